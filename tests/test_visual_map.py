"""Teacher -> student visual-token mapping (``student.visual_map``): overlap and Hungarian weights on grids
whose answers are computed by hand, the relation mapping against a direct loop, and the sparse mixture
against a dense float64 reference on a 12-id vocabulary."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from kd_cache.regions import grid_boxes
from student.visual_map import (
    MixedRows,
    hungarian_weights,
    iou_matrix,
    is_identity,
    map_relation,
    mix_sparse_rows,
    overlap_weights,
)

NAN_BOX = np.full((1, 4), np.nan)


def _sparse_teacher(nt: int, k: int, vocab: int, seed: int):
    """Random normalised teacher rows as a cache stores them: ids [nt, k] (distinct per row), log-probs, exact tail."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(vocab, 0.5), size=nt)
    ids = np.argsort(-p, axis=1)[:, :k]
    lp = np.log(np.take_along_axis(p, ids, axis=1))
    tail = np.log(1.0 - np.exp(lp).sum(axis=1))
    return p, ids, lp, tail


# -- overlap weights ---------------------------------------------------------------------------------

def test_equal_grids_give_the_identity_and_unchanged_outputs():
    boxes = grid_boxes(27, 27)
    A = overlap_weights(boxes, boxes)
    assert A.dtype == np.float64 and A.shape == (729, 729)
    assert is_identity(A) and np.array_equal(A, np.eye(729))
    assert np.array_equal(hungarian_weights(boxes, boxes), np.eye(729))

    R = np.random.default_rng(0).standard_normal((729, 729)).astype(np.float32)
    out = map_relation(A, R)
    assert out is R and np.array_equal(out, R)

    _, ids, lp, tail = _sparse_teacher(729, 8, 50, seed=1)
    ids, lp, tail = ids.astype(np.int32), lp.astype(np.float16), tail.astype(np.float32)
    for k_out in (8, 12):
        mixed = mix_sparse_rows(A, ids, lp, tail, k_out)
        assert isinstance(mixed, MixedRows)
        assert mixed.ids.dtype == np.int64 and mixed.logprobs.dtype == np.float32 and mixed.tail.dtype == np.float32
        assert np.array_equal(mixed.ids, ids) and np.array_equal(mixed.logprobs, lp.astype(np.float32))
        assert np.array_equal(mixed.tail, tail) and mixed.valid.all()


def test_coarse_teacher_each_student_token_takes_one_teacher_token():
    A = overlap_weights(grid_boxes(4, 4), grid_boxes(2, 2))  # student 4x4, teacher 2x2
    assert A.shape == (16, 4)
    # hand-checked: student (row 0, col 0) -> teacher 0, (0, 3) -> 1, (1, 1) -> 0, (2, 2) -> 3, (3, 0) -> 2
    for s, t in [(0, 0), (3, 1), (5, 0), (10, 3), (12, 2)]:
        assert A[s, t] == 1.0
    expected = np.zeros((16, 4))
    for r, c in itertools.product(range(4), range(4)):
        expected[r * 4 + c, (r // 2) * 2 + c // 2] = 1.0
    assert np.array_equal(A, expected)
    assert not is_identity(A)


def test_fine_teacher_each_student_token_shares_four_teacher_tokens():
    A = overlap_weights(grid_boxes(2, 2), grid_boxes(4, 4))  # student 2x2, teacher 4x4
    assert A.shape == (4, 16)
    assert np.array_equal(np.flatnonzero(A[0]), [0, 1, 4, 5])
    assert np.array_equal(np.flatnonzero(A[3]), [10, 11, 14, 15])
    for s in range(4):
        nz = A[s][A[s] > 0]
        assert len(nz) == 4
        np.testing.assert_allclose(nz, 0.25, rtol=1e-12)


def test_fractional_overlaps_match_hand_computed_values():
    A = overlap_weights(grid_boxes(2, 2), grid_boxes(3, 3))  # student 2x2 (cells 1/2), teacher 3x3 (cells 1/3)
    # student cell [0, 1/2]^2 (area 1/4): teacher (0,0) covers [0, 1/3]^2 = 1/9 -> 4/9; (0,1) and (1,0) cover
    # 1/6 x 1/3 = 1/18 -> 2/9; (1,1) covers 1/6 x 1/6 = 1/36 -> 1/9; the shares already sum to 1
    np.testing.assert_allclose(A[0], [4 / 9, 2 / 9, 0, 2 / 9, 1 / 9, 0, 0, 0, 0], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(A[1], [0, 2 / 9, 4 / 9, 0, 1 / 9, 2 / 9, 0, 0, 0], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(A[3], [0, 0, 0, 0, 1 / 9, 2 / 9, 0, 2 / 9, 4 / 9], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(A.sum(axis=1), 1.0, rtol=1e-12)


def test_nan_boxes_give_zero_rows_and_columns():
    student = np.concatenate([NAN_BOX, grid_boxes(2, 2), [[0.3, 0.3, 0.3, 0.6]]])  # CLS, grid, a box with no area
    t_grid = grid_boxes(3, 3)
    teacher = np.concatenate([t_grid[:3], NAN_BOX, t_grid[3:6], NAN_BOX, t_grid[6:]])  # newline after each row
    A = overlap_weights(student, teacher)
    assert A.shape == (6, 11)
    assert not A[0].any() and not A[5].any()
    assert not A[:, 3].any() and not A[:, 7].any()
    t_keep = [i for i in range(11) if i not in (3, 7)]
    assert np.array_equal(A[1:5][:, t_keep], overlap_weights(grid_boxes(2, 2), t_grid))

    H = hungarian_weights(student, teacher)
    assert not H[0].any() and not H[5].any() and not H[:, 3].any() and not H[:, 7].any()
    assert (H[1:5].sum(axis=1) == 1).all()

    mixed = mix_sparse_rows(A, *_sparse_teacher(11, 3, 12, seed=2)[1:], k_out=4)
    assert np.array_equal(mixed.valid, [False, True, True, True, True, False])
    for s in (0, 5):
        assert (mixed.ids[s] == -1).all() and (mixed.logprobs[s] == 0).all() and mixed.tail[s] == 0


def test_teacher_centre_crop_covers_student_border_tokens_in_part():
    # teacher: a 2x2 grid over the centre crop (0.1..0.9); its boundaries are x, y = 0.1, 0.5, 0.9
    # student: a 3x3 grid over the whole image, plus a corner box the crop leaves out entirely
    student = np.concatenate([grid_boxes(3, 3), [[0.0, 0.0, 0.05, 0.05]]])
    A = overlap_weights(student, grid_boxes(2, 2, (0.1, 0.1, 0.9, 0.9)))
    # corners: only part of the box is covered, by one teacher token -> weight 1 on it
    for s, t in [(0, 0), (2, 1), (6, 2), (8, 3)]:
        np.testing.assert_allclose(A[s], np.eye(4)[t], rtol=1e-12)
    # edge middles: covered in part, split at 0.5 between two teacher tokens
    np.testing.assert_allclose(A[1], [0.5, 0.5, 0, 0], rtol=1e-12)
    np.testing.assert_allclose(A[3], [0.5, 0, 0.5, 0], rtol=1e-12)
    np.testing.assert_allclose(A[4], [0.25, 0.25, 0.25, 0.25], rtol=1e-12)
    assert not A[9].any()
    np.testing.assert_allclose(A[:9].sum(axis=1), 1.0, rtol=1e-12)


# -- Hungarian -------------------------------------------------------------------------------------

def test_hungarian_on_a_permuted_teacher_grid_is_the_permutation():
    grid = grid_boxes(4, 4)
    perm = np.random.default_rng(3).permutation(16)
    A = hungarian_weights(grid, grid[perm])  # teacher token t is grid cell perm[t]
    expected = np.zeros((16, 16))
    expected[perm, np.arange(16)] = 1.0
    assert np.array_equal(A, expected)
    assert not is_identity(A)
    assert np.array_equal(overlap_weights(grid, grid[perm]), expected)


def test_hungarian_rectangular():
    # more student tokens than teacher tokens: each teacher token matched once, inside its own cell
    A = hungarian_weights(grid_boxes(4, 4), grid_boxes(2, 2))
    assert A.shape == (16, 4) and set(np.unique(A)) == {0.0, 1.0}
    assert (A.sum(axis=0) == 1).all() and A.sum() == 4
    s_of = np.argmax(A, axis=0)
    for t, s in enumerate(s_of):
        assert ((s // 4) // 2) * 2 + (s % 4) // 2 == t
    # fewer student tokens: each student row one match, inside its quadrant
    A = hungarian_weights(grid_boxes(2, 2), grid_boxes(4, 4))
    assert (A.sum(axis=1) == 1).all() and (A.sum(axis=0) <= 1).all()
    for s, t in enumerate(np.argmax(A, axis=1)):
        assert ((t // 4) // 2) * 2 + (t % 4) // 2 == s


def _random_boxes(rng, n):
    lo = rng.uniform(0, 0.7, size=(n, 2))
    return np.concatenate([lo, lo + rng.uniform(0.1, 0.3, size=(n, 2))], axis=1)


def test_iou_matrix_and_hungarian_against_brute_force():
    rng = np.random.default_rng(4)
    student, teacher = _random_boxes(rng, 5), _random_boxes(rng, 4)
    iou = iou_matrix(student, teacher)
    for s, t in itertools.product(range(5), range(4)):
        a, b = student[s], teacher[t]
        inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        assert iou[s, t] == pytest.approx(inter / union, rel=1e-12)
    best = max(sum(iou[s, t] for t, s in enumerate(rows)) for rows in itertools.permutations(range(5), 4))
    A = hungarian_weights(student, teacher)
    assert (iou * A).sum() == pytest.approx(best, rel=1e-12)
    assert (iou[A > 0] > 0).all()  # pairs with IoU 0 are dropped


def test_is_identity():
    assert is_identity(np.eye(5))
    assert not is_identity(np.eye(5, 6))
    assert not is_identity(np.eye(5)[[1, 0, 2, 3, 4]])
    almost = np.eye(5)
    almost[0, 1] = 1e-300
    assert not is_identity(almost)
    almost = np.eye(5)
    almost[2, 2] = 1 - 1e-16
    assert not is_identity(almost)


# -- relation ----------------------------------------------------------------------------------------

def test_map_relation_against_a_direct_loop():
    A = overlap_weights(np.concatenate([grid_boxes(2, 2), NAN_BOX]), grid_boxes(3, 3))
    R = np.random.default_rng(5).standard_normal((9, 9)).astype(np.float32)  # not symmetric: checks orientation
    out = map_relation(A, R)
    assert out.dtype == np.float32 and out.shape == (5, 5)
    ref = np.zeros((5, 5))
    for i, j, a, b in itertools.product(range(5), range(5), range(9), range(9)):
        ref[i, j] += A[i, a] * float(R[a, b]) * A[j, b]
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-7)
    assert not out[4].any() and not out[:, 4].any()
    with pytest.raises(ValueError, match="Nt = 9"):
        map_relation(A[:, :8], R)


# -- sparse mixture ------------------------------------------------------------------------------------

def _reference_mixture(A, P, ids, k_out):
    """Per student row, from the definition: stored masses {id: mass}, kept (id, mass) list, tail mass; and the
    ids that every contributing row stores."""
    out = []
    for s in range(A.shape[0]):
        rows = [t for t in range(A.shape[1]) if A[s, t] > 0]
        mass, tail = {}, 0.0
        for t in rows:
            stored = [int(i) for i in ids[t] if i >= 0]
            for i in stored:
                mass[i] = mass.get(i, 0.0) + A[s, t] * P[t, i]
            tail += A[s, t] * (1.0 - sum(P[t, i] for i in stored))
        ranked = sorted(mass.items(), key=lambda kv: (-kv[1], kv[0]))
        tail += sum(m for _, m in ranked[k_out:])
        common = set.intersection(*({int(i) for i in ids[t] if i >= 0} for t in rows)) if rows else set()
        out.append((ranked[:k_out], tail, common))
    return out


@pytest.mark.parametrize("k_out", [2, 5, 20])
def test_mix_sparse_rows_against_a_dense_reference(k_out):
    vocab, k = 12, 5
    rng = np.random.default_rng(6)
    student = np.concatenate([grid_boxes(2, 2), NAN_BOX])
    teacher = np.concatenate([grid_boxes(3, 3), NAN_BOX])
    A = overlap_weights(student, teacher)
    nt = len(teacher)
    P = rng.dirichlet(np.full(vocab, 0.7), size=nt)  # dense teacher distributions over 12 ids
    P[:, :3] += 0.3  # ids 0..2 likely everywhere, so many ids are stored by every contributing row
    P /= P.sum(axis=1, keepdims=True)
    ids = np.full((nt, k), -1, dtype=np.int32)
    for t in range(nt):
        n = k if t % 3 else 3  # some rows store fewer ids (-1 padded)
        rest = np.argsort(-P[t, 2:]) if t % 2 else rng.permutation(vocab - 2)  # by mass, or any order
        ids[t, :n] = np.concatenate([[0, 1], rest + 2])[:n]  # ids 0 and 1 stored by every row
    lp = np.where(ids >= 0, np.log(np.take_along_axis(P, np.maximum(ids, 0), axis=1)), 7.0)  # padding: junk
    tail = np.log1p(-np.where(ids >= 0, np.exp(lp), 0.0).sum(axis=1))

    mixed = mix_sparse_rows(A, ids, lp, tail, k_out)
    assert mixed.ids.shape == (5, k_out) and mixed.logprobs.shape == (5, k_out) and mixed.tail.shape == (5,)
    assert np.array_equal(mixed.valid, [True, True, True, True, False])
    dense = A @ P  # the exact mixture
    checked = 0
    for s, (kept, tail_mass, common) in enumerate(_reference_mixture(A, P, ids, k_out)):
        if not mixed.valid[s]:
            assert (mixed.ids[s] == -1).all() and (mixed.logprobs[s] == 0).all() and mixed.tail[s] == 0
            continue
        n = len(kept)
        assert mixed.ids[s, :n].tolist() == [i for i, _ in kept]
        assert (mixed.ids[s, n:] == -1).all() and (mixed.logprobs[s, n:] == 0).all()
        got = np.exp(mixed.logprobs[s, :n].astype(np.float64))
        np.testing.assert_allclose(got, [m for _, m in kept], rtol=1e-6)
        for j, i in enumerate(mixed.ids[s, :n]):
            if i in common:  # every contributing row stored it: the stored mass is the mixture's own
                assert got[j] == pytest.approx(dense[s, i], rel=1e-6)
                checked += 1
        assert np.exp(np.float64(mixed.tail[s])) == pytest.approx(tail_mass, rel=1e-6)
        assert got.sum() + np.exp(np.float64(mixed.tail[s])) == pytest.approx(1.0, abs=1e-6)
    assert checked >= 4


def test_mix_sparse_rows_keeps_the_dense_top_ids_when_rows_store_the_same_ids():
    vocab, k, k_out = 12, 4, 3
    rng = np.random.default_rng(7)
    P = rng.uniform(0.0, 0.5, size=(9, vocab))
    P[:, 4:8] += rng.uniform(1.0, 3.0, size=(9, 4))  # ids 4..7 are every row's top 4
    P /= P.sum(axis=1, keepdims=True)
    ids = np.argsort(-P, axis=1)[:, :k]
    assert (np.sort(ids, axis=1) == np.arange(4, 8)).all()
    lp = np.log(np.take_along_axis(P, ids, axis=1))
    tail = np.log(P.sum(axis=1) - np.exp(lp).sum(axis=1))
    A = overlap_weights(grid_boxes(2, 2), grid_boxes(3, 3))
    mixed = mix_sparse_rows(A, ids, lp, tail, k_out)
    dense = A @ P
    for s in range(4):
        top = sorted(range(vocab), key=lambda i: (-dense[s, i], i))[:k_out]
        assert mixed.ids[s].tolist() == top
        np.testing.assert_allclose(np.exp(mixed.logprobs[s].astype(np.float64)), dense[s, top], rtol=1e-6)
        assert np.exp(np.float64(mixed.tail[s])) == pytest.approx(1.0 - dense[s, top].sum(), rel=1e-6)


def test_identity_with_fewer_ids_out_truncates_to_the_top():
    _, ids, lp, tail = _sparse_teacher(6, 5, 12, seed=8)
    mixed = mix_sparse_rows(np.eye(6), ids, lp, tail, 3)
    assert np.array_equal(mixed.ids, ids[:, :3])  # the rows are already sorted by mass
    np.testing.assert_allclose(mixed.logprobs, lp[:, :3], rtol=1e-6)
    np.testing.assert_allclose(np.exp(mixed.tail.astype(np.float64)), np.exp(tail) + np.exp(lp[:, 3:]).sum(axis=1),
                               rtol=1e-6)


def test_mix_sparse_rows_refuses_bad_inputs():
    _, ids, lp, tail = _sparse_teacher(4, 3, 12, seed=9)
    A = np.full((2, 4), 0.3)
    with pytest.raises(ValueError, match="sums to"):
        mix_sparse_rows(A, ids, lp, tail, 3)
    with pytest.raises(ValueError, match="Nt = 4"):
        mix_sparse_rows(np.eye(3), ids, lp, tail, 3)
    with pytest.raises(ValueError, match="tail"):
        mix_sparse_rows(np.eye(4), ids, lp, tail[:3], 3)


def test_realistic_sizes_run():
    # SigLIP-384 27x27 student vs CLIP-336 24x24 teacher, K = 64 over a 32k vocabulary
    student, teacher = grid_boxes(27, 27), grid_boxes(24, 24)
    A = overlap_weights(student, teacher)
    assert A.shape == (729, 576)
    np.testing.assert_allclose(A.sum(axis=1), 1.0, rtol=1e-12)
    assert (np.count_nonzero(A, axis=1) <= 4).all()
    H = hungarian_weights(student, teacher)
    assert H.sum() == 576
    rng = np.random.default_rng(10)
    R = rng.standard_normal((576, 576)).astype(np.float32)
    assert map_relation(A, R).shape == (729, 729)
    k = 64
    ids = np.stack([rng.choice(32000, k, replace=False) for _ in range(576)]).astype(np.int32)
    logits = rng.standard_normal((576, k + 1))
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    mixed = mix_sparse_rows(A, ids, logp[:, :k].astype(np.float16), logp[:, k].astype(np.float32), k)
    assert mixed.ids.shape == (729, k) and mixed.valid.all()
    total = np.exp(mixed.logprobs.astype(np.float64)).sum(axis=1) + np.exp(mixed.tail.astype(np.float64))
    np.testing.assert_allclose(total, 1.0, atol=2e-3)  # fp16 teacher log-probs: their rows sum to 1 +- 1e-3


def test_equal_masses_keep_the_smaller_id_first():
    lp = np.log([[0.3, 0.3, 0.1]])
    for k_out, expected in [(1, [2]), (2, [2, 5])]:
        mixed = mix_sparse_rows(np.eye(1), np.array([[5, 2, 9]]), lp, np.log([0.3]), k_out)
        assert mixed.ids[0].tolist() == expected
    # two teacher rows, half each: id 7 from one, id 3 from the other, 0.2 of the mixture each
    A = np.array([[0.5, 0.5]])
    mixed = mix_sparse_rows(A, np.array([[7], [3]]), np.log([[0.4], [0.4]]), np.log([0.6, 0.6]), 2)
    assert mixed.ids[0].tolist() == [3, 7]
    np.testing.assert_allclose(np.exp(mixed.logprobs[0]), [0.2, 0.2], rtol=1e-6)


def test_hungarian_drops_pairs_without_overlap():
    # students 0 and 1 overlap teacher 0 only; the assignment must pair one of them with a teacher token it does
    # not touch, and that pair is dropped
    corner, far = [0.0, 0.0, 0.2, 0.2], [0.5, 0.5, 1.0, 1.0]
    A = hungarian_weights(np.array([corner, corner, far]), np.array([corner, far, [0.6, 0.6, 1.0, 1.0]]))
    assert A.sum() == 2 and A[:2, 0].sum() == 1 and A[2, 1] == 1
