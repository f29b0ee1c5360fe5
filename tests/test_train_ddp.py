"""2-process DDP on CPU (gloo, through ``accelerate launch``) equals 1 process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from student_fixtures import one_torch_thread, write_synthetic_cache  # noqa: F401

from student.config import TrainConfig
from student.train import train

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_ddp_equals_one_process(student_dir, processor, tmp_path):
    # 16 samples, every third with an image: some micro-batches of a rank are text-only, so the
    # projector's gradient there comes from DistillStudent's dummy-image term (DDP runs without
    # find_unused_parameters and would fail otherwise).
    cache = write_synthetic_cache(tmp_path / "cache", processor, n=16, shard_size=6, image_every=3)
    common = ["--stage", "dft", "--student", str(student_dir), "--cache", str(cache), "--grad-accum", "2",
              "--epochs", "2", "--lr", "1e-3", "--warmup-ratio", "0.25", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    # On a machine without GPUs, --multi_gpu only selects the torchrun launcher; kd-train then runs on
    # CPU and the processes talk over gloo.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "cli.kd_train_cli", *common, "--batch-size", "2", "--out", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]

    train(TrainConfig(stage="dft", student=str(student_dir), cache=str(cache), out=str(tmp_path / "one"),
                      batch_size=4, grad_accum=2, epochs=2, lr=1e-3, warmup_ratio=0.25, progress=False))

    ddp = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    one = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in ddp] == [m["step"] for m in one] == [1, 2, 3, 4]
    for a, b in zip(ddp, one, strict=True):
        # The same samples per step (the ranks' split of a step differs from one process's micro-batches,
        # not its sample set), so the same counts, positions and losses.
        assert a["samples"] == b["samples"] == 8 and a["positions"] == b["positions"]
        assert a["samples_seen"] == b["samples_seen"] and a["epoch"] == b["epoch"]
        for key in ("loss", "ce", "mdist_response", "mdist_visual", "rdist", "lr", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), (a["step"], key)

    from transformers import LlavaForConditionalGeneration

    wa = LlavaForConditionalGeneration.from_pretrained(tmp_path / "ddp").state_dict()
    wb = LlavaForConditionalGeneration.from_pretrained(tmp_path / "one").state_dict()
    for name, value in wb.items():
        torch.testing.assert_close(wa[name], value, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
