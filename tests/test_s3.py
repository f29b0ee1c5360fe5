"""Caches on S3, against a real S3 server: moto's, started here on 127.0.0.1 (``benchmarks.s3_local``), with
``FaultProxy`` in front of it where a test needs a lost answer, a refused key or a request count.

The lock (``kd_cache.lock.FolderLock``, a build's ``build.lock`` and a run's ``train.lock``): a second writer
is refused naming the holder and the holder's file is never removed; a lost answer to the create is
recognised as ours; a stale lock is taken over, by one of two racing writers only; a holder whose lock was
taken stops. Builds: two real builds into one ``s3://`` cache; an S3 build is byte-identical to a local
one at ~1.2 requests per object written. Reads: one GET per chunk. Failures of the store (unreachable,
refused key, missing bucket) end as one line, exit 2, through the real CLIs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from benchmarks.s3_local import PASS, RESET_AFTER, FaultProxy, local_s3, moto_available, random_faults
from kd_cache import open_cache, storage
from kd_cache.build import BuildConfig, build_cache, build_lock
from kd_cache.lock import FolderLock, FolderLocked

pytestmark = pytest.mark.skipif(not moto_available(), reason="needs s3fs and moto[server] (pip install -e .[dev])")

ROOT = Path(__file__).resolve().parents[1]
ARGS = ("--top-k", "8", "--shard-size", "3", "--batch-size", "2")
FAST = {"config_kwargs": {"retries": {"max_attempts": 2, "mode": "standard"}, "connect_timeout": 1}}


@pytest.fixture(scope="module")
def s3():
    with local_s3() as server:
        server.make_bucket("kd-test")
        yield server


@pytest.fixture
def proxy(s3):
    with FaultProxy(s3.url) as p:
        yield p


_N = iter(range(10**6))


def _fs(s3, endpoint=None, **extra):
    """A fresh filesystem on a new prefix of the test bucket."""
    url = f"s3://kd-test/t{next(_N)}-{os.getpid()}"
    fs, root = storage.open_fs(url, s3.storage_options(endpoint, skip_instance_cache=True, **extra))
    return fs, root, url


def _lock_file(fs, root, name="build.lock") -> dict:
    fs.invalidate_cache(root)
    return json.loads(fs.cat_file(f"{root}/{name}"))


# ------------------------------------------------------------------------------------------- lock
@pytest.mark.parametrize("name,holder", [("build.lock", "build"), ("train.lock", "training run")])
def test_second_writer_is_refused_and_the_holders_lock_stays(s3, name, holder):
    fs, root, _ = _fs(s3)
    a = FolderLock(fs, root, name=name, holder=holder, guarded="it").acquire()
    with pytest.raises(FolderLocked) as e:
        FolderLock(fs, root, name=name, holder=holder, guarded="it").acquire()
    assert f"another {holder} is writing it" in str(e.value) and f"pid {os.getpid()}" in str(e.value)
    assert _lock_file(fs, root, name)["token"] == a.info["token"]  # the refused writer removed nothing
    a.check()
    a.release()
    assert not fs.exists(f"{root}/{name}")


def test_a_lost_answer_to_the_create_is_recognised(s3, proxy):
    """The server applies the conditional PUT, the answer is lost, botocore retries and meets a 412: the
    lock holds our token, so it is ours."""
    fs, root, _ = _fs(s3, proxy.url)
    seen = []

    def rule(method, path, n):
        if method == "PUT" and path.endswith("/build.lock") and not seen:
            seen.append(n)
            return RESET_AFTER
        return PASS

    proxy.rule = rule
    lock = build_lock(fs, root).acquire()
    puts = [st for m, p, st in proxy.log if m == "PUT" and p.endswith("/build.lock")]
    assert puts == [RESET_AFTER, 412]  # applied, answer lost; the retry found it there
    assert _lock_file(fs, root)["token"] == lock.info["token"]
    lock.check()
    lock.release()
    assert not fs.exists(f"{root}/build.lock")


def test_a_stale_lock_is_taken_over_by_one_writer_only(s3):
    fs, root, _ = _fs(s3)
    path = f"{root}/build.lock"
    me = build_lock(fs, root)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    # Same machine, process gone: taken over at once.
    fs.pipe_file(path, json.dumps({"token": "x", "host": me.info["host"], "boot_id": me.info["boot_id"],
                                   "pid": dead.pid, "started": time.time(), "heartbeat": time.time()}).encode())
    build_lock(fs, root).acquire().release()
    # Another machine, no heartbeat for 120 s: stale at stale_s=60, live at the default.
    old = {"token": "y", "host": "elsewhere", "boot_id": "b", "pid": 1, "started": 0, "heartbeat": time.time() - 120}
    fs.pipe_file(path, json.dumps(old).encode())
    with pytest.raises(FolderLocked, match="host elsewhere, pid 1"):
        build_lock(fs, root).acquire()
    # Two writers judged it stale at the same version: the first replaces it, the second's If-Match fails
    # and it neither overwrites nor removes the winner's lock.
    tag = storage.version_tag(fs, path)
    a, b = build_lock(fs, root, stale_s=60), build_lock(fs, root, stale_s=60)
    assert a._create(replacing=tag) is True
    assert b._create(replacing=tag) is False
    assert _lock_file(fs, root)["token"] == a.info["token"]
    with pytest.raises(FolderLocked, match=f"pid {os.getpid()}"):
        b.acquire()
    assert _lock_file(fs, root)["token"] == a.info["token"]
    fs.rm(path)


def test_a_holder_whose_lock_was_taken_stops_and_does_not_overwrite_it(s3):
    fs, root, _ = _fs(s3)
    held = build_lock(fs, root, heartbeat_s=0.05).acquire()
    first = _lock_file(fs, root)["heartbeat"]
    time.sleep(0.5)
    assert _lock_file(fs, root)["heartbeat"] > first  # beats (conditional PUTs on its own version)
    other = {"token": "z", "host": "elsewhere", "boot_id": "b", "pid": 2, "started": time.time(),
             "heartbeat": time.time()}
    fs.pipe_file(f"{root}/build.lock", json.dumps(other).encode())  # taken over meanwhile
    time.sleep(0.5)
    with pytest.raises(FolderLocked, match="taken over"):
        held.check()
    held.release()
    assert _lock_file(fs, root)["token"] == "z"  # neither beaten over nor removed
    fs.rm(f"{root}/build.lock")


# ------------------------------------------------------------------------------------------ builds
def _cli(teacher, data, out, options, *extra):
    return ["build", "--teacher", str(teacher), "--data", str(data[0]), "--image-folder", str(data[1]),
            "--out", str(out), "--device", "cpu", "--no-progress", "--storage-options", json.dumps(options),
            *ARGS, *extra]


@pytest.fixture(scope="module")
def reference(teacher_dir, data7, tmp_path_factory):
    """A local build of the same data (3 shards)."""
    out = tmp_path_factory.mktemp("ref") / "cache"
    build_cache(BuildConfig(teacher=str(teacher_dir), data=str(data7[0]), image_folder=str(data7[1]), out=str(out),
                            device="cpu", progress=False, top_k=8, shard_size=3, batch_size=2))
    return out


def _same_files(fs, root: str, local: Path):
    prefix = root.rstrip("/") + "/"
    fs.invalidate_cache(root)
    remote = {str(p)[len(prefix):]: fs.cat_file(p) for p in fs.find(root)}
    ref = {str(p.relative_to(local)): p.read_bytes() for p in local.rglob("*") if p.is_file()}
    assert sorted(remote) == sorted(ref)
    for name in ref:
        if name not in ("manifest.json", "build.json"):  # they name --out and the data as given
            assert remote[name] == ref[name], name


# Runs the real CLI, pausing after the first shard is written: writes <folder>/paused, waits for <folder>/go.
DRIVER = r"""
import os, sys, time
folder = os.environ["KD_PAUSE"]
import kd_cache.writer as w
real = w.CacheWriter.write_shard
def write_shard(self, *a, **k):
    out = real(self, *a, **k)
    if not os.path.exists(os.path.join(folder, "paused")):
        open(os.path.join(folder, "paused"), "w").close()
        while not os.path.exists(os.path.join(folder, "go")):
            time.sleep(0.05)
    return out
w.CacheWriter.write_shard = write_shard
from cli.kd_cache_cli import main
sys.argv = ["kd-cache", *sys.argv[1:]]
main()
"""


@pytest.mark.slow
def test_two_builds_into_one_s3_cache(s3, teacher_dir, data7, reference, tmp_path):
    """The second build is refused naming the holder and removes nothing; the first finishes a cache that
    `kd-cache verify` passes and that is byte-identical to the local build."""
    from cli.kd_cache_cli import app

    url, options = f"s3://kd-test/two-{os.getpid()}", s3.storage_options()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "KD_PAUSE": str(tmp_path)}
    first = subprocess.Popen([sys.executable, "-c", DRIVER, *_cli(teacher_dir, data7, url, options)], env=env,
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (tmp_path / "paused").exists():
        assert first.poll() is None and time.time() < deadline, first.communicate()[1][-3000:]
        time.sleep(0.05)
    second = subprocess.run([sys.executable, "-m", "cli.kd_cache_cli", *_cli(teacher_dir, data7, url, options)],
                            env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 2, second.stderr[-3000:]
    assert "another build is writing this cache" in second.stderr and f"pid {first.pid}" in second.stderr
    assert "Traceback" not in second.stderr
    (tmp_path / "go").touch()
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    res = CliRunner().invoke(app, ["verify", url, "--storage-options", json.dumps(options)])
    assert res.exit_code == 0 and res.output.startswith(f"OK {url}: 3 shards"), res.output
    fs, root = storage.open_fs(url, options)
    assert not fs.exists(f"{root}/build.lock")
    _same_files(fs, root, reference)


@pytest.mark.slow
def test_s3_build_requests_and_reads(s3, proxy, teacher_dir, data7, reference):
    """A build costs at most 1.5 requests per object written (no existence checks of its own objects, no
    read-back); reading every sample costs one GET per chunk object and no HEAD before a GET."""
    url, options = f"s3://kd-test/count-{os.getpid()}", s3.storage_options(proxy.url)
    build_cache(BuildConfig(teacher=str(teacher_dir), data=str(data7[0]), image_folder=str(data7[1]), out=url,
                            device="cpu", progress=False, top_k=8, shard_size=3, batch_size=2,
                            storage_options=options))
    requests = sum(proxy.counts.values())
    fs, root = storage.open_fs(url, options)
    objects = fs.find(root)
    assert requests <= 1.5 * len(objects), dict(proxy.counts)
    _same_files(fs, root, reference)
    cache = open_cache(url, options)
    proxy.reset_counts()
    for i in range(len(cache)):
        cache[i]
    chunk_gets = [p for m, p, _ in proxy.log if m == "GET" and "/c/" in p]
    assert sorted(chunk_gets) == sorted(set(chunk_gets))  # each chunk object once
    assert len(chunk_gets) == sum(1 for p in objects if "/c/" in p)
    assert proxy.counts["HEAD"] <= len(cache.shard_sizes)  # per shard opened, never per chunk


@pytest.mark.slow
def test_build_survives_slowdowns_bare_503s_and_resets(s3, proxy, teacher_dir, data7, reference):
    """5% SlowDown, 5% 503 without a body, 2% resets before and 2% after the server applied the request
    (seed 3): the build finishes the same bytes as the local build, and verify passes through the faults."""
    from kd_cache.build import verify_cache

    url, options = f"s3://kd-test/faults-{os.getpid()}", s3.storage_options(proxy.url)
    proxy.rule = random_faults(3, {"slowdown": 0.05, "503": 0.05, "reset-before": 0.02, "reset-after": 0.02})
    build_cache(BuildConfig(teacher=str(teacher_dir), data=str(data7[0]), image_folder=str(data7[1]), out=url,
                            device="cpu", progress=False, top_k=8, shard_size=3, batch_size=2,
                            storage_options=options))
    assert sum(v for k, v in proxy.counts.items() if " " in k) > 0  # faults were met
    assert verify_cache(url, storage_options=options).ok
    proxy.rule = lambda m, p, n: PASS
    fs, root = storage.open_fs(url, options)
    _same_files(fs, root, reference)


# ------------------------------------------------------------------------------------- store failures
@pytest.fixture(scope="module")
def s3_cache(s3, teacher_dir, data7):
    url = f"s3://kd-test/failures-{os.getpid()}"
    build_cache(BuildConfig(teacher=str(teacher_dir), data=str(data7[0]), image_folder=str(data7[1]), out=url,
                            device="cpu", progress=False, top_k=8, shard_size=3, batch_size=2,
                            storage_options=s3.storage_options()))
    return url


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FAILURES = {  # what goes wrong -> (options or url change, words the one line must hold)
    "unreachable": ("cannot be reached", "endpoint_url"),
    "credentials": ("access denied (InvalidAccessKeyId)", "AWS_ACCESS_KEY_ID"),
    "bucket": ("does not exist", "create it"),
}


@pytest.mark.slow
@pytest.mark.parametrize("command", ["build", "verify", "inspect-shard", "kd-train"])
@pytest.mark.parametrize("failure", FAILURES)
def test_store_failures_are_one_line(s3, proxy, s3_cache, teacher_dir, data7, student_dir, tmp_path, command,
                                     failure):
    from cli.kd_cache_cli import app as cache_app
    from cli.kd_train_cli import app as train_app

    url, options = s3_cache, s3.storage_options(proxy.url, **FAST)
    if failure == "unreachable":
        options["endpoint_url"] = f"http://127.0.0.1:{_closed_port()}"
    elif failure == "credentials":
        options["key"] = "wrong-key"
        proxy.deny_keys.add("wrong-key")
    else:
        url = url.replace("s3://kd-test/", "s3://no-such-bucket/")
    so = ["--storage-options", json.dumps(options)]
    if command == "build":
        res = CliRunner().invoke(cache_app, _cli(teacher_dir, data7, url, options))
    elif command == "kd-train":
        res = CliRunner().invoke(train_app, ["train", "--stage", "dft", "--student", str(student_dir), "--cache", url,
                                             "--out", str(tmp_path / "run"), "--no-progress", *so])
    else:
        res = CliRunner().invoke(cache_app, [command, url, *so])
    prog = "kd-train" if command == "kd-train" else "kd-cache"
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2, res.output[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: cannot "), res.output[-3000:]
    assert url.split("://")[1].split("/")[0] in lines[0]
    for words in FAILURES[failure]:
        assert words in lines[0], lines[0]
    assert "Traceback" not in res.output
