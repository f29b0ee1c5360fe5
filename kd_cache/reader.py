"""Reading a complete cache: ``open_cache`` / ``KDCache``, the decoded-chunk cache, verify and stats.

``open_cache(url)`` is the public reader: ``len()``, ``.manifest`` (a ``kd_cache.schema.Manifest``),
iteration and random access, yielding one dict of numpy arrays per sample (``CacheSample.to_dict``;
unpacked by ``kd_cache.format.unpack_sample``).

Integrity. Nothing read from a cache is used unchecked:

* opening a shard compares its files with the manifest's ``ShardEntry`` (every listed file present,
  none extra, the total size, the sha256 of the shard's ``zarr.json``, which holds the metadata of
  all its arrays: the only metadata document a reader reads), so a deleted or truncated file, or
  altered metadata, raises before any of the shard's samples is read (``verify_shards`` re-hashes the
  arrays' own ``zarr.json`` too);
* every chunk carries a CRC32C (``kd_cache.format.stored_codecs``) that zarr checks on decode: a
  changed chunk raises ``CorruptCacheError`` naming the shard, the array and the chunk file;
* ``KDCache.check()`` is the cheap whole-cache check a trainer runs before its first step (one listing,
  sizes, the shard metadata and sample counts against the manifest); ``KDCache.verify_shards()``
  re-hashes every file. Both return a ``CacheCheck``: one ``ShardCheck`` per shard, with its problems.
  ``check_shards`` is the one definition of a shard's check, for these and for ``kd-cache build --repair``.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import posixpath
import re
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import zarr
from zarr.core.sync import sync as zarr_sync

from kd_cache import storage
from kd_cache.errors import UserError
from kd_cache.format import BUILD_NAME, COMPLETE_SUFFIX, MANIFEST_NAME, SHARDS_DIR, ShardAttrs, unpack_sample
from kd_cache.schema import TEACHER_TOKENIZER_DIR, Manifest, ShardEntry

READER_CACHE_BYTES = 64 << 20  # decoded chunks a reader keeps (all arrays and open shards together)
INCOMPLETE_HINT = "cache incomplete: run kd-cache build again to finish it"
DAMAGED_HINT = ("the cache is damaged: `kd-cache verify CACHE` lists every problem; `kd-cache verify --repair CACHE` "
                "rebuilds the shards it names")
METADATA_NAME = "zarr.json"  # zarr v3 metadata of a group or an array
_SHARD_DIR = re.compile(r"^\d{5}$")
_SHARD_MARKER = re.compile(r"^(\d{5})" + re.escape(COMPLETE_SUFFIX) + "$")

_OPENINGS = itertools.count()  # shard openings in this process (chunk cache keys)


class CorruptCacheError(UserError, ValueError):
    """A cache file that is missing, truncated or altered; the message names the shard and the file."""


@dataclass
class ShardCheck:
    """The problems found in one shard (``index``: its place in the manifest; None for a shard on disk
    that the manifest does not list)."""

    name: str
    index: int | None
    problems: list[str] = field(default_factory=list)
    # The entry this shard's files were re-hashed against, with no problem found (None: not re-hashed,
    # or it failed): a later ``verify_shards(trusted=...)`` need not re-hash it while that entry stands.
    verified: ShardEntry | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "index": self.index, "ok": self.ok, "problems": list(self.problems)}


@dataclass
class CacheCheck:
    """The result of ``KDCache.check`` / ``KDCache.verify_shards``: one ``ShardCheck`` per shard (the
    manifest's, in order, then any shard on disk it does not list) and the cache-level problems."""

    url: str
    shards: list[ShardCheck]
    problems: list[str] = field(default_factory=list)  # about the manifest itself (e.g. its sample count)
    manifest: Manifest | None = None  # the manifest checked (a repair acts on this result only while it stands)

    @property
    def ok(self) -> bool:
        return not self.problems and all(s.ok for s in self.shards)

    @property
    def failing(self) -> list[str]:
        """Names of the shards with problems (those listed in the manifest and those it misses)."""
        return [s.name for s in self.shards if not s.ok]

    def lines(self) -> list[str]:
        """One readable line per problem (empty: nothing found)."""
        return list(self.problems) + [f"shard {s.name}: {p}" for s in self.shards for p in s.problems]

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "ok": self.ok, "problems": list(self.problems), "failing": self.failing,
                "shards": [s.to_dict() for s in self.shards]}


def _listing(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, int]:
    """Size of every file under ``root``, by path relative to it (empty when ``root`` is missing)."""
    fs.invalidate_cache(root)
    try:
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        return {}
    prefix = root.rstrip("/") + "/"
    return {p[len(prefix):]: int(info.get("size") or 0) for p, info in found.items()
            if p.startswith(prefix) and info.get("type", "file") == "file"}


def _sha256(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return hashlib.sha256(fs.cat_file(path)).hexdigest()


def file_problems(fs: fsspec.AbstractFileSystem, path: str, entry: ShardEntry, files: dict[str, int], *,
                  metadata: str = "all") -> list[str]:
    """How the shard's files (``files``: size by relative path) differ from its manifest entry.

    Every file the entry lists must be there and no other, their sizes must add up to ``entry.bytes``
    (a truncated or deleted chunk), and the zarr metadata must be unchanged: ``metadata="all"`` hashes
    every ``zarr.json``, ``"root"`` only the shard's own, the one a reader uses: it holds the metadata
    of every array of the shard (consolidated, ``kd_cache.format``).
    """
    shown = storage.display(fs, path)
    problems = []
    if not files:
        return [f"shard directory {shown} is missing or empty"]
    expected = entry.files
    missing = sorted(set(expected) - set(files))
    extra = sorted(set(files) - set(expected))
    if missing:
        problems.append(f"{len(missing)} file(s) missing from {shown}: " + ", ".join(missing[:5])
                        + (" ..." if len(missing) > 5 else ""))
    if extra:
        problems.append(f"{len(extra)} unexpected file(s) in {shown}: " + ", ".join(extra[:5])
                        + (" ..." if len(extra) > 5 else ""))
    nbytes = sum(files.values())
    if nbytes != entry.bytes:
        problems.append(f"{shown} holds {nbytes} bytes, the manifest says {entry.bytes} (a file was truncated, "
                        "extended or replaced)")
    wanted = [rel for rel in expected if rel.endswith(METADATA_NAME) and rel in files]
    if metadata == "root":
        wanted = [rel for rel in wanted if rel == METADATA_NAME]
    for rel in sorted(wanted):
        if _sha256(fs, posixpath.join(path, rel)) != expected[rel]:
            problems.append(f"{posixpath.join(shown, rel)} (zarr metadata) changed since the shard was written")
    return problems


def _shard_counts(fs: fsspec.AbstractFileSystem, path: str, entry: ShardEntry) -> list[str]:
    """The shard's own sample count (its attributes and ``tokens/offsets``) against ``entry``'s."""
    try:
        meta = storage.read_json(fs, posixpath.join(path, METADATA_NAME)) or {}
    except ValueError as e:
        return [str(e)]
    offsets = ((meta.get("consolidated_metadata") or {}).get("metadata") or {}).get("tokens/offsets") or {}
    n = (meta.get("attributes") or {}).get("n_samples")
    shape = offsets.get("shape") or [None]
    found = {"attribute n_samples": n, "tokens/offsets": None if shape[0] is None else shape[0] - 1}
    return [f"{what} says {v} samples, the manifest says {entry.samples}" for what, v in found.items()
            if v != entry.samples]


def _rehash_problems(fs: fsspec.AbstractFileSystem, path: str, marker_path: str, entry: ShardEntry,
                     present: bool) -> list[str]:
    """The shard's completion marker and the sha256 of every file of it against ``entry``."""
    problems = []
    shown = storage.display(fs, path)
    try:
        marker = storage.read_json(fs, marker_path) or {}
    except ValueError as e:
        problems.append(f"unreadable completion marker: {e}")
        marker = {}
    if marker and marker.get("checksum") != entry.checksum:
        problems.append(f"completion marker {storage.display(fs, marker_path)} has checksum "
                        f"{marker.get('checksum')} but the manifest has {entry.checksum}")
    if not present:
        return problems
    checksum, _, files = storage.shard_digest(fs, path)
    if checksum != entry.checksum:
        changed = [f"{posixpath.join(shown, rel)} (content changed)" for rel in sorted(files)
                   if rel in entry.files and files[rel] != entry.files[rel]]
        detail = ("; files: " + ", ".join(changed)) if changed else ""
        problems.append(f"checksum mismatch in {shown}: manifest {entry.checksum}, recomputed {checksum}{detail}")
    return problems


def shards_listing(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, int]:
    """Size of every file under the cache's ``shards/`` folder (one listing serves ``check_shards``)."""
    return _listing(fs, posixpath.join(root, SHARDS_DIR))


def check_shards(fs: fsspec.AbstractFileSystem, root: str, entries: list[ShardEntry], *, rehash: bool = False,
                 trusted: dict[str, ShardEntry] | None = None, listing: dict[str, int] | None = None,
                 indices: list[int | None] | None = None) -> list[ShardCheck]:
    """The one check of a shard against its entry (the manifest's, or, for a build that has no manifest
    yet, the shard's own completion marker), for every entry of the cache at ``root``.

    Always (cheap): the completion marker is present, the files the entry lists are there with its total
    size and no other, the shard's ``zarr.json`` hashes to the entry's, its sample count is the entry's.
    With ``rehash``: the marker's checksum is the entry's and every file is re-hashed against the entry's
    checksum, except for a shard whose entry equals the one ``trusted`` names for it (its files were
    re-hashed against that same entry by an earlier check; the cheap checks above still run).
    ``listing``: ``shards_listing(fs, root)``, when the caller has one.
    """
    listing = shards_listing(fs, root) if listing is None else listing
    trusted = trusted or {}
    checks = []
    for entry, index in zip(entries, indices or [None] * len(entries), strict=True):
        c = ShardCheck(entry.name, index)
        path = posixpath.join(root, SHARDS_DIR, entry.name)
        marker_path = path + COMPLETE_SUFFIX
        if entry.name + COMPLETE_SUFFIX not in listing:
            c.problems.append(f"completion marker {storage.display(fs, marker_path)} is missing")
        prefix = entry.name + "/"
        files = {rel[len(prefix):]: size for rel, size in listing.items() if rel.startswith(prefix)}
        c.problems += file_problems(fs, path, entry, files, metadata="root")
        if files and METADATA_NAME in files:
            c.problems += _shard_counts(fs, path, entry)
        known = trusted.get(entry.name) == entry
        if rehash and not known:
            c.problems += _rehash_problems(fs, path, marker_path, entry, present=bool(files))
        if (rehash or known) and c.ok:
            c.verified = entry
        checks.append(c)
    return checks


class ChunkCache:
    """Decoded chunks of any arrays and shards, least recently used out first, within ``max_bytes``.

    One cache serves every array of a reader, and can serve several readers (a dataset that keeps
    several shards open gives them one budget). Keys name the opened shard (each opening is new:
    a reader never serves chunks of an earlier opening) and the array. The chunks that one read needs
    are held by that read until it returns, whatever the budget.
    """

    def __init__(self, max_bytes: int = READER_CACHE_BYTES):
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self._chunks: OrderedDict[tuple, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self._chunks)

    def get(self, key: tuple) -> np.ndarray | None:
        a = self._chunks.get(key)
        if a is not None:
            self._chunks.move_to_end(key)
        return a

    def put(self, key: tuple, a: np.ndarray) -> None:
        old = self._chunks.pop(key, None)
        if old is not None:
            self.nbytes -= old.nbytes
        self._chunks[key] = a
        self.nbytes += a.nbytes
        while self.nbytes > self.max_bytes and len(self._chunks) > 1:
            _, dropped = self._chunks.popitem(last=False)
            self.nbytes -= dropped.nbytes

    def clear(self) -> None:
        self._chunks.clear()
        self.nbytes = 0


class _ChunkReader:
    """Row ranges of one zarr array through a shared ``ChunkCache`` of decoded chunks.

    Sequential reads decode every chunk exactly once; random reads cost the chunks they touch that
    are not cached (each run of missing chunks is one zarr call).
    """

    def __init__(self, arr, key: tuple, where: str = "", name: str = ""):
        self.arr = arr
        self.key = key
        self.where, self.name = where, name  # the shard (as shown) and the array's path in it
        self.n = int(arr.shape[0])
        self.rows = int(arr.chunks[0])

    def _decode(self, lo: int, hi: int) -> np.ndarray:
        """Rows ``lo:hi`` (whole chunks); a chunk that fails its checksum or does not decode raises
        ``CorruptCacheError`` naming it."""
        try:
            return np.asarray(self.arr[lo:hi])
        except Exception as e:  # zarr/numcodecs raise ValueError, RuntimeError, ... for a damaged chunk
            bad = lo // self.rows
            for c in range(lo // self.rows, -(-hi // self.rows)):  # find the first chunk that fails
                try:
                    np.asarray(self.arr[c * self.rows:min((c + 1) * self.rows, self.n)])
                except Exception:
                    bad = c
                    break
            key = "/".join(["c", str(bad)] + ["0"] * (self.arr.ndim - 1))
            raise CorruptCacheError(
                f"shard {self.where}: array {self.name}: chunk {bad} ({posixpath.join(self.where, self.name, key)}) "
                f"is corrupt ({type(e).__name__}: {e}); {DAMAGED_HINT}") from e

    def get(self, start: int, stop: int, cache: ChunkCache) -> np.ndarray:
        start, stop = int(start), int(stop)
        if stop <= start:
            return np.zeros((0, *self.arr.shape[1:]), dtype=self.arr.dtype)
        c0, c1 = start // self.rows, (stop - 1) // self.rows
        pieces: list[np.ndarray | None] = [cache.get((self.key, c)) for c in range(c0, c1 + 1)]
        i = 0
        while i < len(pieces):  # read each run of missing chunks with one zarr call
            if pieces[i] is not None:
                i += 1
                continue
            j = i
            while j + 1 < len(pieces) and pieces[j + 1] is None:
                j += 1
            lo, hi = (c0 + i) * self.rows, min((c0 + j + 1) * self.rows, self.n)
            block = self._decode(lo, hi)
            for m in range(i, j + 1):
                pieces[m] = block[(m - i) * self.rows : (m + 1 - i) * self.rows]
                cache.put((self.key, c0 + m), pieces[m])
            i = j + 1
        base = c0 * self.rows
        if len(pieces) == 1:
            return pieces[0][start - base : stop - base].copy()
        return np.concatenate(pieces, axis=0)[start - base : stop - base]


class _ShardReader:
    """One open shard: attributes and index arrays in memory, data arrays read through _ChunkReader.

    Decoded chunks live in the ``ChunkCache`` handed to ``sample`` (the reading ``KDCache``'s).
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, entry: ShardEntry | None = None):
        """``entry``: the shard's manifest entry; its files are checked against it before anything is read."""
        self.path = path
        self.token = next(_OPENINGS)  # names this opening in chunk cache keys
        self.display = storage.display(fs, path)
        if not fs.exists(posixpath.join(path, METADATA_NAME)):
            raise FileNotFoundError(f"shard {self.display} is missing: {DAMAGED_HINT}")
        if entry is not None:
            problems = file_problems(fs, path, entry, _listing(fs, path), metadata="root")
            if problems:
                raise CorruptCacheError(f"shard {self.display}: " + "; ".join(problems) + f": {DAMAGED_HINT}")
        # Every array's metadata comes from the shard's zarr.json (consolidated): one read, hash-checked above.
        self.group = zarr.open_group(store=storage.zarr_store(fs, path, read_only=True), mode="r", zarr_format=3,
                                     use_consolidated=True)
        self.attrs = ShardAttrs.from_attrs(dict(self.group.attrs), self.display)
        self.n = self.attrs.n_samples
        # every array at once, from the consolidated metadata (one call instead of one per array)
        self._arrays = {name: a for name, a in self.group.members(max_depth=None) if isinstance(a, zarr.Array)}
        self._readers: dict[str, _ChunkReader] = {}
        self._index: dict[str, np.ndarray] | None = None

    @property
    def index(self) -> dict[str, np.ndarray]:
        """The index arrays (``ShardAttrs.index_arrays``), decoded on first use."""
        if self._index is None:
            names = self.attrs.index_arrays()
            readers = [self._reader(name) for name in names]

            async def read_all():  # one round trip through zarr's event loop for all of them
                return await asyncio.gather(*(r.arr.async_array.getitem(slice(None)) for r in readers),
                                            return_exceptions=True)

            found = zarr_sync(read_all())
            self._index = {name: (r._decode(0, r.n) if isinstance(a, BaseException) else np.asarray(a))
                           for name, r, a in zip(names, readers, found, strict=True)}  # _decode names a bad chunk
        return self._index

    def _reader(self, name: str) -> _ChunkReader:
        r = self._readers.get(name)
        if r is None:
            arr = self._arrays.get(name)
            if arr is None:
                raise CorruptCacheError(f"shard {self.display}: array {name} is missing from its metadata; {DAMAGED_HINT}")
            r = self._readers[name] = _ChunkReader(arr, (self.token, name), self.display, name)
        return r

    def _get(self, cache: ChunkCache, name: str, start: int, stop: int) -> np.ndarray:
        return self._reader(name).get(start, stop, cache)

    def sample(self, j: int, cache: ChunkCache) -> dict:
        if not 0 <= j < self.n:
            raise IndexError(f"sample {j} out of range for shard {self.display} with {self.n} samples")
        return unpack_sample(self.attrs, self.index, lambda name, a, b: self._get(cache, name, a, b), j)

    def arrays(self) -> Iterator[tuple[str, Any]]:
        yield from sorted(self._arrays.items())


class KDCache:
    """Read access to a complete cache: ``len``, global indexing, iteration, per-shard reads.

    Picklable for DataLoader workers: the filesystem and open shard are dropped on pickling and
    reopened lazily (also after a fork).

    ``chunk_cache`` holds the decoded chunks of recent reads (``READER_CACHE_BYTES`` by default). A
    copy or a pickle starts with an empty one of the same size; assign one ``ChunkCache`` to several
    copies to give them one budget (the streaming dataset does, for the shards it keeps open).
    """

    def __init__(self, url: str, storage_options: dict | None = None, *, cache_bytes: int = READER_CACHE_BYTES):
        self.url = str(url)
        self.storage_options = dict(storage_options or {})
        fs, root = storage.open_fs(self.url, self.storage_options)
        path = posixpath.join(root, MANIFEST_NAME)
        with storage.reaching(fs, root):
            raw = storage.read_json(fs, path)  # one GET; a missing cache is told apart only when it fails
            if raw is None:
                if not fs.exists(root):
                    raise FileNotFoundError(f"no cache at {storage.display(fs, root)}: run kd-cache build to create it")
                if fs.exists(posixpath.join(root, BUILD_NAME)) or fs.exists(posixpath.join(root, SHARDS_DIR)):
                    raise FileNotFoundError(f"{storage.display(fs, path)} not found: {INCOMPLETE_HINT}")
                raise FileNotFoundError(f"{storage.display(fs, root)} is not a kd cache (no {MANIFEST_NAME}): "
                                        "pass the --out folder of kd-cache build")
        self.manifest: Manifest = Manifest.from_dict(raw, storage.display(fs, path))
        # what the file says beside its shard list (checked by ``check``)
        self._declared_samples = raw.get("num_samples") if isinstance(raw, dict) else None
        self.shard_sizes: list[int] = [e.samples for e in self.manifest.shards]
        self._cum = np.concatenate([[0], np.cumsum(self.shard_sizes, dtype=np.int64)])
        self._fs, self._root = fs, root
        self._pid = os.getpid()
        self._reader: tuple[int, _ShardReader] | None = None
        self.chunk_cache = ChunkCache(cache_bytes)

    # pickling / forking -----------------------------------------------------------------------
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fs"] = None
        state["_reader"] = None
        state["chunk_cache"] = ChunkCache(self.chunk_cache.max_bytes)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)

    def _filesystem(self):
        if self._fs is None or self._pid != os.getpid():
            self._fs, self._root = storage.open_fs(self.url, self.storage_options)
            self._reader = None
            self._pid = os.getpid()
        return self._fs

    # paths ------------------------------------------------------------------------------------
    def shard_name(self, shard_index: int) -> str:
        return self.manifest.shards[shard_index].name

    def shard_path(self, shard_index: int) -> str:
        self._filesystem()
        return posixpath.join(self._root, SHARDS_DIR, self.shard_name(shard_index))

    def marker_path(self, shard_index: int) -> str:
        """The shard's completion marker."""
        self._filesystem()
        return posixpath.join(self._root, SHARDS_DIR, self.shard_name(shard_index) + COMPLETE_SUFFIX)

    def teacher_tokenizer(self):
        """The teacher's tokenizer, from the files the build saved in the cache (each checked against its
        sha256 in the manifest); what a student of another tokenizer aligns with (no teacher checkpoint)."""
        import tempfile

        from transformers import AutoTokenizer

        if not self.manifest.teacher.tokenizer_files:
            raise CorruptCacheError(f"cache {self.url}: no teacher tokenizer files listed in its manifest")
        fs = self._filesystem()
        with storage.reaching(fs, self._root):
            files, problems = self._tokenizer_files(fs)
        if problems:
            raise CorruptCacheError(f"cache {self.url}: {problems[0]}")
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in files.items():
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(data)
            return AutoTokenizer.from_pretrained(tmp)

    # reading ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._cum[-1])

    def locate(self, i: int) -> tuple[int, int]:
        """Global sample index -> (shard index, index within the shard)."""
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sample index {i} out of range for a cache of {n} samples ({self.url})")
        shard = int(np.searchsorted(self._cum, i, side="right")) - 1
        return shard, int(i - self._cum[shard])

    def _open_shard(self, shard_index: int) -> _ShardReader:
        fs = self._filesystem()
        if self._reader is not None and self._reader[0] == shard_index:
            return self._reader[1]
        if not 0 <= shard_index < len(self.shard_sizes):
            raise IndexError(
                f"shard {shard_index} out of range: the cache has {len(self.shard_sizes)} shards"
            )
        marker = self.marker_path(shard_index)
        if not fs.exists(marker):
            raise FileNotFoundError(
                f"shard {self.shard_name(shard_index)} has no completion marker {storage.display(fs, marker)}: "
                f"{DAMAGED_HINT}"
            )
        reader = _ShardReader(fs, self.shard_path(shard_index), self.manifest.shards[shard_index])
        if reader.n != self.shard_sizes[shard_index]:
            raise CorruptCacheError(
                f"shard {reader.display} holds {reader.n} samples but the manifest says "
                f"{self.shard_sizes[shard_index]}: the shard was rewritten after the manifest; {DAMAGED_HINT}"
            )
        self._reader = (shard_index, reader)
        return reader

    def read_sample(self, shard_index: int, local_index: int) -> dict:
        with storage.reaching(self._filesystem(), self._root):
            return self._open_shard(shard_index).sample(local_index, self.chunk_cache)

    def __getitem__(self, i: int) -> dict:
        return self.read_sample(*self.locate(int(i)))

    def shard_samples(self, shard_index: int) -> Iterator[dict]:
        """All samples of one shard in order; each chunk of each array is decoded once."""
        reader = self._open_shard(shard_index)
        for j in range(reader.n):
            yield reader.sample(j, self.chunk_cache)

    def __iter__(self) -> Iterator[dict]:
        for s in range(len(self.shard_sizes)):
            yield from self.shard_samples(s)

    # checks and stats -------------------------------------------------------------------------
    def content_digest(self) -> str:
        """sha256 naming the cache's content (every shard's name, sample count and checksum, in order):
        equal for a byte-identical copy at any path, different for a cache rebuilt from other data or
        by another teacher. Cheap: it reads the manifest only (``check``/``verify_shards`` tie the
        manifest to the files)."""
        h = hashlib.sha256()
        for e in self.manifest.shards:
            h.update(f"{e.name}\0{e.samples}\0{e.checksum}\n".encode())
        return h.hexdigest()

    def _check_manifest(self, fs, listing: dict[str, int]) -> tuple[list[str], list[ShardCheck]]:
        """Cache-level problems and the shards on disk that the manifest does not list."""
        problems = []
        names = [e.name for e in self.manifest.shards]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            problems.append(f"{MANIFEST_NAME} lists shard(s) {', '.join(dup)} more than once")
        if self._declared_samples is not None and self._declared_samples != self.manifest.num_samples:
            problems.append(f"{MANIFEST_NAME} says num_samples {self._declared_samples}, its shards hold "
                            f"{self.manifest.num_samples}")
        on_disk = set()
        for rel in listing:
            top = rel.split("/", 1)[0]
            m = _SHARD_MARKER.match(top)
            if m:
                on_disk.add(m.group(1))
            elif "/" in rel and _SHARD_DIR.match(top):
                on_disk.add(top)
        unlisted = [ShardCheck(n, None, [f"on disk ({storage.display(fs, posixpath.join(self._root, SHARDS_DIR, n))}) "
                                         f"but not listed in {MANIFEST_NAME}: its samples would never be read"])
                    for n in sorted(on_disk - set(names))]
        return problems, unlisted

    def check(self) -> CacheCheck:
        """The whole cache, cheaply, before training uses it: every shard complete (marker present), the
        files each manifest entry lists present with the listed total size, its metadata unchanged, its
        sample count equal to the manifest's, no shard on disk missing from the manifest, and the
        manifest's ``num_samples`` its shards' sum. One listing of ``shards/`` and two small reads per
        shard; chunk contents are checked as they are decoded (their CRC32C)."""
        return self._checks(rehash=False)

    def verify_shards(self, trusted: CacheCheck | None = None) -> CacheCheck:
        """``check`` plus a re-hash of every file of every shard against the manifest and the markers.

        ``trusted``: an earlier result for this cache. A shard it re-hashed without a problem against the
        very entry the manifest lists now is not re-hashed again (``check_shards``); a ``verify --repair``
        passes its first result, so its final verify re-hashes the rebuilt shards only."""
        return self._checks(rehash=True, trusted=trusted)

    def _checks(self, rehash: bool, trusted: CacheCheck | None = None) -> CacheCheck:
        fs = self._filesystem()
        with storage.reaching(fs, self._root):
            return self._check_all(fs, rehash, trusted)

    def _check_all(self, fs, rehash: bool, trusted: CacheCheck | None) -> CacheCheck:
        listing = shards_listing(fs, self._root)
        problems, unlisted = self._check_manifest(fs, listing)
        known = None
        if trusted is not None and trusted.url == self.url:  # another cache's result vouches for nothing here
            known = {c.name: c.verified for c in trusted.shards if c.verified is not None}
        checks = check_shards(fs, self._root, self.manifest.shards, rehash=rehash, trusted=known, listing=listing,
                              indices=list(range(len(self.manifest.shards))))
        if rehash:
            problems = problems + self._tokenizer_files(fs)[1]
        return CacheCheck(self.url, checks + unlisted, problems, manifest=self.manifest)

    def _tokenizer_files(self, fs) -> tuple[dict[str, bytes], list[str]]:
        """The teacher's tokenizer files that match their sha256 in the manifest, and one line per file that
        is missing or does not (what an aligned student reads; ``verify`` lists the lines)."""
        files, problems = {}, []
        for name, digest in self.manifest.teacher.tokenizer_files.items():
            path = posixpath.join(self._root, TEACHER_TOKENIZER_DIR, name)
            try:
                data = fs.cat_file(path)
            except FileNotFoundError:
                problems.append(f"teacher tokenizer file {TEACHER_TOKENIZER_DIR}/{name} is missing")
                continue
            if hashlib.sha256(data).hexdigest() != digest:
                problems.append(f"teacher tokenizer file {TEACHER_TOKENIZER_DIR}/{name} does not match its sha256 "
                                "in the manifest")
            else:
                files[name] = data
        return files, problems

    def shard_status(self, shard_index: int, check: bool = True) -> dict:
        """Completion and (optionally) checksum status of one shard (``check_shards``, re-hashing it)."""
        fs = self._filesystem()
        entry = self.manifest.shards[shard_index]
        path = self.shard_path(shard_index)
        try:
            marker = storage.read_json(fs, self.marker_path(shard_index))
        except ValueError:
            marker = None
        status = {"complete": marker is not None, "path": storage.display(fs, path), "checksum": "not checked"}
        if check:
            c = check_shards(fs, self._root, [entry], rehash=True, indices=[shard_index])[0]
            status["checksum"] = "ok" if c.ok else "missing" if not fs.exists(path) else "mismatch"
            status["problems"] = c.problems
        return status

    def array_stats(self, shard_index: int) -> dict[str, dict]:
        """Per array of a shard: dtype, shape, stored bytes, raw bytes, ratio (raw / stored)."""
        reader = _ShardReader(self._filesystem(), self.shard_path(shard_index))
        stats = {}
        for name, arr in reader.arrays():
            stored = int(arr.nbytes_stored())
            raw = int(arr.nbytes)
            stats[name] = {
                "dtype": str(arr.dtype),
                "shape": list(arr.shape),
                "stored_bytes": stored,
                "raw_bytes": raw,
                "ratio": (raw / stored) if stored else 0.0,
            }
        return stats


def open_cache(url: str, storage_options: dict | None = None) -> KDCache:
    """Open a complete cache for reading (raises with the path if it is missing or incompatible)."""
    return KDCache(url, storage_options)
