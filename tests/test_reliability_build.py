"""Fault injection on ``kd-cache build``: real SIGKILLs at named points (resumed to a byte-identical cache),
data and teacher changes refused, concurrent builds (real processes), the lock's stale rules, repair
of damaged shards, a full and a read-only disk, temporary-file leftovers, per-sample generation seeds.

``tests/test_build.py`` already kills a build once its first shard is complete (and fakes a half-written
shard); the kills here hit every write the build makes, each at an exact point."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.kd_cache_cli import app
from kd_cache import fingerprint, open_cache, storage
from kd_cache.build import BuildConfig, build_cache, build_lock
from kd_cache.lock import FolderLocked
from kd_cache.storage import StorageError, open_fs

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
ARGS = ("--top-k", "8", "--shard-size", "3", "--batch-size", "2")

# Runs the real CLI with one write of the build turned into a SIGKILL: KD_KILL_AT=<point>:<n> kills the
# process at the n-th time the build reaches <point>. KD_PAUSE_AT=<point>:<n>:<folder> instead writes
# <folder>/paused and waits for <folder>/go.
DRIVER = r"""
import os, signal, sys, time
spec = os.environ.get("KD_KILL_AT") or os.environ["KD_PAUSE_AT"]
point, nth, *rest = spec.split(":")
nth, seen = int(nth), {"n": 0}

def hit(p):
    if p != point:
        return
    seen["n"] += 1
    if seen["n"] != nth:
        return
    if os.environ.get("KD_KILL_AT"):
        os.kill(os.getpid(), signal.SIGKILL)
    folder = rest[0]
    open(os.path.join(folder, "paused"), "w").close()
    while not os.path.exists(os.path.join(folder, "go")):
        time.sleep(0.05)

import kd_cache.lock as lk, kd_cache.storage as st

real_replace = os.replace
def replace(src, dst, *a, **k):
    name = os.path.basename(str(dst))
    before = {"build.json": "build_json_renamed", "manifest.json": "manifest_renamed"}.get(name)
    if name.endswith(".complete.json"):
        before = "marker_renamed"
    if before:
        hit(before)  # the temporary file is complete, the rename not done
    real_replace(src, dst, *a, **k)
    if name.endswith(".complete.json"):
        hit("marker_written")
    if name.endswith(".skipped.json"):
        hit("skip_list_written")
os.replace = replace

real_digest = st.shard_digest
def digest(fs, root):
    hit("shard_data_written")  # every chunk written, no marker yet
    return real_digest(fs, root)
st.shard_digest = digest

real_acquire = lk.FolderLock.acquire
def acquire(self):
    out = real_acquire(self)
    hit("lock_taken")
    return out
lk.FolderLock.acquire = acquire

from cli.kd_cache_cli import main
sys.argv = ["kd-cache", *sys.argv[1:]]
main()
"""

KILL_POINTS = [  # (point, n): what a kill there leaves behind
    ("lock_taken", 1),  # a lock whose process is gone, nothing else
    ("build_json_renamed", 1),  # build.json's temporary file, no build.json
    ("skip_list_written", 2),  # shard 00000 complete, 00001's skip list only
    ("shard_data_written", 2),  # shard 00001's chunks, no marker
    ("marker_renamed", 2),  # shard 00001 complete but its marker still a temporary file
    ("marker_written", 2),  # two complete shards
    ("manifest_renamed", 1),  # every shard complete, the manifest a temporary file
]


def _cli(teacher, data, out, *extra):
    return ["build", "--teacher", str(teacher), "--data", str(data[0]), "--image-folder", str(data[1]),
            "--out", str(out), "--device", "cpu", "--no-progress", *ARGS, *extra]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _assert_identical(out: Path, ref: Path):
    """Same shards, markers, skip lists byte for byte; the same manifest but for the --out it names;
    no lock and no temporary file left."""
    a, b = _files(out), _files(ref)
    assert sorted(a) == sorted(b)
    for name in a:
        if name == "manifest.json":
            ma, mb = json.loads(a[name]), json.loads(b[name])
            assert ma["build_config"].pop("out") == str(out)
            mb["build_config"].pop("out")
            assert ma == mb
        elif name != "build.json":  # names the data/teacher as given; compared below
            assert a[name] == b[name], name
    ba, bb = json.loads(a["build.json"]), json.loads(b["build.json"])
    assert ba["settings"] == bb["settings"] and ba["data"] == bb["data"] and ba["teacher"] == bb["teacher"]


def _in_process(teacher, data, out, **kw) -> BuildConfig:
    return BuildConfig(teacher=str(teacher), data=str(data[0]), image_folder=str(data[1]), out=str(out), device="cpu",
                       progress=False, top_k=8, shard_size=3, batch_size=2, **kw)


@pytest.fixture(scope="module")
def reference(teacher_dir, data7, tmp_path_factory):
    """A clean, uninterrupted build (3 shards: 3 + 3 + 1 samples)."""
    out = tmp_path_factory.mktemp("ref") / "cache"
    build_cache(_in_process(teacher_dir, data7, out))
    return out


def _driver(env_extra: dict, argv: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", DRIVER, *argv], env={**ENV, **env_extra}, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


# ------------------------------------------------------------------------------------------- kills
@pytest.mark.slow
def test_sigkill_at_every_write_resumes_to_an_identical_cache(teacher_dir, data7, reference, tmp_path):
    """For each named point: a real SIGKILL there, then the plain command again: the cache is byte-identical
    to the uninterrupted one, the killed build's lock is taken over and its temporary files removed."""
    left = {}
    for point, n in KILL_POINTS:
        out = tmp_path / point
        proc = _driver({"KD_KILL_AT": f"{point}:{n}"}, _cli(teacher_dir, data7, out))
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == -signal.SIGKILL, (point, err[-2000:])
        # Files outside the shards' data folders.
        left[point] = sorted(str(p.relative_to(out)) for p in out.rglob("*")
                             if p.is_file() and len(p.relative_to(out).parts) < 3)
        assert (out / "build.lock").exists() and not (out / "manifest.json").exists(), point
        res = CliRunner().invoke(app, _cli(teacher_dir, data7, out))
        assert res.exit_code == 0, (point, res.output)
        assert "taking over a stale lock" in res.output and "is not running" in res.output
        _assert_identical(out, reference)
    # The kills really stopped at different states.
    assert any(".build.json.tmp-" in x for x in left["build_json_renamed"])
    assert any(".00001.complete.json.tmp-" in x for x in left["marker_renamed"])
    assert any(".manifest.json.tmp-" in x for x in left["manifest_renamed"])
    assert "shards/00001.skipped.json" in left["skip_list_written"]
    assert "shards/00001.complete.json" not in left["skip_list_written"]
    assert "shards/00001.complete.json" in left["marker_written"]
    assert left["lock_taken"] == ["build.lock"]


# ------------------------------------------------------------------------------ identity by content
def _copy_data(data, root: Path):
    root.mkdir(parents=True)
    shutil.copy(data[0], root / "data.json")
    return root / "data.json", data[1]


def test_changed_data_is_refused_even_when_complete(teacher_dir, data7, tmp_path, monkeypatch):
    data = _copy_data(data7, tmp_path / "d")
    out = tmp_path / "c"
    assert CliRunner().invoke(app, _cli(teacher_dir, data, out)).exit_code == 0
    shutil.copytree(out, tmp_path / "first")
    # A rerun on the complete cache opens neither the data file nor a teacher file: (size, mtime) unchanged.
    opened = []
    real_open = builtins.open

    def spy(file, *a, **k):
        if isinstance(file, (str, os.PathLike)) and Path(file).parent in (data[0].parent, Path(teacher_dir)):
            opened.append(Path(file).name)
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", spy)
    monkeypatch.setattr(io, "open", spy)  # pathlib's
    res = CliRunner().invoke(app, _cli(teacher_dir, data, out))
    assert res.exit_code == 0 and "already complete" in res.output and opened == [], (res.output, opened)
    # Touched, same bytes: read once more, accepted, and the new mtime remembered.
    os.utime(data[0])
    assert CliRunner().invoke(app, _cli(teacher_dir, data, out)).exit_code == 0 and opened == ["data.json"]
    opened.clear()
    assert CliRunner().invoke(app, _cli(teacher_dir, data, out)).exit_code == 0 and opened == []
    recs = json.loads(data[0].read_text())
    recs[4]["conversations"][1]["value"] = "a different answer"
    data[0].write_text(json.dumps(recs))
    opened.clear()
    # Complete: the stale cache is not called complete.
    res = CliRunner().invoke(app, _cli(teacher_dir, data, out))
    assert res.exit_code == 2 and "changed since" in res.output and "--overwrite" in res.output
    assert "data.json (changed)" in res.output and opened == ["data.json"]
    monkeypatch.undo()
    assert "already complete" not in res.output
    # Half-built (the manifest and one marker gone, as after a kill): the resume is refused too.
    (out / "manifest.json").unlink()
    (out / "shards/00001.complete.json").unlink()
    res = CliRunner().invoke(app, _cli(teacher_dir, data, out))
    assert res.exit_code == 2 and "changed since" in res.output and str(data[0]) in res.output
    assert not (out / "shards/00001.complete.json").exists()
    # --overwrite rebuilds from the new data: equal to a fresh build of it.
    res = CliRunner().invoke(app, _cli(teacher_dir, data, out, "--overwrite"))
    assert res.exit_code == 0 and "deleted the cache" in res.output, res.output
    fresh = tmp_path / "fresh"
    build_cache(_in_process(teacher_dir, data, fresh))
    _assert_identical(out, fresh)
    assert open_cache(str(out)).manifest.dataset_fingerprint != open_cache(str(tmp_path / "first")).manifest.dataset_fingerprint


def test_changed_teacher_weights_are_refused(teacher_dir, data7, tmp_path, monkeypatch):
    import torch
    from transformers import LlavaForConditionalGeneration

    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_dir, teacher)
    out = tmp_path / "c"
    m = build_cache(_in_process(teacher, data7, out, limit=3))
    assert m.teacher.weights == fingerprint.teacher_identity(str(teacher))["digest"]
    # Touched, same bytes: accepted without hashing the weights again (size+mtime recorded), and remembered.
    hashed = []
    real = fingerprint._file_sha256
    monkeypatch.setattr(fingerprint, "_file_sha256", lambda p: hashed.append(p) or real(p))
    os.utime(teacher / "model.safetensors")
    build_cache(_in_process(teacher, data7, out, limit=3))
    assert [Path(p).name for p in hashed] == ["model.safetensors"]
    hashed.clear()
    build_cache(_in_process(teacher, data7, out, limit=3))
    assert hashed == []  # nothing re-read when nothing changed
    # Other weights at the same path: refused, naming the file.
    model = LlavaForConditionalGeneration.from_pretrained(teacher)
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1.0
    model.save_pretrained(teacher)
    with pytest.raises(ValueError, match=r"changed since.*model\.safetensors \(changed\).*--overwrite"):
        build_cache(_in_process(teacher, data7, out, limit=3))


def test_hub_snapshot_is_identified_by_its_blob_names(teacher_dir, tmp_path, monkeypatch):
    """A Hub cache snapshot (symlinks into content-addressed blobs) costs no hashing; its commit is the
    revision; a different blob is a different teacher."""
    repo = tmp_path / "models--org--tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap, blobs = repo / "snapshots" / commit, repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in sorted(Path(teacher_dir).iterdir()):
        blob = fingerprint._file_sha256(str(f))
        shutil.copy(f, blobs / blob)
        (snap / f.name).symlink_to(Path("../../blobs") / blob)
    monkeypatch.setattr(fingerprint, "_file_sha256", lambda p: pytest.fail(f"hashed {p}"))
    ident = fingerprint.teacher_identity(str(snap))
    assert ident["revision"] == commit
    assert ident["files"]["model.safetensors"]["content"].startswith("blob:")
    monkeypatch.undo()
    # The same bytes as a plain folder identify the same files (sha256 = LFS blob name).
    plain = fingerprint.teacher_identity(str(teacher_dir))
    assert {k: v["content"].split(":")[1] for k, v in plain["files"].items()} == \
           {k: v["content"].split(":")[1] for k, v in ident["files"].items()}


# ------------------------------------------------------------------------------------------- lock
def test_lock_single_writer_and_stale_rules(tmp_path):
    fs, root = open_fs("memory://kd-lock-test")
    a = build_lock(fs, root).acquire()
    with pytest.raises(FolderLocked) as e:
        build_lock(fs, root).acquire()
    msg = str(e.value)
    assert f"pid {os.getpid()}" in msg and "host " in msg and "started " in msg and "build.lock" in msg
    a.release()
    assert not fs.exists(root + "/build.lock")

    def plant(**holder):
        fs.pipe_file(root + "/build.lock", json.dumps({"token": "x", "started": time.time(), **holder}).encode())

    me = build_lock(fs, root)
    # Same machine, process gone: taken over at once.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    plant(host=me.info["host"], boot_id=me.info["boot_id"], pid=dead.pid, heartbeat=time.time())
    build_lock(fs, root).acquire().release()
    # Another machine: live while its heartbeat is fresh, stale once older than stale_s.
    plant(host="elsewhere", boot_id="b", pid=1, heartbeat=time.time())
    with pytest.raises(FolderLocked, match="host elsewhere, pid 1"):
        build_lock(fs, root, stale_s=60).acquire()
    plant(host="elsewhere", boot_id="b", pid=1, heartbeat=time.time() - 120)
    build_lock(fs, root, stale_s=60).acquire().release()
    # An unreadable lock file (killed between create and write): stale once old enough.
    fs.pipe_file(root + "/build.lock", b"")
    with pytest.raises(FolderLocked):
        build_lock(fs, root, stale_s=60).acquire()
    build_lock(fs, root, stale_s=0).acquire().release()
    # The holder beats, and stops when its lock is taken from it.
    held = build_lock(fs, root, heartbeat_s=0.05).acquire()
    first = json.loads(fs.cat_file(root + "/build.lock"))["heartbeat"]
    time.sleep(0.3)
    assert json.loads(fs.cat_file(root + "/build.lock"))["heartbeat"] > first
    held._stop.set()  # no beat racing the takeover below
    held._thread.join()
    plant(host="elsewhere", boot_id="b", pid=1, heartbeat=time.time())
    with pytest.raises(FolderLocked, match="taken over"):
        held.check()
    held.release()
    assert json.loads(fs.cat_file(root + "/build.lock"))["host"] == "elsewhere"  # not ours to remove
    fs.rm(root, recursive=True)


@pytest.mark.slow
@pytest.mark.parametrize("second", ["same settings", "other settings"])
def test_concurrent_builds_second_is_refused(teacher_dir, data7, reference, tmp_path, second):
    """Two real processes into one --out: the second (same or other settings) exits 2 naming the holder;
    the first finishes the cache as if alone. A killed holder's lock is then taken over."""
    out, sync = tmp_path / "c", tmp_path / "sync"
    sync.mkdir()
    first = _driver({"KD_PAUSE_AT": f"marker_written:1:{sync}"}, _cli(teacher_dir, data7, out))
    deadline = time.time() + 300
    while not (sync / "paused").exists():
        assert first.poll() is None and time.time() < deadline, first.communicate()[1][-2000:]
        time.sleep(0.05)
    extra = ("--top-k", "4") if second == "other settings" else ()
    res = subprocess.run([sys.executable, "-m", "cli.kd_cache_cli", *_cli(teacher_dir, data7, out, *extra)],
                         env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "another build is writing this cache" in res.stderr and f"pid {first.pid}" in res.stderr
    assert "Traceback" not in res.stderr
    if second == "same settings":
        (sync / "go").touch()
        assert first.wait(timeout=300) == 0
        _assert_identical(out, reference)
    else:  # the holder is killed mid-build: the next build takes its lock over and finishes
        first.send_signal(signal.SIGKILL)
        first.wait()
        res = CliRunner().invoke(app, _cli(teacher_dir, data7, out))
        assert res.exit_code == 0 and "taking over a stale lock" in res.output, res.output
        _assert_identical(out, reference)


# ------------------------------------------------------------------------------------------ repair
def _count_shard_hashes(monkeypatch) -> dict[tuple[str, str], int]:
    """Count every full re-hash of a shard's files (``storage.shard_digest``) by (calling module, shard):
    ``kd_cache.reader`` checks a shard, ``kd_cache.writer`` computes a shard's checksum as it writes it."""
    counts: dict[tuple[str, str], int] = {}
    real = storage.shard_digest

    def counted(fs, root):
        key = (sys._getframe(1).f_globals["__name__"], Path(root).name)
        counts[key] = counts.get(key, 0) + 1
        return real(fs, root)

    monkeypatch.setattr(storage, "shard_digest", counted)
    return counts


def test_verify_repair_rebuilds_exactly_the_damaged_shards(teacher_dir, chat_data, tmp_path, monkeypatch):
    out, clean = tmp_path / "c", tmp_path / "clean"
    cfg = dict(teacher=str(teacher_dir), data=str(chat_data[0]), image_folder=str(chat_data[1]), device="cpu",
               progress=False, top_k=4, shard_size=2, batch_size=3)
    build_cache(BuildConfig(out=str(out), **cfg))  # 10 samples, 5 shards
    shutil.copytree(out, clean)
    runner = CliRunner()
    hashes = _count_shard_hashes(monkeypatch)
    res = runner.invoke(app, ["verify", str(out), "--repair", "--device", "cpu"])
    assert res.exit_code == 0 and "repaired" not in res.output  # intact: nothing rebuilt
    assert hashes == {("kd_cache.reader", f"0000{i}"): 1 for i in range(5)}  # each shard read once
    hashes.clear()
    stamp = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "shards").rglob("*") if p.is_file()}
    shutil.rmtree(out / "shards/00001")  # a deleted shard
    chunk = next(p for p in sorted((out / "shards/00002").rglob("*")) if p.is_file() and p.name != "zarr.json")
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one flipped bit
    chunk.write_bytes(bytes(raw))
    chunk3 = next(p for p in sorted((out / "shards/00003").rglob("*")) if p.is_file() and p.name != "zarr.json")
    chunk3.write_bytes(chunk3.read_bytes()[:-7])  # a truncated chunk
    (out / "shards/00004.complete.json").unlink()  # an incomplete shard
    res = runner.invoke(app, ["verify", str(out)])
    assert res.exit_code == 1
    hashes.clear()
    res = runner.invoke(app, ["verify", str(out), "--repair", "--device", "cpu"])
    assert res.exit_code == 0 and f"repaired {out}" in res.output, res.output
    for name in ("00001", "00002", "00003", "00004"):
        assert f"shard {name}:" in res.output and "rebuilding it" in res.output
    assert "shard 00000:" not in res.output
    # One check feeds the repair: the good shard is read once; a damaged one by the check, by its rewrite
    # (its new checksum) and by the final verify of the rebuilt result; the deleted one has nothing to read
    # in the check.
    assert {k: n for k, n in hashes.items() if k[0] == "kd_cache.reader"} == {
        ("kd_cache.reader", "00000"): 1, ("kd_cache.reader", "00001"): 1, ("kd_cache.reader", "00002"): 2,
        ("kd_cache.reader", "00003"): 2, ("kd_cache.reader", "00004"): 2}
    assert {k: n for k, n in hashes.items() if k[0] != "kd_cache.reader"} == {
        ("kd_cache.writer", name): 1 for name in ("00001", "00002", "00003", "00004")}
    _assert_identical(out, clean)
    for p, st in stamp.items():  # the good shard's files were not rewritten
        if p.relative_to(out / "shards").parts[0].startswith("00000"):
            assert (p.stat().st_ino, p.stat().st_mtime_ns) == st, p
    assert runner.invoke(app, ["verify", str(out)]).exit_code == 0
    # `build --repair` (no earlier check) checks each shard once itself; here with no manifest (a repair
    # stopped before writing it), so each shard is checked against its completion marker.
    (out / "manifest.json").unlink()
    chunk = next(p for p in sorted((out / "shards/00002").rglob("*")) if p.is_file() and p.name != "zarr.json")
    raw = bytearray(chunk.read_bytes())
    raw[0] ^= 0x10
    chunk.write_bytes(bytes(raw))
    hashes.clear()
    res = runner.invoke(app, ["build", "--teacher", str(teacher_dir), "--data", str(chat_data[0]), "--image-folder",
                              str(chat_data[1]), "--out", str(out), "--device", "cpu", "--no-progress", "--top-k", "4",
                              "--shard-size", "2", "--batch-size", "3", "--repair"])
    assert res.exit_code == 0 and "shard 00002:" in res.output and "checksum mismatch" in res.output, res.output
    assert hashes == {**{("kd_cache.reader", f"0000{i}"): 1 for i in range(5)}, ("kd_cache.writer", "00002"): 1}
    _assert_identical(out, clean)


# ------------------------------------------------------------------------------ storage failures
def _try_mount(path: Path, opts: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True).returncode == 0


@pytest.mark.slow
def test_full_disk_then_resume(teacher_dir, data7, reference, tmp_path):
    """A real full disk (a 64 KiB tmpfs, then one filled up before the build starts): exit 2 naming the
    path, no traceback, no half-written build.json, no temporary file; with space again the same command
    finishes a cache identical to the reference. Skipped where tmpfs cannot be mounted (not root)."""
    mnt = tmp_path / "small"
    if not _try_mount(mnt, "size=64k"):
        pytest.skip("cannot mount a tmpfs here; test_full_storage_simulated covers the write layer")
    try:
        out = mnt / "cache"
        messages = []
        for attempt in ("mid-build", "full before start"):
            if attempt == "full before start":
                shutil.rmtree(out)
                with open(mnt / "filler", "wb", buffering=0) as f:  # fill every byte
                    try:
                        while True:
                            f.write(b"\0" * 4096)
                    except OSError:
                        pass
            res = subprocess.run([sys.executable, "-m", "cli.kd_cache_cli", *_cli(teacher_dir, data7, out)],
                                 env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
            assert res.returncode == 2, (attempt, res.stderr[-3000:])
            assert "No space left on device" in res.stderr and str(out) in res.stderr and "Traceback" not in res.stderr
            messages.append(res.stderr.strip().splitlines()[-1])
            bj = out / "build.json"
            assert not bj.exists() or json.loads(bj.read_text())["settings"]["top_k"] == 8
            assert not [p for p in out.rglob("*") if ".tmp-" in p.name] if out.exists() else True
        print("\n".join(messages))
        (mnt / "filler").unlink()
        subprocess.run(["mount", "-o", "remount,size=8m", str(mnt)], check=True)
        res = subprocess.run([sys.executable, "-m", "cli.kd_cache_cli", *_cli(teacher_dir, data7, out)],
                             env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        _assert_identical(out, reference)
    finally:
        subprocess.run(["umount", str(mnt)])


def test_full_storage_simulated(teacher_dir, data7, reference, monkeypatch):
    """ENOSPC raised by the filesystem layer (an fsspec memory store) at the first write of a build, then at
    a shard: a StorageError naming the path each time; the rerun finishes an identical cache."""
    from fsspec.implementations.memory import MemoryFileSystem

    url = "memory://kd-full-disk"
    real = MemoryFileSystem.pipe_file
    for victim in ("build.json", "00001.skipped.json"):
        def pipe(self, path, value, *a, _victim=victim, **k):
            if _victim in path:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(self, path, value, *a, **k)

        monkeypatch.setattr(MemoryFileSystem, "pipe_file", pipe)
        with pytest.raises(StorageError, match=rf"cannot write memory://.*kd-full-disk/.*{victim}: No space left on device"):
            build_cache(_in_process(teacher_dir, data7, url))
        monkeypatch.undo()
        fs, root = open_fs(url)
        assert not fs.exists(root + "/build.lock") and not [p for p in fs.find(root) if ".tmp-" in p]
    build_cache(_in_process(teacher_dir, data7, url))
    fs, root = open_fs(url)
    for rel in _files(reference):
        if rel.startswith("shards/"):
            assert fs.cat_file(f"{root}/{rel}") == (reference / rel).read_bytes(), rel
    fs.rm(root, recursive=True)


def test_read_only_out_is_a_clear_error(teacher_dir, data7, tmp_path):
    mnt = tmp_path / "ro"
    if not _try_mount(mnt, "ro,size=64k"):
        pytest.skip("cannot mount a read-only tmpfs here (not root)")
    try:
        res = CliRunner().invoke(app, _cli(teacher_dir, data7, mnt / "cache"))
        assert res.exit_code == 2 and "Read-only file system" in res.output and str(mnt / "cache") in res.output
        assert res.exception is None or isinstance(res.exception, SystemExit)
    finally:
        subprocess.run(["umount", str(mnt)])


def test_leftover_temporary_files_are_removed(teacher_dir, data7, reference, tmp_path):
    """The next build deletes ``.<name>.tmp-<hex>`` files of killed writes, and only those."""
    out = tmp_path / "c"
    (out / "shards").mkdir(parents=True)
    ours = [out / f".build.json.tmp-{'a' * 32}", out / "shards" / f".00000.complete.json.tmp-{'b' * 32}"]
    theirs = [out / "notes.txt", out / ".build.json.tmp-mine", out / "shards" / ".keep"]
    for p in ours + theirs:
        p.write_text("x")
    build_cache(_in_process(teacher_dir, data7, out))
    assert not any(p.exists() for p in ours) and all(p.exists() for p in theirs)
    for p in theirs:
        p.unlink()
    _assert_identical(out, reference)


def test_corrupt_build_json_is_a_clear_error(teacher_dir, data7, tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    (out / "build.json").write_bytes(b"")  # what a full disk left before writes were atomic
    res = CliRunner().invoke(app, _cli(teacher_dir, data7, out))
    assert res.exit_code == 2 and "build.json is not valid JSON" in res.output and "--overwrite" in res.output
    res = CliRunner().invoke(app, _cli(teacher_dir, data7, out, "--overwrite"))
    assert res.exit_code == 0, res.output


# -------------------------------------------------------------------------------- generation seeds
def test_sampled_generation_does_not_depend_on_the_batch(teacher_dir, chat_data, tmp_path):
    """--generate-temperature > 0: each sample's answer comes from its own seed, so batch size and record
    order change nothing; another --seed changes the answers (the draws are real)."""
    recs = json.loads(Path(chat_data[0]).read_text())[:5]
    fwd, rev = tmp_path / "fwd.json", tmp_path / "rev.json"
    fwd.write_text(json.dumps(recs))
    rev.write_text(json.dumps(recs[::-1]))

    def answers(data, batch_size, seed=0):
        out = tmp_path / f"{data.stem}-{batch_size}-{seed}"
        build_cache(BuildConfig(teacher=str(teacher_dir), data=str(data), image_folder=str(chat_data[1]),
                                out=str(out), device="cpu", progress=False, top_k=4, generate=True,
                                max_new_tokens=8, generate_temperature=1.5, batch_size=batch_size, seed=seed))
        return {s["id"]: s["input_ids"][s["labels"] != -100].tolist() for s in open_cache(str(out))}

    one = answers(fwd, 1)
    assert answers(fwd, 4) == one and answers(rev, 3) == one
    other = answers(fwd, 4, seed=1)
    assert sorted(other) == sorted(one) and other != one
    assert len({tuple(v) for v in one.values()}) > 1
    np.testing.assert_equal(len(one), 5)


def test_per_sample_sampler_draws_from_the_tempered_softmax():
    """The Gumbel-max processor behind sampled generation: frequencies match softmax(scores / T), and
    each row's draws depend on its own seed only."""
    import torch

    from kd_cache.teacher import _PerSampleSampler

    scores = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]])
    T, n = 1.5, 20000
    sampler = _PerSampleSampler([7], T, torch.device("cpu"))
    counts = np.bincount([int(sampler(None, scores).argmax()) for _ in range(n)], minlength=5)
    p = torch.softmax(scores[0] / T, -1).numpy()
    np.testing.assert_allclose(counts / n, p, atol=4 * np.sqrt(p * (1 - p) / n).max())
    alone = _PerSampleSampler([11], T, torch.device("cpu"))
    pair = _PerSampleSampler([5, 11], T, torch.device("cpu"))
    for _ in range(20):
        assert int(alone(None, scores).argmax()) == int(pair(None, scores.repeat(2, 1))[1].argmax())


def test_shards_without_build_json_are_refused(teacher_dir, data7, reference, tmp_path):
    """Shards whose build.json is gone are of unknown provenance: refused, not adopted."""
    out = tmp_path / "c"
    shutil.copytree(reference, out)
    (out / "build.json").unlink()
    (out / "manifest.json").unlink()
    with pytest.raises(ValueError, match="no build.json.*--overwrite"):
        build_cache(_in_process(teacher_dir, data7, out))
    build_cache(_in_process(teacher_dir, data7, out, overwrite=True))
    _assert_identical(out, reference)
