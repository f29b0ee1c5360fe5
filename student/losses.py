"""Distillation losses: small pure functions over flattened positions.

Notation used in every docstring:

- ``P``: positions (batch x sequence, flattened and already selected by a mask);
- ``V``: vocabulary size; ``K``: teacher ids stored per position; ``d``: hidden size;
- ``N``: visual tokens of one image;
- ``p``: the teacher distribution, ``q``: the student distribution.

Conventions:

- Forward KL is ``KL(p || q) = sum p (log p - log q)`` (mass covering); reverse KL is ``KL(q || p)``.
  Each function returns the quantity it is named after, so identical distributions give 0.
- Generalised JSD follows TRL's ``generalized_jsd_loss`` (GKD, arXiv 2306.13649, Eq. 1)::

      m = beta * p + (1 - beta) * q
      JSD_beta = beta * KL(p || m) + (1 - beta) * KL(q || m)

  ``beta = 0`` returns forward KL and ``beta = 1`` returns reverse KL exactly (as TRL does; the
  formula itself is 0 at both ends, and ``JSD_beta / beta -> KL(p||q)`` as ``beta -> 0``).
  ``beta = 0.5`` is the symmetric Jensen-Shannon divergence.
- Skew KL is ``KL(p || a p + (1 - a) q)`` with ``a = skew_alpha`` (``a = 0`` is forward KL).
- Total variation is ``0.5 * sum |p - q|`` (in [0, 1]).
- Inputs of any float dtype are upcast to at least float32 inside; float64 stays float64 (handy
  for gradcheck).
- Log-probabilities of every bin are floored at ``LOG_PROB_FLOOR`` (-100, i.e. p ~ 4e-44) so that a
  bin that one side gives zero mass (e.g. a teacher tail stored as ``-inf`` because the stored ids
  cover the whole vocabulary) gives a finite loss and finite gradients instead of ``inf``/``NaN``.
  This only changes results for probabilities below ~1e-43.
- Z-score (``zscore=True``, logit standardisation, LLaVADI's logit option) on a *sparse* teacher is
  computed over the stored ids only: the teacher's stored log-probs and the student's logits at
  those ids are each standardised over the row's k ids (z-scoring is shift invariant, so log-probs
  stand in for the teacher's logits exactly), and the divergence compares the two softmaxes over
  those k bins (no tail bin). That is exactly the dense z-score divergence when the ids cover the
  vocabulary, and otherwise the z-score divergence of both models restricted to the teacher's
  top-k vocabulary: the full-vocabulary mean and std of the teacher's logits are not in the cache.
- Losses return per-position values, or sums and counts; turn them into means once, with the
  global count of valid positions (all micro-batches, all ranks), via ``normalise(sum, count)``.
  Empty inputs give 0, guarded with ``clamp_min(1)``, never with a Python branch on a tensor.
"""

from __future__ import annotations

import functools
import math
from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint as _checkpoint

__all__ = [
    "LOG_PROB_FLOOR",
    "Divergence",
    "HiddenLoss",
    "SparseMode",
    "affinity_loss",
    "affinity_matrix",
    "ce_reference",
    "chunked_distill",
    "dense_divergence",
    "head_gram",
    "hidden_alignment",
    "normalise",
    "rdist",
    "relation_from_hidden",
    "relation_from_logits",
    "sparse_divergence",
    "teacher_row_mask",
    "zscore_logits",
]

LOG_PROB_FLOOR = -100.0
IGNORE_INDEX = -100


class Divergence(str, Enum):
    """Which divergence between teacher ``p`` and student ``q`` (see the module docstring)."""

    FKL = "fkl"  # forward KL(p || q)
    RKL = "rkl"  # reverse KL(q || p)
    JSD = "jsd"  # generalised JSD(beta), TRL convention
    TVD = "tvd"  # total variation 0.5 * sum |p - q|
    SKL = "skl"  # skew KL(p || a p + (1 - a) q)


class SparseMode(str, Enum):
    """How a sparse teacher distribution is compared with the student's full one."""

    TAIL = "tail"  # k stored ids + one "everything else" bin, for both sides
    RENORM = "renorm"  # both renormalised over the stored ids
    SAMPLE = "sample"  # random-sampling KD: needs counts, forward KL only


class HiddenLoss(str, Enum):
    """How projected student hidden states are compared with the teacher's (``hidden_alignment``)."""

    MSE = "mse"  # mean over features of the squared difference
    COSINE = "cosine"  # 1 - cosine similarity


def _as_divergence(divergence: str | Divergence) -> Divergence:
    try:
        return Divergence(divergence)
    except ValueError:
        choices = ", ".join(repr(d.value) for d in Divergence)
        raise ValueError(f"divergence {divergence!r} not understood: expected one of {choices}") from None


def _as_mode(mode: str | SparseMode) -> SparseMode:
    try:
        return SparseMode(mode)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in SparseMode)
        raise ValueError(f"sparse mode {mode!r} not understood: expected one of {choices}") from None


def _check_options(jsd_beta: float, skew_alpha: float, temperature: float) -> None:
    if not 0.0 <= jsd_beta <= 1.0:
        raise ValueError(f"jsd_beta must lie in [0, 1] (0 = forward KL, 1 = reverse KL), got {jsd_beta}")
    if not 0.0 <= skew_alpha < 1.0:
        raise ValueError(f"skew_alpha must lie in [0, 1) (0 = forward KL), got {skew_alpha}")
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _up(x: Tensor) -> Tensor:
    """Upcast to at least float32 (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _masked_log_softmax(x: Tensor, mask: Tensor) -> Tensor:
    """log-softmax of ``x`` [P, B] over the bins where ``mask`` [P, B] is True.

    Masked bins get a finite fill (never -inf), so an all-masked row yields finite garbage rather
    than NaN; callers mask those bins/rows out afterwards.
    """
    x = x.masked_fill(~mask, torch.finfo(x.dtype).min)
    return x - x.logsumexp(-1, keepdim=True)


def _bin_divergence(
    log_p: Tensor, log_q: Tensor, mask: Tensor, divergence: Divergence, jsd_beta: float, skew_alpha: float
) -> Tensor:
    """Divergence between two distributions over B bins.

    log_p, log_q: [P, B] log-probabilities (teacher, student); mask: [P, B] bool, bins to use.
    Returns [P]. Masked bins contribute exactly 0 (their inputs may be NaN or -inf).
    """
    # Double-where: sanitise masked entries *before* any arithmetic so their gradients stay finite.
    log_p = torch.where(mask, log_p.clamp_min(LOG_PROB_FLOOR), 0.0)
    log_q = torch.where(mask, log_q.clamp_min(LOG_PROB_FLOOR), 0.0)
    p, q = log_p.exp(), log_q.exp()
    if divergence is Divergence.JSD and jsd_beta == 0.0:
        divergence = Divergence.FKL
    elif divergence is Divergence.JSD and jsd_beta == 1.0:
        divergence = Divergence.RKL
    elif divergence is Divergence.SKL and skew_alpha == 0.0:
        divergence = Divergence.FKL

    if divergence is Divergence.FKL:
        terms = p * (log_p - log_q)
    elif divergence is Divergence.RKL:
        terms = q * (log_q - log_p)
    elif divergence is Divergence.JSD:
        b = jsd_beta
        log_m = torch.logaddexp(log_p + math.log(b), log_q + math.log1p(-b))
        terms = b * p * (log_p - log_m) + (1.0 - b) * q * (log_q - log_m)
    elif divergence is Divergence.TVD:
        terms = 0.5 * (p - q).abs()
    elif divergence is Divergence.SKL:
        a = skew_alpha
        log_m = torch.logaddexp(log_p + math.log(a), log_q + math.log1p(-a))
        terms = p * (log_p - log_m)
    else:  # pragma: no cover - _as_divergence rejects anything else
        raise ValueError(f"unknown divergence {divergence!r}")
    return torch.where(mask, terms, 0.0).sum(-1)


def zscore_logits(logits: Tensor, eps: float = 1e-6) -> Tensor:
    """Standardise each row of logits [..., V] to zero mean, unit std (logit standardisation).

    Returns float32 (or float64) [..., V]. A constant row maps to zeros (std guarded by ``eps``).
    """
    z = _up(logits)
    mean = z.mean(-1, keepdim=True)
    std = z.std(-1, keepdim=True, correction=0)
    return (z - mean) / std.clamp_min(eps)


def _masked_zscore(x: Tensor, mask: Tensor, eps: float = 1e-6) -> Tensor:
    """Standardise ``x`` [P, K] over the entries where ``mask`` [P, K] is True (population std).

    Masked entries come out as 0; a row with one (or no) valid entry, or a constant row, gives
    zeros. The variance is floored *before* the square root, so its gradient stays finite.
    """
    n = mask.sum(-1, keepdim=True).clamp_min(1).to(x.dtype)
    mean = torch.where(mask, x, 0.0).sum(-1, keepdim=True) / n
    dev = torch.where(mask, x - mean, 0.0)
    var = dev.pow(2).sum(-1, keepdim=True) / n
    return dev / var.clamp_min(eps * eps).sqrt()


def _student_logits(logits: Tensor, temperature: float, zscore: bool) -> Tensor:
    z = _up(logits)
    if zscore:
        z = zscore_logits(z)
    if temperature != 1.0:
        z = z / temperature
    return z


def teacher_row_mask(teacher_ids: Tensor) -> Tensor:
    """[P, K] teacher ids padded with -1 -> [P] bool, True where at least one id is stored."""
    return (teacher_ids >= 0).any(-1)


def dense_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    divergence: str | Divergence = "fkl",
    jsd_beta: float = 0.5,
    skew_alpha: float = 0.1,
    temperature: float = 1.0,
    zscore: bool = False,
) -> Tensor:
    """Full-vocabulary divergence (the reference the sparse paths are tested against).

    student_logits, teacher_logits: [P, V], any float dtype. ``temperature`` divides both (after
    ``zscore_logits`` on both when ``zscore``). Returns [P] (float32 or float64).
    """
    div = _as_divergence(divergence)
    _check_options(jsd_beta, skew_alpha, temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "must have the same shape [P, V]"
        )
    log_q = _student_logits(student_logits, temperature, zscore).log_softmax(-1)
    log_p = _student_logits(teacher_logits, temperature, zscore).log_softmax(-1)
    mask = torch.ones_like(log_q, dtype=torch.bool)
    return _bin_divergence(log_p, log_q.to(log_p.dtype), mask, div, jsd_beta, skew_alpha)


def _tail_fill(ids: Tensor, valid: Tensor) -> Tensor:
    """Stored ids [P, K] with padding pointed at the row's largest id (a stored one whenever the row has
    any), so a scatter over them marks exactly the stored ids."""
    row_max = ids.max(-1, keepdim=True).values if ids.shape[-1] else ids
    return torch.where(valid, ids, row_max).clamp_min(0)


def _needs_tail(mode: SparseMode, zscore: bool) -> bool:
    return mode is SparseMode.TAIL and not zscore


def _sparse_from_logq(
    log_q_all: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor | None,
    teacher_tail: Tensor | None,
    counts: Tensor | None,
    div: Divergence,
    mode: SparseMode,
    jsd_beta: float,
    skew_alpha: float,
    zscore: bool = False,
    temperature: float = 1.0,
    logp_mean: Tensor | None = None,
) -> Tensor:
    """``sparse_divergence`` given the student's full log-softmax [P, V]; returns [P].

    With ``zscore`` the first argument may be the raw logits (only differences within a row are
    used) and ``temperature`` divides both standardised sides; otherwise the caller has already
    applied any temperature to ``log_q_all``. In sample mode ``logp_mean`` [P] replaces the
    teacher's per-entry log-probs (which may then be None).
    """
    ids = teacher_ids.long()
    s_lp = log_q_all.gather(-1, ids.clamp_min(0))  # [P, K]
    s_tail = None
    if _needs_tail(mode, zscore):
        # Student tail bin: log(1 - sum_K q) as a logsumexp over the ids *not* stored, which stays
        # exact when sum_K q is close to 1 (log1p(-exp(.)) would not).
        stored = torch.zeros_like(log_q_all, dtype=torch.bool).scatter_(-1, _tail_fill(ids, ids >= 0), True)
        s_tail = log_q_all.masked_fill(stored, torch.finfo(log_q_all.dtype).min).logsumexp(-1)
    return _sparse_from_bins(s_lp, s_tail, ids, teacher_logprobs, teacher_tail, counts, div, mode, jsd_beta,
                             skew_alpha, zscore, temperature, logp_mean)


def _sparse_from_bins(
    s_lp: Tensor,
    s_tail: Tensor | None,
    ids: Tensor,
    teacher_logprobs: Tensor | None,
    teacher_tail: Tensor | None,
    counts: Tensor | None,
    div: Divergence,
    mode: SparseMode,
    jsd_beta: float,
    skew_alpha: float,
    zscore: bool,
    temperature: float,
    logp_mean: Tensor | None,
) -> Tensor:
    """The sparse divergence [P] from the student's log-probs at the stored ids ``s_lp`` [P, K] and, in
    tail mode, its tail bin ``s_tail`` [P]: everything the sparse losses read of the student."""
    valid = ids >= 0  # [P, K]
    rows = valid.any(-1)  # [P]
    dtype = s_lp.dtype
    if mode is SparseMode.SAMPLE and not zscore:
        # sum_i (c_i / N)(log p_i - log q_i): E[c_i / N] = p_i, so this is unbiased for KL(p || q).
        # The teacher half, sum_i (c_i / N) log p_i, is one number per row (the cache's logp_mean).
        c = torch.where(valid, _up(counts), 0.0).to(dtype)
        w = c / c.sum(-1, keepdim=True).clamp_min(1)
        student = torch.where(valid, w * s_lp.clamp_min(LOG_PROB_FLOOR), 0.0).sum(-1)
        if logp_mean is not None:
            teacher = _up(logp_mean).to(dtype)
        else:
            t_lp = _up(teacher_logprobs).to(dtype).clamp_min(LOG_PROB_FLOOR)
            teacher = torch.where(valid, w * t_lp, 0.0).sum(-1)
        return torch.where(rows, teacher - student, 0.0)
    t_lp = torch.where(valid, _up(teacher_logprobs), 0.0).to(dtype)

    if zscore:
        # Standardise both sides over the stored ids (see the module docstring), compare over them.
        z_t = _masked_zscore(t_lp.clamp_min(LOG_PROB_FLOOR), valid) / temperature
        z_s = _masked_zscore(s_lp, valid) / temperature
        log_p = _masked_log_softmax(z_t, valid)
        log_q = _masked_log_softmax(z_s, valid)
        per = _bin_divergence(log_p, log_q, valid, div, jsd_beta, skew_alpha)
    elif mode is SparseMode.RENORM:
        log_p = _masked_log_softmax(t_lp, valid)
        log_q = _masked_log_softmax(s_lp, valid)
        per = _bin_divergence(log_p, log_q, valid, div, jsd_beta, skew_alpha)
    else:
        t_tail = torch.where(rows, _up(teacher_tail).to(dtype), 0.0)
        mask = torch.cat([valid, torch.ones_like(rows)[:, None]], -1)  # [P, K + 1]
        log_p = torch.cat([t_lp, t_tail[:, None]], -1).clamp_min(LOG_PROB_FLOOR)
        log_q = torch.cat([s_lp, s_tail[:, None]], -1)
        # The stored teacher bins sum to 1 up to the rounding of (fp16) log-probs: renormalise.
        log_p = _masked_log_softmax(log_p, mask)
        per = _bin_divergence(log_p, log_q, mask, div, jsd_beta, skew_alpha)
    return torch.where(rows, per, 0.0)


def _check_sparse(
    student_logits: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor | None,
    teacher_tail: Tensor | None,
    counts: Tensor | None,
    div: Divergence,
    mode: SparseMode,
    zscore: bool = False,
    logp_mean: Tensor | None = None,
) -> SparseMode:
    if student_logits.ndim != 2:
        raise ValueError(f"student logits must be [P, V], found shape {tuple(student_logits.shape)}")
    P = student_logits.shape[0]
    sampled = counts is not None or mode is SparseMode.SAMPLE
    if teacher_ids.ndim != 2 or teacher_ids.shape[0] != P:
        raise ValueError(f"teacher ids must be [P, K] with P = {P} (the student logits' rows), found shape "
                         f"{tuple(teacher_ids.shape)}")
    if teacher_logprobs is None:
        if not (sampled and logp_mean is not None):
            raise ValueError("teacher log-probs [P, K] are required, except for sampled ids (counts given) with "
                             "their logp_mean [P]")
    elif teacher_logprobs.shape != teacher_ids.shape:
        raise ValueError(
            f"teacher ids {tuple(teacher_ids.shape)} and log-probs {tuple(teacher_logprobs.shape)} must both "
            f"be [P, K] with P = {P} (the student logits' rows)"
        )
    if logp_mean is not None and (not sampled or logp_mean.shape != (P,)):
        raise ValueError(f"logp_mean (sum_i c_i/N log p_i per row) goes with sampled ids (counts given) and must be "
                         f"[P] = [{P}], found shape {tuple(logp_mean.shape)}"
                         + ("" if sampled else " without counts"))
    if sampled:
        if counts is None:
            raise ValueError("sparse mode 'sample' needs the teacher's draw counts (counts=[P, K]); none given")
        if counts.shape != teacher_ids.shape:
            raise ValueError(f"counts {tuple(counts.shape)} must match teacher ids {tuple(teacher_ids.shape)}")
        if div is not Divergence.FKL:
            raise ValueError(
                f"divergence {div.value!r} cannot be used with sampled teacher ids (counts given): only "
                "forward KL is unbiased in sample mode, since E[c_i/N] = p_i makes sum_i (c_i/N)(log p_i - "
                "log q_i) an unbiased estimate of KL(p||q), while reverse KL, JSD, TVD and skew KL need p "
                "on tokens that were never drawn. Use divergence='fkl', or build the cache with top-k ids."
            )
        if zscore:
            raise ValueError(
                "zscore cannot be used with sampled teacher ids (counts given): standardising needs the "
                "teacher's log-probs on a fixed set of ids, and sampled ids are a random subset of varying "
                "size. Build the cache with top-k ids (kd-cache build --sparse topk) to use zscore."
            )
        return SparseMode.SAMPLE
    if mode is SparseMode.TAIL:
        if teacher_tail is None:
            raise ValueError("sparse mode 'tail' needs teacher_tail [P] (log of the teacher mass outside the ids)")
        if teacher_tail.shape != (P,):
            raise ValueError(f"teacher tail must be [P] = [{P}], found shape {tuple(teacher_tail.shape)}")
    return mode


def sparse_divergence(
    student_logits: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor | None,
    teacher_tail: Tensor | None,
    *,
    divergence: str | Divergence = "fkl",
    mode: str | SparseMode = "tail",
    jsd_beta: float = 0.5,
    skew_alpha: float = 0.1,
    counts: Tensor | None = None,
    logp_mean: Tensor | None = None,
    temperature: float = 1.0,
    zscore: bool = False,
) -> Tensor:
    """Per-position divergence between a sparse teacher and the student's full distribution.

    Args:
        student_logits: [P, V], any float dtype (upcast to fp32 inside).
        teacher_ids: [P, K] integer ids, padded with -1 (padding is ignored, whatever the other
            tensors hold there); ids within a row are assumed distinct.
        teacher_logprobs: [P, K] teacher log-prob of each id, normalised over the full vocabulary.
            May be None for sampled ids when ``logp_mean`` is given.
        teacher_tail: [P] log of the teacher mass outside the stored ids (may be -inf or very
            negative when the ids cover everything). Only read in ``mode="tail"``; may be None
            otherwise.
        mode: ``"tail"`` compares the K + 1 bins (the ids + "everything else") on both sides; the
            student's tail bin is the logsumexp of its log-probs off the stored ids, and the
            teacher's K + 1 bins are renormalised (they sum to 1 up to storage rounding).
            ``"renorm"`` renormalises both sides over the stored ids only. ``"sample"`` (or any
            mode when ``counts`` is given) is the random-sampling estimator below.
        counts: [P, K] draw counts (random-sampling KD: ids drawn N times with replacement, N =
            counts.sum(-1)). Returns ``sum_i (c_i/N)(log p_i - log q_i)`` with q the student's
            full-vocabulary probability, an unbiased estimate of forward KL(p || q). Any other
            divergence raises ``ValueError``.
        logp_mean: [P] ``sum_i (c_i/N) log p_i`` per row (what a sample-mode cache stores instead of
            per-entry log-probs); when given it is used for the teacher half of the estimator.
        temperature: divides the *student* logits only; the teacher's distribution is used as
            stored (apply a teacher temperature when building the cache). With ``zscore`` it
            divides both standardised sides (as in ``dense_divergence``).
        zscore: logit standardisation over the stored ids, for both sides: the teacher's stored
            log-probs and the student's logits at those ids are each standardised over the row's
            valid ids, and the divergence is taken between the two softmaxes over those ids (``mode``
            and the tail are then unused). Equals ``dense_divergence(..., zscore=True)`` when the ids
            cover the vocabulary; otherwise it is that divergence restricted to the stored ids (the
            teacher's full-vocabulary mean and std are not stored). Not available with ``counts``.

    Returns:
        [P] float32 divergences; rows whose ids are all -1 give exactly 0.
    """
    div = _as_divergence(divergence)
    mode = _check_sparse(student_logits, teacher_ids, teacher_logprobs, teacher_tail, counts, div, _as_mode(mode),
                         zscore, logp_mean)
    _check_options(jsd_beta, skew_alpha, temperature)
    if zscore:  # standardised over the stored ids inside: the raw logits are all it needs
        return _sparse_from_logq(_up(student_logits), teacher_ids, teacher_logprobs, teacher_tail, counts, div,
                                 mode, jsd_beta, skew_alpha, zscore=True, temperature=temperature)
    log_q_all = _student_logits(student_logits, temperature, False).log_softmax(-1)
    return _sparse_from_logq(
        log_q_all, teacher_ids, teacher_logprobs, teacher_tail, counts, div, mode, jsd_beta, skew_alpha,
        logp_mean=logp_mean,
    )


def ce_reference(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Unchunked cross-entropy: logits [P, V], targets [P] (-100 = ignore) -> (sum, count) scalars."""
    total = F.cross_entropy(_up(logits), targets.long(), ignore_index=IGNORE_INDEX, reduction="sum")
    return total, (targets != IGNORE_INDEX).sum().to(total.dtype)


def normalise(total: Tensor, count: Tensor) -> Tensor:
    """``total / count`` with an empty count giving 0 rather than NaN (no host sync)."""
    return total / count.clamp_min(1)


def _chunk_losses(
    hidden: Tensor,
    head_weight: Tensor,
    targets: Tensor | None,
    ids: Tensor | None,
    logprobs: Tensor | None,
    tail: Tensor | None,
    counts: Tensor | None,
    logp_mean: Tensor | None,
    *,
    div: Divergence,
    mode: SparseMode,
    jsd_beta: float,
    skew_alpha: float,
    temperature: float,
    zscore: bool,
    relation_groups: int = 0,
    relation_size: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """CE sum and KD sum (fp32 scalars) for one chunk of positions: hidden [c, d] -> logits [c, V].

    The third output is ``Z Z^T`` [G, N, N] of the chunk's first ``G = relation_groups`` runs of
    ``N = relation_size`` rows (fp32 logits; [0, N, N] when G = 0)."""
    dtype = torch.promote_types(hidden.dtype, head_weight.dtype)
    logits = hidden.to(dtype) @ head_weight.to(dtype).T  # [c, V] in the model's dtype
    z = _up(logits)
    zg = z[: relation_groups * relation_size].reshape(relation_groups, relation_size, z.shape[-1])
    relation = zg @ zg.transpose(-1, -2)
    log_q = z.log_softmax(-1)
    zero = z.new_zeros(())
    ce = zero
    if targets is not None:
        keep = targets != IGNORE_INDEX
        picked = log_q.gather(-1, targets.long().clamp_min(0)[:, None])[:, 0]
        ce = -torch.where(keep, picked, 0.0).sum()
    kd = zero
    if ids is not None:
        if zscore:  # standardised over the stored ids; log_q is the logits up to a per-row shift
            kd = _sparse_from_logq(log_q, ids, logprobs, tail, counts, div, mode, jsd_beta, skew_alpha,
                                   zscore=True, temperature=temperature).sum()
        else:
            log_q_kd = log_q if temperature == 1.0 else _student_logits(z, temperature, False).log_softmax(-1)
            kd = _sparse_from_logq(log_q_kd, ids, logprobs, tail, counts, div, mode, jsd_beta, skew_alpha,
                                   logp_mean=logp_mean).sum()
    return ce, kd, relation


class _FusedHeadLoss(torch.autograd.Function):
    """CE + sparse KD (+ relation ``Z Z^T``) of one chunk of positions, with the gradient of the
    logits in closed form instead of autograd through every [c, V] op.

    Everything the losses read of the student's logits ``z`` [c, V] is ``lse = logsumexp(z)``, the
    log-probs at the targets and at the stored ids ``s_j = z_j - lse`` and, in tail mode, the tail
    bin ``s_tail = logsumexp(z off the stored ids) - lse``. Given the gradients ``G_j`` and ``G_tail``
    of the (any) divergence with respect to those few bins (autograd on [c, K + 1] tensors), the chain
    rule through ``log_softmax`` gives, per row, with ``q = softmax(z)`` and ``a``/``b`` the upstream
    gradients of the CE and KD sums::

        dL/dz_m = q_m (a keep - b (sum_j G_j + G_tail)) + b G_tail exp(z_m - tail_lse) [m not stored]
                  + b G_j [m = id_j] - a keep [m = target]

    so backward is one exponential pass over [c, V] and a few scatters, then ``g W`` and ``g^T h``.
    With autograd the same step costs a log-softmax, a masked copy and a logsumexp forward and their
    backward passes (about twelve [c, V] passes against four). ``keep``: save the fp32 logits for
    backward (4 bytes per logit); otherwise recompute them from ``hidden`` and the head (one more
    matmul). Same values and gradients as the autograd path (tested), any dtype, under autocast.
    """

    @staticmethod
    def forward(ctx, hidden, head_weight, targets, ids, logprobs, tail, counts, logp_mean, opts, groups, size, keep):
        div, mode, jsd_beta, skew_alpha, zscore, temperature = opts
        dtype = torch.promote_types(hidden.dtype, head_weight.dtype)
        logits = hidden.to(dtype) @ head_weight.to(dtype).T  # [c, V] in the model's (or autocast's) dtype
        ctx.mm_dtype = logits.dtype
        z = _up(logits)
        del logits
        lse = z.logsumexp(-1)  # [c]
        zero = z.new_zeros(())
        ce, kd = zero, zero
        t_safe = keep_t = fill = valid = s_lp = G_k = G_tail = tail_lse = None
        if targets is not None:
            keep_t = targets != IGNORE_INDEX
            t_safe = targets.long().clamp_min(0)
            ce = -torch.where(keep_t, z.gather(-1, t_safe[:, None])[:, 0] - lse, 0.0).sum()
        if ids is not None:
            ids_l = ids.long()
            valid = ids_l >= 0
            fill = _tail_fill(ids_l, valid)
            s_lp = z.gather(-1, ids_l.clamp_min(0)) - lse[:, None]  # [c, K]
            s_tail = None
            if _needs_tail(mode, zscore):
                masked = z.scatter(-1, fill, torch.finfo(z.dtype).min)
                tail_lse = masked.logsumexp(-1)
                del masked
                s_tail = tail_lse - lse
            with torch.enable_grad():  # gradients of the divergence w.r.t. the K + 1 student bins only
                leaves = [s_lp.detach().requires_grad_(True)]
                if s_tail is not None:
                    leaves.append(s_tail.detach().requires_grad_(True))
                per = _sparse_from_bins(leaves[0], leaves[1] if s_tail is not None else None, ids_l, logprobs, tail,
                                        counts, div, mode, jsd_beta, skew_alpha, zscore, temperature, logp_mean)
                total = per.sum()
                grads = torch.autograd.grad(total, leaves)
            kd = total.detach()
            G_k = grads[0]
            G_tail = grads[1] if s_tail is not None else None
        zg = z[: groups * size].reshape(groups, size, z.shape[-1])
        relation = zg @ zg.transpose(-1, -2)
        ctx.save_for_backward(hidden, head_weight, z if keep else None, lse, t_safe, keep_t, fill, valid, s_lp, G_k,
                              G_tail, tail_lse)
        ctx.groups, ctx.size = groups, size
        return ce, kd, relation

    @staticmethod
    def backward(ctx, grad_ce, grad_kd, grad_rel):
        hidden, head_weight, z, lse, t_safe, keep_t, fill, valid, s_lp, G_k, G_tail, tail_lse = ctx.saved_tensors
        mm = ctx.mm_dtype
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            if z is None:  # recompute the logits exactly as forward did
                z = _up(hidden.to(mm) @ head_weight.to(mm).T)
            c = z.shape[0]
            a = grad_ce.to(z.dtype) * (keep_t.to(z.dtype) if keep_t is not None else z.new_zeros(c))  # [c]
            coef = a.clone()  # multiplies q_m everywhere
            base = lse
            if G_k is not None:
                b = grad_kd.to(z.dtype)
                sum_g = G_k.sum(-1) + (G_tail if G_tail is not None else 0.0)
                coef = coef - b * sum_g
                if G_tail is not None:
                    # Dense part as exp(z - tail_lse) * (coef * Q_tail + b G_tail): no overflow, since
                    # Q_tail = exp(tail_lse - lse) <= 1. Rows whose tail bin gets no gradient (clamped,
                    # empty tail) keep the plain q * coef form.
                    use = G_tail != 0
                    base = torch.where(use, tail_lse, lse)
                    coef = torch.where(use, coef * (tail_lse - lse).exp() + b * G_tail, coef)
            g = (z - base[:, None]).exp_().mul_(coef[:, None])  # [c, V]
            if G_k is not None:
                # Stored ids: q_j (a keep - b sum G) + b G_j, written over the dense part. Padding slots
                # point at the row's largest stored id (``_tail_fill``) and carry that id's own value, so
                # every write to an index agrees (a row without ids writes its token 0's plain value).
                vals = s_lp.exp() * (a - b * sum_g)[:, None] + b * G_k
                vals = torch.where(valid, vals, vals.gather(-1, torch.where(valid, fill, -1).argmax(-1, keepdim=True)))
                g.scatter_(-1, fill, vals)
            if t_safe is not None:
                g.scatter_add_(-1, t_safe[:, None], -a[:, None])
            if ctx.groups and grad_rel is not None:
                n = ctx.groups * ctx.size
                zg = z[:n].reshape(ctx.groups, ctx.size, -1)
                g[:n] += ((grad_rel + grad_rel.transpose(-1, -2)).to(z.dtype) @ zg).reshape(n, -1)
            g = g.to(mm)
            dh = (g @ head_weight.to(mm)).to(hidden.dtype) if ctx.needs_input_grad[0] else None
            dw = (g.T @ hidden.to(mm)).to(head_weight.dtype) if ctx.needs_input_grad[1] else None
        return dh, dw, None, None, None, None, None, None, None, None, None, None


def chunked_distill(
    hidden: Tensor,
    head_weight: Tensor,
    *,
    targets: Tensor | None = None,
    teacher: dict[str, Tensor] | None = None,
    divergence: str | Divergence = "fkl",
    mode: str | SparseMode = "tail",
    jsd_beta: float = 0.5,
    skew_alpha: float = 0.1,
    temperature: float = 1.0,
    zscore: bool = False,
    chunk_size: int = 1024,
    checkpoint: bool = True,
    relation_size: int = 0,
    fused: bool = True,
) -> dict[str, Tensor]:
    """Cross-entropy and sparse KD from hidden states, chunked over positions.

    The LM head is applied chunk by chunk (``logits = hidden_c @ head_weight.T`` in the model's
    dtype, then fp32 log-softmax), so fp32 [P, V] logits never exist for all positions at once. A
    head bias is not supported (Qwen2/LLaMA-style heads have none). With ``checkpoint=True`` each
    chunk runs under ``torch.utils.checkpoint`` (non-reentrant), so its [chunk, V] logits are
    recomputed in backward instead of being kept alive until then.

    Args:
        hidden: [P, d] final hidden states (after the final norm) at the selected positions.
        head_weight: [V, d] LM head weight.
        targets: optional [P] next-token ids, -100 = ignore (no CE contribution).
        teacher: optional dict with ``ids`` [P, K] (-1 padded), ``logprobs`` [P, K], ``tail`` [P]
            (needed in tail mode) and optional ``counts`` [P, K] (sample mode); with ``counts``,
            ``logp_mean`` [P] may stand in for ``logprobs`` (see ``sparse_divergence``). Rows whose ids
            are all -1 contribute nothing.
        divergence, mode, jsd_beta, skew_alpha, temperature, zscore: as in ``sparse_divergence``
            (temperature and zscore apply to the KD term only, never to CE).
        chunk_size: positions per chunk.
        checkpoint: recompute each chunk's logits in backward (only when grad is enabled).
        fused: compute the logits' gradient in closed form (``_FusedHeadLoss``: same values and
            gradients, a third of the [chunk, V] passes); False: autograd through every op.
        relation_size: ``N`` > 0 also returns ``relation`` [P / N, N, N], the relation matrices
            ``Z Z^T`` of every run of ``N`` consecutive rows (one image's visual positions), from the
            fp32 logits the chunk computes anyway; ``P`` must be a multiple of ``N``, and chunks then
            hold whole images (at least one, so a chunk may exceed ``chunk_size``). Costs
            ``4 N^2 V`` FLOPs per image (forward and backward) on top of the logits, against
            ``4 V d^2`` per call for ``H (W^T W) H^T`` (``relation_from_hidden``).

    Returns:
        dict of fp32 scalars ``ce_sum``, ``ce_count`` (targets != -100), ``kd_sum``, ``kd_count``
        (teacher rows with at least one id), plus ``relation`` with ``relation_size``. Sums, not
        means: divide by the global counts with ``normalise`` so that gradient accumulation and
        data parallelism equal one big batch. Empty inputs give zero sums (still connected to the
        graph), never NaN.
    """
    if hidden.ndim != 2 or head_weight.ndim != 2 or hidden.shape[1] != head_weight.shape[1]:
        raise ValueError(
            f"hidden must be [P, d] and head_weight [V, d] with the same d, found {tuple(hidden.shape)} "
            f"and {tuple(head_weight.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    div = _as_divergence(divergence)
    mode = _as_mode(mode)
    _check_options(jsd_beta, skew_alpha, temperature)
    P = hidden.shape[0]
    if relation_size < 0 or (relation_size and P % relation_size):
        raise ValueError(f"relation_size must be >= 0 and divide the {P} positions, got {relation_size}")
    if relation_size:  # chunks of whole images
        chunk_size = max(1, chunk_size // relation_size) * relation_size
    if targets is not None and targets.shape != (P,):
        raise ValueError(f"targets must be [P] = [{P}], found shape {tuple(targets.shape)}")

    ids = logprobs = tail = counts = logp_mean = None
    if teacher is not None:
        sampled_lean = "counts" in teacher and "logp_mean" in teacher
        missing = [k for k in ("ids",) + (() if sampled_lean else ("logprobs",)) if k not in teacher]
        if missing:
            raise ValueError(f"teacher dict is missing {missing}; expected keys ids, logprobs, tail, or for sampled "
                             "ids: ids, counts, logp_mean")
        ids, logprobs, tail, counts = teacher["ids"], teacher.get("logprobs"), teacher.get("tail"), teacher.get("counts")
        logp_mean = teacher.get("logp_mean")
        fake = hidden.new_empty((P, 0))  # only its shape is read
        mode = _check_sparse(fake, ids, logprobs, tail, counts, div, mode, zscore, logp_mean)

    # Zero sums that still reach both parameters, so backward() works on an empty batch.
    zero = (_up(hidden[:0]).sum() + _up(head_weight[:0]).sum()) * 0.0
    ce_sum, kd_sum = zero, zero
    relations = []
    fn = functools.partial(
        _chunk_losses, div=div, mode=mode, jsd_beta=jsd_beta, skew_alpha=skew_alpha,
        temperature=temperature, zscore=zscore,
    )
    use_ckpt = checkpoint and torch.is_grad_enabled()
    # The closed-form gradient (_FusedHeadLoss) serves every divergence and mode; a temperature on the
    # student's non-standardised logits (its own softmax) takes the autograd path.
    fused = fused and torch.is_grad_enabled() and (zscore or temperature == 1.0) and (
        hidden.requires_grad or head_weight.requires_grad)
    opts = (div, mode, jsd_beta, skew_alpha, zscore, temperature)
    for a in range(0, P, chunk_size):
        sl = slice(a, a + chunk_size)
        args = (
            hidden[sl],
            head_weight,
            None if targets is None else targets[sl],
            None if ids is None else ids[sl],
            None if logprobs is None else logprobs[sl],
            None if tail is None else tail[sl],
            None if counts is None else counts[sl],
            None if logp_mean is None else logp_mean[sl],
        )
        rows = min(chunk_size, P - a)
        groups = rows // relation_size if relation_size else 0
        part = functools.partial(fn, relation_groups=groups, relation_size=relation_size)
        if fused:
            ce, kd, rel = _FusedHeadLoss.apply(*args, opts, groups, relation_size, not use_ckpt)
        elif use_ckpt:
            ce, kd, rel = _checkpoint(part, *args, use_reentrant=False, preserve_rng_state=False)
        else:
            ce, kd, rel = part(*args)
        ce_sum = ce_sum + ce
        kd_sum = kd_sum + kd
        relations.append(rel)

    count_dtype = zero.dtype
    ce_count = zero.new_zeros(()) if targets is None else (targets != IGNORE_INDEX).sum().to(count_dtype)
    kd_count = zero.new_zeros(()) if ids is None else teacher_row_mask(ids).sum().to(count_dtype)
    out = {"ce_sum": ce_sum, "ce_count": ce_count, "kd_sum": kd_sum, "kd_count": kd_count}
    if relation_size:
        out["relation"] = torch.cat(relations) if relations else zero.new_zeros((0, relation_size, relation_size))
    return out


def head_gram(head_weight: Tensor, chunk_size: int = 16384) -> Tensor:
    """``W^T W`` [d, d] in fp32 from the LM head [V, d], accumulated over vocabulary chunks so no
    fp32 copy of the whole head is made."""
    if head_weight.ndim != 2:
        raise ValueError(f"head weight must be [V, d], found shape {tuple(head_weight.shape)}")
    d = head_weight.shape[1]
    dtype = torch.promote_types(head_weight.dtype, torch.float32)
    gram = head_weight.new_zeros((d, d), dtype=dtype)
    for a in range(0, head_weight.shape[0], chunk_size):
        w = head_weight[a : a + chunk_size].to(dtype)
        gram = gram + w.T @ w
    return gram


def relation_from_hidden(hidden: Tensor, head_weight: Tensor | None, *, gram: Tensor | None = None) -> Tensor:
    """Relation matrix ``R = Z Z^T`` with ``Z = hidden @ head_weight.T``, without forming Z.

    Uses ``R = H (W^T W) H^T``: hidden [..., N, d], head_weight [V, d] -> [..., N, N] (fp32). Pass a
    precomputed ``gram = head_gram(head_weight)`` [d, d] to share it across images in a step (then
    ``head_weight`` may be None). Gradients flow to ``hidden`` and, through the Gram matrix, to the
    head.
    """
    if gram is None:
        if head_weight is None:
            raise ValueError("relation_from_hidden needs head_weight [V, d] or a precomputed gram [d, d]")
        gram = head_gram(head_weight)
    h = hidden.to(torch.promote_types(hidden.dtype, gram.dtype))
    if h.shape[-1] != gram.shape[0]:
        raise ValueError(f"hidden size {h.shape[-1]} does not match the head's {gram.shape[0]}")
    return h @ gram.to(h.dtype) @ h.transpose(-1, -2)


def relation_from_logits(logits: Tensor) -> Tensor:
    """Dense reference: logits [..., N, V] -> ``Z Z^T`` [..., N, N] in fp32."""
    z = _up(logits)
    return z @ z.transpose(-1, -2)


def rdist(student_relation: Tensor, teacher_relation: Tensor, eps: float = 1e-12) -> Tensor:
    """Relation distillation: ``1 - cos(vec R_s, vec R_t)``.

    student_relation, teacher_relation: [..., N, N] (any scale: the result is scale invariant).
    Returns [...] (a scalar for [N, N] inputs), in [0, 2]. Each side is normalised by its Frobenius
    norm (guarded by ``eps``) before the dot product, so large logit products cannot overflow; a
    zero matrix gives 1.
    """
    if student_relation.shape != teacher_relation.shape:
        raise ValueError(
            f"student relation {tuple(student_relation.shape)} and teacher relation "
            f"{tuple(teacher_relation.shape)} must have the same shape [..., N, N]"
        )
    s = _up(student_relation).flatten(-2)
    t = _up(teacher_relation).flatten(-2).to(s.dtype)
    s = s / s.norm(dim=-1, keepdim=True).clamp_min(eps)
    t = t / t.norm(dim=-1, keepdim=True).clamp_min(eps)
    return 1.0 - (s * t).sum(-1)


# --------------------------------------------------------------------------------------------------
# LLaVADI: hidden-state alignment and affinity


def hidden_alignment(student: Tensor, teacher: Tensor, loss: str | HiddenLoss = "mse", eps: float = 1e-8) -> Tensor:
    """Per-position distance between projected student and teacher hidden states.

    student: [P, d_t] (the student's final hidden states after the projector MLP), teacher: [P, d_t]
    (stored teacher final-layer states, any float dtype). ``mse``: mean over the d_t features of the
    squared difference; ``cosine``: ``1 - cos(student, teacher)`` (in [0, 2]; a zero vector counts as
    orthogonal). Returns [P] in fp32 (fp64 stays fp64); P = 0 gives an empty tensor.
    """
    try:
        loss = HiddenLoss(loss)
    except ValueError:
        raise ValueError(f"hidden loss {loss!r} not understood: expected 'mse' or 'cosine'") from None
    if student.shape != teacher.shape or student.ndim != 2:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} hidden states must both "
                         "be [P, d_t] (project the student to the teacher's width first)")
    s = _up(student)
    t = _up(teacher).to(s.dtype)
    if loss is HiddenLoss.MSE:
        return (s - t).pow(2).mean(-1)
    return 1.0 - F.cosine_similarity(s, t, dim=-1, eps=eps)


def affinity_matrix(rows: Tensor, cols: Tensor, row_mask: Tensor, col_mask: Tensor, eps: float = 1e-12) -> Tensor:
    """Cosine-similarity block of L2-normalised hidden states, per sample.

    rows: [A, N, d] (e.g. visual positions), cols: [A, M, d] (e.g. response positions), masks
    [A, N] / [A, M] bool (False = padding). Returns [A, N, M] fp32 ``<r_i/|r_i|, c_j/|c_j|>``, 0 where
    either side is padding.
    """
    r = F.normalize(_up(rows), dim=-1, eps=eps)
    c = F.normalize(_up(cols), dim=-1, eps=eps).to(r.dtype)
    sim = r @ c.transpose(-1, -2)
    return torch.where(row_mask[..., :, None] & col_mask[..., None, :], sim, 0.0)


def affinity_loss(student_rows: Tensor, student_cols: Tensor, teacher_rows: Tensor, teacher_cols: Tensor,
                  row_mask: Tensor, col_mask: Tensor) -> Tensor:
    """LLaVADI affinity distillation: MSE between student and teacher similarity matrices.

    student_rows [A, N, d_s], student_cols [A, M, d_s], teacher_rows [A, N, d_t], teacher_cols
    [A, M, d_t] (the widths may differ: similarities are width free), masks [A, N] / [A, M]. Per sample
    ``a``: the mean over its ``n_a x m_a`` valid entries of ``(S_s - S_t)^2`` with ``S = affinity_matrix``.
    Returns [A] fp32; a sample with no valid entry gives 0.
    """
    s = affinity_matrix(student_rows, student_cols, row_mask, col_mask)
    t = affinity_matrix(teacher_rows, teacher_cols, row_mask, col_mask).to(s.dtype)
    mask = row_mask[..., :, None] & col_mask[..., None, :]
    n = mask.sum((-1, -2)).clamp_min(1).to(s.dtype)
    return torch.where(mask, (s - t).pow(2), 0.0).sum((-1, -2)) / n
