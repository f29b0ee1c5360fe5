"""The benchmark runner's plumbing: ``run_all --smoke`` runs every benchmark on tiny models and writes
one JSON object with the issue's keys. No timing is asserted here (speed is measured by the
benchmarks themselves, never in tests)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_run_all_smoke_writes_every_key(tmp_path):
    out = tmp_path / "smoke.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "benchmarks/run_all.py", "--smoke", "--out", str(out),
                           "--workdir", str(tmp_path / "work")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    sys.path.insert(0, str(REPO))
    from benchmarks.run_all import GOALS, RESULT_KEYS

    assert set(RESULT_KEYS) == set(GOALS)
    for key in RESULT_KEYS:
        assert isinstance(doc[key], float) and math.isfinite(doc[key]), (key, doc[key])
    assert doc["errors"] == {}
    for meta in ("goals", "machine", "date", "versions", "settings", "details"):
        assert meta in doc
    assert set(doc) - set(RESULT_KEYS) <= {"goals", "machine", "date", "versions", "settings", "details", "errors",
                                           "wall_s", "group_wall_s"}
    assert doc["settings"]["mode"] == "smoke"
    # The table names every key.
    for key in RESULT_KEYS:
        assert key in proc.stdout


def test_demo_seeds_table_counts_verdicts():
    sys.path.insert(0, str(REPO))
    from benchmarks.demo_seeds import table

    def res(t, b, d, gain_z, red_z):
        out = {m: {"accuracy": a, "kl_to_teacher": kl, "questions": 100}
               for m, (a, kl) in zip(("teacher", "baseline", "distilled"), (t, b, d))}
        out["verdict"] = {"accuracy_gain": d[0] - b[0], "accuracy_gain_se": 0.01, "accuracy_gain_z": gain_z,
                          "kl_reduction": b[1] - d[1], "kl_reduction_se": 0.02, "kl_reduction_z": red_z,
                          "verdict": gain_z > 2 and red_z > 2}
        return out

    runs = [{"seed": 0, "wall_s": 60.0, "cpu_s": 90.0, "results": res((0.9, 0.0), (0.7, 0.2), (0.8, 0.1), 10.0, 5.0)},
            {"seed": 1, "wall_s": 120.0, "cpu_s": None, "results": res((0.9, 0.0), (0.8, 0.1), (0.7, 0.3), -10.0, -10.0)}]
    text = table(runs)
    assert "| 0 | 0.900 | 0.700 | 0.800 | +0.100 ± 0.010 (+10.0) | 0.2000 | 0.1000 | +0.1000 ± 0.0200 (+5.0) | yes | " \
           "1.0 min | 1.5 min |" in text
    assert "| NO | 2.0 min | - |" in text
    assert "| mean | 0.900 | 0.750 | 0.750 | | 0.1500 | 0.2000 |" in text
    assert "more than 2 standard errors of the 100-question test set on 1 of 2 seeds" in text


def test_lora_memory_accounting_equals_the_measured_run():
    """benchmarks/bench_lora_memory.py: the meta-device accounting of trainable parameters and AdamW state
    is what a real kd-train DFT run at the demo's shape holds, in full and with LoRA."""
    from benchmarks.bench_lora_memory import run

    results = run(shapes=("demo",), steps=1)
    for mode in ("full", "lora"):
        counted, got = results["accounting"]["demo"][mode], results["measured"]["demo"][mode]
        assert got["trainable"] == counted["trainable"] and got["optimizer_bytes"] == counted["optimizer_bytes"]
    acc = results["accounting"]["demo"]
    assert acc["lora"]["trainable"] < acc["full"]["trainable"] and acc["qlora"]["static_bytes"] < acc["lora"]["static_bytes"]


@pytest.mark.slow
def test_gpu_check_smoke_prints_every_figure(tmp_path):
    """``benchmarks/gpu_check.sh --smoke``: the GPU check's CPU stand-in runs end to end and prints each figure."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHON=sys.executable)
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--smoke", str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for line in ("teacher-pass tokens/s", "forward fraction of bf16 peak", "teacher pass over forward only",
                 "DFT step over SFT step", "peak memory SFT", "peak memory DFT", "batching llava", "batching qwen2vl"):
        assert line in proc.stdout, line
    assert len(list(tmp_path.glob("gpu-check-cpu-*.json"))) == len(list(tmp_path.glob("batching-cpu-*.json"))) == 1
