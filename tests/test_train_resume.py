"""``--resume``: a run killed mid-epoch continues with the same next samples and the same losses."""

from __future__ import annotations

import json

import pytest
import torch
from student_fixtures import Killed, kill_after_checkpoint, one_torch_thread, write_synthetic_cache  # noqa: F401

from student.checkpoints import checkpoint_dirs
from student.config import TrainConfig
from student.train import train

COMPARED = ("loss", "ce", "mdist_response", "mdist_visual", "rdist", "lr", "grad_norm", "samples_seen", "epoch")


@pytest.fixture(scope="module")
def cache(tmp_path_factory, processor):
    # 11 samples, batch 2 -> 5 micro-batches per epoch (the last sample of each epoch is in a batch of 1),
    # grad-accum 2 -> 3 steps per epoch, the last one shorter.
    return write_synthetic_cache(tmp_path_factory.mktemp("resume"), processor, n=11, shard_size=4)


def _cfg(student_dir, cache, out, **kw):
    base = {"stage": "dft", "student": str(student_dir), "cache": str(cache), "out": str(out), "batch_size": 2,
            "grad_accum": 2, "epochs": 3, "save_every": 2, "warmup_ratio": 0.2, "lr": 1e-3, "progress": False}
    return TrainConfig(**{**base, **kw})


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_gives_identical_subsequent_losses(student_dir, cache, tmp_path, monkeypatch, capsys,
                                                            num_workers):
    full = tmp_path / "full"
    train(_cfg(student_dir, cache, full, num_workers=num_workers))
    reference = _metrics(full)
    assert len(reference) == 9 and [m["epoch"] for m in reference] == [0, 0, 0, 1, 1, 1, 2, 2, 2]

    # Kill the run right after the step-4 checkpoint (mid-epoch 1) ...
    killed = tmp_path / "killed"
    kill_after_checkpoint(monkeypatch, 4)
    with pytest.raises(Killed):
        train(_cfg(student_dir, cache, killed, num_workers=num_workers))
    monkeypatch.undo()
    assert [c.name for c in checkpoint_dirs(killed)] == ["step-2", "step-4"]
    assert not (killed / "model.safetensors").exists()
    # ... leaving a metrics line past the checkpoint, as a process killed a moment later would. Mark
    # the lines before it, to see below that the resumed run keeps them rather than retraining.
    lines = [{**m, "before_kill": True} for m in _metrics(killed)]
    assert len(lines) == 4
    (killed / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines)
                                          + json.dumps({**reference[4], "loss": -1.0}) + "\n"
                                          + '{"step": 6, "lo')  # and one cut short by the kill
    # A checkpoint directory without its COMPLETE marker (killed while saving) is ignored.
    (killed / "checkpoints" / "step-6").mkdir()

    capsys.readouterr()
    result = train(_cfg(student_dir, cache, killed, num_workers=num_workers, resume=True))
    assert result["step"] == 9
    assert f"resuming from {killed / 'checkpoints' / 'step-4'} (step 4, epoch 1, 4 samples seen)" in capsys.readouterr().err
    resumed = _metrics(killed)
    assert [m["step"] for m in resumed] == list(range(1, 10))
    assert [m.get("before_kill", False) for m in resumed] == [True] * 4 + [False] * 5
    for ref, got in zip(reference, resumed, strict=True):
        for key in COMPARED:
            assert got[key] == pytest.approx(ref[key], rel=1e-6, abs=1e-9), (ref["step"], key)
        assert got["positions"] == ref["positions"]

    from transformers import LlavaForConditionalGeneration

    a = LlavaForConditionalGeneration.from_pretrained(full).state_dict()
    b = LlavaForConditionalGeneration.from_pretrained(killed).state_dict()
    for name, value in a.items():
        torch.testing.assert_close(b[name], value, rtol=1e-6, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


def test_resume_refuses_changed_settings_and_starts_fresh_without_checkpoints(student_dir, cache, tmp_path, capsys):
    out = tmp_path / "run"
    train(_cfg(student_dir, cache, out, epochs=1, save_every=1))
    with pytest.raises(ValueError, match=r"--batch-size: checkpoint has 2, this run asks for 3"):
        train(_cfg(student_dir, cache, out, epochs=1, save_every=1, batch_size=3, resume=True))
    # Nothing to resume from: say so and train from scratch.
    fresh = tmp_path / "fresh"
    assert train(_cfg(student_dir, cache, fresh, epochs=1, resume=True))["step"] == 3
    assert "holds no complete checkpoint" in capsys.readouterr().err
    # Resuming a finished run trains nothing more and keeps the metrics.
    before = _metrics(out)
    assert train(_cfg(student_dir, cache, out, epochs=1, save_every=1, resume=True))["step"] == 3
    assert _metrics(out) == before


def test_fresh_run_refuses_an_out_dir_with_checkpoints(student_dir, cache, tmp_path):
    out = tmp_path / "run"
    train(_cfg(student_dir, cache, out, max_steps=2, save_every=1))
    with pytest.raises(ValueError, match=r"already holds checkpoints of an earlier run \(step-2\).*--resume"):
        train(_cfg(student_dir, cache, out, max_steps=2, save_every=1))
