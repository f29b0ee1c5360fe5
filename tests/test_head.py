"""The chunked LM head (``chunked_distill``) against an independent dense reference written here: the
full-vocabulary logits of a tiny vocabulary, ``log_softmax`` over all of it, the teacher's bins built
row by row from the definitions, and autograd for the gradients. Chunks are uneven on purpose."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from loss_reference import DIVERGENCES, ref_div

from student.losses import (
    DivergenceOptions,
    HeadLosses,
    SparseTeacher,
    chunked_distill,
    rdist,
    relation_from_logits,
    sparse_divergence,
)

V = 40


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _case(P=23, vocab=V, d=8, K=6, dtype=torch.float64, seed=50, full_cover=False, sampled=False, lean=False):
    """Hidden states, head, targets (30% ignored) and a top-k teacher with fully and partly padded rows."""
    g = _gen(seed)
    hidden = torch.randn(P, d, generator=g, dtype=dtype)
    head = torch.randn(vocab, d, generator=g, dtype=dtype) * 0.5
    targets = torch.randint(0, vocab, (P,), generator=g)
    targets[torch.rand(P, generator=g) < 0.3] = -100
    t_logits = torch.randn(P, vocab, generator=g, dtype=dtype) * 2
    lp, ids = t_logits.log_softmax(-1).topk(vocab if full_cover else K, dim=-1)
    tail = (torch.full((P,), -math.inf, dtype=dtype) if full_cover
            else torch.log1p(-lp.exp().sum(-1).clamp(max=1 - 1e-7)))
    ids[torch.rand(P, generator=g) < 0.25] = -1  # fully padded rows
    if not full_cover:  # (a full-cover row's tail is empty: it cannot lose an id)
        ids[:, -1][torch.rand(P, generator=g) < 0.5] = -1  # partially padded rows
    counts = torch.randint(1, 5, ids.shape, generator=g) if sampled else None
    logp_mean = None
    if lean:
        c = torch.where(ids >= 0, counts, 0).to(dtype)
        logp_mean = (c * lp).sum(-1) / c.sum(-1).clamp_min(1)
        lp = None
    return hidden, head, targets, SparseTeacher(ids, lp, tail, counts, logp_mean)


def _standardise(x):
    return (x - x.mean()) / x.std(correction=0).clamp_min(1e-6)


def _dense_reference(hidden, head, targets, teacher, opts: DivergenceOptions, logits_dtype=None):
    """(CE sum, MDist sum) from the full [P, V] logits, row by row from the definitions."""
    z = hidden @ head.T if logits_dtype is None else (hidden.to(logits_dtype) @ head.to(logits_dtype).T)
    z = z.double()
    ce = F.cross_entropy(z, targets, ignore_index=-100, reduction="sum") if targets is not None else z.sum() * 0
    if teacher is None:
        return ce, z.sum() * 0
    T = 1.0 if opts.zscore else opts.temperature
    log_q = (z / T).log_softmax(-1)
    total = z.sum() * 0
    for r in range(z.shape[0]):
        keep = teacher.ids[r] >= 0
        if not keep.any():
            continue
        ids = teacher.ids[r][keep]
        if teacher.counts is not None:
            w = teacher.counts[r][keep].double()
            w = w / w.sum()
            t_half = (teacher.logp_mean[r].double() if teacher.logp_mean is not None
                      else (w * teacher.logprobs[r][keep].double()).sum())
            total = total + t_half - (w * log_q[r, ids]).sum()
            continue
        lp = teacher.logprobs[r][keep].double()
        if opts.zscore:
            p = (_standardise(lp) / opts.temperature).softmax(-1)
            q = (_standardise(z[r, ids]) / opts.temperature).softmax(-1)
        elif opts.mode.value == "renorm":
            p, q = lp.softmax(-1), log_q[r, ids].softmax(-1)
        else:
            p = torch.cat([lp.exp(), teacher.tail[r].double().exp()[None]])
            p = p / p.sum()
            q_ids = log_q[r, ids].exp()
            q = torch.cat([q_ids, (1 - q_ids.sum()).clamp_min(0)[None]])
        total = total + ref_div(p, q, opts.divergence.value, opts.jsd_beta, opts.skew)
    return ce, total


def _mean_loss(ce_sum, ce_n, mdist_sum, mdist_n):
    return ce_sum / ce_n.clamp_min(1) + 0.7 * mdist_sum / mdist_n.clamp_min(1)


def _run(hidden, head, targets, teacher, opts, autocast=False, **kw):
    h, w = hidden.clone().requires_grad_(True), head.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = chunked_distill(h, w, targets=targets, teacher=teacher, options=opts, **kw)
    _mean_loss(out.ce_sum, out.ce_count, out.mdist_sum, out.mdist_count).backward()
    return out, h.grad, w.grad


def _reference(hidden, head, targets, teacher, opts, logits_dtype=None):
    h, w = hidden.clone().requires_grad_(True), head.clone().requires_grad_(True)
    ce, mdist = _dense_reference(h, w, targets, teacher, opts, logits_dtype)
    ce_n = (targets != -100).sum().double() if targets is not None else torch.zeros((), dtype=torch.float64)
    mdist_n = teacher.rows().sum().double() if teacher is not None else torch.zeros((), dtype=torch.float64)
    _mean_loss(ce, ce_n, mdist, mdist_n).backward()
    return ce, ce_n, mdist, mdist_n, h.grad, w.grad


CASES = [{"divergence": d} for d in DIVERGENCES] + [
    {"divergence": "jsd", "jsd_beta": 0.3}, {"divergence": "skl", "skew": 0.4}, {"divergence": "srkl", "skew": 0.4},
    {"divergence": "fkl", "mode": "renorm"}, {"divergence": "jsd", "mode": "renorm"},
    {"divergence": "srkl", "mode": "renorm"}, {"divergence": "fkl", "temperature": 2.0},
    {"divergence": "rkl", "mode": "renorm", "temperature": 0.5}, {"divergence": "fkl", "zscore": True},
    {"divergence": "jsd", "zscore": True, "temperature": 2.0},
]


@pytest.mark.parametrize("checkpoint", [True, False])
@pytest.mark.parametrize("case", CASES + [{"sampled": True}, {"sampled": True, "lean": True}, {"no_teacher": True},
                                          {"full_cover": True}, {"full_cover": True, "divergence": "rkl"},
                                          {"no_targets": True, "divergence": "srkl"},
                                          {"no_targets": True, "temperature": 3.0}])
def test_chunked_head_equals_the_dense_reference(case, checkpoint):
    """Values and gradients of every divergence and mode, sampled ids with and without per-entry
    log-probs, temperature, zscore, padded rows, an empty tail, CE alone and MDist alone, in float64,
    over 23 positions in chunks of 5 (the last one shorter)."""
    case = dict(case)
    flags = {k: case.pop(k, False) for k in ("sampled", "lean", "no_teacher", "full_cover", "no_targets")}
    hidden, head, targets, teacher = _case(full_cover=flags["full_cover"], sampled=flags["sampled"],
                                           lean=flags["lean"])
    P, chunk = hidden.shape[0], 5
    assert P % chunk != 0
    targets = None if flags["no_targets"] else targets
    teacher = None if flags["no_teacher"] else teacher
    opts = DivergenceOptions(**case)
    out, gh, gw = _run(hidden, head, targets, teacher, opts, chunk_size=chunk, checkpoint=checkpoint)
    ce, ce_n, mdist, mdist_n, gh_ref, gw_ref = _reference(hidden, head, targets, teacher, opts)
    assert isinstance(out, HeadLosses) and out.relation is None
    torch.testing.assert_close(out.ce_sum, ce.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.mdist_sum, mdist.detach(), rtol=1e-9, atol=1e-10)
    assert out.ce_count.item() == ce_n.item() and out.mdist_count.item() == mdist_n.item()
    torch.testing.assert_close(gh, gh_ref, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-8, atol=1e-10)
    assert gh.abs().max() > 1e-3 and gw.abs().max() > 1e-3


def test_chunked_head_in_float32_and_bf16_autocast():
    """float32: the reference's precision. bf16 autocast: the head's matmuls run in bf16 (the reference
    rounds its logits the same way), everything after them in fp32."""
    hidden, head, targets, teacher = _case(P=37, vocab=64, d=16, K=8, dtype=torch.float32, seed=51)
    opts = DivergenceOptions()
    for autocast, tol in ((False, 1e-5), (True, 2e-2)):
        out, gh, gw = _run(hidden, head, targets, teacher, opts, autocast=autocast, chunk_size=9)
        ce, _, mdist, _, gh_ref, gw_ref = _reference(hidden.double(), head.double(), targets, teacher, opts,
                                                     logits_dtype=torch.bfloat16 if autocast else None)
        assert gh.dtype == torch.float32 and gw.dtype == torch.float32
        torch.testing.assert_close(out.mdist_sum.double(), mdist.detach(), rtol=tol, atol=tol)
        torch.testing.assert_close(out.ce_sum.double(), ce.detach(), rtol=tol, atol=tol)
        torch.testing.assert_close(gh.double(), gh_ref, rtol=tol, atol=tol * gh_ref.abs().max().item())
        torch.testing.assert_close(gw.double(), gw_ref, rtol=tol, atol=tol * gw_ref.abs().max().item())


@pytest.mark.parametrize("case", [{"divergence": "fkl"}, {"divergence": "jsd"}, {"divergence": "srkl", "skew": 0.3},
                                  {"divergence": "tvd", "temperature": 2.0}, {"divergence": "fkl", "mode": "renorm"}])
def test_chunked_head_gradcheck(case):
    hidden, head, targets, teacher = _case(P=11, vocab=13, d=4, K=3, seed=52)
    opts = DivergenceOptions(**case)

    def f(h, w):
        out = chunked_distill(h, w, targets=targets, teacher=teacher, options=opts, chunk_size=4)
        return out.ce_sum + 0.5 * out.mdist_sum

    assert torch.autograd.gradcheck(f, (hidden.requires_grad_(True), head.requires_grad_(True)))


def test_relations_from_the_head_chunks_give_the_dense_gradient():
    """``relation_size``: Z Z^T per image from the chunk's own logits, with MDist and CE in the same
    chunks (chunks of whole images, the last one shorter), against autograd on the dense logits."""
    hidden, head, targets, teacher = _case(P=24, seed=53)
    n_img, N = 6, 4
    target_rel = torch.eye(N, dtype=torch.float64).expand(n_img, N, N)

    h, w = hidden.clone().requires_grad_(True), head.clone().requires_grad_(True)
    out = chunked_distill(h, w, targets=targets, teacher=teacher, chunk_size=9, relation_size=N)
    (_mean_loss(out.ce_sum, out.ce_count, out.mdist_sum, out.mdist_count)
     + 0.3 * rdist(out.relation, target_rel).sum()).backward()

    hr, wr = hidden.clone().requires_grad_(True), head.clone().requires_grad_(True)
    ce, mdist = _dense_reference(hr, wr, targets, teacher, DivergenceOptions())
    rel = relation_from_logits((hr @ wr.T).reshape(n_img, N, V))
    (_mean_loss(ce, out.ce_count, mdist, out.mdist_count) + 0.3 * rdist(rel, target_rel).sum()).backward()
    torch.testing.assert_close(out.relation, rel.detach())
    torch.testing.assert_close(h.grad, hr.grad, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(w.grad, wr.grad, rtol=1e-8, atol=1e-10)


def test_sample_logp_mean_replaces_per_entry_logprobs():
    """A sample-mode cache stores logp_mean = sum_i (c_i/N) log p_i instead of the per-entry log-probs:
    same per-position values and gradients as the per-entry estimator, direct and chunked, and a
    hand-written reference: sum_i (c_i/N)(log p_i - log q_i) entry by entry."""
    hidden, head, targets, teacher = _case(sampled=True, seed=44)
    ids, lp, counts = teacher.ids, teacher.logprobs, teacher.counts
    real = ids >= 0
    c = torch.where(real, counts, 0).double()
    logp_mean = (c * torch.where(real, lp, 0.0)).sum(-1) / c.sum(-1).clamp_min(1)
    logits = (hidden @ head.T).float().requires_grad_(True)
    with_lp = sparse_divergence(logits, ids, lp.float(), None, counts=counts)
    (g_lp,) = torch.autograd.grad(with_lp.sum(), logits)
    lean = sparse_divergence(logits, ids, None, None, counts=counts, logp_mean=logp_mean.float())
    (g_lean,) = torch.autograd.grad(lean.sum(), logits)
    torch.testing.assert_close(lean, with_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_lean, g_lp, rtol=1e-6, atol=1e-7)
    log_q = logits.detach().double().log_softmax(-1)
    for p in range(ids.shape[0]):
        n = float(c[p].sum())
        ref = sum(float(c[p, j]) / n * (float(lp[p, j]) - float(log_q[p, ids[p, j]]))
                  for j in range(ids.shape[1]) if ids[p, j] >= 0)
        assert float(lean[p].detach()) == pytest.approx(ref, abs=1e-5)
    assert (lean[~real.any(-1)] == 0).all()
    lean_teacher = SparseTeacher(ids, None, teacher.tail, counts, logp_mean.float())
    out_lean, gh_lean, gw_lean = _run(hidden.float(), head.float(), targets, lean_teacher, DivergenceOptions(),
                                      chunk_size=5)
    out_lp, gh_lp, gw_lp = _run(hidden.float(), head.float(), targets, SparseTeacher(ids, lp.float(), None, counts),
                                DivergenceOptions(), chunk_size=5)
    torch.testing.assert_close(out_lean.mdist_sum, out_lp.mdist_sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh_lean, gh_lp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw_lean, gw_lp, rtol=1e-5, atol=1e-6)
    # logp_mean without counts, or log-probs missing without logp_mean, are refused
    with pytest.raises(ValueError, match="logp_mean"):
        sparse_divergence(logits, ids, lp.float(), teacher.tail, logp_mean=logp_mean.float())
    with pytest.raises(ValueError, match="log-probs .* are required"):
        sparse_divergence(logits, ids, None, None, counts=counts)


def test_checkpoint_does_not_keep_chunk_logits():
    hidden, head, targets, teacher = _case(P=12, dtype=torch.float32)
    h = hidden.requires_grad_(True)
    w = head.requires_grad_(True)
    chunk = 4

    def saved_shapes(checkpoint):
        shapes = []

        def pack(x):
            shapes.append(tuple(x.shape))
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            out = chunked_distill(h, w, targets=targets, teacher=teacher, chunk_size=chunk, checkpoint=checkpoint)
        (out.ce_sum + out.mdist_sum).backward()
        return shapes

    assert (chunk, V) in saved_shapes(False)
    assert (chunk, V) not in saved_shapes(True)


def test_empty_inputs_give_zero_not_nan():
    head = torch.randn(V, 8, requires_grad=True)
    hidden = torch.randn(0, 8, requires_grad=True)
    teacher = SparseTeacher(torch.full((0, 4), -1), torch.zeros(0, 4), torch.zeros(0))
    out = chunked_distill(hidden, head, targets=torch.zeros(0, dtype=torch.long), teacher=teacher)
    loss = _mean_loss(out.ce_sum, out.ce_count, out.mdist_sum, out.mdist_count)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(head.grad, torch.zeros_like(head))
    # All positions ignored / all teacher rows padded.
    hidden = torch.randn(5, 8, requires_grad=True)
    teacher = SparseTeacher(torch.full((5, 4), -1), torch.full((5, 4), float("nan")), torch.zeros(5))
    out = chunked_distill(hidden, head, targets=torch.full((5,), -100), teacher=teacher, chunk_size=2)
    assert out.ce_count.item() == 0 and out.mdist_count.item() == 0
    loss = _mean_loss(out.ce_sum, out.ce_count, out.mdist_sum, out.mdist_count)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(head.grad).all()
    # No targets and no teacher: zero sums and counts.
    out = chunked_distill(hidden, head)
    assert all(v.item() == 0 for v in (out.ce_sum, out.ce_count, out.mdist_sum, out.mdist_count))


def test_split_batches_with_global_count_match_one_call():
    """Gradient accumulation: sums over micro-batches / global count == one big batch (gradients)."""
    hidden, head, targets, teacher = _case(seed=41, dtype=torch.float32)
    _, gh_ref, gw_ref = _run(hidden, head, targets, teacher, DivergenceOptions(), chunk_size=4)

    h = hidden.clone().requires_grad_(True)
    w = head.clone().requires_grad_(True)
    halves = [slice(0, 9), slice(9, 23)]
    parts = [chunked_distill(h[sl], w, targets=targets[sl], teacher=teacher[sl], chunk_size=4) for sl in halves]
    ce_n = sum(p.ce_count for p in parts)
    mdist_n = sum(p.mdist_count for p in parts)
    for p in parts:  # one backward per micro-batch, as in gradient accumulation
        _mean_loss(p.ce_sum, ce_n, p.mdist_sum, mdist_n).backward()
    torch.testing.assert_close(h.grad, gh_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, gw_ref, rtol=1e-5, atol=1e-6)

    # The per-micro-batch mean (the common slip) gives a different gradient on uneven halves.
    w2 = head.clone().requires_grad_(True)
    for sl in halves:
        o = chunked_distill(hidden[sl], w2, targets=targets[sl], teacher=teacher[sl], chunk_size=4)
        _mean_loss(o.ce_sum, o.ce_count, o.mdist_sum, o.mdist_count).backward()
    assert not torch.allclose(w2.grad / 2, gw_ref, rtol=1e-3, atol=1e-5)


def test_bad_inputs_raise_clear_errors():
    hidden, head, targets, teacher = _case(P=6)
    with pytest.raises(ValueError, match="divide"):
        chunked_distill(hidden, head, relation_size=5)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        chunked_distill(hidden, head, chunk_size=0)
    with pytest.raises(ValueError, match=r"targets must be \[P\] = \[6\]"):
        chunked_distill(hidden, head, targets=targets[:5])
    with pytest.raises(ValueError, match=r"teacher ids must be \[P, K\] with P = 6"):
        chunked_distill(hidden, head, teacher=teacher[:5])
    with pytest.raises(ValueError, match="same d"):
        chunked_distill(hidden, head[:, :3])
