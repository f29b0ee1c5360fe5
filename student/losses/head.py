"""The LM head with its losses: cross-entropy and sparse MDist from hidden states, chunk by chunk.

``chunked_distill`` applies the head to a chunk of positions at a time (``logits = hidden_c @ W^T``
in the model's dtype, then fp32), so fp32 [P, V] logits never exist for all positions at once, and
``_FusedHeadLoss`` gives the gradient of each chunk's logits in closed form. Losses are sums with
their counts; the trainer divides by the global counts of a step (all micro-batches, all ranks), so
that gradient accumulation and data parallelism equal one big batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_cache.schema import IGNORE_INDEX
from student.losses.divergences import (
    DivergenceOptions,
    SparseTeacher,
    sparse_from_bins,
    tail_fill,
    up,
)

FORWARD_KL = DivergenceOptions()  # the defaults: forward KL, tail mode

# Bytes per logit held for backward when chunks are not recomputed, measured with saved-tensor hooks
# on chunked_distill: 4.0 (CE) and 4.1 (CE + forward KL, tail mode): the fp32 logits.
LOGIT_BYTES_HELD = 4


def keep_head_logits(n_positions: int, vocab: int, budget_mb: int) -> bool:
    """Whether ``n_positions`` rows of [vocab] logits may stay in memory for backward (no recompute)."""
    return n_positions * vocab * LOGIT_BYTES_HELD <= budget_mb * 2**20


def ce_reference(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Unchunked cross-entropy: logits [P, V], targets [P] (-100 = ignore) -> (sum, count) scalars."""
    total = F.cross_entropy(up(logits), targets.long(), ignore_index=IGNORE_INDEX, reduction="sum")
    return total, (targets != IGNORE_INDEX).sum().to(total.dtype)


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


@dataclass(frozen=True)
class HeadLosses:
    """What ``chunked_distill`` returns: fp32 scalar sums and counts (and the relation matrices)."""

    ce_sum: Tensor
    ce_count: Tensor  # targets != IGNORE_INDEX
    mdist_sum: Tensor
    mdist_count: Tensor  # teacher rows with at least one stored id
    relation: Tensor | None = None  # [P / N, N, N] with relation_size N


@dataclass
class _MDistBins:
    """The teacher-side view of one chunk's MDist: which logits it reads and their gradients.

    ``lse``/``tail_lse`` [c] are the logsumexp of the MDist logits ``z / T`` over the vocabulary and
    off the stored ids; ``s_lp`` [c, K] the student's log-probs at the ids; ``G``/``G_tail`` the
    gradients of the MDist sum with respect to those K + 1 bins."""

    fill: Tensor
    valid: Tensor
    s_lp: Tensor
    lse: Tensor
    tail_lse: Tensor | None
    G: Tensor | None = None
    G_tail: Tensor | None = None


def _mdist_bins(zk: Tensor, lse: Tensor, teacher: SparseTeacher, options: DivergenceOptions,
                need_grad: bool) -> tuple[Tensor, _MDistBins]:
    """MDist sum of one chunk from its MDist logits ``zk`` [c, V] (and their logsumexp ``lse`` [c])."""
    ids = teacher.ids.long()
    valid = ids >= 0
    fill = tail_fill(ids, valid)
    s_lp = zk.gather(-1, ids.clamp_min(0)) - lse[:, None]  # [c, K]
    tail_lse = zk.scatter(-1, fill, torch.finfo(zk.dtype).min).logsumexp(-1) if teacher.uses_tail(options) else None
    bins = _MDistBins(fill, valid, s_lp, lse, tail_lse)
    if not need_grad:
        return sparse_from_bins(s_lp, None if tail_lse is None else tail_lse - lse, teacher, options).sum(), bins
    with torch.enable_grad():  # gradients of the divergence w.r.t. the K + 1 student bins only
        leaves = [s_lp.detach().requires_grad_(True)]
        if tail_lse is not None:
            leaves.append((tail_lse - lse).detach().requires_grad_(True))
        total = sparse_from_bins(leaves[0], leaves[1] if tail_lse is not None else None, teacher, options).sum()
        grads = torch.autograd.grad(total, leaves)
    bins.G = grads[0]
    bins.G_tail = grads[1] if tail_lse is not None else None
    return total.detach(), bins


def _softmax_grad(z: Tensor, lse: Tensor, a: Tensor, bins: _MDistBins | None, b: Tensor | None) -> Tensor:
    """``dL/dz`` [c, V] of ``L = sum_r a_r (-log q_r[target]) + b * MDist`` through ``q = softmax(z)``,
    less the ``-a`` at the targets (the caller adds it); ``bins`` are the MDist's, read of this same
    softmax. See ``_FusedHeadLoss`` for the formula."""
    coef = a.clone()  # multiplies q_m everywhere
    base = lse
    if bins is not None:
        sum_g = bins.G.sum(-1) + (bins.G_tail if bins.G_tail is not None else 0.0)
        coef = coef - b * sum_g
        if bins.G_tail is not None:
            # Dense part as exp(z - tail_lse) * (coef * Q_tail + b G_tail): no overflow, since
            # Q_tail = exp(tail_lse - lse) <= 1. Rows whose tail bin gets no gradient (clamped,
            # empty tail) keep the plain q * coef form.
            use = bins.G_tail != 0
            base = torch.where(use, bins.tail_lse, lse)
            coef = torch.where(use, coef * (bins.tail_lse - lse).exp() + b * bins.G_tail, coef)
    g = (z - base[:, None]).exp_().mul_(coef[:, None])  # [c, V]
    if bins is not None:
        # Stored ids: q_j (a - b sum G) + b G_j, written over the dense part. Padding slots point at the
        # row's largest stored id (``tail_fill``) and carry that id's own value, so every write to an
        # index agrees (a row without ids writes its token 0's plain value).
        valid, fill = bins.valid, bins.fill
        vals = bins.s_lp.exp() * (a - b * sum_g)[:, None] + b * bins.G
        vals = torch.where(valid, vals, vals.gather(-1, torch.where(valid, fill, -1).argmax(-1, keepdim=True)))
        g.scatter_(-1, fill, vals)
    return g


class _FusedHeadLoss(torch.autograd.Function):
    """CE + sparse MDist (+ relation ``Z Z^T``) of one chunk of positions, with the gradient of the
    logits in closed form instead of autograd through every [c, V] op.

    Everything the losses read of the student's logits ``z`` [c, V] is ``lse = logsumexp(z)``, the
    log-probs at the targets and at the stored ids ``s_j = z_j - lse`` and, in tail mode, the tail
    bin ``s_tail = logsumexp(z off the stored ids) - lse``. Given the gradients ``G_j`` and ``G_tail``
    of the (any) divergence with respect to those few bins (autograd on [c, K + 1] tensors), the chain
    rule through ``log_softmax`` gives, per row, with ``q = softmax(z)`` and ``a``/``b`` the upstream
    gradients of the CE and MDist sums::

        dL/dz_m = q_m (a keep - b (sum_j G_j + G_tail)) + b G_tail exp(z_m - tail_lse) [m not stored]
                  + b G_j [m = id_j] - a keep [m = target]

    so backward is one exponential pass over [c, V] and a few scatters, then ``g W`` and ``g^T h``
    (autograd would take about twelve [c, V] passes). A temperature ``T`` on the student's MDist
    logits makes MDist read the softmax of ``z / T``: its part of the formula then runs on ``z / T``
    and is divided by ``T``, a second exponential pass. ``keep``: save the fp32 logits for backward
    (4 bytes per logit); otherwise recompute them from ``hidden`` and the head (one more matmul).
    """

    @staticmethod
    def forward(ctx, hidden, head_weight, targets, teacher, options, groups, size, keep, need_grad):
        dtype = torch.promote_types(hidden.dtype, head_weight.dtype)
        logits = hidden.to(dtype) @ head_weight.to(dtype).T  # [c, V] in the model's (or autocast's) dtype
        ctx.mm_dtype = logits.dtype
        z = up(logits)
        del logits
        lse = z.logsumexp(-1)  # [c]
        zero = z.new_zeros(())
        ce, mdist, bins = zero, zero, None
        t_safe = keep_t = None
        if targets is not None:
            keep_t = targets != IGNORE_INDEX
            t_safe = targets.long().clamp_min(0)
            ce = -torch.where(keep_t, z.gather(-1, t_safe[:, None])[:, 0] - lse, 0.0).sum()
        # zscore is shift and scale free: it reads log_softmax(z) and applies its temperature itself.
        ctx.temperature = 1.0 if options.zscore else options.temperature
        if teacher is not None:
            zk = z if ctx.temperature == 1.0 else z / ctx.temperature
            lse_k = lse if ctx.temperature == 1.0 else zk.logsumexp(-1)
            mdist, bins = _mdist_bins(zk, lse_k, teacher, options, need_grad)
            del zk
        zg = z[: groups * size].reshape(groups, size, z.shape[-1])
        relation = zg @ zg.transpose(-1, -2)
        if need_grad:
            b = bins or _MDistBins(*[None] * 5)
            ctx.save_for_backward(hidden, head_weight, z if keep else None, lse, t_safe, keep_t, b.fill, b.valid,
                                  b.s_lp, b.lse, b.tail_lse, b.G, b.G_tail)
            ctx.has_bins = bins is not None
            ctx.groups, ctx.size = groups, size
        return ce, mdist, relation

    @staticmethod
    def backward(ctx, grad_ce, grad_mdist, grad_rel):
        hidden, head_weight, z, lse, t_safe, keep_t, *saved = ctx.saved_tensors
        bins = _MDistBins(*saved) if ctx.has_bins else None
        mm, T = ctx.mm_dtype, ctx.temperature
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            if z is None:  # recompute the logits exactly as forward did
                z = up(hidden.to(mm) @ head_weight.to(mm).T)
            a = grad_ce.to(z.dtype) * (keep_t.to(z.dtype) if keep_t is not None else z.new_zeros(z.shape[0]))  # [c]
            b = grad_mdist.to(z.dtype)
            if T == 1.0 or bins is None:
                g = _softmax_grad(z, lse, a, bins, b)
            else:  # CE reads softmax(z), MDist softmax(z / T)
                g = _softmax_grad(z / T, bins.lse, torch.zeros_like(a), bins, b / T)
                if t_safe is not None:
                    g += _softmax_grad(z, lse, a, None, None)
            if t_safe is not None:
                g.scatter_add_(-1, t_safe[:, None], -a[:, None])
            if ctx.groups and grad_rel is not None:
                n = ctx.groups * ctx.size
                zg = z[:n].reshape(ctx.groups, ctx.size, -1)
                g[:n] += ((grad_rel + grad_rel.transpose(-1, -2)).to(z.dtype) @ zg).reshape(n, -1)
            g = g.to(mm)
            dh = (g @ head_weight.to(mm)).to(hidden.dtype) if ctx.needs_input_grad[0] else None
            dw = (g.T @ hidden.to(mm)).to(head_weight.dtype) if ctx.needs_input_grad[1] else None
        return dh, dw, None, None, None, None, None, None, None


def _check_inputs(hidden: Tensor, head_weight: Tensor, targets: Tensor | None, teacher: SparseTeacher | None,
                  options: DivergenceOptions, chunk_size: int, relation_size: int) -> None:
    if hidden.ndim != 2 or head_weight.ndim != 2 or hidden.shape[1] != head_weight.shape[1]:
        raise ValueError(
            f"hidden must be [P, d] and head_weight [V, d] with the same d, found {tuple(hidden.shape)} "
            f"and {tuple(head_weight.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    P = hidden.shape[0]
    if relation_size < 0 or (relation_size and P % relation_size):
        raise ValueError(f"relation_size must be >= 0 and divide the {P} positions, got {relation_size}")
    if targets is not None and targets.shape != (P,):
        raise ValueError(f"targets must be [P] = [{P}], found shape {tuple(targets.shape)}")
    if teacher is not None:
        teacher.check(P, options)


def _chunks(P: int, chunk_size: int, relation_size: int) -> list[slice]:
    """Slices of at most ``chunk_size`` positions; with ``relation_size`` N, of whole runs of N (at
    least one, so a chunk may exceed ``chunk_size``)."""
    if relation_size:
        chunk_size = max(1, chunk_size // relation_size) * relation_size
    return [slice(a, a + chunk_size) for a in range(0, P, chunk_size)]


def chunked_distill(
    hidden: Tensor,
    head_weight: Tensor,
    *,
    targets: Tensor | None = None,
    teacher: SparseTeacher | None = None,
    options: DivergenceOptions = FORWARD_KL,
    chunk_size: int = 1024,
    checkpoint: bool = True,
    relation_size: int = 0,
) -> HeadLosses:
    """Cross-entropy and sparse MDist from hidden states, chunked over positions.

    A head bias is not supported (Qwen2/LLaMA-style heads have none).

    Args:
        hidden: [P, d] final hidden states (after the final norm) at the selected positions.
        head_weight: [V, d] LM head weight.
        targets: optional [P] next-token ids, IGNORE_INDEX (-100) = no CE contribution.
        teacher: optional stored teacher distribution at the P positions; rows whose ids are all -1
            contribute nothing.
        options: the divergence (temperature and zscore apply to MDist only, never to CE).
        chunk_size: positions per chunk.
        checkpoint: recompute each chunk's logits in backward (one more matmul per chunk) instead of
            keeping its fp32 [chunk, V] logits alive until then.
        relation_size: ``N`` > 0 also returns the relation matrices ``Z Z^T`` [P / N, N, N] of every run
            of ``N`` consecutive rows (one image's visual positions), from the fp32 logits the chunk
            computes anyway; ``P`` must be a multiple of ``N``. Costs ``4 N^2 V`` FLOPs per image
            (forward and backward) on top of the logits, against ``4 V d^2`` per call for
            ``H (W^T W) H^T`` (``relation_from_hidden``).

    Returns:
        ``HeadLosses``: sums, not means. Empty inputs give zero sums (still connected to the graph),
        never NaN.
    """
    _check_inputs(hidden, head_weight, targets, teacher, options, chunk_size, relation_size)
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or head_weight.requires_grad)
    # Zero sums that still reach both parameters, so backward() works on an empty batch.
    zero = (up(hidden[:0]).sum() + up(head_weight[:0]).sum()) * 0.0
    ce_sum, mdist_sum, relations = zero, zero, []
    for sl in _chunks(hidden.shape[0], chunk_size, relation_size):
        h = hidden[sl]
        groups = h.shape[0] // relation_size if relation_size else 0
        ce, mdist, rel = _FusedHeadLoss.apply(h, head_weight, None if targets is None else targets[sl],
                                              None if teacher is None else teacher[sl], options, groups,
                                              relation_size, not checkpoint, need_grad)
        ce_sum, mdist_sum = ce_sum + ce, mdist_sum + mdist
        relations.append(rel)
    ce_count = zero.new_zeros(()) if targets is None else (targets != IGNORE_INDEX).sum().to(zero.dtype)
    mdist_count = zero.new_zeros(()) if teacher is None else teacher.rows().sum().to(zero.dtype)
    relation = None
    if relation_size:
        relation = torch.cat(relations) if relations else zero.new_zeros((0, relation_size, relation_size))
    return HeadLosses(ce_sum, ce_count, mdist_sum, mdist_count, relation)
