"""Where a cache's bytes go: fsspec filesystems, zarr stores, atomic writes, JSON files and digests.

Every function takes an fsspec filesystem and a path on it, so a cache lives in a local directory or
behind any fsspec URL (``memory://x``, ``file:///tmp/x``, ``s3://bucket/x``) with the same code. What
the files hold is ``kd_cache.format``; who writes and reads them, ``kd_cache.writer`` and
``kd_cache.reader``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import re
import shutil
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
from zarr.storage import FsspecStore, LocalStore

from kd_cache.errors import UserError


def open_fs(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the path on it of a local path or fsspec URL."""
    return fsspec.core.url_to_fs(str(url), **(storage_options or {}))


def is_local(fs: fsspec.AbstractFileSystem | None) -> bool:
    """True for the local disk (``None`` stands for it too)."""
    return fs is None or "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def display(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The path as a user would type it (protocol included for non-local filesystems)."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def _async_fs(fs: fsspec.AbstractFileSystem):
    """An asynchronous instance of ``fs``, as ``zarr.storage.FsspecStore`` requires."""
    if fs.async_impl and fs.asynchronous:
        return fs
    if fs.async_impl:
        spec = json.loads(fs.to_json())
        spec["asynchronous"] = True
        return fsspec.AbstractFileSystem.from_json(json.dumps(spec))
    from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

    return AsyncFileSystemWrapper(fs, asynchronous=True)


def zarr_store(fs: fsspec.AbstractFileSystem, path: str, read_only: bool):
    """A zarr v3 store rooted at ``path`` (a plain ``LocalStore`` on the local disk)."""
    if is_local(fs):
        return LocalStore(path, read_only=read_only)
    return FsspecStore(fs=_async_fs(fs), path=path, read_only=read_only)


class StorageError(UserError, OSError):
    """A cache file could not be written (full or read-only storage); the message names the path."""


@contextlib.contextmanager
def writing(fs: fsspec.AbstractFileSystem | None, path: str) -> Iterator[None]:
    """Turn an ``OSError`` raised while writing ``path`` into a ``StorageError`` that names the path
    and says what to do (a full disk, a read-only folder: not a traceback)."""
    try:
        yield
    except (FileExistsError, FileNotFoundError, StorageError):
        raise
    except OSError as e:
        where = display(fs, path) if fs is not None else str(path)
        reason = e.strerror or str(e) or type(e).__name__
        raise StorageError(
            f"cannot write {where}: {reason}. Free space or make the location writable, then rerun the same "
            "command: the build resumes where it stopped"
        ) from e


# ``atomic_write``'s temporary names: ``.<name>.tmp-<32 hex>`` next to the target.
_TMP = re.compile(r"^\..+\.tmp-[0-9a-f]{32}$")


def atomic_write(fs: fsspec.AbstractFileSystem | None, path: str, data: bytes) -> None:
    """Write ``data`` to a temporary name next to ``path``, then rename it into place.

    ``fs=None`` is the local disk. A reader sees the old file or the new one, never a part of it; a
    failed write (full disk) removes its temporary file and raises ``StorageError`` naming ``path``.
    A killed process can leave the temporary file: ``remove_temp_files`` deletes such leftovers.
    """
    parent = posixpath.dirname(str(path))
    tmp = posixpath.join(parent, f".{posixpath.basename(str(path))}.tmp-{uuid.uuid4().hex}")
    with writing(fs, path):
        if is_local(fs):
            os.makedirs(parent, exist_ok=True)
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)  # atomic on POSIX
            finally:
                if os.path.lexists(tmp):
                    os.unlink(tmp)
            return
        fs.makedirs(parent, exist_ok=True)
        try:
            fs.pipe_file(tmp, data)
            fs.mv(tmp, path)
        finally:
            if fs.exists(tmp):
                fs.rm(tmp)


def remove_temp_files(fs: fsspec.AbstractFileSystem, folder: str) -> list[str]:
    """Delete ``atomic_write`` leftovers (``.<name>.tmp-<hex>``) directly in ``folder``; return their names.

    Only call it while no other writer uses ``folder`` (the build holds its lock).
    """
    fs.invalidate_cache(folder)
    try:
        entries = fs.ls(folder, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return []
    removed = []
    for p in entries:
        name = posixpath.basename(str(p).rstrip("/"))
        if _TMP.match(name):
            fs.rm(str(p))
            removed.append(name)
    return removed


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    """Parsed JSON at ``path``, or None when the file does not exist. Bad JSON raises ValueError."""
    try:
        raw = fs.cat_file(path)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{display(fs, path)} is not valid JSON ({e})") from e


def write_json(fs: fsspec.AbstractFileSystem | None, path: str, obj: Any, *, indent: int = 1,
               sort_keys: bool = False) -> None:
    """``obj`` as JSON at ``path``, written atomically (``fs=None``: the local disk)."""
    atomic_write(fs, path, json.dumps(obj, indent=indent, sort_keys=sort_keys).encode("utf-8"))


def list_files(fs: fsspec.AbstractFileSystem, root: str) -> list[tuple[str, str]]:
    """(relative posix path, full path) of every file under ``root``, sorted by relative path."""
    fs.invalidate_cache(root)
    if not fs.exists(root):
        return []
    out = []
    prefix = root.rstrip("/") + "/"
    for p in fs.find(root):
        p = str(p)
        if p.startswith(prefix):  # strict: never a sibling such as 00000.complete.json
            out.append((p[len(prefix) :], p))
    return sorted(out)


def remove_tree(fs: fsspec.AbstractFileSystem, root: str) -> None:
    """Delete every file under ``root`` (and, locally, its directories); siblings are untouched."""
    if is_local(fs):
        shutil.rmtree(root, ignore_errors=True)
        if os.path.exists(root):
            raise OSError(f"could not delete the partial shard {root}")
        return
    files = [full for _, full in list_files(fs, root)]
    if files:
        fs.rm(files)
    fs.invalidate_cache(root)


def shard_digest(fs: fsspec.AbstractFileSystem, root: str) -> tuple[str, int, dict[str, str]]:
    """(sha256 over the shard, total bytes, per-file sha256) for the files under ``root``.

    The shard hash covers every file in sorted relative-path order: path, size and content.
    """
    total = hashlib.sha256()
    nbytes = 0
    files: dict[str, str] = {}
    for rel, full in list_files(fs, root):
        data = fs.cat_file(full)
        nbytes += len(data)
        files[rel] = hashlib.sha256(data).hexdigest()
        total.update(rel.encode("utf-8") + b"\0" + len(data).to_bytes(8, "little"))
        total.update(data)
    return total.hexdigest(), nbytes, files
