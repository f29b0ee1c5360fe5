"""kd-demo --quick through the real CLI in a fresh interpreter: every step runs, the result entries
have finite metrics that agree with the predictions written beside them, curves.png is written.
Whether distillation wins is checked by the full demo (benchmarks/demo_seeds.py, results in
benchmarks/RESULTS.md), not here: the quick run is far too small to mean anything."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.kd_demo_cli import app
from kd_demo.config import QUICK, DemoConfig

REPO = Path(__file__).resolve().parents[1]


def _quick_demo(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", "from cli.kd_demo_cli import main; main()", "--out", str(out),
                           "--quick", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _predictions(out: Path, name: str) -> list[dict]:
    return [json.loads(x) for x in (out / f"predictions-{name}.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_quick_demo_runs_every_step(tmp_path):
    out = tmp_path / "demo"
    proc = _quick_demo(out, "--seed", "3")
    results = json.loads((out / "results.json").read_text())
    kinds = {r["id"]: r["question_type"] for r in json.loads((out / "data" / "test.json").read_text())}
    assert len(kinds) == QUICK["n_test"]
    for name in ("teacher", "baseline", "distilled"):
        for key in ("accuracy", "mc_accuracy", "kl_to_teacher", "top1_agreement"):
            assert math.isfinite(results[name][key]), (name, key, results[name][key])
        # Accuracy overall and per question type, recounted from the model's written predictions.
        preds = _predictions(out, name)
        assert [p["id"] for p in preds] == list(kinds) and results[name]["questions"] == len(kinds)
        assert results[name]["accuracy"] == pytest.approx(sum(p["correct"] for p in preds) / len(preds))
        for kind, acc in results[name]["accuracy_by_question"].items():
            hits = [p["correct"] for p in preds if kinds[p["id"]] == kind]
            assert acc == pytest.approx(sum(hits) / len(hits)), (name, kind)
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


def test_demo_config_and_cli_reject_nonsense(tmp_path):
    with pytest.raises(ValueError, match="--n-train"):
        DemoConfig(out=str(tmp_path), n_train=0)
    with pytest.raises(ValueError, match="--method 'other': expected one of llavakd, llavadi"):
        DemoConfig(out=str(tmp_path), method="other")
    res = CliRunner().invoke(app, ["--out", str(tmp_path / "x"), "--method", "other"])
    assert res.exit_code == 2 and "--method" in res.output
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_quick_demo_llavadi_arm(tmp_path):
    out = tmp_path / "demo"
    _quick_demo(out, "--method", "llavadi")
    results = json.loads((out / "results.json").read_text())
    assert {"teacher", "baseline", "distilled", "llavadi"} <= set(results)
    assert all(math.isfinite(results["llavadi"][k]) for k in ("accuracy", "kl_to_teacher", "top1_agreement"))
    cfg = json.loads((out / "runs" / "llavadi-dft" / "train_config.json").read_text())
    assert cfg["positions"] in ("response,visual,prompt", ["response", "visual", "prompt"]) and cfg["gamma"] == 0.0
    assert (out / "runs" / "llavadi-dft" / "hidden_projector" / "model.safetensors").is_file()
    metrics = [json.loads(x) for x in (out / "runs" / "llavadi-dft" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["hidden"] is not None and m["mdist_prompt"] is not None for m in metrics)
