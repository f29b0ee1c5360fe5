"""LLaVADI strategies in kd-train: prompt positions, hidden-state alignment (MLP beside the model),
affinity, z-score logits. Real caches built by ``kd_cache.build.build_cache`` from the tiny teacher.

References are computed by hand from per-sample *unpadded* student forwards and the raw cache arrays,
so padding, flat indexing, row bookkeeping and global normalisation are all checked together.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from student_fixtures import Killed, kill_after_checkpoint, one_torch_thread, read_all  # noqa: F401
from typer.testing import CliRunner

from cli.kd_train_cli import app
from kd_cache import open_cache
from kd_cache.build import BuildConfig, build_cache
from kd_cache.schema import HiddenInfo, SparseInfo
from student.cache_checks import check_cache_options
from student.checkpoints import checkpoint_dirs
from student.config import TrainConfig
from student.distill import (
    PROJECTOR_DIR,
    DistillStudent,
    HiddenProjector,
    LossSettings,
    batch_counts,
)
from student.losses import (
    affinity_loss,
    dense_divergence,
    hidden_alignment,
    sparse_divergence,
)
from student.model import load_student
from student.stages import set_trainable
from student.stream import StreamingKDDataset
from student.terms import TERM_NAMES, LossWeights
from student.train import accumulate_gradients, train

ALL = ("response", "visual", "prompt")


@pytest.fixture(scope="module")
def caches(tmp_path_factory, teacher_dir, chat_data):
    """``full``: response,visual,prompt + hidden states; ``plain``: the LLaVA-KD default (no hidden, no prompt)."""
    root = tmp_path_factory.mktemp("llavadi")
    data, images = chat_data
    common = {"teacher": str(teacher_dir), "data": str(data), "image_folder": str(images), "top_k": 8,
              "device": "cpu", "progress": False}
    build_cache(BuildConfig(out=str(root / "full"), shard_size=4, hidden=True, positions="response,visual,prompt",
                            **common))
    build_cache(BuildConfig(out=str(root / "plain"), shard_size=8, limit=4, **common))
    build_cache(BuildConfig(out=str(root / "resp"), shard_size=8, limit=3, positions="response", **common))
    return {"full": root / "full", "plain": root / "plain", "resp": root / "resp"}


@pytest.fixture(scope="module")
def samples(caches):
    out = read_all(caches["full"])
    assert {bool(s["images"]) for s in out} == {True, False}
    assert all(len(s["prompt_positions"]) and s["prompt_hidden"].shape[1] == 64 for s in out)
    return out


def _dataset(path, processor, settings: LossSettings, batch_size=4):
    return StreamingKDDataset(str(path), processor, image_folder=None, batch_size=batch_size, kinds=settings.kinds,
                              hidden_kinds=settings.kinds if settings.hidden_loss else (),
                              affinity=settings.affinity)


def _wrapper(student_dir, settings, seed=0):
    model, _ = load_student(student_dir)
    set_trainable(model, ("projector", "llm"))
    torch.manual_seed(seed)
    return DistillStudent(model, settings, teacher_hidden_size=64)


def _unpadded_hidden(model, processor, sample, folder):
    """The student's final hidden states for one sample, run alone (no padding): [L, d]."""
    from PIL import Image

    ids = torch.from_numpy(np.asarray(sample["input_ids"], dtype=np.int64))[None]
    px = None
    if sample["images"]:
        ims = [Image.open(folder / p).convert("RGB") for p in sample["images"]]
        px = processor.image_processor(images=ims, return_tensors="pt")["pixel_values"]
    return model.model(input_ids=ids, pixel_values=px, use_cache=False).last_hidden_state[0]


# ------------------------------------------------------------------------------------------ pure losses


def test_hidden_alignment_and_affinity_properties():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    assert torch.equal(hidden_alignment(a, a, "mse"), torch.zeros(5))
    torch.testing.assert_close(hidden_alignment(a, a * 3.0, "cosine"), torch.zeros(5), atol=1e-6, rtol=0)
    torch.testing.assert_close(hidden_alignment(a, b, "mse"), ((a - b) ** 2).mean(-1))
    torch.testing.assert_close(hidden_alignment(a, -a, "cosine"), torch.full((5,), 2.0))
    assert hidden_alignment(a[:0], b[:0]).shape == (0,)
    with pytest.raises(ValueError, match="project the student to the teacher's width"):
        hidden_alignment(a, b[:, :3])
    with pytest.raises(ValueError, match="'mse' or 'cosine'"):
        hidden_alignment(a, b, "l1")
    # Affinity: width free, invariant to per-token scale, 0 for the same geometry, padding ignored.
    sv, sr = torch.randn(2, 4, 6, generator=g), torch.randn(2, 3, 6, generator=g)
    rot = torch.linalg.qr(torch.randn(6, 6, generator=g))[0]
    tv = torch.cat([sv @ rot, torch.zeros(2, 4, 5)], -1) * 2.5  # a wider teacher with the same angles
    tr = torch.cat([sr @ rot, torch.zeros(2, 3, 5)], -1)
    vm, rm = torch.ones(2, 4, dtype=torch.bool), torch.ones(2, 3, dtype=torch.bool)
    torch.testing.assert_close(affinity_loss(sv, sr, tv, tr, vm, rm), torch.zeros(2), atol=1e-6, rtol=0)
    noisy = affinity_loss(sv, sr, torch.randn(2, 4, 11, generator=g), tr, vm, rm)
    assert (noisy > 0).all() and torch.isfinite(noisy).all()
    empty = affinity_loss(sv[:, :1], sr, tv[:, :1], tr, torch.zeros(2, 1, dtype=torch.bool), rm)
    assert torch.equal(empty, torch.zeros(2))


def test_affinity_ignores_padding_rows():
    g = torch.Generator().manual_seed(3)
    sv, sr, tv, tr = (torch.randn(1, 4, 6, generator=g), torch.randn(1, 3, 6, generator=g),
                      torch.randn(1, 4, 8, generator=g), torch.randn(1, 3, 8, generator=g))
    vm = torch.tensor([[True, True, False, False]])
    rm = torch.tensor([[True, False, True]])
    padded = affinity_loss(sv, sr, tv, tr, vm, rm)
    sv2, tv2 = sv.clone(), tv.clone()
    sv2[:, 2:], tv2[:, 2:] = 123.0, -7.0  # anything in the padding
    torch.testing.assert_close(affinity_loss(sv2, sr, tv2, tr, vm, rm), padded)
    ref = affinity_loss(sv[:, :2], sr[:, [0, 2]], tv[:, :2], tr[:, [0, 2]], vm[:, :2], rm[:, [0, 2]])
    torch.testing.assert_close(padded, ref)


def _topk(logits, k):
    lp = logits.log_softmax(-1)
    top = lp.topk(k, -1)
    tail = torch.log1p(-top.values.exp().sum(-1).clamp_max(1 - 1e-7))
    return top.indices, top.values, tail


@pytest.mark.parametrize("divergence", ["fkl", "rkl", "jsd"])
def test_zscore_over_the_stored_ids(divergence):
    """--zscore on a top-k cache = the dense z-score divergence of both models restricted to the k ids;
    with k = V it is the full dense z-score divergence. Teacher temperature/shift does not matter."""
    g = torch.Generator().manual_seed(1)
    V, K = 40, 6
    s = torch.randn(5, V, generator=g, dtype=torch.float64) * 2
    t = torch.randn(5, V, generator=g, dtype=torch.float64) * 4
    ids, lp, tail = _topk(t, K)
    got = sparse_divergence(s, ids, lp, tail, divergence=divergence, zscore=True)
    ref = dense_divergence(s.gather(-1, ids), t.gather(-1, ids), divergence=divergence, zscore=True)
    torch.testing.assert_close(got, ref)
    ids2, lp2, tail2 = _topk(t / 3.0 + 5.0, K)  # the same ranking from a hotter, shifted teacher
    torch.testing.assert_close(sparse_divergence(s, ids2, lp2, tail2, divergence=divergence, zscore=True), got)
    full = _topk(t, V)
    torch.testing.assert_close(sparse_divergence(s, *full, divergence=divergence, zscore=True),
                               dense_divergence(s, t, divergence=divergence, zscore=True))
    # Same logits on the stored ids: 0, whatever the student does elsewhere.
    s2 = s.clone().scatter_(-1, ids, t.gather(-1, ids) * 0.5 - 1)
    torch.testing.assert_close(sparse_divergence(s2, ids, lp, tail, divergence=divergence, zscore=True),
                               torch.zeros(5, dtype=torch.float64), atol=1e-12, rtol=0)


def test_chunked_zscore_equals_the_direct_sparse_divergence():
    """The trainer's path (LM head applied chunk by chunk, uneven chunks) gives the same z-score KD and CE."""
    from student.losses import DivergenceOptions, SparseTeacher, chunked_distill

    g = torch.Generator().manual_seed(2)
    h, w = torch.randn(11, 8, generator=g), torch.randn(30, 8, generator=g)
    ids, lp, tail = _topk(torch.randn(11, 30, generator=g) * 3, 5)
    ids[3, 2:] = -1  # a short row
    out = chunked_distill(h, w, targets=torch.randint(0, 30, (11,), generator=g),
                          teacher=SparseTeacher(ids, lp, tail),
                          options=DivergenceOptions(zscore=True, divergence="jsd"), chunk_size=4)
    ref = sparse_divergence(h @ w.T, ids, lp, tail, zscore=True, divergence="jsd")
    torch.testing.assert_close(out.mdist_sum, ref.sum())


def test_zscore_edge_rows_and_sampled_caches():
    s = torch.randn(3, 10, requires_grad=True)
    ids = torch.tensor([[4, -1, -1], [-1, -1, -1], [1, 2, 3]])
    lp = torch.tensor([[-0.1, 0.0, 0.0], [0.0, 0.0, 0.0], [-1.0, -1.0, -1.0]])  # 1 id, none, constant
    out = sparse_divergence(s, ids, lp, torch.zeros(3), zscore=True)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(s.grad).all()
    with pytest.raises(ValueError, match="zscore cannot be used with sampled teacher ids"):
        sparse_divergence(s, ids, lp, None, counts=torch.ones_like(ids), zscore=True)


# ------------------------------------------------------------------------------------ the trainer's losses


def test_losses_equal_hand_computed_references(student_dir, processor, caches, samples, chat_data):
    """hidden (mse and cosine), affinity and prompt MDist from the batched forward == per-sample references."""
    batch_samples = samples[2:6]  # two image samples, one text-only, one image: lengths differ
    assert len({len(s["input_ids"]) for s in batch_samples}) > 1
    for loss in ("mse", "cosine"):
        settings = LossSettings(kinds=ALL, hidden_loss=loss, affinity=True, chunk_size=5)
        wrapper = _wrapper(student_dir, settings)
        ds = _dataset(caches["full"], processor, settings)
        batch = ds.collate(batch_samples)
        with torch.no_grad():
            sums = wrapper(batch)
        counts = dict(zip(TERM_NAMES, batch_counts(batch, settings).tolist()))

        hid_sum, hid_n, aff_sum, aff_n, prompt_sum, prompt_n = 0.0, 0, 0.0, 0, 0.0, 0
        head = wrapper.student.get_output_embeddings().weight
        with torch.no_grad():
            for s in batch_samples:
                h = _unpadded_hidden(wrapper.student, processor, s, chat_data[1])
                for kind in ALL:
                    pos = torch.from_numpy(s[f"{kind}_positions"].astype(np.int64))
                    proj = wrapper.hidden_projector.fc2(F.gelu(wrapper.hidden_projector.fc1(h[pos])))
                    t = torch.from_numpy(s[f"{kind}_hidden"].astype(np.float32))
                    if loss == "mse":
                        per = ((proj - t) ** 2).sum(-1) / t.shape[1]
                    else:
                        per = 1 - (proj * t).sum(-1) / (proj.norm(dim=-1) * t.norm(dim=-1))
                    hid_sum, hid_n = hid_sum + per.sum().item(), hid_n + len(pos)
                pv = torch.from_numpy(s["prompt_positions"].astype(np.int64))
                kd = sparse_divergence(h[pv] @ head.T, torch.from_numpy(s["prompt_ids"]).long(),
                                       torch.from_numpy(s["prompt_logprobs"].astype(np.float32)),
                                       torch.from_numpy(s["prompt_tail"]))
                prompt_sum, prompt_n = prompt_sum + kd.sum().item(), prompt_n + len(pv)
                if s["images"]:
                    v = torch.from_numpy(s["visual_positions"].astype(np.int64))
                    r = torch.from_numpy(s["response_positions"].astype(np.int64))

                    def sim(a, b):
                        return (a / a.norm(dim=-1, keepdim=True)) @ (b / b.norm(dim=-1, keepdim=True)).T

                    s_aff = sim(h[v], h[r])
                    t_aff = sim(torch.from_numpy(s["visual_hidden"].astype(np.float32)),
                                torch.from_numpy(s["response_hidden"].astype(np.float32)))
                    aff_sum, aff_n = aff_sum + ((s_aff - t_aff) ** 2).mean().item(), aff_n + 1
        assert counts["hidden"] == hid_n and counts["affinity"] == aff_n == 3 and counts["mdist_prompt"] == prompt_n
        assert sums["hidden_sum"].item() / hid_n == pytest.approx(hid_sum / hid_n, rel=1e-4)
        assert sums["affinity_sum"].item() / aff_n == pytest.approx(aff_sum / aff_n, rel=1e-4)
        assert sums["mdist_prompt_sum"].item() / prompt_n == pytest.approx(prompt_sum / prompt_n, rel=1e-4)


def test_prompt_positions_count_only_when_requested(student_dir, processor, caches, samples):
    llava_kd = LossSettings()  # response, visual
    ds = _dataset(caches["full"], processor, llava_kd)
    batch = ds.collate(samples[:4])
    assert "prompt_ids" not in batch and "prompt_index" not in batch and "visual_hidden" not in batch
    wrapper = _wrapper(student_dir, llava_kd)
    with torch.no_grad():
        assert wrapper(batch)["mdist_prompt_sum"].item() == 0.0
    assert batch_counts(batch, llava_kd)[3] == 0
    # A collated prompt array is still ignored unless the settings ask for prompt positions.
    full_batch = _dataset(caches["full"], processor, LossSettings(kinds=ALL)).collate(samples[:4])
    with torch.no_grad():
        base = wrapper(full_batch)
        wrapper.settings = LossSettings(kinds=ALL)
        with_prompt = wrapper(full_batch)
    assert base["mdist_prompt_sum"].item() == 0.0 and with_prompt["mdist_prompt_sum"].item() > 0
    for key in ("ce_sum", "mdist_response_sum", "mdist_visual_sum", "rdist_sum"):
        assert base[key].item() == with_prompt[key].item()


def test_a_response_only_cache_still_gives_ce_and_rdist(student_dir, processor, caches):
    """Visual positions that were not cached are derived from the image tokens, so RDist still lines up."""
    cache = open_cache(str(caches["resp"]))
    samples = [cache[i] for i in range(len(cache))]
    assert cache.manifest.positions == ("response",) and all(len(s["visual_positions"]) == 0 for s in samples)
    settings = LossSettings(kinds=("response",))
    batch = _dataset(caches["resp"], processor, settings, batch_size=3).collate(samples)
    n_images = sum(len(s["images"]) for s in samples)
    assert n_images == 3 and "visual_ids" not in batch and batch["relation_index"].shape[0] == n_images
    T = batch["model_inputs"]["input_ids"].shape[1]
    image_id = cache.manifest.image_token_id
    expected = np.concatenate([b * T + np.nonzero(s["input_ids"] == image_id)[0] for b, s in enumerate(samples)])
    np.testing.assert_array_equal(batch["visual_index"].numpy(), expected)
    with torch.no_grad():
        sums = _wrapper(student_dir, settings)(batch)
    assert sums["mdist_response_sum"] > 0 and 0 < sums["rdist_sum"] <= 4 and sums["mdist_visual_sum"] == 0
    counts = batch_counts(batch, settings)
    assert counts[2] == 0 and counts[4] == n_images  # no visual MDist; one relation matrix per image


def test_grad_accum_equals_one_big_batch_with_every_llavadi_term(student_dir, processor, caches, samples,
                                                                  accelerator):
    settings = LossSettings(kinds=ALL, hidden_loss="mse", affinity=True, chunk_size=7)
    weights = LossWeights(alpha=1.0, beta=0.5, gamma=2.0, delta=0.7, hidden=1.3, affinity=3.0)
    ds = _dataset(caches["full"], processor, settings)
    wrapper = _wrapper(student_dir, settings)
    four = samples[2:6]

    def grads(micro):
        for p in wrapper.parameters():
            p.grad = None
        m = accumulate_gradients(accelerator, wrapper, micro, weights=weights)
        return {n: p.grad.clone() for n, p in wrapper.named_parameters() if p.grad is not None}, m

    big, m_big = grads([ds.collate(four)])
    accum, m_accum = grads([ds.collate(four[:2]), ds.collate(four[2:])])
    trainable = {n for n, p in wrapper.named_parameters() if p.requires_grad}
    assert set(big) == trainable and any(n.startswith("hidden_projector.") for n in big)
    for name, g in big.items():
        torch.testing.assert_close(accum[name], g, rtol=2e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    for key in ("loss", "ce", "mdist_response", "mdist_visual", "mdist_prompt", "rdist", "hidden", "affinity"):
        assert m_big[key] is not None and m_big[key] == pytest.approx(m_accum[key], rel=1e-5), key
    assert m_big["positions"] == m_accum["positions"] and m_big["positions"]["affinity"] == 3
    expected = (m_big["ce"] + 1.0 * m_big["mdist_response"] + 0.5 * m_big["mdist_visual"] + 0.7 * m_big["mdist_prompt"]
                + 2.0 * m_big["rdist"] + 1.3 * m_big["hidden"] + 3.0 * m_big["affinity"])
    assert m_big["loss"] == pytest.approx(expected, rel=1e-9)
    # A micro-batch of text-only samples has no affinity pair and may have no visual rows: still finite,
    # and the projector still gets a gradient (DDP without find_unused_parameters needs that).
    text_only = [s for s in samples if not s["images"]]
    g, m = grads([ds.collate(text_only)])
    assert m["positions"]["affinity"] == 0 and m["affinity"] == 0.0
    assert all(torch.isfinite(v).all() for v in g.values()) and "hidden_projector.fc1.weight" in g


# ----------------------------------------------------------------------------------------- train + resume


def _cfg(student_dir, cache, out, **kw):
    base = {"stage": "dft", "student": str(student_dir), "cache": str(cache), "out": str(out), "batch_size": 2,
            "grad_accum": 1, "max_steps": 4, "save_every": 2, "lr": 1e-3, "warmup_ratio": 0.0, "progress": False,
            "positions": "response,visual,prompt", "delta": 0.5, "hidden_weight": 1.0, "affinity_weight": 2.0}
    return TrainConfig(**{**base, **kw})


def test_projector_saved_beside_the_model_and_restored_on_resume(student_dir, caches, tmp_path, monkeypatch):
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration

    full = tmp_path / "full"
    train(_cfg(student_dir, caches["full"], full))
    ref = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in ref] == [1, 2, 3, 4]
    assert all(m["hidden"] > 0 and m["mdist_prompt"] > 0 and m["affinity"] is not None for m in ref)

    # Beside, not inside: a plain LLaVA checkpoint + OUT/hidden_projector/{config.json, model.safetensors}.
    proj_dir = full / PROJECTOR_DIR
    cfg = json.loads((proj_dir / "config.json").read_text())
    assert cfg["student_hidden_size"] == 32 and cfg["teacher_hidden_size"] == 64 and cfg["hidden_loss"] == "mse"
    assert cfg["positions"] == list(ALL) and cfg["step"] == 4
    assert set(load_file(str(proj_dir / "model.safetensors"))) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert not any("projector" in k and "multi_modal" not in k for k in load_file(str(full / "model.safetensors")))
    _, info = LlavaForConditionalGeneration.from_pretrained(full, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"]
    projector = HiddenProjector.from_pretrained(proj_dir)
    assert json.loads((full / "trainer_state.json").read_text())["hidden_projector"] == PROJECTOR_DIR

    # Killed after the step-2 checkpoint; the resumed run must continue with the *trained* MLP.
    killed = tmp_path / "killed"
    kill_after_checkpoint(monkeypatch, 2)
    with pytest.raises(Killed):
        train(_cfg(student_dir, caches["full"], killed))
    monkeypatch.undo()
    assert [c.name for c in checkpoint_dirs(killed)] == ["step-2"] and not (killed / PROJECTOR_DIR).exists()
    with pytest.raises(ValueError, match=r"--hidden-weight: checkpoint has 1.0, this run asks for 0.5"):
        train(_cfg(student_dir, caches["full"], killed, hidden_weight=0.5, resume=True))
    train(_cfg(student_dir, caches["full"], killed, resume=True))
    got = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(ref, got, strict=True):
        for key in ("loss", "ce", "mdist_prompt", "hidden", "affinity", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), (a["step"], key)
    resumed = HiddenProjector.from_pretrained(killed / PROJECTOR_DIR)
    for name, value in projector.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=1e-6, atol=1e-7)


def test_refusals_name_the_flag_and_the_fix(student_dir, caches, tmp_path):
    plain = caches["plain"]
    with pytest.raises(ValueError, match=r"--hidden-weight 1.0: .*rebuild the cache with kd-cache build --hidden"):
        train(_cfg(student_dir, plain, tmp_path / "a", positions="response,visual"))
    with pytest.raises(ValueError, match=r"--affinity-weight 2.0: .*rebuild the cache with kd-cache build --hidden"):
        train(_cfg(student_dir, plain, tmp_path / "b", positions="response,visual", hidden_weight=0.0))
    with pytest.raises(ValueError, match=r"--positions response,visual,prompt: the cache .* holds teacher "
                                         r"distributions at response,visual positions only, not prompt; rebuild it "
                                         r"with `kd-cache build --positions response,visual,prompt`"):
        train(_cfg(student_dir, plain, tmp_path / "c", hidden_weight=0.0, affinity_weight=0.0))
    assert not (tmp_path / "a").exists()  # refused before anything was written
    # Sampled caches refuse --zscore.
    manifest = open_cache(plain).manifest
    cfg = _cfg(student_dir, plain, tmp_path / "d", positions="visual", hidden_weight=0.0, affinity_weight=0.0,
               zscore=True)
    assert check_cache_options(cfg, manifest) is None
    sampled = dataclasses.replace(manifest, sparse=SparseInfo(mode="sample", k=8, samples=8, scheme="systematic",
                                                              logprobs_stored=False))
    with pytest.raises(ValueError, match=r"--zscore: the cache holds sampled teacher tokens"):
        check_cache_options(cfg, sampled)
    cfg = _cfg(student_dir, plain, tmp_path / "e", positions="response", hidden_weight=0.0)
    with pytest.raises(ValueError, match=r"--affinity-weight 2.0: needs the teacher's hidden states at response "
                                         r"and visual positions"):
        check_cache_options(cfg, dataclasses.replace(manifest, positions=("response",),
                                                     hidden=HiddenInfo(stored=True, size=64, dtype="float16")))
    # Config-level checks.
    with pytest.raises(ValueError, match=r"--hidden-weight 1.0: the sft stage trains on CE only"):
        _cfg(student_dir, plain, tmp_path / "f", stage="sft")
    with pytest.raises(ValueError, match=r"--positions 'response,answers': expected a comma-separated subset"):
        _cfg(student_dir, plain, tmp_path / "g", positions="response,answers")
    with pytest.raises(ValueError, match=r"--hidden-loss 'l2': expected one of mse, cosine"):
        _cfg(student_dir, plain, tmp_path / "h", hidden_loss="l2")
    with pytest.raises(ValueError, match=r"--delta must be >= 0"):
        _cfg(student_dir, plain, tmp_path / "i", delta=-1.0)


def test_llava_kd_defaults_leave_the_new_terms_off(student_dir, caches, tmp_path):
    out = tmp_path / "kd"
    (out / PROJECTOR_DIR).mkdir(parents=True)  # left by an earlier LLaVADI run into the same OUT: removed
    train(_cfg(student_dir, caches["full"], out, positions="response,visual", hidden_weight=0.0, affinity_weight=0.0,
               max_steps=1, save_every=0))
    m = json.loads((out / "metrics.jsonl").read_text())
    assert m["mdist_prompt"] is None and m["hidden"] is None and m["affinity"] is None
    assert m["mdist_response"] > 0 and m["mdist_visual"] > 0 and m["positions"]["mdist_prompt"] == 0
    assert not (out / PROJECTOR_DIR).exists()
    assert json.loads((out / "train_config.json").read_text())["positions"] == "response,visual"


def test_cli_llavadi_run_writes_model_projector_and_metrics(student_dir, caches, tmp_path):
    out = tmp_path / "cli"
    args = ["train", "--stage", "dft", "--student", str(student_dir), "--cache", str(caches["full"]), "--out", str(out),
            "--positions", "response,visual,prompt", "--delta", "0.5", "--hidden-weight", "1", "--hidden-loss",
            "cosine", "--affinity-weight", "1", "--zscore", "--divergence", "rkl", "--batch-size", "2",
            "--max-steps", "2", "--no-progress"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    for name in ("model.safetensors", "config.json", "train_config.json", "metrics.jsonl",
                 f"{PROJECTOR_DIR}/config.json", f"{PROJECTOR_DIR}/model.safetensors"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["positions"] == "response,visual,prompt" and saved["hidden_loss"] == "cosine" and saved["zscore"]
    assert json.loads((out / PROJECTOR_DIR / "config.json").read_text())["hidden_loss"] == "cosine"
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2
    assert all(0 < m["hidden"] <= 2 and m["affinity"] >= 0 and m["mdist_prompt"] > 0 for m in metrics)
    # And a refusal through the CLI: exit code 2, one line naming the fix.
    res = CliRunner().invoke(app, ["train", "--stage", "dft", "--student", str(student_dir), "--cache",
                                   str(caches["plain"]), "--out", str(tmp_path / "x"), "--hidden-weight", "1",
                                   "--no-progress"])
    assert res.exit_code == 2 and "rebuild the cache with kd-cache build --hidden" in res.output


@pytest.mark.slow
def test_two_process_ddp_equals_one_process_with_llavadi_terms(student_dir, caches, tmp_path):
    """DDP (2 CPU processes over gloo) runs the projector without find_unused_parameters, normalises
    hidden/affinity/prompt terms over both ranks, and saves the projector once: equal to 1 process."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    repo = Path(__file__).resolve().parents[1]
    llavadi = ["--positions", "response,visual,prompt", "--delta", "0.5", "--hidden-weight", "1.0",
               "--affinity-weight", "2.0", "--zscore"]
    common = ["--stage", "dft", "--student", str(student_dir), "--cache", str(caches["full"]), "--max-steps", "2",
              "--lr", "1e-3", "--warmup-ratio", "0", "--no-progress", *llavadi]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(port), "-m", "cli.kd_train_cli", *common, "--batch-size", "2", "--out", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = CliRunner().invoke(app, ["train", *common, "--batch-size", "4", "--out", str(tmp_path / "one")])
    assert res.exit_code == 0, res.output

    ddp, one = ([json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
                for d in ("ddp", "one"))
    assert [m["step"] for m in ddp] == [m["step"] for m in one] == [1, 2]
    for a, b in zip(ddp, one, strict=True):
        assert a["positions"] == b["positions"]
        for key in ("loss", "ce", "mdist_prompt", "hidden", "affinity", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), (a["step"], key)
    pa = HiddenProjector.from_pretrained(tmp_path / "ddp" / PROJECTOR_DIR).state_dict()
    pb = HiddenProjector.from_pretrained(tmp_path / "one" / PROJECTOR_DIR).state_dict()
    for name, value in pb.items():
        torch.testing.assert_close(pa[name], value, rtol=1e-4, atol=1e-6)
