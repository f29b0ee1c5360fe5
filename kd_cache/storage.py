"""Where a cache's bytes go: fsspec filesystems, zarr stores, atomic writes, JSON files and digests.

Every function takes an fsspec filesystem and a path on it, so a cache lives in a local directory or
behind any fsspec URL (``memory://x``, ``file:///tmp/x``, ``s3://bucket/x``) with the same code. What
the files hold is ``kd_cache.format``; who writes and reads them, ``kd_cache.writer`` and
``kd_cache.reader``.

Object stores (``s3://``, ``gs://``, ``az://``, ...) differ from a disk in three ways this module hides:

- every request costs a round trip, so a write is one PUT (a PUT replaces an object atomically: no
  temporary name and rename) and a read one GET (``open_fs`` turns off s3fs's size request before a
  whole-object read);
- requests fail transiently (503 SlowDown, a 503 without a body, resets): ``open_fs`` gives S3 explicit
  retries (``S3_DEFAULTS``; ``--storage-options`` overrides any of them);
- a store that cannot be reached, refuses the credentials or has no such bucket is a ``StorageError``
  naming the URL and what to check (``reaching``), not a traceback.
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
from collections.abc import Iterable, Iterator
from typing import Any

import fsspec
from zarr.storage import FsspecStore, LocalStore

from kd_cache.errors import UserError

# What ``open_fs`` gives an ``s3://`` filesystem unless ``--storage-options`` says otherwise. botocore's
# "standard" retry mode retries throttling (503 SlowDown), every 500/502/503/504 (with or without a body)
# and connection errors, with exponential backoff (at most 20 s a wait); ``max_attempts`` counts the first
# try. s3fs retries a few errors of its own on top (``S3FileSystem.retries``). ``max_concurrency=1``: a
# whole-object read is one GET (s3fs otherwise asks for the size first, to split large reads).
S3_DEFAULTS: dict[str, Any] = {
    "config_kwargs": {"retries": {"mode": "standard", "max_attempts": 8}, "connect_timeout": 5, "read_timeout": 60},
    "max_concurrency": 1,
}
OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2"}


def parse_storage_options(text: str) -> dict[str, Any]:
    """``--storage-options``: a JSON object of fsspec options (e.g. ``{"endpoint_url": ...}``)."""
    value = json.loads(text)
    if not isinstance(value, dict):
        raise TypeError(f"--storage-options must be a JSON object, got {text!r}")
    return value


STORAGE_OPTIONS_HELP = (
    "JSON object of fsspec storage options for a remote cache, e.g. '{\"endpoint_url\": \"http://host:9000\", "
    "\"profile\": \"p\"}'. On s3:// retries are explicit: '{\"config_kwargs\": {\"retries\": {\"max_attempts\": "
    "8, \"mode\": \"standard\"}}}' (the default; retries 503s with or without a body, 500/502/504 and "
    "connection errors).")


def _merge(defaults: dict, given: dict) -> dict:
    """``given`` over ``defaults``, nested dicts merged key by key."""
    out = dict(defaults)
    for k, v in given.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def open_fs(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the path on it of a local path or fsspec URL (``S3_DEFAULTS`` under the given
    options on ``s3://``)."""
    options = dict(storage_options or {})
    if fsspec.core.split_protocol(str(url))[0] in ("s3", "s3a"):
        options = _merge(S3_DEFAULTS, options)
    with reaching(None, str(url)):
        return fsspec.core.url_to_fs(str(url), **options)


def is_object_store(fs: fsspec.AbstractFileSystem | None) -> bool:
    """True for object stores (a PUT replaces a whole object atomically; every request is a round trip)."""
    return fs is not None and bool(OBJECT_STORES & set(fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)))


def _is_s3(fs: fsspec.AbstractFileSystem | None) -> bool:
    return fs is not None and bool({"s3", "s3a"} & set(fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)))


# -------------------------------------------------------------------------------- store failures
def _chain(e: BaseException) -> Iterator[BaseException]:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _error_code(e: BaseException) -> tuple[str, int | None]:
    """(S3 error code, HTTP status) of a botocore ``ClientError`` (("", None) for anything else)."""
    response = getattr(e, "response", None)
    if not isinstance(response, dict):
        return "", None
    return (str((response.get("Error") or {}).get("Code") or ""),
            (response.get("ResponseMetadata") or {}).get("HTTPStatusCode"))


def precondition_failed(e: BaseException) -> bool:
    """True when ``e`` is a store's answer that a conditional write's condition did not hold (412, or the
    ``FileExistsError`` that an exclusive create raises)."""
    for x in _chain(e):
        if isinstance(x, FileExistsError):
            return True
        code, status = _error_code(x)
        if code == "PreconditionFailed" or status == 412:
            return True
    return False


_UNREACHABLE = ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ReadTimeoutError",
                "ClientConnectorError", "ServerDisconnectedError", "ConnectionRefusedError", "gaierror")
_CREDENTIALS = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken",
                "AllAccessDisabled", "AccountProblem")
CREDENTIALS_HINT = ("check the credentials: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or "
                    "\"key\"/\"secret\"/\"profile\" in --storage-options, and that they may use this bucket")


def _endpoint(fs: fsspec.AbstractFileSystem | None) -> str:
    client = getattr(fs, "client_kwargs", None) or {}
    return str(client.get("endpoint_url") or getattr(fs, "endpoint_url", None) or os.environ.get("AWS_ENDPOINT_URL")
               or "the default endpoint")


def diagnose(e: BaseException, fs: fsspec.AbstractFileSystem | None = None) -> str | None:
    """What a failure to use an object store means for the user and what to check; None when ``e`` is
    not such a failure (a missing file is not: its caller knows what it means)."""
    for x in _chain(e):
        name = type(x).__name__
        code, status = _error_code(x)
        if name in ("NoCredentialsError", "PartialCredentialsError"):
            return f"no credentials found; {CREDENTIALS_HINT}"
        if code in _CREDENTIALS or status == 403:
            return f"access denied ({code or status}); {CREDENTIALS_HINT}"
        if code == "NoSuchBucket":
            bucket = (getattr(x, "response", {}).get("Error") or {}).get("BucketName") or ""
            return (f"the bucket {bucket + ' ' if bucket else ''}does not exist at {_endpoint(fs)}: create it, or fix "
                    "the bucket in the URL (and the endpoint_url in --storage-options)")
        if name in _UNREACHABLE:
            return (f"the store at {_endpoint(fs)} cannot be reached ({name}, after the retries): check the "
                    "endpoint_url in --storage-options (or AWS_ENDPOINT_URL), the network, and that the server is "
                    "running; rerun the same command once it is")
    return None


@contextlib.contextmanager
def reaching(fs: fsspec.AbstractFileSystem | None, path: str) -> Iterator[None]:
    """Turn a failure to reach or use the store holding ``path`` (unreachable endpoint, refused credentials,
    missing bucket) into a ``StorageError`` naming the URL and what to check. Other errors pass."""
    try:
        yield
    except (UserError, KeyboardInterrupt):
        raise
    except Exception as e:
        error = _store_error(e, fs, path, "use")
        if error is None:
            raise
        raise error from e


def _store_error(e: BaseException, fs: fsspec.AbstractFileSystem | None, path: str, verb: str) -> StorageError | None:
    """``cannot <verb> <path>: <why>`` when ``e`` is a failure of the store itself (``diagnose``), else None."""
    why = diagnose(e, fs)
    return None if why is None else StorageError(f"cannot {verb} {display(fs, str(path))}: {why}")


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
    except (StorageError, KeyboardInterrupt):
        raise
    except Exception as e:
        error = _store_error(e, fs, path, "write")
        if error is not None:
            raise error from e
        if isinstance(e, (FileExistsError, FileNotFoundError)) or not isinstance(e, OSError):
            raise
        where = display(fs, str(path))
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
    A killed process can leave the temporary file: ``remove_temp_files`` deletes such leftovers. On an
    object store a PUT is already atomic: one request, no temporary name.
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
        if is_object_store(fs):
            fs.pipe_file(path, data)
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
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
        if diagnose(e, fs) is not None:  # not a missing file: a missing bucket
            raise
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
    return digest_files((rel, fs.cat_file(full)) for rel, full in list_files(fs, root))


def digest_files(files: Iterable[tuple[str, bytes]]) -> tuple[str, int, dict[str, str]]:
    """``shard_digest`` of files given as (relative path, bytes), in sorted relative-path order (a writer
    digests what it is about to upload, without reading it back)."""
    total = hashlib.sha256()
    nbytes = 0
    digests: dict[str, str] = {}
    for rel, data in files:
        nbytes += len(data)
        digests[rel] = hashlib.sha256(data).hexdigest()
        total.update(rel.encode("utf-8") + b"\0" + len(data).to_bytes(8, "little"))
        total.update(data)
    return total.hexdigest(), nbytes, digests


# ----------------------------------------------------------------------- conditional writes (the lock)
def _etag(response: Any) -> str | None:
    return response.get("ETag") if isinstance(response, dict) else None


def create_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> str | None:
    """Create ``path`` holding ``data`` only if it does not exist; return its version tag (the S3 ETag; None
    elsewhere). Raises ``FileExistsError`` (or the store's 412, ``precondition_failed``) when it exists, and
    ``NotImplementedError`` when the filesystem has no exclusive create.

    Where the outcome is reported differs: ``O_EXCL`` at ``open`` on the local disk, a conditional PUT
    (``If-None-Match: *``) whose answer is the outcome on S3. An answer can be lost after the store
    applied the write (the retry then meets a 412): the caller reads the file back to know."""
    if _is_s3(fs):
        return _etag(fs.pipe_file(path, data, mode="create"))
    try:
        f = fs.open(path, "xb")
    except (ValueError, NotImplementedError, TypeError) as e:  # no exclusive create on this filesystem
        raise NotImplementedError(f"{type(fs).__name__} has no exclusive create") from e
    try:
        with f:
            f.write(data)
    except Exception:
        if is_local(fs):  # O_EXCL succeeded at open: the file is ours, and half-written
            with contextlib.suppress(OSError):
                fs.rm(path)
        raise  # elsewhere the create may be decided at close: a file we did not create is never removed
    return None


def can_replace_if_unchanged(fs: fsspec.AbstractFileSystem) -> bool:
    """True when ``replace_if_unchanged`` works on ``fs`` (S3: ``If-Match`` on PUT)."""
    return _is_s3(fs)


def version_tag(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    """The version tag of ``path`` for ``replace_if_unchanged`` (None where there is none; FileNotFoundError)."""
    if not _is_s3(fs):
        return None
    fs.invalidate_cache(path)
    return fs.info(path).get("ETag")


def replace_if_unchanged(fs: fsspec.AbstractFileSystem, path: str, data: bytes, tag: str) -> str | None:
    """Overwrite ``path`` with ``data`` only while its version tag is ``tag`` (a conditional PUT with
    ``If-Match``); return the new tag. A changed file raises the store's 412 (``precondition_failed``)."""
    if not _is_s3(fs):
        raise NotImplementedError(f"{type(fs).__name__} has no conditional replace")
    return _etag(fs.pipe_file(path, data, IfMatch=tag))
