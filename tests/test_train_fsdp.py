"""FSDP2 on 2 CPU processes (gloo, through ``accelerate launch --config_file docs/accelerate/fsdp2.yaml``)
equals 1 process with the same global batch: losses per step, final weights, a resume from a checkpoint
written under FSDP, and DPT's frozen parts.

accelerate selects FSDP only on accelerator devices; on CPU ``kd-train`` switches an FSDP2 launch to
FSDP itself (``student.train._fsdp_on_cpu``), so this is the launch a user runs on GPUs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from student_fixtures import one_torch_thread, write_synthetic_cache  # noqa: F401

from student.config import TrainConfig
from student.families import parameter_parts
from student.train import train

REPO = Path(__file__).resolve().parents[1]
FSDP_CONFIG = REPO / "docs" / "accelerate" / "fsdp2.yaml"
COMPARED = ("loss", "ce", "mdist_response", "mdist_visual", "rdist", "lr", "grad_norm", "epoch", "samples_seen")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_fsdp(args: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
           "--num_processes", "2", "--main_process_port", str(_free_port()), "-m", "cli.kd_train_cli",
           *args, "--no-progress"]
    # Its own session, so that a hang (a collective one rank never joins) ends with every rank killed.
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"the FSDP run did not finish in 240 s (a rank waiting on a collective?):\n{err[-4000:]}")
    assert proc.returncode == 0, err[-4000:]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(path).state_dict()


def _assert_same_run(fsdp: Path, one: Path, steps: list[int]) -> None:
    a, b = _metrics(fsdp), _metrics(one)
    assert [m["step"] for m in a] == [m["step"] for m in b] == steps
    for x, y in zip(a, b, strict=True):
        assert x["samples"] == y["samples"] == 8 and x["positions"] == y["positions"]
        assert x["samples_seen"] == y["samples_seen"] and x["epoch"] == y["epoch"]
        for key in COMPARED:
            assert x[key] == pytest.approx(y[key], rel=1e-4), (x["step"], key)
    wa, wb = _weights(fsdp), _weights(one)
    assert wa.keys() == wb.keys()
    for name, value in wb.items():
        torch.testing.assert_close(wa[name], value, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def _one_process(stage: str, student_dir, cache, out: Path, **kw) -> None:
    train(TrainConfig(stage=stage, student=str(student_dir), cache=str(cache), out=str(out), batch_size=4,
                      grad_accum=2, lr=1e-3, warmup_ratio=0.25, progress=False, **kw))


@pytest.mark.slow
def test_fsdp_dft_equals_one_process_and_resumes(student_dir, processor, tmp_path):
    # 16 samples, every third with an image: some micro-batches of a rank are text-only, so that rank
    # runs the vision tower on a blank image (DistillStudent) to keep FSDP's all-gathers in step.
    # 2 ranks x batch 2 x grad-accum 2 = 8 samples per step: 2 steps per epoch, 4 in all.
    cache = write_synthetic_cache(tmp_path / "cache", processor, n=16, shard_size=6, image_every=3)
    common = ["--stage", "dft", "--student", str(student_dir), "--cache", str(cache), "--grad-accum", "2",
              "--epochs", "2", "--lr", "1e-3", "--warmup-ratio", "0.25", "--batch-size", "2", "--save-every", "1"]
    fsdp = tmp_path / "fsdp"
    _launch_fsdp([*common, "--out", str(fsdp)])
    one = tmp_path / "one"
    _one_process("dft", student_dir, cache, one, epochs=2)
    _assert_same_run(fsdp, one, [1, 2, 3, 4])

    # The checkpoints are FSDP's: each rank wrote its shard of the model and of the optimizer.
    ckpt = fsdp / "checkpoints" / "step-1"
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert sorted(p.name for p in (ckpt / part).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"], part
    assert json.loads((ckpt / "trainer_state.json").read_text())["world_size"] == 2

    # Resume from the mid-epoch step-1 checkpoint, as if the run had died after writing it: the three
    # steps after it (across the epoch boundary) and the final weights are the uninterrupted run's.
    resumed = tmp_path / "resumed"
    shutil.copytree(fsdp, resumed)
    for step in (2, 3, 4):
        shutil.rmtree(resumed / "checkpoints" / f"step-{step}")
    (resumed / "model.safetensors").unlink()
    _launch_fsdp([*common, "--out", str(resumed), "--resume"])
    _assert_same_run(resumed, one, [1, 2, 3, 4])


@pytest.mark.slow
def test_fsdp_dpt_trains_the_projector_only(student_dir, processor, tmp_path):
    # DPT: the projector trains, the language model and the vision tower are frozen, and frozen and
    # trainable parameters share the root FSDP unit (projector next to the embeddings and the head).
    cache = write_synthetic_cache(tmp_path / "cache", processor, n=16, shard_size=6, image_every=3,
                                  template="pretrain")
    fsdp = tmp_path / "fsdp"
    _launch_fsdp(["--stage", "dpt", "--student", str(student_dir), "--cache", str(cache), "--grad-accum", "2",
                  "--epochs", "1", "--lr", "1e-3", "--warmup-ratio", "0.25", "--batch-size", "2",
                  "--out", str(fsdp)])
    one = tmp_path / "one"
    _one_process("dpt", student_dir, cache, one, epochs=1)
    _assert_same_run(fsdp, one, [1, 2])

    from transformers import LlavaForConditionalGeneration

    before = LlavaForConditionalGeneration.from_pretrained(student_dir)
    parts = parameter_parts(before)
    after = _weights(fsdp)
    moved = {parts[n] for n, p in before.state_dict().items() if n in parts and not torch.equal(p, after[n])}
    assert moved == {"projector"}
