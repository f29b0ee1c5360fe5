"""One ``kd-train`` at a time per ``--out``: rank 0 holds ``OUT/train.lock`` (``student.checkpoints.lock_output``,
the build's ``kd_cache.lock.FolderLock``) from before ``OUT`` is looked into until the run ends. A second
run is refused naming the holder (real processes below), a stale lock is taken over, and the lock file is
never mistaken for an earlier run's content."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from student_fixtures import one_torch_thread, write_synthetic_cache  # noqa: F401
from typer.testing import CliRunner

from cli.kd_train_cli import app
from kd_cache.lock import FolderLocked
from student.checkpoints import (
    LOCK_NAME,
    MODEL_FILES,
    STATE_NAME,
    _move_into,
    check_output,
    clear_run,
    existing_run,
    lock_output,
)
from student.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory, processor):
    return write_synthetic_cache(tmp_path_factory.mktemp("lock"), processor, n=6, shard_size=3)


def _args(student_dir, cache, out, *extra) -> list[str]:
    return ["train", "--stage", "dft", "--student", str(student_dir), "--cache", str(cache), "--out", str(out),
            "--batch-size", "2", "--no-progress", *[str(x) for x in extra]]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _plant(out: Path, **holder) -> None:
    out.mkdir(parents=True, exist_ok=True)
    now = time.time()
    (out / LOCK_NAME).write_text(json.dumps({"token": "x", "started": now, "heartbeat": now, **holder}))


def _finished_run(out: Path) -> dict[str, bytes]:
    """A fake finished run in ``out``; its files and their bytes."""
    out.mkdir(parents=True, exist_ok=True)
    files = {STATE_NAME: b'{"step": 7}', **{name: name.encode() for name in MODEL_FILES}}
    for name, data in files.items():
        (out / name).write_bytes(data)
    return files


# ------------------------------------------------------------------------------------------- the lock


def test_train_lock_refuses_a_live_holder_and_takes_over_a_stale_one(tmp_path, capsys):
    out = tmp_path / "run"
    held = lock_output(out)
    lock_file = out / LOCK_NAME
    assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    assert held._thread.daemon  # the heartbeat never keeps the process alive
    with pytest.raises(FolderLocked) as e:
        lock_output(out)
    msg = str(e.value)
    assert msg.startswith(f"another training run is writing to this --out: {lock_file} is held by "
                          f"host {socket.gethostname()}, pid {os.getpid()}, started "), msg
    assert "\n" not in msg and "build" not in msg
    held.release()
    assert not lock_file.exists()

    # The holder's process is gone (same host and boot): taken over at once, with a message.
    me = lock_output(out)
    host, boot = me.info["host"], me.info["boot_id"]
    me.release()
    dead = _dead_pid()
    _plant(out, host=host, boot_id=boot, pid=dead)
    capsys.readouterr()
    lock = lock_output(out)
    assert f"{lock_file}: taking over a stale lock (its process {dead} is not running" in capsys.readouterr().err
    assert json.loads(lock_file.read_text())["token"] == lock.info["token"]
    lock.release()
    # A holder on another machine is live while it beats, stale once its heartbeat is older than stale_s.
    _plant(out, host="elsewhere", boot_id="b", pid=1)
    with pytest.raises(FolderLocked, match="host elsewhere, pid 1"):
        lock_output(out, stale_s=60)
    _plant(out, host="elsewhere", boot_id="b", pid=1, heartbeat=time.time() - 120)
    lock_output(out, stale_s=60).release()
    # Taken from its holder: the holder's check stops it before its next save.
    held = lock_output(out)
    _plant(out, host="elsewhere", boot_id="b", pid=1)
    with pytest.raises(FolderLocked, match=f"{lock_file} was taken over by another training run .*host elsewhere.*"
                                           "this training run stops"):
        held.check()
    held.release()
    assert json.loads(lock_file.read_text())["host"] == "elsewhere"  # not ours to remove


def test_an_out_that_cannot_hold_the_lock_is_an_output_error(tmp_path):
    from student.checkpoints import OutputError

    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match=rf"--out {tmp_path / 'file' / 'run'}: cannot write there"):
        lock_output(tmp_path / "file" / "run")


def test_the_lock_file_is_not_run_content(student_dir, cache, tmp_path):
    out = tmp_path / "run"
    lock = lock_output(out)
    cfg = TrainConfig(stage="dft", student=str(student_dir), cache=str(cache), out=str(out))
    assert existing_run(out) is None
    check_output(cfg)  # a held, otherwise empty OUT is a new run's
    files = _finished_run(out)
    assert existing_run(out) == "a finished run"
    clear_run(out)
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    # The final save's move into OUT replaces the model files and leaves the lock alone.
    tmp = out / ".final-tmp"
    tmp.mkdir()
    for name in files:
        (tmp / name).write_bytes(b"new")
    _move_into(tmp, out)
    assert sorted(p.name for p in out.iterdir()) == sorted([LOCK_NAME, *files])
    lock.check()  # still this process's lock
    lock.release()
    assert not (out / LOCK_NAME).exists()


def test_a_held_out_is_refused_before_anything_in_it_changes(student_dir, cache, tmp_path):
    """Even ``--overwrite`` leaves a held OUT alone; once the holder is gone (stale lock) the same command
    takes the lock over, replaces the earlier run and releases the lock."""
    out = tmp_path / "run"
    files = _finished_run(out)
    held = lock_output(out)
    res = CliRunner().invoke(app, _args(student_dir, cache, out, "--max-steps", "1", "--overwrite"))
    assert res.exit_code == 2, res.output
    assert (f"kd-train: error: another training run is writing to this --out: {out / LOCK_NAME} is held by "
            f"host {socket.gethostname()}, pid {os.getpid()}, started ") in res.output
    assert "Traceback" not in res.output
    assert {name: (out / name).read_bytes() for name in files} == files
    held.release()

    _plant(out, host=held.info["host"], boot_id=held.info["boot_id"], pid=_dead_pid())
    res = CliRunner().invoke(app, _args(student_dir, cache, out, "--max-steps", "1", "--overwrite"))
    assert res.exit_code == 0, res.output
    assert "taking over a stale lock" in res.output
    assert json.loads((out / STATE_NAME).read_text())["step"] == 1
    assert not (out / LOCK_NAME).exists()


def test_a_refused_run_leaves_no_empty_out(student_dir, tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(app, _args(student_dir, tmp_path / "not-a-cache", out))
    assert res.exit_code == 2, res.output
    assert not out.exists()


# ------------------------------------------------------------------------------ two real processes

# Runs the real kd-train CLI and pauses it before its second optimizer step (step 1 done: OUT holds its
# train_config.json and metrics.jsonl, no checkpoint): it writes <sync>/paused and waits for <sync>/go.
DRIVER = r"""
import os, sys, time
import student.train as train_mod

sync, seen = sys.argv[1], {"n": 0}
real_step = train_mod._optimizer_step
def step(*a, **k):
    seen["n"] += 1
    if seen["n"] == 2:
        open(os.path.join(sync, "paused"), "w").close()
        while not os.path.exists(os.path.join(sync, "go")):
            time.sleep(0.05)
    return real_step(*a, **k)
train_mod._optimizer_step = step

from cli.kd_train_cli import main
main(sys.argv[2:])
"""


@pytest.mark.slow
def test_concurrent_runs_second_is_refused(student_dir, cache, tmp_path):
    """Two real kd-train processes into one --out, with other settings and without --overwrite: the
    second exits 2 naming the holder (host, pid, start time) while the first runs; the first finishes
    with exit 0 and its outputs. OUT holds no checkpoint at that moment, so only the lock refuses it."""
    out, sync = tmp_path / "run", tmp_path / "sync"
    sync.mkdir()
    first = subprocess.Popen([sys.executable, "-c", DRIVER, str(sync),
                              *_args(student_dir, cache, out, "--max-steps", "3", "--lr", "1e-3", "--save-every", "0")],
                             env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (sync / "paused").exists():
            assert first.poll() is None and time.time() < deadline, first.communicate()[1][-3000:]
            time.sleep(0.05)
        holder = json.loads((out / LOCK_NAME).read_text())
        assert holder["pid"] == first.pid
        assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", LOCK_NAME, "train_config.json"]
        assert existing_run(out) is None  # nothing else would have stopped the second run

        second = subprocess.run([sys.executable, "-m", "cli.kd_train_cli",
                                 *_args(student_dir, cache, out, "--max-steps", "2", "--lr", "5e-3")],
                                env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        errors = [line for line in second.stderr.splitlines() if line.startswith("kd-train: error:")]
        assert len(errors) == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
        assert errors[0].startswith(f"kd-train: error: another training run is writing to this --out: "
                                    f"{out / LOCK_NAME} is held by host {socket.gethostname()}, pid {first.pid}, "
                                    "started "), errors[0]
        assert json.loads((out / LOCK_NAME).read_text())["token"] == holder["token"]  # still the first's
        assert json.loads((out / "train_config.json").read_text())["lr"] == 1e-3

        (sync / "go").touch()
        _, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, err[-3000:]
    assert "done after 3 steps" in err
    assert json.loads((out / "train_config.json").read_text())["lr"] == 1e-3
    assert json.loads((out / STATE_NAME).read_text())["step"] == 3
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not (out / LOCK_NAME).exists()
