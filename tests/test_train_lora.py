"""LoRA students (``kd-train --lora-r``, ``student.lora``): what trains, the gradient of a LoRA step, the
adapter and merged outputs (equal logits), kd-eval and the pipeline on both, resume, 2-rank DDP and FSDP2
equal to one process, and QLoRA refused without a GPU (run under the GPU marker where there is one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from student_fixtures import (  # noqa: F401
    Killed,
    kill_after_checkpoint,
    model_inputs,
    one_torch_thread,
    read_all,
    write_synthetic_cache,
)

from student.checkpoints import checkpoint_dirs
from student.config import TrainConfig
from student.distill import DistillStudent, LossSettings
from student.families import parameter_parts
from student.lora import MERGED_DIR, add_adapters
from student.model import load_student
from student.stages import set_trainable
from student.stream import StreamingKDDataset
from student.train import accumulate_gradients, train

REPO = Path(__file__).resolve().parents[1]
COMPARED = ("loss", "ce", "mdist_response", "mdist_visual", "rdist", "lr", "grad_norm", "samples_seen", "epoch")
LORA = {"lora_r": 4, "lora_alpha": 8.0}


@pytest.fixture(scope="module")
def cache(tmp_path_factory, processor):
    # 9 samples, batch 2 x grad-accum 2: 3 steps per epoch (the last one shorter), every other with an image.
    return write_synthetic_cache(tmp_path_factory.mktemp("lora"), processor, n=9, shard_size=4, image_every=2)


def _cfg(student_dir, cache, out, **kw) -> TrainConfig:
    base = {"stage": "dft", "student": str(student_dir), "cache": str(cache), "out": str(out), "batch_size": 2,
            "grad_accum": 2, "epochs": 2, "warmup_ratio": 0.2, "lr": 1e-2, "progress": False, **LORA}
    return TrainConfig(**{**base, **kw})


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _llava(path):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()


def _peft(base_dir, adapter_dir):
    from peft import PeftModel

    return PeftModel.from_pretrained(_llava(base_dir), str(adapter_dir)).eval()


def _image_inputs(processor, cache):
    sample = next(s for s in read_all(cache) if len(s["images"]))
    from PIL import Image

    image = Image.open(Path(cache).parent / "images" / sample["images"][0]).convert("RGB")
    return model_inputs(processor, sample["input_ids"], [image])


# ------------------------------------------------------------------------------------------------ config


def test_lora_settings_are_checked_and_named(student_dir, cache, tmp_path):
    with pytest.raises(ValueError, match="dpt trains the projector only"):
        _cfg(student_dir, cache, tmp_path / "x", stage="dpt")
    for kw, flag in (({"merge": True}, "--merge"), ({"load_in_4bit": True}, "--load-in-4bit"),
                     ({"lora_target_modules": "q_proj"}, "--lora-target-modules")):
        with pytest.raises(ValueError, match=f"{flag} needs LoRA adapters"):
            _cfg(student_dir, cache, tmp_path / "x", lora_r=0, lora_alpha=None, **kw)
    with pytest.raises(ValueError, match="--lora-dropout"):
        _cfg(student_dir, cache, tmp_path / "x", lora_dropout=1.0)
    with pytest.raises(ValueError, match="train llm or vision"):
        _cfg(student_dir, cache, tmp_path / "x", train_modules="projector")
    cfg = _cfg(student_dir, cache, tmp_path / "x", lora_alpha=None, lora_target_modules="q_proj, v_proj")
    assert cfg.lora_alpha == 8.0 and cfg.lora_target_modules == ("q_proj", "v_proj")
    model, _ = load_student(student_dir)
    with pytest.raises(ValueError, match="no nn.Linear layer of the llm part .* named .*q_proj"):
        add_adapters(model, ("projector", "llm"), r=2, alpha=4, dropout=0.0, targets=("qkv",))


# -------------------------------------------------------------------------------------------- gradients


def test_lora_gradient_is_the_full_gradient_through_the_adapters(student_dir, processor, cache, accelerator):
    """One LoRA step's gradient lands on the adapters and the projector only, and has the value the chain
    rule gives from the full-rank gradient at the same point: with B = 0 (peft's start) the effective
    weight is W, and dL/dB = (alpha / r) dL/dW A^T, dL/dA = 0; the projector's equals full training's."""
    samples = read_all(cache)
    ds = StreamingKDDataset(str(cache), processor, image_folder=None, batch_size=4)
    micro = [ds.collate(samples[:4]), ds.collate(samples[4:8])]

    full, _ = load_student(student_dir)
    set_trainable(full, ("projector", "llm"))
    accumulate_gradients(accelerator, DistillStudent(full, LossSettings()), micro)
    full_grads = {n: p.grad for n, p in full.named_parameters() if p.grad is not None}

    model, _ = load_student(student_dir)
    add_adapters(model, ("projector", "llm"), r=4, alpha=8.0, dropout=0.0)
    accumulate_gradients(accelerator, DistillStudent(model, LossSettings()), micro)
    params = dict(model.named_parameters())
    got = {n for n, p in params.items() if p.grad is not None}
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert got == trainable
    assert all(".lora_" in n or ".modules_to_save." in n for n in got)
    parts = parameter_parts(model)
    assert {parts[n] for n in got} == {"llm", "projector"}
    adapted = sorted({n.split(".lora_")[0] for n in got if ".lora_" in n})
    assert len(adapted) == 14  # q/k/v/o/gate/up/down of both layers
    for layer in adapted:
        a = params[f"{layer}.lora_A.default.weight"]
        g_w = full_grads[f"{layer}.weight"]
        torch.testing.assert_close(params[f"{layer}.lora_B.default.weight"].grad, 2.0 * g_w @ a.detach().T,
                                   rtol=1e-4, atol=1e-7)
        assert torch.count_nonzero(a.grad) == 0
    for n in got:
        if ".modules_to_save." in n:
            own = n.replace(".modules_to_save.default", "")
            torch.testing.assert_close(params[n].grad, full_grads[own], rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------- outputs


@pytest.fixture(scope="module")
def lora_run(student_dir, cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora-run") / "out"
    train(_cfg(student_dir, cache, out, merge=True, save_every=3))
    return out


def test_lora_run_writes_adapter_and_merged_model_with_equal_logits(student_dir, processor, cache, lora_run, capsys):
    out = lora_run
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(Path(student_dir).absolute())
    assert config["modules_to_save"] == ["model.multi_modal_projector"] and config["r"] == 4

    state = json.loads((out / "trainer_state.json").read_text())["trainable"]
    assert state["vision"]["trainable"] == 0 and state["vision"]["frozen"] == state["vision"]["parameters"] > 0
    assert state["projector"]["full"] == state["projector"]["parameters"] > 0 and state["projector"]["adapters"] == 0
    # 2 layers of the 32-wide LLM (q/o 32 -> 32, k/v 32 -> 16: one KV head of 16, gate/up/down 32 <-> 64):
    # r x (in + out) per adapted layer.
    assert state["llm"]["adapters"] == 2 * 4 * (2 * (32 + 32) + 2 * (32 + 16) + 3 * (32 + 64))
    assert state["llm"]["full"] == 0 and state["llm"]["frozen"] == state["llm"]["parameters"]

    inputs = _image_inputs(processor, cache)
    with torch.no_grad():
        adapter_logits = _peft(student_dir, out)(**inputs).logits
        merged_logits = _llava(out / MERGED_DIR)(**inputs).logits
        base_logits = _llava(student_dir)(**inputs).logits
        loaded, _ = load_student(out)  # an adapter folder as --student / kd-eval --model: merged on its base
        loaded_logits = loaded.eval()(**inputs).logits
    torch.testing.assert_close(merged_logits, adapter_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loaded_logits, adapter_logits, rtol=1e-4, atol=1e-5)
    assert (merged_logits - base_logits).abs().max() > 1e-3  # the adapters and the projector did train

    # The merged model is the student with only the projector and the adapted layers changed.
    base, merged = _llava(student_dir).state_dict(), _llava(out / MERGED_DIR).state_dict()
    assert base.keys() == merged.keys()
    parts = parameter_parts(_llava(student_dir))
    changed = {n for n in base if not torch.equal(base[n], merged[n])}
    assert {parts[n] for n in changed} == {"projector", "llm"}
    assert all(n.endswith("_proj.weight") for n in changed if parts.get(n) == "llm")


def test_kd_eval_and_the_pipeline_take_the_adapter_and_the_merged_model(student_dir, processor, cache, lora_run):
    from student.evaluate import evaluate_cache

    on_adapter = evaluate_cache(str(lora_run), str(cache), device="cpu")
    on_merged = evaluate_cache(str(lora_run / MERGED_DIR), str(cache), device="cpu")
    for key in ("kl_to_teacher", "top1_agreement", "ce", "kl_visual"):
        assert on_adapter[key] == pytest.approx(on_merged[key], rel=1e-4), key

    from transformers import pipeline

    answers = []
    for model in (lora_run, lora_run / MERGED_DIR):  # transformers loads an adapter folder on its base itself
        pipe = pipeline("image-text-to-text", model=str(model), processor=str(lora_run), device="cpu")
        sample = next(s for s in read_all(cache) if len(s["images"]))
        image = str(Path(cache).parent / "images" / sample["images"][0])
        msgs = [{"role": "user", "content": [{"type": "image", "url": image}, {"type": "text", "text": "colour?"}]}]
        answers.append(pipe(text=msgs, max_new_tokens=4, do_sample=False)[0]["generated_text"])
    assert answers[0] == answers[1]


def test_a_lora_stage_starts_from_a_lora_stage(student_dir, cache, lora_run, tmp_path):
    """SFT -> DFT with adapters: the second stage's --student is the first's OUT (merged on load), and its
    adapter loads on the merged first stage."""
    out = tmp_path / "second"
    train(_cfg(student_dir, cache, out, student=str(lora_run), stage="sft", max_steps=1))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(lora_run.absolute())
    model, _ = load_student(out)
    assert type(model).__name__ == "LlavaForConditionalGeneration"


# ---------------------------------------------------------------------------------------------- resume


def test_lora_resume_mid_run_gives_the_same_losses_and_adapter(student_dir, cache, lora_run, tmp_path, monkeypatch):
    killed = tmp_path / "killed"
    kill_after_checkpoint(monkeypatch, 3)
    with pytest.raises(Killed):
        train(_cfg(student_dir, cache, killed, merge=True, save_every=3))
    monkeypatch.undo()
    assert [c.name for c in checkpoint_dirs(killed)] == ["step-3"]
    with pytest.raises(ValueError, match="--lora-r: checkpoint has 4, this run asks for 8"):
        train(_cfg(student_dir, cache, killed, merge=True, save_every=3, lora_r=8, resume=True))
    train(_cfg(student_dir, cache, killed, merge=True, save_every=3, resume=True))
    reference, resumed = _metrics(lora_run), _metrics(killed)
    assert [m["step"] for m in resumed] == [m["step"] for m in reference] == list(range(1, 7))
    for ref, got in zip(reference, resumed, strict=True):
        for key in COMPARED:
            assert got[key] == pytest.approx(ref[key], rel=1e-6, abs=1e-9), (ref["step"], key)
    from safetensors.torch import load_file

    a, b = load_file(lora_run / "adapter_model.safetensors"), load_file(killed / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name, value in a.items():
        torch.testing.assert_close(b[name], value, rtol=1e-6, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


# ------------------------------------------------------------------------------------------ 2 CPU ranks


def _adapter_equal(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    wa, wb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and any(".lora_B." in k for k in wa)
    for name, value in wb.items():
        torch.testing.assert_close(wa[name], value, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def _same_run(ranks: Path, one: Path) -> None:
    a, b = _metrics(ranks), _metrics(one)
    assert [m["step"] for m in a] == [m["step"] for m in b] and a
    for x, y in zip(a, b, strict=True):
        assert x["samples"] == y["samples"] and x["positions"] == y["positions"]
        for key in COMPARED:
            assert x[key] == pytest.approx(y[key], rel=1e-4), (x["step"], key)
    _adapter_equal(ranks, one)
    torch.testing.assert_close(_llava(ranks / MERGED_DIR).state_dict(), _llava(one / MERGED_DIR).state_dict(),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["ddp", "fsdp2"])
def test_two_rank_lora_equals_one_process(student_dir, processor, tmp_path, launch):
    from tests.test_train_fsdp import _launch_fsdp

    # 2 ranks x batch 2 x grad-accum 2 = 8 samples a step, every third sample with an image (text-only
    # micro-batches take the blank-image path on their rank); one process: batch 4 x grad-accum 2.
    cache = write_synthetic_cache(tmp_path / "cache", processor, n=16, shard_size=6, image_every=3)
    common = ["--stage", "dft", "--student", str(student_dir), "--cache", str(cache), "--grad-accum", "2",
              "--epochs", "1", "--lr", "1e-2", "--warmup-ratio", "0.25", "--batch-size", "2", "--lora-r", "4",
              "--merge"]
    ranks = tmp_path / launch
    if launch == "fsdp2":
        _launch_fsdp([*common, "--out", str(ranks)])
    else:
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), "-m", "cli.kd_train_cli", *common, "--out", str(ranks),
               "--no-progress"]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-4000:]
    one = tmp_path / "one"
    train(TrainConfig(stage="dft", student=str(student_dir), cache=str(cache), out=str(one), batch_size=4,
                      grad_accum=2, lr=1e-2, warmup_ratio=0.25, progress=False, lora_r=4, merge=True))
    _same_run(ranks, one)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------- QLoRA


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_qlora_is_refused_without_a_gpu_in_one_line(student_dir, cache, tmp_path):
    out = tmp_path / "q"
    cmd = [sys.executable, "-m", "cli.kd_train_cli", "--stage", "dft", "--student", str(student_dir), "--cache",
           str(cache), "--out", str(out), "--lora-r", "4", "--load-in-4bit", "--no-progress"]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "kd-train: error: --load-in-4bit (QLoRA) needs a CUDA GPU: bitsandbytes' NF4 weights do not train on CPU; "
        "drop --load-in-4bit to train LoRA adapters on full-precision weights here"]
    assert not out.exists()


@pytest.mark.gpu
def test_qlora_trains_on_a_gpu_and_merges(student_dir, cache, tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "qlora"
    train(_cfg(student_dir, cache, out, load_in_4bit=True, merge=True, max_steps=2))
    losses = [m["loss"] for m in _metrics(out)]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    from transformers import LlavaForConditionalGeneration

    merged = LlavaForConditionalGeneration.from_pretrained(out / MERGED_DIR)
    assert merged.model.language_model.layers[0].self_attn.q_proj.weight.dtype in (torch.float32, torch.bfloat16)
