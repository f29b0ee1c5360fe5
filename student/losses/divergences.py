"""Divergences between a teacher distribution ``p`` and the student's ``q``: dense (full vocabulary,
the reference) and sparse (the teacher's stored ids, as a cache holds them).

Notation: ``P`` positions (flattened, already selected), ``V`` vocabulary, ``K`` teacher ids stored
per position.

Conventions:

- Forward KL is ``KL(p || q) = sum p (log p - log q)`` (mass covering); reverse KL is ``KL(q || p)``.
  Each function returns the quantity it is named after, so identical distributions give 0.
- Generalised JSD follows TRL's ``generalized_jsd_loss`` (GKD, arXiv 2306.13649, Eq. 1)::

      m = beta * p + (1 - beta) * q
      JSD_beta = beta * KL(p || m) + (1 - beta) * KL(q || m)

  ``beta = 0`` returns forward KL and ``beta = 1`` returns reverse KL exactly (as TRL does; the
  formula itself is 0 at both ends, and ``JSD_beta / beta -> KL(p||q)`` as ``beta -> 0``).
  ``beta = 0.5`` is the symmetric Jensen-Shannon divergence.
- Skew KL and skew reverse KL follow DistiLLM (arXiv 2402.03898, ``skewed_forward_kl`` /
  ``skewed_reverse_kl`` of its loss file), with ``a = skew``: the first argument of the KL is mixed
  into the second with weight ``a``, so ``a = 0`` gives the plain KL::

      skl  = KL(p || a p + (1 - a) q)
      srkl = KL(q || a q + (1 - a) p)

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
- Sampled teacher ids (a sample-mode cache, recognised by its draw ``counts``) allow forward KL only:
  ``sum_i (c_i / N)(log p_i - log q_i)`` is unbiased for it, every other divergence needs ``p`` on
  ids that were never drawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from enum import Enum

import torch
from torch import Tensor

LOG_PROB_FLOOR = -100.0


class Divergence(str, Enum):
    """Which divergence between teacher ``p`` and student ``q`` (see the module docstring)."""

    fkl = "fkl"  # forward KL(p || q)
    rkl = "rkl"  # reverse KL(q || p)
    jsd = "jsd"  # generalised JSD(beta), TRL convention
    tvd = "tvd"  # total variation 0.5 * sum |p - q|
    skl = "skl"  # skew KL(p || a p + (1 - a) q)
    srkl = "srkl"  # skew reverse KL(q || a q + (1 - a) p)


class TailMode(str, Enum):
    """How a top-k teacher distribution is compared with the student's full one."""

    tail = "tail"  # k stored ids + one "everything else" bin, for both sides
    renorm = "renorm"  # both renormalised over the stored ids


def _choice(enum: type[Enum], value, what: str, note: str = ""):
    try:
        return enum(value)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in enum)
        raise ValueError(f"{what} {value!r} not understood: expected one of {choices}{note}") from None


@dataclass(frozen=True)
class DivergenceOptions:
    """How the student's distribution is compared with the teacher's (validated on construction).

    ``temperature`` divides the student's logits (the teacher's distribution is used as stored); with
    ``zscore`` it divides both standardised sides. ``mode`` is read for top-k teachers only.
    """

    divergence: Divergence = Divergence.fkl
    mode: TailMode = TailMode.tail
    jsd_beta: float = 0.5  # JSD's beta: 0 = forward KL, 1 = reverse KL
    skew: float = 0.1  # skl / srkl mixing weight a in [0, 1)
    temperature: float = 1.0
    zscore: bool = False

    def __post_init__(self):
        object.__setattr__(self, "divergence", _choice(Divergence, self.divergence, "divergence"))
        object.__setattr__(self, "mode", _choice(TailMode, self.mode, "tail mode",
                                                 " (sampled ids are recognised from their counts)"))
        if not 0.0 <= self.jsd_beta <= 1.0:
            raise ValueError(f"--jsd-beta must lie in [0, 1] (0 = forward KL, 1 = reverse KL), got {self.jsd_beta}")
        if not 0.0 <= self.skew < 1.0:
            raise ValueError(f"--skew must lie in [0, 1) (0 = plain KL; 1 makes skl and srkl identically 0), "
                             f"got {self.skew}")
        if not self.temperature > 0.0:
            raise ValueError(f"--temperature must be > 0, got {self.temperature}")

    @property
    def plain(self) -> Divergence:
        """The divergence with its endpoint cases resolved (JSD(0) = FKL, JSD(1) = RKL, skew 0 = FKL/RKL)."""
        d = self.divergence
        if d is Divergence.jsd and self.jsd_beta in (0.0, 1.0):
            return Divergence.fkl if self.jsd_beta == 0.0 else Divergence.rkl
        if d is Divergence.skl and self.skew == 0.0:
            return Divergence.fkl
        if d is Divergence.srkl and self.skew == 0.0:
            return Divergence.rkl
        return d



@dataclass(frozen=True)
class SparseTeacher:
    """One position kind's stored teacher distribution at ``P`` positions.

    ids: [P, K] integer ids, padded with -1 (padding is ignored, whatever the other arrays hold
    there); ids within a row are assumed distinct. logprobs: [P, K] teacher log-prob of each id,
    normalised over the full vocabulary. tail: [P] log of the teacher mass outside the ids (tail
    mode). counts: [P, K] draw counts of sampled ids (sample-mode caches: N = counts.sum(-1) draws
    with replacement); with them ``logp_mean`` [P] = ``sum_i (c_i/N) log p_i`` may stand in for
    ``logprobs``.
    """

    ids: Tensor
    logprobs: Tensor | None = None
    tail: Tensor | None = None
    counts: Tensor | None = None
    logp_mean: Tensor | None = None

    @property
    def sampled(self) -> bool:
        return self.counts is not None

    def uses_tail(self, options: DivergenceOptions) -> bool:
        """Whether the comparison has a tail bin: top-k ids in tail mode without zscore (which compares
        the stored ids only); never for sampled ids."""
        return options.mode is TailMode.tail and not options.zscore and not self.sampled

    def rows(self) -> Tensor:
        """[P] bool, True where at least one id is stored."""
        return teacher_row_mask(self.ids)

    def _map(self, f) -> SparseTeacher:
        return SparseTeacher(**{x.name: None if (v := getattr(self, x.name)) is None else f(v) for x in fields(self)})

    def __getitem__(self, sl: slice) -> SparseTeacher:
        return self._map(lambda v: v[sl])

    def to(self, device) -> SparseTeacher:
        return self._map(lambda v: v.to(device))

    def check(self, P: int, options: DivergenceOptions) -> None:
        """Raise a ValueError naming what is missing or mis-shaped for ``P`` positions and ``options``."""
        ids = self.ids
        if ids.ndim != 2 or ids.shape[0] != P:
            raise ValueError(f"teacher ids must be [P, K] with P = {P} (the student logits' rows), found shape "
                             f"{tuple(ids.shape)}")
        if self.logprobs is None:
            if not (self.sampled and self.logp_mean is not None):
                raise ValueError("teacher log-probs [P, K] are required, except for sampled ids (counts given) "
                                 "with their logp_mean [P]")
        elif self.logprobs.shape != ids.shape:
            raise ValueError(f"teacher ids {tuple(ids.shape)} and log-probs {tuple(self.logprobs.shape)} must both "
                             f"be [P, K] with P = {P} (the student logits' rows)")
        if self.logp_mean is not None and (not self.sampled or self.logp_mean.shape != (P,)):
            raise ValueError(f"logp_mean (sum_i c_i/N log p_i per row) goes with sampled ids (counts given) and "
                             f"must be [P] = [{P}], found shape {tuple(self.logp_mean.shape)}"
                             + ("" if self.sampled else " without counts"))
        if self.sampled:
            if self.counts.shape != ids.shape:
                raise ValueError(f"counts {tuple(self.counts.shape)} must match teacher ids {tuple(ids.shape)}")
            if options.divergence is not Divergence.fkl:
                raise ValueError(
                    f"divergence {options.divergence.value!r} cannot be used with sampled teacher ids (counts "
                    "given): only forward KL is unbiased in sample mode, since E[c_i/N] = p_i makes sum_i (c_i/N)"
                    "(log p_i - log q_i) an unbiased estimate of KL(p||q), while reverse KL, JSD, TVD and the "
                    "skew KLs need p on tokens that were never drawn. Use divergence='fkl', or build the cache "
                    "with top-k ids.")
            if options.zscore:
                raise ValueError(
                    "zscore cannot be used with sampled teacher ids (counts given): standardising needs the "
                    "teacher's log-probs on a fixed set of ids, and sampled ids are a random subset of varying "
                    "size. Build the cache with top-k ids (kd-cache build --sparse topk) to use zscore.")
        elif self.uses_tail(options):
            if self.tail is None:
                raise ValueError("tail mode needs the teacher's tail [P] (log of the teacher mass outside the ids)")
            if self.tail.shape != (P,):
                raise ValueError(f"teacher tail must be [P] = [{P}], found shape {tuple(self.tail.shape)}")


def teacher_row_mask(teacher_ids: Tensor) -> Tensor:
    """[P, K] teacher ids padded with -1 -> [P] bool, True where at least one id is stored."""
    return (teacher_ids >= 0).any(-1)


def up(x: Tensor) -> Tensor:
    """Upcast to at least float32 (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _masked_log_softmax(x: Tensor, mask: Tensor) -> Tensor:
    """log-softmax of ``x`` [P, B] over the bins where ``mask`` [P, B] is True.

    Masked bins get a finite fill (never -inf), so an all-masked row yields finite garbage rather
    than NaN; callers mask those bins/rows out afterwards.
    """
    x = x.masked_fill(~mask, torch.finfo(x.dtype).min)
    return x - x.logsumexp(-1, keepdim=True)


def _skewed_kl(log_a: Tensor, log_b: Tensor, a: Tensor, skew: float) -> Tensor:
    """Terms of ``KL(A || skew A + (1 - skew) B)`` per bin."""
    log_m = torch.logaddexp(log_a + math.log(skew), log_b + math.log1p(-skew))
    return a * (log_a - log_m)


def bin_divergence(log_p: Tensor, log_q: Tensor, mask: Tensor, options: DivergenceOptions) -> Tensor:
    """Divergence between two distributions over B bins.

    log_p, log_q: [P, B] log-probabilities (teacher, student); mask: [P, B] bool, bins to use.
    Returns [P]. Masked bins contribute exactly 0 (their inputs may be NaN or -inf).
    """
    # Double-where: sanitise masked entries *before* any arithmetic so their gradients stay finite.
    log_p = torch.where(mask, log_p.clamp_min(LOG_PROB_FLOOR), 0.0)
    log_q = torch.where(mask, log_q.clamp_min(LOG_PROB_FLOOR), 0.0)
    p, q = log_p.exp(), log_q.exp()
    div = options.plain
    if div is Divergence.fkl:
        terms = p * (log_p - log_q)
    elif div is Divergence.rkl:
        terms = q * (log_q - log_p)
    elif div is Divergence.jsd:
        b = options.jsd_beta
        log_m = torch.logaddexp(log_p + math.log(b), log_q + math.log1p(-b))
        terms = b * p * (log_p - log_m) + (1.0 - b) * q * (log_q - log_m)
    elif div is Divergence.tvd:
        terms = 0.5 * (p - q).abs()
    elif div is Divergence.skl:
        terms = _skewed_kl(log_p, log_q, p, options.skew)
    else:
        terms = _skewed_kl(log_q, log_p, q, options.skew)
    return torch.where(mask, terms, 0.0).sum(-1)


def zscore_logits(logits: Tensor, eps: float = 1e-6) -> Tensor:
    """Standardise each row of logits [..., V] to zero mean, unit std (logit standardisation).

    Returns float32 (or float64) [..., V]. A constant row maps to zeros (std guarded by ``eps``).
    """
    z = up(logits)
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


def _scaled_logits(logits: Tensor, temperature: float, zscore: bool) -> Tensor:
    z = up(logits)
    if zscore:
        z = zscore_logits(z)
    if temperature != 1.0:
        z = z / temperature
    return z


def dense_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    divergence: str | Divergence = "fkl",
    jsd_beta: float = 0.5,
    skew: float = 0.1,
    temperature: float = 1.0,
    zscore: bool = False,
) -> Tensor:
    """Full-vocabulary divergence (the reference the sparse paths are tested against).

    student_logits, teacher_logits: [P, V], any float dtype. ``temperature`` divides both (after
    ``zscore_logits`` on both when ``zscore``). Returns [P] (float32 or float64).
    """
    opts = DivergenceOptions(divergence=divergence, jsd_beta=jsd_beta, skew=skew, temperature=temperature,
                             zscore=zscore)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "must have the same shape [P, V]"
        )
    log_q = _scaled_logits(student_logits, temperature, zscore).log_softmax(-1)
    log_p = _scaled_logits(teacher_logits, temperature, zscore).log_softmax(-1)
    mask = torch.ones_like(log_q, dtype=torch.bool)
    return bin_divergence(log_p, log_q.to(log_p.dtype), mask, opts)


def tail_fill(ids: Tensor, valid: Tensor) -> Tensor:
    """Stored ids [P, K] with padding pointed at the row's largest id (a stored one whenever the row has
    any), so a scatter over them marks exactly the stored ids."""
    row_max = ids.max(-1, keepdim=True).values if ids.shape[-1] else ids
    return torch.where(valid, ids, row_max).clamp_min(0)


def student_bins(log_q_all: Tensor, teacher: SparseTeacher, options: DivergenceOptions) -> tuple[Tensor, Tensor | None]:
    """The student's log-probs at the stored ids [P, K] and, with a tail bin, that bin [P], from its
    full log-softmax [P, V] (or, with zscore, its logits: only differences within a row are used)."""
    ids = teacher.ids.long()
    s_lp = log_q_all.gather(-1, ids.clamp_min(0))
    if not teacher.uses_tail(options):
        return s_lp, None
    # log(1 - sum_K q) as a logsumexp over the ids *not* stored, which stays exact when sum_K q is
    # close to 1 (log1p(-exp(.)) would not).
    stored = torch.zeros_like(log_q_all, dtype=torch.bool).scatter_(-1, tail_fill(ids, ids >= 0), True)
    return s_lp, log_q_all.masked_fill(stored, torch.finfo(log_q_all.dtype).min).logsumexp(-1)


def _sampled_fkl(s_lp: Tensor, teacher: SparseTeacher, valid: Tensor) -> Tensor:
    """``sum_i (c_i / N)(log p_i - log q_i)``: E[c_i / N] = p_i, so this is unbiased for KL(p || q). The
    teacher half, ``sum_i (c_i / N) log p_i``, is one number per row (the cache's ``logp_mean``)."""
    dtype = s_lp.dtype
    c = torch.where(valid, up(teacher.counts), 0.0).to(dtype)
    w = c / c.sum(-1, keepdim=True).clamp_min(1)
    student = torch.where(valid, w * s_lp.clamp_min(LOG_PROB_FLOOR), 0.0).sum(-1)
    if teacher.logp_mean is not None:
        return up(teacher.logp_mean).to(dtype) - student
    t_lp = up(teacher.logprobs).to(dtype).clamp_min(LOG_PROB_FLOOR)
    return torch.where(valid, w * t_lp, 0.0).sum(-1) - student


def sparse_from_bins(s_lp: Tensor, s_tail: Tensor | None, teacher: SparseTeacher, options: DivergenceOptions) -> Tensor:
    """The sparse divergence [P] from the student's bins (``student_bins``): everything the sparse
    losses read of the student."""
    valid = teacher.ids >= 0  # [P, K]
    rows = valid.any(-1)  # [P]
    dtype = s_lp.dtype
    if teacher.sampled:
        per = _sampled_fkl(s_lp, teacher, valid)
    elif options.zscore:
        # Standardise both sides over the stored ids (see the module docstring), compare over them.
        t_lp = torch.where(valid, up(teacher.logprobs), 0.0).to(dtype)
        z_t = _masked_zscore(t_lp.clamp_min(LOG_PROB_FLOOR), valid) / options.temperature
        z_s = _masked_zscore(s_lp, valid) / options.temperature
        per = bin_divergence(_masked_log_softmax(z_t, valid), _masked_log_softmax(z_s, valid), valid, options)
    elif options.mode is TailMode.renorm:
        t_lp = torch.where(valid, up(teacher.logprobs), 0.0).to(dtype)
        per = bin_divergence(_masked_log_softmax(t_lp, valid), _masked_log_softmax(s_lp, valid), valid, options)
    else:
        t_lp = torch.where(valid, up(teacher.logprobs), 0.0).to(dtype)
        t_tail = torch.where(rows, up(teacher.tail).to(dtype), 0.0)
        mask = torch.cat([valid, torch.ones_like(rows)[:, None]], -1)  # [P, K + 1]
        log_p = torch.cat([t_lp, t_tail[:, None]], -1).clamp_min(LOG_PROB_FLOOR)
        log_q = torch.cat([s_lp, s_tail[:, None]], -1)
        # The stored teacher bins sum to 1 up to the rounding of (fp16) log-probs: renormalise.
        per = bin_divergence(_masked_log_softmax(log_p, mask), log_q, mask, options)
    return torch.where(rows, per, 0.0)


def sparse_divergence(
    student_logits: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor | None,
    teacher_tail: Tensor | None,
    *,
    divergence: str | Divergence = "fkl",
    mode: str | TailMode = "tail",
    jsd_beta: float = 0.5,
    skew: float = 0.1,
    counts: Tensor | None = None,
    logp_mean: Tensor | None = None,
    temperature: float = 1.0,
    zscore: bool = False,
) -> Tensor:
    """Per-position divergence between a sparse teacher and the student's full distribution.

    Args:
        student_logits: [P, V], any float dtype (upcast to fp32 inside).
        teacher_ids, teacher_logprobs, teacher_tail, counts, logp_mean: the teacher's arrays, as in
            ``SparseTeacher`` (``teacher_tail`` is read in tail mode only; ``teacher_logprobs`` may be
            None for sampled ids with their ``logp_mean``).
        mode: ``"tail"`` compares the K + 1 bins (the ids + "everything else") on both sides; the
            student's tail bin is the logsumexp of its log-probs off the stored ids, and the
            teacher's K + 1 bins are renormalised (they sum to 1 up to storage rounding).
            ``"renorm"`` renormalises both sides over the stored ids only. With ``counts`` (sampled
            ids) the mode is not read: the result is ``sum_i (c_i/N)(log p_i - log q_i)`` with q the
            student's full-vocabulary probability, an unbiased estimate of forward KL(p || q); any
            other divergence raises ``ValueError``.
        temperature: divides the *student* logits only; the teacher's distribution is used as
            stored (apply a teacher temperature when building the cache). With ``zscore`` it
            divides both standardised sides (as in ``dense_divergence``).
        zscore: logit standardisation over the stored ids, for both sides (see the module
            docstring; ``mode`` and the tail are then unused). Equals ``dense_divergence(...,
            zscore=True)`` when the ids cover the vocabulary. Not available with ``counts``.

    Returns:
        [P] float32 divergences; rows whose ids are all -1 give exactly 0.
    """
    opts = DivergenceOptions(divergence=divergence, mode=mode, jsd_beta=jsd_beta, skew=skew,
                             temperature=temperature, zscore=zscore)
    teacher = SparseTeacher(teacher_ids, teacher_logprobs, teacher_tail, counts, logp_mean)
    if student_logits.ndim != 2:
        raise ValueError(f"student logits must be [P, V], found shape {tuple(student_logits.shape)}")
    teacher.check(student_logits.shape[0], opts)
    if zscore:  # standardised over the stored ids inside: the raw logits are all it needs
        log_q_all = up(student_logits)
    else:
        log_q_all = _scaled_logits(student_logits, temperature, False).log_softmax(-1)
    return sparse_from_bins(*student_bins(log_q_all, teacher, opts), teacher, opts)
