"""End to end on real caches: kd-cache build with the tiny teacher, then the teacher directory is
deleted and the whole student pipeline (init-student -> DPT -> SFT -> DFT) runs from the caches alone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from student_fixtures import one_torch_thread  # noqa: F401
from typer.testing import CliRunner

from cli.kd_train_cli import app
from kd_cache.build import BuildConfig, build_cache
from student.config import TrainConfig
from student.train import train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, teacher_dir, causal_teacher_dir, chat_data, caption_data):
    """Real caches from a teacher copy, a student composed from that teacher's vision tower and a causal
    LM; then the teacher copy is deleted."""
    root = tmp_path_factory.mktemp("e2e")
    teacher = root / "teacher"
    shutil.copytree(teacher_dir, teacher)
    caches = {}
    for name, (data, images), template in (("caption", caption_data, "pretrain"), ("chat", chat_data, "chat")):
        caches[name] = root / f"cache-{name}"
        build_cache(BuildConfig(teacher=str(teacher), data=str(data), image_folder=str(images),
                                out=str(caches[name]), template=template, shard_size=3, top_k=16, device="cpu",
                                progress=False))
    res = CliRunner().invoke(app, ["init-student", "--vision", str(teacher), "--llm", str(causal_teacher_dir),
                                   "--out", str(root / "student")])
    assert res.exit_code == 0, res.output
    shutil.rmtree(teacher)
    return root, caches


def test_dpt_through_the_cli_without_the_teacher(pipeline):
    root, caches = pipeline
    manifest = json.loads((caches["caption"] / "manifest.json").read_text())
    assert not Path(manifest["teacher"]["path"]).exists()  # the teacher is gone
    out = root / "dpt"
    # The documented no-subcommand form, in a fresh interpreter: exit code, files, and proof that the
    # teacher-side module was never imported.
    script = textwrap.dedent(f"""
        import sys
        from cli.kd_train_cli import main
        try:
            main(["--stage", "dpt", "--student", {str(root / "student")!r}, "--cache", {str(caches["caption"])!r},
                  "--out", {str(out)!r}, "--batch-size", "2", "--max-steps", "3", "--num-workers", "2",
                  "--save-every", "3", "--no-progress"])
        except SystemExit as e:
            assert not e.code, e.code
        assert "kd_cache.teacher" not in sys.modules, "the trainer imported the teacher pass"
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "dpt done after 3 steps" in proc.stderr
    for name in ("model.safetensors", "config.json", "processor_config.json", "train_config.json", "metrics.jsonl"):
        assert (out / name).is_file(), name
    assert (out / "checkpoints" / "step-3" / "COMPLETE").is_file()
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(m["mdist_visual"] > 0 and 0 <= m["rdist"] <= 2 for m in metrics)


def test_sft_then_dft_chain_on_the_chat_cache(pipeline):
    """Each stage's OUT is the next stage's --student; the chat cache mixes image and text-only records."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    root, caches = pipeline
    student = root / "student"
    for stage in ("sft", "dft"):
        out = root / stage
        result = train(TrainConfig(stage=stage, student=str(student), cache=str(caches["chat"]), out=str(out),
                                   batch_size=3, grad_accum=2, epochs=1, progress=False))
        assert result["step"] == 2  # 10 records, batch 3 -> 4 micro-batches -> 2 steps
        student = out
    metrics = [json.loads(x) for x in (root / "dft" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["samples_seen"] == 10 and metrics[0]["mdist_response"] > 0
    LlavaForConditionalGeneration.from_pretrained(root / "dft")
    AutoProcessor.from_pretrained(root / "dft")
