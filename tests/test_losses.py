"""Property, golden-value and dense-reference tests of the divergences and RDist (CPU, tiny vocabularies).

The chunked LM head is tested in test_head.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from loss_reference import DIVERGENCES, ref_div

from student.losses import (
    LOG_PROB_FLOOR,
    DivergenceOptions,
    SparseTeacher,
    chunked_distill,
    dense_divergence,
    head_gram,
    rdist,
    relation_from_hidden,
    relation_from_logits,
    sparse_divergence,
    zscore_logits,
)

V = 11


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logits(P: int, vocab: int = V, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(P, vocab, generator=_gen(seed), dtype=torch.float64).float() * scale


def _topk(teacher_logits: torch.Tensor, k: int):
    """Top-k sparse teacher: (ids [P, k], logprobs [P, k], exact tail [P])."""
    logp = teacher_logits.float().log_softmax(-1)
    lp, ids = logp.topk(k, dim=-1)
    tail = logp.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return ids, lp, tail


# ---------------------------------------------------------------------------------------------
# Divergence properties
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("div", DIVERGENCES)
def test_identical_inputs_give_zero(div):
    z = _logits(6)
    assert torch.allclose(dense_divergence(z, z.clone(), divergence=div), torch.zeros(6), atol=1e-7)
    for k, mode in [(4, "tail"), (4, "renorm"), (V, "tail")]:
        ids, lp, tail = _topk(z, k)
        out = sparse_divergence(z, ids, lp, tail, divergence=div, mode=mode)
        assert torch.allclose(out, torch.zeros(6), atol=1e-6), (mode, k, out)


def test_forward_kl_matches_torch_kl_div_and_jsd_endpoints():
    s, t = _logits(5, seed=1), _logits(5, seed=2)
    log_q, log_p = s.log_softmax(-1), t.log_softmax(-1)
    fkl_torch = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)  # KL(p || q)
    rkl_torch = F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)  # KL(q || p)
    fkl = dense_divergence(s, t, divergence="fkl")
    rkl = dense_divergence(s, t, divergence="rkl")
    torch.testing.assert_close(fkl, fkl_torch)
    torch.testing.assert_close(rkl, rkl_torch)
    # TRL convention: beta = 0 is forward KL, beta = 1 is reverse KL.
    torch.testing.assert_close(dense_divergence(s, t, divergence="jsd", jsd_beta=0.0), fkl_torch)
    torch.testing.assert_close(dense_divergence(s, t, divergence="jsd", jsd_beta=1.0), rkl_torch)
    # ... and they are the limits of JSD_beta / beta (resp. / (1 - beta)) of the formula itself.
    eps = 1e-5
    s64, t64 = s.double(), t.double()
    near0 = dense_divergence(s64, t64, divergence="jsd", jsd_beta=eps) / eps
    near1 = dense_divergence(s64, t64, divergence="jsd", jsd_beta=1 - eps) / eps
    torch.testing.assert_close(near0.float(), fkl_torch, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(near1.float(), rkl_torch, rtol=1e-3, atol=1e-5)
    # Skew KL with skew 0 is forward KL, skew reverse KL with skew 0 is reverse KL.
    torch.testing.assert_close(dense_divergence(s, t, divergence="skl", skew=0.0), fkl_torch)
    torch.testing.assert_close(dense_divergence(s, t, divergence="srkl", skew=0.0), rkl_torch)
    ids, lp, tail = _topk(t, V)
    torch.testing.assert_close(sparse_divergence(s, ids, lp, tail, divergence="srkl", skew=0.0), rkl_torch,
                               rtol=1e-5, atol=1e-6)
    # Away from 0 they differ from the plain KLs, and from each other.
    skl, srkl = (dense_divergence(s, t, divergence=d, skew=0.3) for d in ("skl", "srkl"))
    assert not torch.allclose(skl, fkl_torch) and not torch.allclose(srkl, rkl_torch)


def test_jsd_half_is_symmetric_and_tvd_bounded():
    s, t = _logits(7, seed=3, scale=4.0), _logits(7, seed=4, scale=4.0)
    torch.testing.assert_close(
        dense_divergence(s, t, divergence="jsd", jsd_beta=0.5),
        dense_divergence(t, s, divergence="jsd", jsd_beta=0.5),
    )
    # JSD(0.5) <= log 2.
    assert (dense_divergence(s, t, divergence="jsd") <= math.log(2) + 1e-6).all()
    tvd = dense_divergence(s, t, divergence="tvd")
    assert ((tvd >= 0) & (tvd <= 1)).all()
    torch.testing.assert_close(tvd, dense_divergence(t, s, divergence="tvd"))
    # Disjoint supports saturate at 1.
    a = torch.tensor([[60.0, -60.0]])
    b = torch.tensor([[-60.0, 60.0]])
    torch.testing.assert_close(dense_divergence(a, b, divergence="tvd"), torch.ones(1))
    ids, lp, tail = _topk(b, 2)
    tvd_sparse = sparse_divergence(a, ids, lp, tail, divergence="tvd")
    assert 0 <= tvd_sparse.item() <= 1


def test_golden_values_by_hand():
    # p = (1/2, 1/4, 1/4) teacher, q = (1/4, 1/2, 1/4) student.
    p = torch.tensor([[0.5, 0.25, 0.25]])
    q = torch.tensor([[0.25, 0.5, 0.25]])
    t, s = p.log(), q.log()
    ln2 = math.log(2)
    # FKL = 1/2 ln 2 + 1/4 ln(1/2) = 1/4 ln 2; RKL is the same by symmetry of this example.
    assert dense_divergence(s, t, divergence="fkl").item() == pytest.approx(0.25 * ln2, abs=1e-6)
    assert dense_divergence(s, t, divergence="rkl").item() == pytest.approx(0.25 * ln2, abs=1e-6)
    # m = (3/8, 3/8, 1/4): JSD = 1/2 [KL(p||m) + KL(q||m)] = 1/2 ln(4/3) + 1/4 ln(2/3).
    jsd = 0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3)
    assert dense_divergence(s, t, divergence="jsd", jsd_beta=0.5).item() == pytest.approx(jsd, abs=1e-6)
    assert dense_divergence(s, t, divergence="tvd").item() == pytest.approx(0.25, abs=1e-6)
    # m = 0.1 p + 0.9 q = (0.275, 0.475, 0.25): SKL = 1/2 ln(0.5/0.275) + 1/4 ln(0.25/0.475).
    skl = 0.5 * math.log(0.5 / 0.275) + 0.25 * math.log(0.25 / 0.475)
    assert dense_divergence(s, t, divergence="skl", skew=0.1).item() == pytest.approx(skl, abs=1e-6)
    # An asymmetric pair tells the two skews apart: p = (1/2, 1/2), q = (1/4, 3/4), skew 1/2.
    # SKL = KL(p || (3/8, 5/8)) = 1/2 ln(4/3) + 1/2 ln(4/5); SRKL = KL(q || (3/8, 5/8)) = 1/4 ln(2/3) + 3/4 ln(6/5).
    p2, q2 = torch.tensor([[0.5, 0.5]]).log(), torch.tensor([[0.25, 0.75]]).log()
    assert dense_divergence(q2, p2, divergence="skl", skew=0.5).item() == pytest.approx(
        0.5 * math.log(4 / 3) + 0.5 * math.log(4 / 5), abs=1e-6)
    assert dense_divergence(q2, p2, divergence="srkl", skew=0.5).item() == pytest.approx(
        0.25 * math.log(2 / 3) + 0.75 * math.log(6 / 5), abs=1e-6)
    # Tail mode with one stored id: bins p = (1/2, 1/2), q = (1/4, 3/4).
    ids = torch.tensor([[0, -1]])
    lp = torch.tensor([[math.log(0.5), float("nan")]])  # padding content must be ignored
    tail = torch.tensor([math.log(0.5)])
    out = sparse_divergence(s, ids, lp, tail, divergence="fkl", mode="tail")
    assert out.item() == pytest.approx(0.5 * ln2 + 0.5 * math.log(2 / 3), abs=1e-6)
    # Renorm over ids {0, 1}: p = (2/3, 1/3), q = (1/3, 2/3): FKL = 1/3 ln 2.
    ids = torch.tensor([[1, 0]])
    lp = torch.tensor([[math.log(0.25), math.log(0.5)]])
    out = sparse_divergence(s, ids, lp, None, divergence="fkl", mode="renorm")
    assert out.item() == pytest.approx(ln2 / 3, abs=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(0.01, 20.0),
    k=st.integers(1, V),
    div=st.sampled_from(DIVERGENCES),
    mode=st.sampled_from(["tail", "renorm"]),
    beta=st.floats(0.0, 1.0),
    skew=st.floats(0.0, 0.99),
)
def test_property_nonnegative_and_zero_when_identical(seed, scale, k, div, mode, beta, skew):
    s, t = _logits(4, seed=seed, scale=scale), _logits(4, seed=seed + 1, scale=scale)
    opts = {"divergence": div, "jsd_beta": beta, "skew": skew}
    dense = dense_divergence(s, t, **opts)
    assert torch.isfinite(dense).all() and (dense >= -1e-6).all()
    ids, lp, tail = _topk(t, k)
    sparse = sparse_divergence(s, ids, lp, tail, mode=mode, **opts)
    assert torch.isfinite(sparse).all() and (sparse >= -1e-6).all()
    ids, lp, tail = _topk(s, k)
    same = sparse_divergence(s, ids, lp, tail, mode=mode, **opts)
    assert same.abs().max() < 1e-5
    assert dense_divergence(s, s, **opts).abs().max() < 1e-6


# ---------------------------------------------------------------------------------------------
# Masking and empty inputs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "div,mode", [(d, m) for d in DIVERGENCES for m in ("tail", "renorm")] + [("fkl", "sample")]
)
@pytest.mark.parametrize("P", [0, 3])
def test_all_masked_gives_zero_with_finite_grads(div, mode, P):
    z = _logits(P, seed=5).requires_grad_(True)
    ids = torch.full((P, 4), -1, dtype=torch.long)
    lp = torch.full((P, 4), float("nan"))
    tail = torch.full((P,), float("-inf"))
    sampled = mode == "sample"  # sampled ids are recognised from their counts
    counts = torch.zeros((P, 4), dtype=torch.long) if sampled else None
    out = sparse_divergence(z, ids, lp, tail, divergence=div, mode="tail" if sampled else mode, counts=counts)
    assert out.shape == (P,)
    assert torch.equal(out, torch.zeros(P))
    out.sum().backward()
    assert torch.isfinite(z.grad).all() and torch.equal(z.grad, torch.zeros_like(z))


def test_padding_is_ignored_and_rows_are_independent():
    s, t = _logits(5, seed=6), _logits(5, seed=7)
    ids, lp, tail = _topk(t, 5)
    # Same content with padding interleaved (and garbage in the padded slots).
    pid = torch.full((5, 8), -1, dtype=torch.long)
    plp = torch.full((5, 8), float("nan"))
    pid[:, [0, 2, 3, 5, 7]] = ids
    plp[:, [0, 2, 3, 5, 7]] = lp
    for div in DIVERGENCES:
        for mode in ["tail", "renorm"]:
            a = sparse_divergence(s, ids, lp, tail, divergence=div, mode=mode)
            b = sparse_divergence(s, pid, plp, tail, divergence=div, mode=mode)
            torch.testing.assert_close(a, b)
    # A fully padded row is 0 while the others are unchanged.
    pid[2] = -1
    b = sparse_divergence(s, pid, plp, tail, divergence="fkl")
    a = sparse_divergence(s, ids, lp, tail, divergence="fkl")
    assert b[2] == 0
    torch.testing.assert_close(b[[0, 1, 3, 4]], a[[0, 1, 3, 4]])


def test_low_precision_inputs_are_upcast():
    s, t = _logits(4, seed=8), _logits(4, seed=9)
    ids, lp, tail = _topk(t, 6)
    ref = sparse_divergence(s, ids, lp, tail)
    out = sparse_divergence(s.bfloat16(), ids.int(), lp.half(), tail)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=5e-2, atol=5e-3)


# ---------------------------------------------------------------------------------------------
# Sparse paths against dense references
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("div", DIVERGENCES)
def test_sparse_full_cover_equals_dense(div):
    s, t = _logits(6, seed=10), _logits(6, seed=11)
    ids, lp, tail = _topk(t, V)  # K = V: the tail is -inf (empty)
    assert torch.isinf(tail).all() or (tail < -15).all()
    dense = dense_divergence(s, t, divergence=div, jsd_beta=0.3, skew=0.2)
    for mode in ["tail", "renorm"]:
        sparse = sparse_divergence(s, ids, lp, tail, divergence=div, mode=mode, jsd_beta=0.3, skew=0.2)
        torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)
    # Permuted ids change nothing.
    perm = torch.randperm(V, generator=_gen(1))
    sparse = sparse_divergence(s, ids[:, perm], lp[:, perm], tail, divergence=div, jsd_beta=0.3, skew=0.2)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("div", DIVERGENCES)
def test_renorm_equals_dense_on_restricted_support(div):
    s, t = _logits(6, seed=12), _logits(6, seed=13)
    support = torch.tensor([7, 1, 4, 9])
    ids = support.expand(6, -1).clone()
    lp = t.log_softmax(-1)[:, support]
    out = sparse_divergence(s, ids, lp, None, divergence=div, mode="renorm")
    ref = dense_divergence(s[:, support], t[:, support], divergence=div)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("div", DIVERGENCES)
@pytest.mark.parametrize("k", [1, 3, 7])
def test_tail_mode_equals_coarsened_dense(div, k):
    s, t = _logits(6, seed=14), _logits(6, seed=15)
    ids, lp, tail = _topk(t, k)
    # Independent coarsening in float64: k stored bins + one "everything else" bin.
    p, q = t.double().softmax(-1), s.double().softmax(-1)
    pk, qk = p.gather(-1, ids), q.gather(-1, ids)
    p_bins = torch.cat([pk, 1 - pk.sum(-1, keepdim=True)], -1)
    q_bins = torch.cat([qk, 1 - qk.sum(-1, keepdim=True)], -1)
    ref = ref_div(p_bins, q_bins, div, beta=0.3, skew=0.2).float()
    out = sparse_divergence(s, ids, lp, tail, divergence=div, mode="tail", jsd_beta=0.3, skew=0.2)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("div", DIVERGENCES)
def test_dense_matches_float64_reference(div):
    s, t = _logits(5, seed=16), _logits(5, seed=17)
    ref = ref_div(t.double().softmax(-1), s.double().softmax(-1), div, beta=0.7, skew=0.3).float()
    out = dense_divergence(s, t, divergence=div, jsd_beta=0.7, skew=0.3)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_tail_mode_with_teacher_tail_minus_inf_is_finite():
    # Teacher says the stored ids cover everything (tail -inf) but K < V: large, finite loss.
    s = _logits(3, seed=18).requires_grad_(True)
    ids = torch.tensor([[0, 1], [2, 3], [4, 5]])
    lp = torch.log(torch.full((3, 2), 0.5))
    tail = torch.full((3,), float("-inf"))
    for div in DIVERGENCES:
        out = sparse_divergence(s, ids, lp, tail, divergence=div)
        assert torch.isfinite(out).all()
        (g,) = torch.autograd.grad(out.sum(), s)
        assert torch.isfinite(g).all()
    # Reverse KL punishes the student's mass off the ids, which the teacher excludes, at the floored
    # log p = LOG_PROB_FLOOR: sum_j q_j (log q_j - log 1/2) + q_tail (log q_tail - LOG_PROB_FLOOR).
    rkl = sparse_divergence(s, ids, lp, tail, divergence="rkl")
    log_q = s.detach().double().log_softmax(-1)
    q_ids = log_q.gather(-1, ids).exp()
    q_tail = 1 - q_ids.sum(-1)
    ref = (q_ids * (q_ids.log() - math.log(0.5))).sum(-1) + q_tail * (q_tail.log() - LOG_PROB_FLOOR)
    torch.testing.assert_close(rkl.double(), ref, rtol=1e-5, atol=1e-6)


def test_sampled_forward_kl_is_unbiased():
    gen = _gen(123)
    p_logits, q_logits = _logits(1, seed=19, scale=1.5), _logits(1, seed=20, scale=1.5)
    log_p = p_logits.log_softmax(-1)
    trials, n_draws = 20000, 8
    draws = torch.multinomial(log_p.exp().expand(trials, -1), n_draws, replacement=True, generator=gen)
    counts = torch.zeros(trials, V, dtype=torch.long).scatter_add_(1, draws, torch.ones_like(draws))
    ids = torch.where(counts > 0, torch.arange(V).expand(trials, -1), -1)
    lp = torch.where(counts > 0, log_p.expand(trials, -1), 0.0)
    est = sparse_divergence(q_logits.expand(trials, -1), ids, lp, None, counts=counts)
    exact = dense_divergence(q_logits, p_logits, divergence="fkl").item()
    # Per-trial values are unbiased but noisy: the std of the mean is ~ sqrt(Var / trials).
    se = est.std().item() / math.sqrt(trials)
    assert abs(est.mean().item() - exact) < max(5 * se, 1e-3), (est.mean().item(), exact, se)
    # One draw of all N samples on one id: the estimate is exactly log p_i - log q_i there.
    one_id = torch.tensor([[3, -1]])
    one = sparse_divergence(q_logits, one_id, log_p[:, [3, 0]], None, counts=torch.tensor([[n_draws, 0]]))
    torch.testing.assert_close(one, log_p[:, 3] - q_logits.log_softmax(-1)[:, 3])


@pytest.mark.parametrize("div", ["rkl", "jsd", "tvd", "skl", "srkl"])
def test_sample_mode_refuses_biased_divergences(div):
    z = _logits(2)
    ids = torch.tensor([[0, 1], [2, -1]])
    counts = torch.tensor([[3, 1], [4, 0]])
    with pytest.raises(ValueError, match="only forward KL is unbiased"):
        sparse_divergence(z, ids, torch.zeros(2, 2), None, divergence=div, counts=counts)
    with pytest.raises(ValueError, match="only forward KL is unbiased"):
        chunked_distill(torch.randn(2, 4), torch.randn(V, 4), options=DivergenceOptions(divergence=div),
                        teacher=SparseTeacher(ids, torch.zeros(2, 2), counts=counts))


def test_bad_options_raise_clear_errors():
    z = _logits(2)
    ids, lp, tail = _topk(z, 3)
    with pytest.raises(ValueError, match="divergence 'kl' not understood"):
        sparse_divergence(z, ids, lp, tail, divergence="kl")
    with pytest.raises(ValueError, match="tail mode 'sample' not understood.*recognised from their counts"):
        sparse_divergence(z, ids, lp, tail, mode="sample")
    with pytest.raises(ValueError, match="--jsd-beta"):
        dense_divergence(z, z, divergence="jsd", jsd_beta=1.5)
    with pytest.raises(ValueError, match=r"skew must lie in \[0, 1\)"):
        dense_divergence(z, z, divergence="srkl", skew=1.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sparse_divergence(z, ids, lp, tail, temperature=0.0)
    with pytest.raises(ValueError, match="tail mode needs the teacher's tail"):
        sparse_divergence(z, ids, lp, None, mode="tail")
    with pytest.raises(ValueError, match=r"\[P, K\]"):
        sparse_divergence(z, ids[:1], lp[:1], tail)


def test_zscore_logits():
    z = _logits(4, seed=21) * 7 + 3
    zs = zscore_logits(z)
    torch.testing.assert_close(zs.mean(-1), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(zs.std(-1, correction=0), torch.ones(4))
    # Invariant to a per-row shift and positive scale; a constant row gives zeros, not NaN.
    torch.testing.assert_close(zscore_logits(2.5 * z - 11), zs, rtol=1e-5, atol=1e-5)
    assert torch.equal(zscore_logits(torch.full((1, 5), 3.0)), torch.zeros(1, 5))
    # Two teachers that differ only in logit scale give the same standardised divergence.
    s = _logits(4, seed=22)
    a = dense_divergence(s, z, zscore=True)
    b = dense_divergence(s, 3 * z, zscore=True)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    ids, lp, tail = _topk(zscore_logits(z), V)
    torch.testing.assert_close(sparse_divergence(s, ids, lp, tail, zscore=True), a, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Relation distillation
# ---------------------------------------------------------------------------------------------


def test_relation_from_hidden_equals_dense():
    g = _gen(30)
    H = torch.randn(9, 6, generator=g, dtype=torch.float64)
    W = torch.randn(V, 6, generator=g, dtype=torch.float64)
    Hr, Wr = H.clone().requires_grad_(True), W.clone().requires_grad_(True)
    Hd, Wd = H.clone().requires_grad_(True), W.clone().requires_grad_(True)
    R = relation_from_hidden(Hr, Wr)
    Rd = relation_from_logits(Hd @ Wd.T)
    torch.testing.assert_close(R, Rd)
    torch.testing.assert_close(relation_from_hidden(H, None, gram=head_gram(W, chunk_size=4)), Rd.detach())
    # float32 path, and gradients agree too.
    torch.testing.assert_close(relation_from_hidden(H.float(), W.float()), Rd.detach().float(), rtol=1e-4, atol=1e-4)
    weight = torch.randn(9, 9, generator=g, dtype=torch.float64)
    (R * weight).sum().backward()
    (Rd * weight).sum().backward()
    torch.testing.assert_close(Hr.grad, Hd.grad)
    torch.testing.assert_close(Wr.grad, Wd.grad)


@pytest.mark.parametrize("chunk_size", [1, 4, 8, 100])  # smaller than an image, one, two, all images
@pytest.mark.parametrize("checkpoint", [True, False])
def test_chunked_distill_relations_equal_dense(chunk_size, checkpoint):
    """``relation_size``: Z Z^T of each image from the chunk's own logits, values and gradients."""
    g = _gen(31)
    n_img, N, d = 3, 4, 5
    H = torch.randn(n_img * N, d, generator=g, dtype=torch.float64)
    W = torch.randn(V, d, generator=g, dtype=torch.float64)
    z = (H @ W.T).detach()
    ids, lp, tail = _topk(z + torch.randn(z.shape, generator=g, dtype=torch.float64), 3)
    weight = torch.randn(n_img, N, N, generator=g, dtype=torch.float64)
    grads = []
    for fused in (True, False):
        Hr, Wr = H.clone().requires_grad_(True), W.clone().requires_grad_(True)
        out = chunked_distill(Hr, Wr, teacher=SparseTeacher(ids, lp, tail), chunk_size=chunk_size,
                              checkpoint=checkpoint, relation_size=N if fused else 0)
        R = out.relation if fused else relation_from_hidden(Hr.reshape(n_img, N, d), Wr)
        if fused:
            assert R.shape == (n_img, N, N)
            torch.testing.assert_close(R, relation_from_logits((H @ W.T).reshape(n_img, N, V)))
        (out.mdist_sum + (R * weight).sum()).backward()
        grads.append((Hr.grad, Wr.grad))
    torch.testing.assert_close(grads[0], grads[1])
    with pytest.raises(ValueError, match="divide"):
        chunked_distill(H, W, relation_size=5)


def test_rdist_is_one_minus_cosine_and_scale_invariant():
    g = _gen(31)
    Zs, Zt = torch.randn(5, V, generator=g), torch.randn(5, V, generator=g)
    Rs, Rt = relation_from_logits(Zs), relation_from_logits(Zt)
    ref = 1 - F.cosine_similarity(Rs.flatten(), Rt.flatten(), dim=0)
    out = rdist(Rs, Rt)
    assert out.shape == ()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(rdist(1e6 * Rs, Rt), ref)
    torch.testing.assert_close(rdist(Rs, 1e-6 * Rt), ref)
    assert rdist(Rs, Rs.clone()).abs().item() < 1e-6
    # Batched over images, and a zero matrix is 1 rather than NaN (with finite gradients).
    torch.testing.assert_close(rdist(torch.stack([Rs, Rt]), torch.stack([Rt, Rt]))[0], ref)
    zero = torch.zeros(5, 5, requires_grad=True)
    d = rdist(zero, Rt)
    d.backward()
    assert d.item() == pytest.approx(1.0) and torch.isfinite(zero.grad).all()
