"""``FolderLock``: one writer at a time in a folder, on any fsspec filesystem.

Two writers use it: a cache's build (``<cache>/build.lock``, ``kd_cache.format.LOCK_NAME``: one build
at a time per cache) and a training run (``<out>/train.lock``, ``student.checkpoints.LOCK_NAME``: one
``kd-train`` at a time per ``--out``). A lock is named by its file, the writer that holds it (``holder``:
"build") and what it guards (``guarded``: "this cache"); its file is JSON: a random ``token``, ``host``,
``boot_id``, ``pid``, ``started`` and ``heartbeat`` (Unix seconds), ``world`` (ranks).

- Taking it creates the file exclusively (``open(..., "xb")``: ``O_EXCL`` locally, a conditional
  put on object stores whose fsspec driver supports it). A filesystem without exclusive create falls
  back to write, wait ``SETTLE_S``, read back: the token read back must be ours.
- A second writer is refused with the holder's host, pid and start time (``FolderLocked``).
- A lock is stale, and is taken over (with a message), when its holder ran on this machine (same host
  name and boot id) and its pid is gone, or when its heartbeat is older than ``stale_s`` (a holder
  on another machine: it rewrites ``heartbeat`` every ``heartbeat_s``). An unreadable lock file (a
  crash between create and write) is stale once it is ``stale_s`` old by its modification time.
- The holder checks, at every heartbeat and before each write that matters (``check``: a build before
  every shard and the manifest, a training run before every checkpoint and the final save), that the
  file still holds its token; a writer whose lock was taken over stops (``FolderLocked``).
- The heartbeat thread is a daemon: it never keeps a process alive.
- The ranks of one distributed launch share rank 0's lock: only rank 0 takes, beats and releases it,
  and the other ranks wait for it (a barrier) before they look into the folder.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import posixpath
import socket
import sys
import threading
import time
import uuid

import fsspec

from kd_cache import storage
from kd_cache.errors import UserError

HEARTBEAT_S = 30.0
STALE_S = 300.0  # ten missed heartbeats; generous for clock skew between machines
SETTLE_S = 2.0


class FolderLocked(UserError, RuntimeError):
    """Another writer holds the folder's lock (or took it over from this one)."""


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _when(t: float | None) -> str:
    return "?" if t is None else _dt.datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")


def describe(holder: dict) -> str:
    """``host ..., pid ..., started ...`` of a lock's holder."""
    return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {_when(holder.get('started'))}, "
            f"last heartbeat {_when(holder.get('heartbeat'))}")


class FolderLock:
    """The lock file ``<root>/<name>``, taken by a ``holder`` ("build", "training run") that writes
    ``guarded`` ("this cache"); ``world``: the holder's ranks (shown to the writer it refuses)."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, *, name: str, holder: str, guarded: str,
                 world: int = 1, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S):
        self.fs, self.root = fs, root
        self.path = posixpath.join(root, name)
        self.holder, self.guarded = holder, guarded
        self.shown = storage.display(fs, self.path)
        self.world, self.heartbeat_s, self.stale_s = world, heartbeat_s, stale_s
        now = time.time()
        self.info = {"token": uuid.uuid4().hex, "host": socket.gethostname(), "boot_id": _boot_id(),
                     "pid": os.getpid(), "started": now, "heartbeat": now, "world": world}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None

    # reading ----------------------------------------------------------------------------------
    def _read(self) -> dict | None:
        """The lock's content; None when there is no lock; {} when it is unreadable."""
        self.fs.invalidate_cache(self.root)
        try:
            raw = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        try:
            d = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return {}
        return d if isinstance(d, dict) else {}

    def _stale(self, holder: dict) -> str | None:
        """Why ``holder``'s lock is stale, or None when it is live."""
        now = time.time()
        if not holder:
            try:
                mtime = self.fs.modified(self.path).timestamp()
            except (NotImplementedError, OSError, AttributeError):
                mtime = None
            if mtime is None or now - mtime > self.stale_s:
                return f"the lock file is unreadable (a {self.holder} killed while taking it)"
            return None
        same_machine = holder.get("host") == self.info["host"] and holder.get("boot_id") == self.info["boot_id"]
        if same_machine and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"]):
            return f"its process {holder['pid']} is not running"
        beat = holder.get("heartbeat")
        if not isinstance(beat, (int, float)) or now - beat > self.stale_s:
            return f"no heartbeat for {now - beat:.0f} s (limit {self.stale_s:.0f} s)" if isinstance(
                beat, (int, float)) else "it has no heartbeat"
        return None

    # taking and giving back -------------------------------------------------------------------
    def _payload(self) -> bytes:
        return json.dumps(self.info, sort_keys=True).encode()

    def _create(self) -> bool:
        """Create the lock file exclusively; False when it exists."""
        data = self._payload()
        with storage.writing(self.fs, self.path):
            self.fs.makedirs(self.root, exist_ok=True)
            try:
                f = self.fs.open(self.path, "xb")
            except (FileExistsError, FileNotFoundError):  # taken, or its folder removed meanwhile: look again
                return False
            except (ValueError, NotImplementedError, TypeError):  # no exclusive create on this filesystem
                if self.fs.exists(self.path):
                    return False
                self.fs.pipe_file(self.path, data)
                time.sleep(SETTLE_S)
                return (self._read() or {}).get("token") == self.info["token"]
            try:
                with f:
                    f.write(data)
            except BaseException:
                self.fs.rm(self.path)
                raise
        return (self._read() or {}).get("token") == self.info["token"]

    def acquire(self) -> FolderLock:
        """Take the lock (taking over a stale one), start the heartbeat; raise ``FolderLocked`` if held."""
        for _ in range(3):
            if self._create():
                self._thread = threading.Thread(target=self._beat, name=f"lock {self.shown}", daemon=True)
                self._thread.start()
                return self
            holder = self._read()
            if holder is None:  # released meanwhile
                continue
            why = self._stale(holder)
            if why is None:
                raise FolderLocked(
                    f"another {self.holder} is writing {self.guarded}: {self.shown} is held by {describe(holder)}"
                    f"{' (' + str(holder.get('world')) + ' ranks)' if (holder.get('world') or 1) > 1 else ''}. "
                    "Wait for it to finish, or stop it; a lock whose process is gone is taken over "
                    f"automatically (on another machine after {self.stale_s:.0f} s without heartbeat)."
                )
            print(f"{self.shown}: taking over a stale lock ({why}; held by {describe(holder) if holder else '?'})",
                  file=sys.stderr)
            if self._read() == holder:  # unchanged since judged stale: nobody else took it over
                self.fs.rm(self.path)
        raise FolderLocked(f"could not take the lock {self.shown}: other {self.holder}s keep taking it")

    def check(self) -> None:
        """Raise ``FolderLocked`` unless the lock file still holds this writer's token."""
        if self.lost is None:
            holder = self._read()
            if (holder or {}).get("token") != self.info["token"]:
                self.lost = describe(holder) if holder else "nobody (the lock file was removed)"
        if self.lost is not None:
            raise FolderLocked(f"{self.shown} was taken over by another {self.holder} ({self.lost}); "
                               f"this {self.holder} stops")

    def _beat(self):
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.check()
                self.info["heartbeat"] = time.time()
                storage.atomic_write(self.fs, self.path, self._payload())
            except FolderLocked:
                return
            except Exception as e:  # noqa: BLE001 - a failed heartbeat is retried at the next beat
                print(f"{self.shown}: heartbeat failed ({e})", file=sys.stderr)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.lost is None and (self._read() or {}).get("token") == self.info["token"]:
            self.fs.rm(self.path)

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
