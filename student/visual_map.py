"""Teacher visual tokens -> student visual tokens, by the part of the image they cover. A library: the
trainer does not call it yet.

A teacher and a student of different families cut the same image into different visual tokens (another
patch size, grid, crop, tiling, thumbnail view). ``kd_cache.regions.image_regions`` gives each visual token
the box ``(x0, y0, x1, y1)`` of the original image it covers, normalised to ``[0, 1]`` (a row of NaN: the
token covers nothing, e.g. an image-newline or CLS feature). A mapping matrix ``A`` [Ns, Nt] says how much
of each teacher token a student token takes:

* ``overlap_weights``: ``A[s, t]`` = the share of student box ``s`` that teacher box ``t`` covers, each row
  normalised over what is covered (soft, many to many);
* ``hungarian_weights``: a one-to-one 0/1 matching of maximal total IoU (EM-KD's matching).

Both give the identity when the two sides' boxes are the same grid, and the users of ``A`` then return their
inputs unchanged (``is_identity``), so a same-layout pair keeps today's behaviour bit for bit:

* ``map_relation``: a teacher relation matrix ``R_t`` [Nt, Nt] -> ``A R_t A^T`` [Ns, Ns];
* ``mix_sparse_rows``: the teacher's sparse per-token distributions (ids, log-probs, tail; ``kd_cache.schema``)
  -> one mixture ``sum_t A[s, t] p_t`` per student token, sparse again.

Everything is numpy, float64 inside. A row of ``A`` that is all zero (a student token no teacher token
covers) carries no teacher knowledge: ``MixedRows.valid`` is False there and the caller must give that row
no loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_CHUNK = 512  # student rows per block of the dense [rows, Nt] overlap computation


def _check_boxes(name: str, boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name} must be [N, 4] boxes (x0, y0, x1, y1), found shape {boxes.shape}")
    return boxes


def _usable(boxes: np.ndarray) -> np.ndarray:
    """[N] bool: boxes with no NaN and a positive area (the others cover nothing)."""
    finite = np.isfinite(boxes).all(axis=1)
    with np.errstate(invalid="ignore"):
        return finite & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


def _intersections(s: np.ndarray, t: np.ndarray) -> np.ndarray:
    """[n, m] area of ``s[i] ∩ t[j]`` for finite boxes ``s`` [n, 4], ``t`` [m, 4]."""
    w = np.minimum(s[:, None, 2], t[None, :, 2]) - np.maximum(s[:, None, 0], t[None, :, 0])
    h = np.minimum(s[:, None, 3], t[None, :, 3]) - np.maximum(s[:, None, 1], t[None, :, 1])
    return np.clip(w, 0.0, None) * np.clip(h, 0.0, None)


def _area(b: np.ndarray) -> np.ndarray:
    return (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])


def overlap_weights(student_boxes: np.ndarray, teacher_boxes: np.ndarray) -> np.ndarray:
    """Soft mapping by area: float64 ``A`` [Ns, Nt] from ``student_boxes`` [Ns, 4] and ``teacher_boxes`` [Nt, 4].

    ``A[s, t] = area(box_s ∩ box_t) / area(box_s)``, then each row normalised to sum 1, i.e.
    ``area(box_s ∩ box_t) / sum_t' area(box_s ∩ box_t')``: a student token that the teacher's tokens cover
    only in part (the teacher's view is a centre crop) is shared among the tokens that cover it. Where teacher
    boxes overlap each other (tiles plus a thumbnail of the whole image), a student token is shared among all
    the views that cover it, in proportion to area.

    A student row is all zero when its box is NaN, has no area, or no teacher box overlaps it; a NaN teacher
    box is an all-zero column. Equal boxes on both sides (the same grid) give exactly the identity.
    Dense over [Ns, Nt], computed in blocks of student rows.
    """
    def shares(inter: np.ndarray, s_use: np.ndarray, t_use: np.ndarray) -> np.ndarray:
        total = inter.sum(axis=1, keepdims=True)
        return np.divide(inter, total, out=inter, where=total > 0)

    return _pairwise(student_boxes, teacher_boxes, shares)


def _pairwise(student_boxes: np.ndarray, teacher_boxes: np.ndarray, block) -> np.ndarray:
    """float64 [Ns, Nt]: ``block(intersections, student boxes, teacher boxes)`` over the usable boxes of both
    sides, in blocks of student rows; 0 wherever either box is NaN or has no area."""
    s_boxes, t_boxes = _check_boxes("student_boxes", student_boxes), _check_boxes("teacher_boxes", teacher_boxes)
    out = np.zeros((len(s_boxes), len(t_boxes)), dtype=np.float64)
    s_idx, t_idx = np.flatnonzero(_usable(s_boxes)), np.flatnonzero(_usable(t_boxes))
    if not len(s_idx) or not len(t_idx):
        return out
    t_use = t_boxes[t_idx]
    for a in range(0, len(s_idx), _CHUNK):
        rows = s_idx[a:a + _CHUNK]
        out[np.ix_(rows, t_idx)] = block(_intersections(s_boxes[rows], t_use), s_boxes[rows], t_use)
    return out


def iou_matrix(student_boxes: np.ndarray, teacher_boxes: np.ndarray) -> np.ndarray:
    """float64 [Ns, Nt] intersection over union of every student box with every teacher box (0 where either
    box is NaN or has no area)."""
    def iou(inter: np.ndarray, s_use: np.ndarray, t_use: np.ndarray) -> np.ndarray:
        return inter / (_area(s_use)[:, None] + _area(t_use)[None, :] - inter)

    return _pairwise(student_boxes, teacher_boxes, iou)


def hungarian_weights(student_boxes: np.ndarray, teacher_boxes: np.ndarray) -> np.ndarray:
    """One-to-one mapping: float64 0/1 ``A`` [Ns, Nt] from ``student_boxes`` [Ns, 4] and ``teacher_boxes`` [Nt, 4].

    EM-KD matches visual tokens one to one with the Hungarian algorithm; here the matching maximises the total
    IoU of the matched boxes (``scipy.optimize.linear_sum_assignment`` on ``iou_matrix``, ``maximize=True``).
    Matched pairs whose IoU is 0 are dropped, so a row with no match (more student tokens than teacher tokens,
    a NaN box, no overlap) is all zero and a column holds at most one 1. Equal grids give the identity, a
    permuted teacher grid the permutation.

    A dense assignment over the boxes that overlap anything: cubic in their number at worst (grids of ~3000
    tokens a side take well under a second).
    """
    from scipy.optimize import linear_sum_assignment

    iou = iou_matrix(student_boxes, teacher_boxes)
    out = np.zeros_like(iou)
    rows, cols = np.flatnonzero(iou.any(axis=1)), np.flatnonzero(iou.any(axis=0))
    if not len(rows):
        return out
    r, c = linear_sum_assignment(iou[np.ix_(rows, cols)], maximize=True)
    r, c = rows[r], cols[c]
    keep = iou[r, c] > 0
    out[r[keep], c[keep]] = 1.0
    return out


def is_identity(A: np.ndarray) -> bool:
    """Whether ``A`` is square and exactly the identity matrix."""
    A = np.asarray(A)
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        return False
    return bool(np.count_nonzero(A) == A.shape[0] and (np.diagonal(A) == 1).all())


def _check_weights(A: np.ndarray, nt: int, what: str) -> np.ndarray:
    A = np.asarray(A, dtype=np.float64)
    if A.ndim != 2 or A.shape[1] != nt:
        raise ValueError(f"the mapping must be [Ns, Nt] with Nt = {nt} teacher tokens ({what}), found shape "
                         f"{A.shape}")
    return A


def map_relation(A: np.ndarray, R_t: np.ndarray) -> np.ndarray:
    """A teacher relation matrix ``R_t`` [Nt, Nt] on the student's tokens: float32 ``A @ R_t @ A.T`` [Ns, Ns],
    computed in float64 (``A`` [Ns, Nt] used as a sparse matrix).

    When ``is_identity(A)`` it returns ``R_t`` itself, unchanged (same object, same dtype). The result is not
    renormalised: a caller that stores ``R / ||R||_F`` divides again.
    """
    R_t = np.asarray(R_t)
    if R_t.ndim != 2 or R_t.shape[0] != R_t.shape[1]:
        raise ValueError(f"the teacher relation matrix must be square [Nt, Nt], found shape {R_t.shape}")
    A = _check_weights(A, R_t.shape[0], "the relation matrix's size")
    if is_identity(A):
        return R_t
    from scipy.sparse import csr_matrix

    As = csr_matrix(A)
    B = As @ R_t.astype(np.float64)  # A R  [Ns, Nt]
    return np.asarray((As @ B.T).T, dtype=np.float32)  # (A (A R)^T)^T = A R A^T


@dataclass(frozen=True)
class MixedRows:
    """Sparse per-student-token distributions (``mix_sparse_rows``), ``Ns`` rows.

    ids: int64 [Ns, k] stored ids, by decreasing mass (ties: smaller id first), padded with -1.
    logprobs: float32 [Ns, k] log mass of each id (0 at padding). tail: float32 [Ns] log of the mass outside
    the stored ids. valid: bool [Ns], False for a row no teacher token maps to (its ids are all -1, logprobs 0
    and tail 0, i.e. log 1, a placeholder): the caller must give such a row no loss.
    """

    ids: np.ndarray
    logprobs: np.ndarray
    tail: np.ndarray
    valid: np.ndarray


def mix_sparse_rows(A: np.ndarray, ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray, k_out: int) -> MixedRows:
    """The teacher's sparse distributions mixed onto the student's tokens.

    A: [Ns, Nt] weights (``overlap_weights`` / ``hungarian_weights``; a nonzero row must sum to 1).
    ids: [Nt, K] integer ids of each teacher row, padded with -1, distinct within a row. logprobs: [Nt, K] their
    log-probs (ignored at padding). tail: [Nt] log of each teacher row's mass outside its ids. k_out: how many
    ids each student row keeps.

    Student row ``s`` is the mixture ``q_s = sum_t A[s, t] p_t``. For each id in the union of the stored ids of
    the rows with ``A[s, t] > 0``, its stored mass is ``sum over those rows t that store it of A[s, t] p_t(id)``;
    a row that does not store the id has its mass for it inside its tail, so it adds to the mixed tail
    ``sum_t A[s, t] exp(tail_t)`` instead. The ``k_out`` largest masses are kept (ties: smaller id first); the
    dropped ids' mass also goes to the tail, so ``sum(exp(logprobs)) + exp(tail) = 1`` (float error) when the
    teacher rows sum to 1. The tail is summed from parts, never taken as ``1 - stored``, so a small tail keeps
    its precision (it is ``-inf`` only when every part is 0).

    Returns ``MixedRows`` with ids [Ns, k_out]. When ``is_identity(A)`` and ``k_out >= K`` the inputs come back
    unchanged (ids as int64, logprobs and tail as float32, width K, the same values) and every row is valid.
    """
    ids, logprobs, tail = np.asarray(ids), np.asarray(logprobs), np.asarray(tail)
    if ids.ndim != 2 or logprobs.shape != ids.shape or tail.shape != ids.shape[:1]:
        raise ValueError(f"teacher rows must be ids [Nt, K], logprobs [Nt, K] and tail [Nt]; found ids {ids.shape}, "
                         f"logprobs {logprobs.shape}, tail {tail.shape}")
    if k_out < 0:
        raise ValueError(f"k_out must be >= 0, found {k_out}")
    nt, k = ids.shape
    A = _check_weights(A, nt, "the teacher rows")
    ns = A.shape[0]
    if is_identity(A) and k_out >= k:
        return MixedRows(ids.astype(np.int64), logprobs.astype(np.float32), tail.astype(np.float32),
                         np.ones(ns, dtype=bool))
    sums = A.sum(axis=1)
    valid = sums > 0
    if not np.allclose(sums[valid], 1.0, rtol=0, atol=1e-6):
        bad = int(np.flatnonzero(valid & ~np.isclose(sums, 1.0, rtol=0, atol=1e-6))[0])
        raise ValueError(f"row {bad} of the mapping sums to {sums[bad]!r}; each nonzero row must sum to 1 "
                         "(build it with overlap_weights or hungarian_weights)")

    s_of, t_of = np.nonzero(A)  # the (student, teacher) pairs with weight, by student row
    w = A[s_of, t_of]
    tail_mass = np.bincount(s_of, weights=w * np.exp(tail[t_of].astype(np.float64)), minlength=ns)

    # (student row, id, mass) for every stored id of every contributing teacher row, then summed per (row, id)
    pair_ids = ids[t_of].astype(np.int64)
    stored = pair_ids >= 0
    mass = (w[:, None] * np.exp(logprobs[t_of].astype(np.float64)))[stored]
    row = np.broadcast_to(s_of[:, None], pair_ids.shape)[stored]
    vid = pair_ids[stored]
    vocab = int(vid.max()) + 1 if len(vid) else 1
    key, inverse = np.unique(row * vocab + vid, return_inverse=True)
    g_mass = np.bincount(inverse.ravel(), weights=mass, minlength=len(key))
    g_row, g_id = key // vocab, key % vocab

    # rank within each row: by decreasing mass, then increasing id
    order = np.lexsort((g_id, -g_mass, g_row))
    g_row, g_id, g_mass = g_row[order], g_id[order], g_mass[order]
    first = np.searchsorted(g_row, np.arange(ns))  # where each row's run starts
    rank = np.arange(len(g_row)) - first[g_row]
    kept = rank < k_out
    tail_mass += np.bincount(g_row[~kept], weights=g_mass[~kept], minlength=ns)

    out_ids = np.full((ns, k_out), -1, dtype=np.int64)
    out_lp = np.zeros((ns, k_out), dtype=np.float32)
    out_ids[g_row[kept], rank[kept]] = g_id[kept]
    with np.errstate(divide="ignore"):  # a mass that underflows to 0 is log 0 = -inf
        out_lp[g_row[kept], rank[kept]] = np.log(g_mass[kept])
        out_tail = np.where(valid, np.log(tail_mass), 0.0).astype(np.float32)
    return MixedRows(out_ids, out_lp, out_tail, valid)
