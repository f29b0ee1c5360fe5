"""Fault injection on the read side and the trainer: corrupt caches, edited manifests, changed resume
settings, protected output folders, and a SIGKILL during the metrics rewrite.

Every corruption is made to a real cache written by ``CacheWriter`` and must be detected before any of
its numbers reach training: by ``KDCache.check`` (which ``kd-train`` runs before step 1), when the
shard is opened, or by the chunk's CRC32C when it is decoded, with an error that names the file.
The figures of RELIABILITY.md ("Reading a cache and training") come from these tests.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from student_fixtures import one_torch_thread, write_synthetic_cache  # noqa: F401
from typer.testing import CliRunner

from kd_cache import open_cache
from kd_cache.reader import ChunkCache, CorruptCacheError, _ShardReader
from student.checkpoints import OutputError, check_resume, checkpoint_dirs, truncate_metrics
from student.config import PATH_KEYS, RESUME_KEYS, TrainConfig
from student.train import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory, processor):
    # 7 samples in shards of 3: shards 00000, 00001 and a short 00002
    return write_synthetic_cache(tmp_path_factory.mktemp("rel"), processor, n=7, shard_size=3)


def _copy(cache: Path, tmp_path: Path, name: str = "copy") -> Path:
    dst = tmp_path / name
    shutil.copytree(cache, dst)
    return dst


def _chunk_files(shard: Path) -> list[Path]:
    """Every chunk file of a shard (not the zarr metadata)."""
    return sorted(p for p in shard.rglob("*") if p.is_file() and p.name != "zarr.json")


def _read_shard(cache_dir: Path, shard: int) -> list[dict]:
    c = open_cache(str(cache_dir))
    return list(c.shard_samples(shard))


def _corrupt(path: Path, how: str, at: int | None = None) -> None:
    raw = bytearray(path.read_bytes())
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(bytes(raw[: len(raw) // 2]))
    elif how == "flip":
        raw[len(raw) // 2 if at is None else at] ^= 0xFF if at is None else 0x01
        path.write_bytes(bytes(raw))
    else:
        raise ValueError(how)


# ------------------------------------------------------------------------------------ chunk corruption


@pytest.mark.parametrize("how", ["delete", "truncate", "flip"])
def test_every_chunk_of_every_array_corrupted_is_detected_before_use(cache, tmp_path, how):
    """Each chunk file of a shard (input_ids, labels, offsets, positions, ids, logprobs, tail, relation ...),
    deleted, truncated or with a flipped byte: the shard's samples are never returned. Deleted and
    truncated chunks are found by the cheap whole-cache check (listing and sizes) that kd-train runs
    before step 1; a flipped byte by the chunk's checksum when it is decoded, naming the chunk file."""
    work = _copy(cache, tmp_path)
    shard = work / "shards" / "00001"
    reference = _read_shard(cache, 1)
    files = _chunk_files(shard)
    arrays = {str(p.relative_to(shard)).split("/c/")[0] for p in files}
    for needed in ("tokens/input_ids", "tokens/labels", "tokens/offsets", "response/logprobs", "response/ids",
                   "response/tail", "response/positions", "visual/logprobs", "relation/upper"):
        assert needed in arrays, needed
    for f in files:
        saved = f.read_bytes()
        _corrupt(f, how)
        check = open_cache(str(work)).check()
        if how in ("delete", "truncate"):
            assert check.failing == ["00001"], (f, check.lines())
        else:
            assert check.ok  # same size, same listing: the checksum finds it on decode
        with pytest.raises(CorruptCacheError) as err:
            _read_shard(work, 1)
        msg = str(err.value)
        assert "00001" in msg and "kd-cache verify" in msg
        if how == "flip":
            assert str(f) in msg, msg  # shard, array and chunk file named
        else:
            assert str(f.relative_to(shard)) in msg or "bytes" in msg, msg
        assert not open_cache(str(work)).verify_shards().ok
        f.write_bytes(saved)
    # Restored: the same samples as the original cache.
    for a, b in zip(reference, _read_shard(work, 1), strict=True):
        for key, value in a.items():
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(b[key], value)


def test_every_single_byte_flip_of_a_logprob_chunk_raises(cache, tmp_path):
    """All single-bit flips at every byte of one log-prob chunk: none decodes to other numbers."""
    work = _copy(cache, tmp_path)
    shard = work / "shards" / "00000"
    (chunk,) = _chunk_files(shard / "response" / "logprobs")
    raw = chunk.read_bytes()
    fs_path = str(shard)
    for at in range(len(raw)):
        flipped = bytearray(raw)
        flipped[at] ^= 0x01
        chunk.write_bytes(bytes(flipped))
        reader = _ShardReader(__import__("fsspec").filesystem("file"), fs_path)
        with pytest.raises(CorruptCacheError, match="array response/logprobs: chunk 0"):
            reader._get(ChunkCache(), "response/logprobs", 0, reader._reader("response/logprobs").n)
    chunk.write_bytes(raw)
    print(f"flipped bytes tried: {len(raw)}, all detected")


def test_changed_array_metadata_is_detected_when_the_shard_opens(cache, tmp_path):
    """A same-size edit of an array's metadata (its dtype) passes the listing and sizes, not the hash.

    A reader takes every array's metadata from the shard's zarr.json (consolidated): an edit there is
    refused when the shard opens. The array's own zarr.json is never read (an edit there changes no
    sample) and ``verify_shards`` finds it."""
    reference = _read_shard(cache, 0)
    work = _copy(cache, tmp_path)
    root = work / "shards" / "00000" / "zarr.json"
    doc = json.loads(root.read_text())
    assert doc["consolidated_metadata"]["metadata"]["response/logprobs"]["data_type"] == "float16"
    text = root.read_text()
    at = text.index('"response/logprobs"')
    root.write_text(text[:at] + text[at:].replace('"float16"', '"float32"', 1))
    with pytest.raises(CorruptCacheError, match="00000/zarr.json \\(zarr metadata\\) changed"):
        _read_shard(work, 0)
    assert not open_cache(str(work)).check().ok  # the up-front check hashes it too
    assert open_cache(str(work)).verify_shards().failing == ["00000"]

    work = _copy(cache, tmp_path, "own")
    meta = work / "shards" / "00000" / "response" / "logprobs" / "zarr.json"
    text = meta.read_text()
    assert '"float16"' in text
    meta.write_text(text.replace('"float16"', '"float32"'))
    for a, b in zip(reference, _read_shard(work, 0), strict=True):
        np.testing.assert_array_equal(a["response_logprobs"], b["response_logprobs"])
        assert b["response_logprobs"].dtype == np.float16
    assert open_cache(str(work)).verify_shards().failing == ["00000"]


def test_missing_chunk_of_fill_values_is_a_missing_file_not_zeros(tmp_path, processor):
    """Chunks equal to the fill value are written too: deleting one is detected, never read as zeros."""
    from kd_cache.writer import CacheWriter

    cache_dir = write_synthetic_cache(tmp_path, processor, n=2, shard_size=2)
    w = CacheWriter(str(tmp_path / "zeros"))
    samples = [dict(s) for s in open_cache(str(cache_dir))]
    for s in samples:
        s["response_tail"] = np.zeros_like(s["response_tail"])  # an all-fill-value array
    entry = w.write_shard(0, samples, sparse_mode="topk", k=8, relation="full")
    chunks = [rel for rel in entry.files if rel.startswith("response/tail/c/")]
    assert chunks
    import fsspec

    shard = tmp_path / "zeros" / "shards" / "00000"
    (shard / chunks[0]).unlink()
    with pytest.raises(CorruptCacheError, match=f"file\\(s\\) missing from .*{chunks[0]}"):
        _ShardReader(fsspec.filesystem("file"), str(shard), entry)


# --------------------------------------------------------------------------------- manifest edits, verify


def _edit_manifest(root: Path, edit) -> None:
    m = json.loads((root / "manifest.json").read_text())
    edit(m)
    (root / "manifest.json").write_text(json.dumps(m))


MANIFEST_EDITS = {
    # name: (edit, failing shards, words in the problem)
    "dropped shard entry": (lambda m: m["shards"].pop(1), ["00001"], "not listed in manifest.json"),
    "entry sample count": (lambda m: m["shards"][2].__setitem__("samples", 2), ["00002"],
                           "says 1 samples, the manifest says 2"),
    "total num_samples": (lambda m: m.__setitem__("num_samples", 99), [], "says num_samples 99"),
    "entry byte count": (lambda m: m["shards"][0].__setitem__("bytes", m["shards"][0]["bytes"] + 1), ["00000"],
                         "bytes, the manifest says"),
    "file list": (lambda m: m["shards"][0]["files"].__setitem__("extra/c/0", "0" * 64), ["00000"],
                  "file(s) missing"),
}


@pytest.mark.parametrize("name", list(MANIFEST_EDITS))
def test_verify_cross_checks_the_manifest_against_the_shards(cache, tmp_path, name):
    edit, failing, words = MANIFEST_EDITS[name]
    work = _copy(cache, tmp_path)
    from cli.kd_cache_cli import app

    runner = CliRunner()
    assert runner.invoke(app, ["verify", str(work)]).exit_code == 0
    _edit_manifest(work, edit)
    res = runner.invoke(app, ["verify", str(work), "--json"])
    assert res.exit_code == 1
    assert words in res.output
    report = json.loads(res.stdout)
    assert report["failing"] == failing and report["ok"] is False
    # the shape other tools use: one entry per shard, in manifest order, then the unlisted ones
    assert {"name", "index", "ok", "problems"} == set(report["shards"][0])
    # kd-train's check before step 1 finds the same
    check = open_cache(str(work)).check()
    assert check.failing == failing and words in "\n".join(check.lines())


def test_shard_marker_missing_is_found_by_the_up_front_check(cache, tmp_path):
    work = _copy(cache, tmp_path)
    (work / "shards" / "00002.complete.json").unlink()
    check = open_cache(str(work)).check()
    assert check.failing == ["00002"] and "completion marker" in check.lines()[0]


# ----------------------------------------------------------------------------------------- kd-train CLI


def _train_args(student_dir, cache, out, *extra) -> list[str]:
    return ["train", "--stage", "dft", "--student", str(student_dir), "--cache", str(cache), "--out", str(out),
            "--batch-size", "2", "--lr", "1e-3", "--no-progress", *[str(x) for x in extra]]


def _kd_train(*args):
    from cli.kd_train_cli import app

    return CliRunner().invoke(app, list(args))


def test_kd_train_refuses_a_damaged_cache_before_step_1(student_dir, cache, tmp_path):
    work = _copy(cache, tmp_path)
    # the last shard in the file order: a lazy check would find it mid-epoch
    victim = next(p for p in _chunk_files(work / "shards" / "00002") if "response/logprobs" in str(p))
    victim.unlink()
    out = tmp_path / "run"
    res = _kd_train(*_train_args(student_dir, work, out))
    assert res.exit_code == 2, res.output
    assert "the cache is damaged" in res.output and "00002" in res.output and "response/logprobs" in res.output
    assert "Traceback" not in res.output
    assert not (out / "metrics.jsonl").exists()  # refused before the first step


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_flipped_chunk_met_mid_run_stops_it_and_keeps_the_steps_done(student_dir, cache, tmp_path, num_workers):
    """The up-front check does not decode chunks: a flipped byte (same size) is found by its checksum
    when the step's data is read. No number of it is used; the steps done are kept as a checkpoint,
    and the run resumes once the cache is repaired, ending as an uninterrupted run does."""
    work = _copy(cache, tmp_path)
    # unshuffled, batch 2: shard 00002 (sample 6) is first read by step 4
    chunk = _chunk_files(work / "shards" / "00002" / "response" / "logprobs")[0]
    good = chunk.read_bytes()
    _corrupt(chunk, "flip")
    out, ref = tmp_path / "run", tmp_path / "ref"
    kw = dict(save_every=0, max_steps=None, epochs=1, shuffle=False, num_workers=num_workers)
    with pytest.raises(ValueError) as err:
        train(_cfg(student_dir, work, out, **kw))
    msg = str(err.value)
    assert "array response/logprobs: chunk 0" in msg and str(chunk) in msg
    assert f"the 3 steps done are kept in {out / 'checkpoints' / 'step-3'}" in msg
    assert [c.name for c in checkpoint_dirs(out)] == ["step-3"]
    chunk.write_bytes(good)  # repaired (bit-identical, as a rebuild of the shard is)
    assert train(_cfg(student_dir, work, out, resume=True, **kw))["step"] == 4
    train(_cfg(student_dir, cache, ref, **kw))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    for a, b in zip(lines, expected, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)


def test_kd_train_names_a_folder_that_is_not_a_cache(student_dir, tmp_path):
    (tmp_path / "notacache").mkdir()
    (tmp_path / "notacache" / "data.json").write_text("[]")
    res = _kd_train(*_train_args(student_dir, tmp_path / "notacache", tmp_path / "run"))
    assert res.exit_code == 2
    assert "is not a kd cache (no manifest.json)" in res.output and "build again" not in res.output


# --------------------------------------------------------------------------------------- resume settings


# A changed value for every setting a resumed run must match. Adding a resume key without a case here fails.
CHANGED = {
    "stage": "dpt", "image_folder": "/elsewhere", "epochs": 2, "max_steps": 5, "lr": 5e-4, "batch_size": 3,
    "grad_accum": 2, "warmup_ratio": 0.1, "weight_decay": 0.1, "max_grad_norm": 0.5, "seed": 1, "alpha": 0.5,
    "beta": 0.5, "gamma": 0.5, "positions": "response", "delta": 0.5, "hidden_weight": 0.5, "hidden_loss": "cosine",
    "affinity_weight": 0.5, "zscore": True, "divergence": "rkl", "jsd_beta": 0.3, "skew": 0.2, "temperature": 2.0,
    "tail_mode": "renorm", "shuffle": False, "block_shards": 2, "train_modules": "projector",
    "mixed_precision": "bf16", "lora_r": 4, "alignment": "cross", "visual_alignment": "hungarian",
}
# The adapter settings, changed against a run with adapters (--lora-r 8): without --lora-r they are refused.
CHANGED_LORA = {"lora_alpha": 3.0, "lora_dropout": 0.1, "lora_target_modules": "q_proj", "load_in_4bit": True}
# Settings that may change on resume, with a changed value: they do not change the samples, losses or updates.
FREE = {"chunk_size": 64, "head_memory_mb": 0, "num_workers": 2, "save_every": 3, "report_to": "none",
        "gradient_checkpointing": True, "progress": False, "any_template": True, "student": "/other/student",
        "cache": "/other/cache", "out": "/other/out", "storage_options": {}}
FREE_LORA = {"merge": True}  # what a run with adapters writes at its end, not how it trains


def test_every_resume_key_is_checked(tmp_path, monkeypatch):
    assert set(CHANGED) | set(CHANGED_LORA) == set(RESUME_KEYS)
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"resume", "overwrite"}
    assert set(RESUME_KEYS) | set(FREE) | set(FREE_LORA) == fields, "decide the resume rule of every TrainConfig field"
    base = {"stage": "dft", "student": "s", "cache": "c", "out": "o", "max_steps": 4, "image_folder": "imgs"}
    saved = TrainConfig(**base).to_dict()
    ident = {"cache": "a", "student": "b"}
    for key, value in CHANGED.items():
        cfg = TrainConfig(**{**base, key: value})
        with pytest.raises(ValueError, match=f"--{key.replace('_', '-')}: checkpoint has"):
            check_resume(saved, cfg, tmp_path, ident, ident)
    lora = {**base, "lora_r": 8}
    for key, value in CHANGED_LORA.items():
        with pytest.raises(ValueError, match=f"--{key.replace('_', '-')}: checkpoint has"):
            check_resume(TrainConfig(**lora).to_dict(), TrainConfig(**{**lora, key: value}), tmp_path, ident, ident)
    for key, value in FREE_LORA.items():
        check_resume(TrainConfig(**lora).to_dict(), TrainConfig(**{**lora, key: value}), tmp_path, ident, ident)
    for key, value in FREE.items():
        check_resume(saved, TrainConfig(**{**base, key: value}), tmp_path, ident, ident)
    # a path is the same path relative or absolute
    assert PATH_KEYS == ("image_folder",)
    monkeypatch.chdir(tmp_path)
    check_resume(TrainConfig(**{**base, "image_folder": str(tmp_path / "imgs")}).to_dict(),
                 TrainConfig(**base), tmp_path, ident, ident)
    # the content of the cache and the student, not their paths
    for key in ident:
        with pytest.raises(ValueError, match=f"--{key}: .* than the checkpoint was trained on"):
            check_resume(saved, TrainConfig(**base), tmp_path, ident, {**ident, key: "other"})


def _cfg(student_dir, cache, out, **kw):
    base = {"stage": "dft", "student": str(student_dir), "cache": str(cache), "out": str(out), "batch_size": 2,
            "max_steps": 3, "save_every": 1, "lr": 1e-3, "progress": False}
    return TrainConfig(**{**base, **kw})


def test_resume_by_content_not_path(student_dir, cache, processor, tmp_path, monkeypatch):
    from student_fixtures import Killed, kill_after_checkpoint

    out = tmp_path / "run"
    kill_after_checkpoint(monkeypatch, 1)
    with pytest.raises(Killed):
        train(_cfg(student_dir, cache, out))
    monkeypatch.undo()
    # a changed --max-grad-norm and --image-folder are refused
    with pytest.raises(ValueError, match="--max-grad-norm: checkpoint has 1.0"):
        train(_cfg(student_dir, cache, out, max_grad_norm=0.5, resume=True))
    with pytest.raises(ValueError, match="--image-folder: checkpoint has"):
        train(_cfg(student_dir, cache, out, image_folder=str(tmp_path), resume=True))
    # a byte-identical copy at another path, reached by a relative path, with a relative --image-folder
    copy = _copy(cache, tmp_path, "moved")
    images = open_cache(str(cache)).manifest.image_folder
    monkeypatch.chdir(tmp_path)
    assert train(_cfg(student_dir, "moved", out, resume=True,
                      image_folder=os.path.relpath(images, tmp_path)))["step"] == 3
    assert copy.is_dir()
    # the same path rebuilt by another teacher: refused
    shutil.rmtree(copy)
    write_synthetic_cache(tmp_path / "other", processor, n=7, shard_size=3, teacher_seed=1,
                          image_folder=images)
    shutil.move(str(tmp_path / "other" / "cache"), str(copy))
    with pytest.raises(ValueError, match="--cache: moved is a cache with other content"):
        train(_cfg(student_dir, "moved", out, resume=True))


# ------------------------------------------------------------------------------------------ run protection


def test_finished_run_is_refused_unless_overwrite(student_dir, cache, tmp_path):
    out = tmp_path / "run"
    train(_cfg(student_dir, cache, out, save_every=0, max_steps=1))
    assert (out / "trainer_state.json").is_file() and (out / "model.safetensors").is_file()
    before = (out / "model.safetensors").read_bytes()
    res = _kd_train(*_train_args(student_dir, cache, out, "--max-steps", "2"))
    assert res.exit_code == 2 and "already holds a finished run" in res.output and "--overwrite" in res.output
    assert (out / "model.safetensors").read_bytes() == before
    # --resume without a checkpoint would start over on top of it: refused too
    res = _kd_train(*_train_args(student_dir, cache, out, "--max-steps", "2", "--resume"))
    assert res.exit_code == 2 and "no checkpoint to continue from" in res.output
    res = _kd_train(*_train_args(student_dir, cache, out, "--max-steps", "2", "--resume", "--overwrite"))
    assert res.exit_code == 2 and "pass one of them" in res.output
    # --overwrite: a new run, its own metrics and model
    res = _kd_train(*_train_args(student_dir, cache, out, "--max-steps", "2", "--overwrite"))
    assert res.exit_code == 0, res.output
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert json.loads((out / "trainer_state.json").read_text())["step"] == 2
    assert not (out / ".final-tmp").exists()


def test_overwrite_removes_the_old_model_before_the_new_run_starts(student_dir, cache, tmp_path, monkeypatch):
    """Killed half-way, an overwritten run never shows the old model beside the new config."""
    import student.train as train_mod

    out = tmp_path / "run"
    train(_cfg(student_dir, cache, out, save_every=0, max_steps=1))

    class Killed(Exception):
        pass

    def die(*a, **k):
        raise Killed

    monkeypatch.setattr(train_mod, "_optimizer_step", die)
    with pytest.raises(Killed):
        train(_cfg(student_dir, cache, out, save_every=0, max_steps=2, overwrite=True, lr=5e-4))
    assert json.loads((out / "train_config.json").read_text())["lr"] == 5e-4
    assert not (out / "model.safetensors").exists() and not (out / "trainer_state.json").exists()


def test_out_is_or_holds_the_student(student_dir, cache, tmp_path):
    res = _kd_train(*_train_args(student_dir, cache, student_dir))
    assert res.exit_code == 2 and "is (or holds) the --student" in res.output
    res = _kd_train(*_train_args(student_dir, cache, Path(student_dir).parent))
    assert res.exit_code == 2 and "is (or holds) the --student" in res.output


def test_failed_final_save_keeps_the_run(student_dir, cache, tmp_path, monkeypatch):
    """--save-every 0 and the disk refuses the final model: the model is saved to a rescue folder
    and the error names it; OUT is not marked finished and holds no half-written model."""
    import errno

    import student.checkpoints as ck

    real = ck._write_final
    out = tmp_path / "run"

    def disk_full_in_out(folder, *a, **k):
        if Path(folder).is_relative_to(out):
            raise OSError(errno.ENOSPC, "No space left on device", str(folder / "model.safetensors"))
        return real(folder, *a, **k)

    monkeypatch.setattr(ck, "_write_final", disk_full_in_out)
    with pytest.raises(OutputError, match="could not be saved there") as err:
        train(_cfg(student_dir, cache, out, save_every=0, max_steps=2))
    msg = str(err.value)
    rescue = Path(msg.split("saved to ")[1].split(" instead")[0])
    assert "No space left on device" in msg and str(out) in msg
    from transformers import LlavaForConditionalGeneration

    LlavaForConditionalGeneration.from_pretrained(rescue)
    assert json.loads((rescue / "trainer_state.json").read_text())["step"] == 2
    assert not (out / "trainer_state.json").exists() and not (out / ".final-tmp").exists()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    shutil.rmtree(rescue)


def test_not_enough_free_space_is_refused_before_step_1(student_dir, cache, tmp_path, monkeypatch):
    import student.checkpoints as ck

    real = shutil.disk_usage
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    out = tmp_path / "run"
    res = _kd_train(*_train_args(student_dir, cache, out, "--max-steps", "2", "--save-every", "1"))
    assert res.exit_code == 2, res.output
    assert f"--out {out}: 0.0 MiB free" in res.output and "2 checkpoints" in res.output
    assert not (out / "metrics.jsonl").exists()


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 160 KiB filesystem, half the tiny student's weights (needs the right to mount; otherwise the
    test is skipped with the reason)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mnt)], capture_output=True,
                         text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_full_and_read_only_out_on_a_real_filesystem(student_dir, cache, small_tmpfs, monkeypatch):
    out = small_tmpfs / "run"
    # refused before step 1: the final model would not fit
    res = _kd_train(*_train_args(student_dir, cache, out, "--max-steps", "1"))
    assert res.exit_code == 2 and f"--out {out}:" in res.output and "MiB free" in res.output, res.output
    assert "Traceback" not in res.output and not (out / "metrics.jsonl").exists()
    # without the check, the disk fills during the final save: a rescue copy, and OUT not marked finished
    import student.train as train_mod

    monkeypatch.setattr(train_mod, "check_free_space", lambda *a, **k: None)
    res = _kd_train(*_train_args(student_dir, cache, out, "--max-steps", "1"))
    assert res.exit_code == 2 and "No space left on device" in res.output and "Traceback" not in res.output
    rescue = Path(res.output.split("saved to ")[1].split(" instead")[0])
    assert (rescue / "model.safetensors").is_file() and (rescue / "trainer_state.json").is_file()
    assert not (out / "trainer_state.json").exists() and not (out / ".final-tmp").exists()
    shutil.rmtree(rescue)
    monkeypatch.undo()
    shutil.rmtree(out)
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    res = _kd_train(*_train_args(student_dir, cache, out, "--max-steps", "1"))
    assert res.exit_code == 2 and f"--out {out}: cannot write there (Read-only file system)" in res.output, res.output


# ------------------------------------------------------------------------------ atomic metrics rewrite


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import kd_cache.storage as storage
    from student.checkpoints import truncate_metrics

    point = sys.argv[2]
    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)
    if point == "before_rename":
        storage.os.replace = die
    elif point == "mid_write":
        storage.os.fsync = die
    truncate_metrics(__import__("pathlib").Path(sys.argv[1]), 2)
""")


@pytest.mark.parametrize("point", ["mid_write", "before_rename"])
def test_metrics_rewrite_survives_sigkill(tmp_path, point):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 6)]
    path.write_text("".join(x + "\n" for x in lines))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(path), point], env=env)
    assert proc.returncode == -signal.SIGKILL
    assert path.read_text().splitlines() == lines  # the old file, whole
    truncate_metrics(path, 2)
    assert path.read_text().splitlines() == lines[:2]
    assert checkpoint_dirs(tmp_path) == []
