"""A teacher spread over devices by ``accelerate``'s big-model dispatch gives the cache of the teacher on
one device; GPU-only options are refused on the CPU with one line.

On CPU the split is forced with ``--max-memory``: the CPU gets about half the teacher's bytes, the rest
(the last layers and the LM head) is offloaded to disk, and the dispatch hooks move activations and
weights. Equality: ids and positions exact; log-probs and tails within 1e-4, relations within 1e-3 (fp16
storage of relations; the same fp32 kernels run, on the same device, only the weights' home differs).
Gemma3 is left out: its tiny tower keeps SigLIP's pooling head, an ``nn.MultiheadAttention`` that reads
its ``out_proj`` weight without calling it, so accelerate's disk-offload hooks leave that weight on the
meta device (real Gemma3 towers have no pooling head; GPU-only splits are unaffected).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.kd_cache_cli import app
from kd_cache import open_cache
from kd_cache.build import build_cache
from kd_cache.build_config import BuildConfig
from kd_cache.runtime import teacher_placement
from kd_cache.teacher import load_teacher

pytest.importorskip("torchvision", reason="the processors of several families need torchvision")
warnings.filterwarnings("ignore", message=".*slow image processor.*")

SIZES = {"wide.png": (48, 32, "red"), "tall.png": (40, 64, "blue")}
RECORDS = [
    {"id": "wide", "image": ["wide.png"], "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the circle?"}, {"from": "gpt", "value": "red, in the middle."}]},
    {"id": "text-only", "conversations": [
        {"from": "human", "value": "How many shapes are there?"}, {"from": "gpt", "value": "three"}]},
    {"id": "tall", "image": ["tall.png"], "conversations": [
        {"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": "a blue ellipse on white."}]},
]
FAMILIES = ["llava", "qwen2_vl", "idefics3", "internvl", "mistral3"]


def _half_the_weights(teacher) -> int:
    size = sum(p.stat().st_size for p in teacher.glob("*.safetensors"))
    return size // 2


@pytest.fixture(scope="module")
def built(family_builds):
    def make(fam, root, folder) -> dict:
        teacher = fam.build(root / "teacher")
        (root / "data.json").write_text(json.dumps(RECORDS))

        def build(name, **kw):
            cfg = BuildConfig(teacher=str(teacher), data=str(root / "data.json"), out=str(root / name),
                              image_folder=str(folder), top_k=8, batch_size=2, device="cpu", dtype="float32",
                              progress=False, strict=True, **kw)
            build_cache(cfg)
            return list(open_cache(str(root / name)))

        return {"teacher": teacher, "one": build("one"), "split": build("split", max_memory={"cpu": _half_the_weights(teacher)})}

    return family_builds("dispatch", SIZES, make)


@pytest.mark.parametrize("name", FAMILIES)
def test_dispatched_teacher_gives_the_same_cache(built, name):
    f = built(name)
    placement = teacher_placement(torch.device("cpu"), 1, {"cpu": _half_the_weights(f["teacher"])})
    t = load_teacher(str(f["teacher"]), "cpu", torch.float32, placement)
    homes = set(t.model.hf_device_map.values())
    assert homes == {"cpu", "disk"}, t.model.hf_device_map  # really split: some layers on disk
    assert t.model.get_output_embeddings().weight.device.type == "meta"  # the head too (its W^T W via head(I))
    assert len(f["one"]) == len(f["split"]) == len(RECORDS)
    for a, b in zip(f["one"], f["split"]):
        assert a["id"] == b["id"]
        for key in a:
            if not key.endswith(("_logprobs", "_tail", "_logp_mean")) and isinstance(a[key], np.ndarray):
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)  # ids, positions, tokens
        for key in [k for k in a if k.endswith(("_logprobs", "_tail"))]:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-4, err_msg=key)
        assert len(a["relation"]) == len(b["relation"])
        for ra, rb in zip(a["relation"], b["relation"]):
            np.testing.assert_allclose(ra, rb, atol=1e-3)


@pytest.mark.parametrize("flags, says", [
    (["--gpus-per-teacher", "2"], "--gpus-per-teacher 2 spreads the teacher over CUDA GPUs"),
    (["--quantize", "8bit"], "--quantize 8bit loads the teacher through bitsandbytes, which needs a CUDA GPU"),
    (["--max-memory", '{"0": "1GiB"}'], "--max-memory names GPU 0"),
    (["--max-memory", '{"gpu": "1GiB"}'], "--max-memory key 'gpu'"),
])
def test_gpu_options_are_refused_on_cpu(teacher_dir, chat_data, tmp_path, flags, says):
    res = CliRunner().invoke(app, ["build", "--teacher", str(teacher_dir), "--data", str(chat_data[0]),
                                   "--image-folder", str(chat_data[1]), "--out", str(tmp_path / "c"), "--device",
                                   "cpu", "--no-progress", *flags])
    assert res.exit_code == 2, res.output
    assert says in res.output and "Traceback" not in res.output


def _full_distribution_cache(built_root, teacher, folder, name, **kw) -> list[dict]:
    """A cache whose top-k is the whole tokenizer (the tiny vocabulary), so KLs between caches are exact."""
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(teacher))
    cfg = BuildConfig(teacher=str(teacher), data=str(built_root / "data.json"), out=str(built_root / name),
                      image_folder=str(folder), top_k=vocab, batch_size=2, device="cuda", progress=False,
                      strict=True, **kw)
    build_cache(cfg)
    return list(open_cache(str(built_root / name)))


@pytest.fixture(scope="module")
def gpu_teacher(tmp_path_factory):
    from tests.vlm_families import FAMILIES as BUILDERS
    from tests.vlm_families import draw_images

    root = tmp_path_factory.mktemp("gpu-dispatch")
    (root / "images").mkdir()
    folder = draw_images(root / "images", SIZES)
    (root / "data.json").write_text(json.dumps(RECORDS))
    return root, BUILDERS["llava"].build(root / "teacher"), folder


@pytest.mark.gpu
def test_gpu_split_with_cpu_offload_gives_the_same_cache(gpu_teacher):
    """One GPU holding half the teacher, the rest on the CPU (executed on the GPU through the hooks)."""
    root, teacher, folder = gpu_teacher
    one = _full_distribution_cache(root, teacher, folder, "gpu-one", dtype="float32")
    half = _half_the_weights(teacher)
    split = _full_distribution_cache(root, teacher, folder, "gpu-split", dtype="float32",
                                     max_memory={"0": half, "cpu": 4 * half})
    for a, b in zip(one, split):
        assert a["id"] == b["id"]
        for key in [k for k in a if k.endswith(("_logprobs", "_tail"))]:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-3, atol=1e-3, err_msg=key)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_two_gpus_per_teacher_give_the_same_cache(gpu_teacher):
    root, teacher, folder = gpu_teacher
    one = _full_distribution_cache(root, teacher, folder, "gpu1", dtype="float32")
    half = _half_the_weights(teacher)
    two = _full_distribution_cache(root, teacher, folder, "gpu2", dtype="float32", gpus_per_teacher=2,
                                   max_memory={"0": half, "1": 4 * half})
    for a, b in zip(one, two):
        for key in [k for k in a if k.endswith(("_logprobs", "_tail"))]:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-3, atol=1e-3, err_msg=key)


def _kl(p_cache: list[dict], q_cache: list[dict]) -> float:
    """Mean KL(p || q) per distilled position between two full-vocabulary caches (ids per row differ in order)."""
    total, n = 0.0, 0
    for a, b in zip(p_cache, q_cache):
        for kind in ("response", "visual"):
            ids_a, lp_a = a[f"{kind}_ids"], a[f"{kind}_logprobs"].astype(np.float64)
            ids_b, lp_b = b[f"{kind}_ids"], b[f"{kind}_logprobs"].astype(np.float64)
            for r in range(len(ids_a)):
                q = dict(zip(ids_b[r].tolist(), lp_b[r].tolist()))
                total += sum(np.exp(x) * (x - q[i]) for i, x in zip(ids_a[r].tolist(), lp_a[r].tolist()))
                n += 1
    return total / max(n, 1)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_quantized_teacher_kl_to_bf16(gpu_teacher, bits, record_property):
    """An 8/4-bit teacher's cached distributions against the bf16 teacher's: KL recorded, bounded loosely
    (random tiny weights are not a real model's; the figure is what to read)."""
    pytest.importorskip("bitsandbytes")
    root, teacher, folder = gpu_teacher
    ref = _full_distribution_cache(root, teacher, folder, "bf16", dtype="bfloat16")
    quant = _full_distribution_cache(root, teacher, folder, f"q{bits}", dtype="bfloat16", quantize=bits)
    kl = _kl(ref, quant)
    record_property(f"kl_{bits}_to_bf16", kl)
    print(f"KL(bf16 || {bits}) per position: {kl:.4g} nats")
    assert -1e-3 < kl < 1.0  # fp16 log-probs: a KL of 0 reads as a few 1e-4 either way
