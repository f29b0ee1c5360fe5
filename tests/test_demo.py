"""kd-demo --quick through the real CLI in a fresh interpreter: every step runs, the three result
entries have finite metrics, curves.png is written. Whether distillation wins is checked by the full
demo (benchmarks/demo_seeds.py, results in benchmarks/RESULTS.md), not here: the quick run is far too small to mean anything."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_demo_runs_every_step(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", "from cli.kd_demo_cli import main; main()", "--out", str(out),
                           "--quick", "--seed", "3"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    for name in ("teacher", "baseline", "distilled"):
        for key in ("accuracy", "mc_accuracy", "kl_to_teacher", "top1_agreement"):
            value = results[name][key]
            assert isinstance(value, float) and math.isfinite(value), (name, key, value)
            assert value >= 0.0
        assert results[name]["accuracy"] <= 1.0 and results[name]["top1_agreement"] <= 1.0
    # The teacher evaluated on its own cache: k covers the vocabulary, so the KL is ~0.
    assert results["teacher"]["kl_to_teacher"] < 1e-3 and results["teacher"]["top1_agreement"] == 1.0
    assert results["config"]["quick"] is True and results["config"]["seed"] == 3
    # The student LLM is ~8x smaller than the teacher's, and both students start from one checkpoint.
    assert 6.0 <= results["teacher_to_student_llm_params"] <= 10.0
    for run in ("baseline-pt", "distilled-dpt"):
        cfg = json.loads((out / "runs" / run / "train_config.json").read_text())
        assert cfg["student"] == str(out / "models" / "student-init")
    assert (out / "curves.png").stat().st_size > 10_000
    assert "distilled" in proc.stdout and "kl_to_teacher" in proc.stdout  # the printed table


def test_demo_config_rejects_nonsense(tmp_path):
    from typer.testing import CliRunner

    from cli.kd_demo_cli import app
    from kd_demo.config import DemoConfig

    with pytest.raises(ValueError, match="--n-train"):
        DemoConfig(out=str(tmp_path), n_train=0)
    res = CliRunner().invoke(app, ["--help"])
    assert res.exit_code == 0 and "--quick" in res.output


@pytest.mark.slow
def test_quick_demo_llavadi_arm(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", "from cli.kd_demo_cli import main; main()", "--out", str(out),
                           "--quick", "--method", "llavadi"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert {"teacher", "baseline", "distilled", "llavadi"} <= set(results)
    assert all(math.isfinite(results["llavadi"][k]) for k in ("accuracy", "kl_to_teacher", "top1_agreement"))
    cfg = json.loads((out / "runs" / "llavadi-dft" / "train_config.json").read_text())
    assert cfg["positions"] in ("response,visual,prompt", ["response", "visual", "prompt"]) and cfg["gamma"] == 0.0
    assert (out / "runs" / "llavadi-dft" / "hidden_projector" / "model.safetensors").is_file()
    metrics = [json.loads(x) for x in (out / "runs" / "llavadi-dft" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["hidden"] is not None and m["mdist_prompt"] is not None for m in metrics)
    with pytest.raises(ValueError, match="--method"):
        from kd_demo.config import DemoConfig

        DemoConfig(out=str(tmp_path), method="other")
