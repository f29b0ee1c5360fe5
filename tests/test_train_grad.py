"""Gradient equality: one big batch == grad accumulation == per-sample micro-batches, and == a dense
full-vocabulary reference, for batches that mix image and text-only samples of different lengths.

Gradients (``.grad``) are compared, not loss curves: AdamW's normalised update hides a global scale
error in the loss normalisation.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from student_fixtures import one_torch_thread, read_all, write_synthetic_cache  # noqa: F401

from kd_cache import open_cache
from student.distill import DistillStudent, LossSettings
from student.losses import rdist, relation_from_logits, sparse_divergence
from student.losses.head import LOGIT_BYTES_HELD, keep_head_logits
from student.model import load_student
from student.stages import set_trainable
from student.stream import StreamingKDDataset
from student.terms import LossWeights
from student.train import accumulate_gradients, enable_activation_checkpointing

WEIGHTS = LossWeights(alpha=1.0, beta=0.5, gamma=2.0)  # distinct so a swapped term would show


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory, processor):
    # 8 samples: 0, 2, 4, 6 have an image; lengths differ; two shards.
    return write_synthetic_cache(tmp_path_factory.mktemp("grad"), processor, n=8, shard_size=5, k=6,
                                 image_every=2, min_len=6, max_len=30)


@pytest.fixture(scope="module")
def samples(cache_path):
    out = read_all(cache_path)
    assert len({len(s["input_ids"]) for s in out}) > 3  # really different lengths
    assert {bool(s["images"]) for s in out} == {True, False}
    return out


def _grads(model, accelerator, micro_batches, distill, settings=None):
    for p in model.parameters():
        p.grad = None
    wrapper = DistillStudent(model, settings or LossSettings(distill=distill, chunk_size=7))
    metrics = accumulate_gradients(accelerator, wrapper, micro_batches, weights=WEIGHTS)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, metrics


def _assert_same(a: dict, b: dict, rtol=2e-4, atol=1e-6):
    assert a.keys() == b.keys() and a
    for name, value in a.items():
        torch.testing.assert_close(value, b[name], rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize(("modules", "distill"), [
    (("projector", "llm"), True),   # DFT
    (("projector",), True),         # DPT (text-only micro-batches take the dummy-image path)
    (("projector", "llm"), False),  # SFT
    (("vision", "projector", "llm"), True),
])
def test_grad_accum_and_per_sample_equal_one_big_batch(student_dir, processor, cache_path, samples, accelerator,
                                                       modules, distill):
    ds = StreamingKDDataset(str(cache_path), processor, image_folder=None, batch_size=8, with_teacher=distill)
    model, _ = load_student(student_dir)
    trained = set_trainable(model, modules)

    big, m_big = _grads(model, accelerator, [ds.collate(samples)], distill)
    accum, m_accum = _grads(model, accelerator, [ds.collate(samples[i:i + 2]) for i in range(0, 8, 2)], distill)
    single, m_single = _grads(model, accelerator, [ds.collate([s]) for s in samples], distill)

    assert set(big) == set(trained)  # every trainable parameter got a gradient, nothing else did
    _assert_same(big, accum)
    _assert_same(big, single)
    for key in ("loss", "ce", "mdist_response", "mdist_visual", "rdist"):
        if distill:
            assert m_big[key] == pytest.approx(m_accum[key], rel=1e-5)
            assert m_big[key] == pytest.approx(m_single[key], rel=1e-5)
    assert m_big["positions"] == m_accum["positions"] == m_single["positions"]


@pytest.mark.parametrize("relation_path", ["fused", "gram"])
def test_gradients_equal_the_dense_full_vocabulary_reference(student_dir, processor, cache_path, samples,
                                                             accelerator, monkeypatch, relation_path):
    """The chunked, gathered, globally normalised losses are the DESIGN.md quantities, computed densely.

    Both ways to the student relations are checked: ``Z Z^T`` from the visual MDist chunk's logits
    (what these small images take) and ``H (W^T W) H^T`` (forced here)."""
    import student.distill as distill_mod

    fuse = distill_mod._fuse_relation
    taken = []
    monkeypatch.setattr(distill_mod, "_fuse_relation", lambda *a: taken.append(fuse(*a)) or (
        taken[-1] if relation_path == "fused" else False))
    ds = StreamingKDDataset(str(cache_path), processor, image_folder=None, batch_size=8)
    model, _ = load_student(student_dir)
    set_trainable(model, ("projector", "llm"))
    micro = [ds.collate(samples[i:i + 3]) for i in range(0, 8, 3)]  # uneven micro-batches: 3, 3, 2
    chunked, metrics = _grads(model, accelerator, micro, True)
    assert taken and all(taken)  # the cost rule picks the fused way at these shapes

    for p in model.parameters():
        p.grad = None
    batch = ds.collate(samples)
    logits = model(**batch["model_inputs"]).logits.float()
    z = logits.reshape(-1, logits.shape[-1])
    ce = F.cross_entropy(z[batch["response_index"]], batch["response_targets"])
    kd = {}
    for kind in ("response", "visual"):
        kd[kind] = sparse_divergence(z[batch[f"{kind}_index"]], batch[f"{kind}_ids"], batch[f"{kind}_logprobs"],
                                     batch[f"{kind}_tail"]).mean()
    rel = rdist(relation_from_logits(z[batch["relation_index"]]), batch["relation_target"]).mean()
    loss = ce + WEIGHTS.alpha * kd["response"] + WEIGHTS.beta * kd["visual"] + WEIGHTS.gamma * rel
    loss.backward()
    dense = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    _assert_same(chunked, dense, rtol=1e-3, atol=1e-5)
    assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-4)
    assert metrics["ce"] == pytest.approx(ce.item(), rel=1e-4)
    assert metrics["rdist"] == pytest.approx(rel.item(), rel=1e-4)


def test_sft_ignores_the_teacher(student_dir, processor, tmp_path, accelerator):
    """Same tokens, different teacher arrays: SFT gradients are identical (and the batch carries no teacher)."""
    grads = []
    for teacher_seed in (0, 1):
        path = write_synthetic_cache(tmp_path / str(teacher_seed), processor, n=4, shard_size=4,
                                     teacher_seed=teacher_seed)
        cache = open_cache(str(path))
        ds = StreamingKDDataset(str(path), processor, image_folder=None, batch_size=4, with_teacher=False)
        model, _ = load_student(student_dir)
        set_trainable(model, ("projector", "llm"))
        grads.append(_grads(model, accelerator, [ds.collate([cache[i] for i in range(4)])], False)[0])
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


def test_gradient_checkpointing_gives_the_same_gradients(student_dir, processor, cache_path, samples, accelerator):
    ds = StreamingKDDataset(str(cache_path), processor, image_folder=None, batch_size=4)
    micro = [ds.collate(samples[:4]), ds.collate(samples[4:])]
    model, _ = load_student(student_dir)
    set_trainable(model, ("projector", "llm"))
    plain, _ = _grads(model, accelerator, micro, True)
    enable_activation_checkpointing(model)
    model.train()
    assert model.model.language_model.gradient_checkpointing
    recomputed, _ = _grads(model, accelerator, micro, True)
    _assert_same(plain, recomputed, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("distill", [True, False])
def test_head_memory_budget_keeps_or_recomputes_logits_with_the_same_gradients(
        student_dir, processor, cache_path, samples, accelerator, monkeypatch, distill):
    """--head-memory-mb picks whether LM-head chunk logits are kept for backward or recomputed; both
    give the same gradients, and the choice follows the micro-batch's head positions x vocabulary."""
    import student.distill as distill_mod

    ds = StreamingKDDataset(str(cache_path), processor, image_folder=None, batch_size=4)
    micro = [ds.collate(samples[:4]), ds.collate(samples[4:])]
    model, _ = load_student(student_dir)
    set_trainable(model, ("projector", "llm"))
    seen = []
    real = distill_mod.chunked_distill

    def spy(*args, **kw):
        seen.append(kw["checkpoint"])
        return real(*args, **kw)

    monkeypatch.setattr(distill_mod, "chunked_distill", spy)
    grads = {}
    for budget in (0, 1024):
        seen.clear()
        grads[budget], _ = _grads(model, accelerator, micro, distill,
                                  LossSettings(distill=distill, chunk_size=7, head_memory_mb=budget))
        assert seen and all(c == (budget == 0) for c in seen), (budget, seen)
    _assert_same(grads[0], grads[1024], rtol=1e-5, atol=1e-7)
    V = model.get_output_embeddings().weight.shape[0]
    assert keep_head_logits(1000, V, 1) == (1000 * V * LOGIT_BYTES_HELD <= 2**20)
    assert not keep_head_logits(2**20, 151936, 1024)  # a real vocabulary recomputes big batches
