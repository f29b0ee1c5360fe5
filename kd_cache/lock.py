"""``FolderLock``: one writer at a time in a folder, on any fsspec filesystem.

Two writers use it: a cache's build (``<cache>/build.lock``, ``kd_cache.format.LOCK_NAME``: one build
at a time per cache) and a training run (``<out>/train.lock``, ``student.checkpoints.LOCK_NAME``: one
``kd-train`` at a time per ``--out``). A lock is named by its file, the writer that holds it (``holder``:
"build") and what it guards (``guarded``: "this cache"); its file is JSON: a random ``token``, ``host``,
``boot_id``, ``pid``, ``started`` and ``heartbeat`` (Unix seconds), ``world`` (ranks).

- Taking it creates the file exclusively (``kd_cache.storage.create_exclusive``: ``O_EXCL`` locally,
  whose outcome is known at ``open``; a conditional PUT, ``If-None-Match: *``, on S3, whose outcome is its
  answer). When the create fails for any reason the file is read back: holding our token, it is ours (the
  store applied the write and its answer was lost; the retry met a 412); a lock file this writer did not
  create is never removed. A filesystem without exclusive create falls back to write, wait ``SETTLE_S``,
  read back: the token read back must be ours.
- A second writer is refused with the holder's host, pid and start time (``FolderLocked``).
- A lock is stale, and is taken over (with a message), when its holder ran on this machine (same host
  name and boot id) and its pid is gone, or when its heartbeat is older than ``stale_s`` (a holder
  on another machine: it rewrites ``heartbeat`` every ``heartbeat_s``). An unreadable lock file (a
  crash between create and write) is stale once it is ``stale_s`` old by its modification time. Where the
  store has conditional replace (S3: ``If-Match``), a takeover and every heartbeat replace the file only
  if it is still the version judged stale / last written by this holder, so two writers taking over the
  same stale lock, or a takeover racing a heartbeat, cannot both win. Elsewhere a takeover removes the
  stale file when it still reads as judged, then creates its own.
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
        self._tag: str | None = None  # the version tag of the lock file this holder last wrote (S3: its ETag)
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

    def _mine(self) -> bool:
        return (self._read() or {}).get("token") == self.info["token"]

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

    def _create(self, replacing: str | None = None) -> bool:
        """Create the lock file exclusively (``replacing``: instead replace the version with that tag, a
        stale lock); True when this writer holds the lock, False when another file is there."""
        data = self._payload()
        with storage.writing(self.fs, self.path):
            if not storage.is_object_store(self.fs):  # an object store has no folders to make
                self.fs.makedirs(self.root, exist_ok=True)
            try:
                if replacing is None:
                    self._tag = storage.create_exclusive(self.fs, self.path, data)
                else:
                    self._tag = storage.replace_if_unchanged(self.fs, self.path, data, replacing)
            except FileNotFoundError as e:  # its folder removed meanwhile: look again
                if storage.diagnose(e, self.fs) is not None:  # no such bucket: nothing to look at again
                    raise
                return False
            except NotImplementedError:  # no exclusive create on this filesystem
                if self.fs.exists(self.path):
                    return False
                self.fs.pipe_file(self.path, data)
                time.sleep(SETTLE_S)
                return self._mine()
            except Exception as e:
                # The store's answer is not the whole truth: a write applied and then answered with an error
                # (a lost answer, retried into a 412) left our token there. Read what the store holds.
                if self._mine():
                    self._tag = storage.version_tag(self.fs, self.path)
                    return True
                if storage.precondition_failed(e):
                    return False
                raise
        return True

    def _start(self) -> FolderLock:
        self._thread = threading.Thread(target=self._beat, name=f"lock {self.shown}", daemon=True)
        self._thread.start()
        return self

    def acquire(self) -> FolderLock:
        """Take the lock (taking over a stale one), start the heartbeat; raise ``FolderLocked`` if held."""
        with storage.reaching(self.fs, self.path):
            for _ in range(3):
                if self._create():
                    return self._start()
                try:
                    tag = storage.version_tag(self.fs, self.path)  # before the read: a later change fails the If-Match
                except FileNotFoundError:
                    continue  # released meanwhile
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
                if tag is not None and storage.can_replace_if_unchanged(self.fs):
                    if self._create(replacing=tag):  # only if nobody changed it since it was judged stale
                        return self._start()
                elif self._read() == holder:  # unchanged since judged stale: nobody else took it over
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
                if self._tag is not None and storage.can_replace_if_unchanged(self.fs):
                    if not self._create(replacing=self._tag):  # changed since our last write: taken over
                        self.check()
                else:
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
