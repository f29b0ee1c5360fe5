"""Reading a complete cache: ``open_cache`` / ``KDCache``, the decoded-chunk cache, verify and stats.

``open_cache(url)`` is the public reader: ``len()``, ``.manifest`` (a ``kd_cache.schema.Manifest``),
iteration and random access, yielding one dict of numpy arrays per sample (``CacheSample.to_dict``;
unpacked by ``kd_cache.format.unpack_sample``).
"""

from __future__ import annotations

import itertools
import os
import posixpath
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import fsspec
import numpy as np
import zarr

from kd_cache import storage
from kd_cache.format import COMPLETE_SUFFIX, MANIFEST_NAME, SHARDS_DIR, ShardAttrs, unpack_sample
from kd_cache.schema import Manifest

READER_CACHE_BYTES = 64 << 20  # decoded chunks a reader keeps (all arrays and open shards together)
INCOMPLETE_HINT = "cache incomplete: run kd-cache build again to finish it"

_OPENINGS = itertools.count()  # shard openings in this process (chunk cache keys)


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

    def __init__(self, arr, key: tuple):
        self.arr = arr
        self.key = key
        self.n = int(arr.shape[0])
        self.rows = int(arr.chunks[0])

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
            block = np.asarray(self.arr[lo:hi])
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

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str):
        self.path = path
        self.token = next(_OPENINGS)  # names this opening in chunk cache keys
        self.display = storage.display(fs, path)
        if not fs.exists(posixpath.join(path, "zarr.json")):
            raise FileNotFoundError(f"shard {self.display} is missing: {INCOMPLETE_HINT}")
        self.group = zarr.open_group(store=storage.zarr_store(fs, path, read_only=True), mode="r", zarr_format=3)
        self.attrs = ShardAttrs.from_attrs(dict(self.group.attrs), self.display)
        self.n = self.attrs.n_samples
        self.index = {name: np.asarray(self.group[name][...]) for name in self.attrs.index_arrays()}
        self._readers: dict[str, _ChunkReader] = {}

    def _get(self, cache: ChunkCache, name: str, start: int, stop: int) -> np.ndarray:
        r = self._readers.get(name)
        if r is None:
            r = self._readers[name] = _ChunkReader(self.group[name], (self.token, name))
        return r.get(start, stop, cache)

    def sample(self, j: int, cache: ChunkCache) -> dict:
        if not 0 <= j < self.n:
            raise IndexError(f"sample {j} out of range for shard {self.display} with {self.n} samples")
        return unpack_sample(self.attrs, self.index, lambda name, a, b: self._get(cache, name, a, b), j)

    def arrays(self) -> Iterator[tuple[str, Any]]:
        for name, obj in sorted(self.group.members(max_depth=None), key=lambda x: x[0]):
            if isinstance(obj, zarr.Array):
                yield name, obj


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
        if not fs.exists(root):
            raise FileNotFoundError(f"no cache at {storage.display(fs, root)}: run kd-cache build to create it")
        raw = storage.read_json(fs, path)
        if raw is None:
            raise FileNotFoundError(f"{storage.display(fs, path)} not found: {INCOMPLETE_HINT}")
        self.manifest: Manifest = Manifest.from_dict(raw, storage.display(fs, path))
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
                f"{INCOMPLETE_HINT}"
            )
        reader = _ShardReader(fs, self.shard_path(shard_index))
        if reader.n != self.shard_sizes[shard_index]:
            raise ValueError(
                f"shard {reader.display} holds {reader.n} samples but the manifest says "
                f"{self.shard_sizes[shard_index]}: the shard was rewritten after the manifest; "
                "run kd-cache build again"
            )
        self._reader = (shard_index, reader)
        return reader

    def read_sample(self, shard_index: int, local_index: int) -> dict:
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
    def verify(self) -> list[str]:
        """Re-hash every shard; one readable line per problem (empty list: the cache is intact)."""
        fs = self._filesystem()
        problems: list[str] = []
        for idx, entry in enumerate(self.manifest.shards):
            name = entry.name
            path, marker_path = self.shard_path(idx), self.marker_path(idx)
            shown = storage.display(fs, path)
            try:
                marker = storage.read_json(fs, marker_path)
            except ValueError as e:
                problems.append(f"shard {name}: unreadable completion marker: {e}")
                marker = {}
            if marker is None:
                problems.append(f"shard {name}: completion marker {storage.display(fs, marker_path)} is missing")
                marker = {}
            if not fs.exists(path):
                problems.append(f"shard {name}: shard directory {shown} is missing")
                continue
            checksum, nbytes, files = storage.shard_digest(fs, path)
            if checksum != entry.checksum:
                changed = []
                expected_files = marker.get("files") or {}
                for rel in sorted(set(expected_files) | set(files)):
                    if rel not in files:
                        changed.append(f"{posixpath.join(shown, rel)} (missing)")
                    elif rel not in expected_files:
                        changed.append(f"{posixpath.join(shown, rel)} (unexpected file)")
                    elif files[rel] != expected_files[rel]:
                        changed.append(f"{posixpath.join(shown, rel)} (content changed)")
                detail = ("; files: " + ", ".join(changed)) if changed else ""
                problems.append(
                    f"shard {name}: checksum mismatch in {shown}: manifest {entry.checksum}, "
                    f"recomputed {checksum}{detail}"
                )
            if marker and marker.get("checksum") != entry.checksum:
                problems.append(
                    f"shard {name}: completion marker {storage.display(fs, marker_path)} has checksum "
                    f"{marker.get('checksum')} but the manifest has {entry.checksum}"
                )
            if nbytes != entry.bytes:
                problems.append(f"shard {name}: {shown} holds {nbytes} bytes, manifest says {entry.bytes}")
        return problems

    def shard_status(self, shard_index: int, check: bool = True) -> dict:
        """Completion and (optionally) checksum status of one shard."""
        fs = self._filesystem()
        entry = self.manifest.shards[shard_index]
        path = self.shard_path(shard_index)
        try:
            marker = storage.read_json(fs, self.marker_path(shard_index))
        except ValueError:
            marker = None
        status = {"complete": marker is not None, "path": storage.display(fs, path), "checksum": "not checked"}
        if check:
            if not fs.exists(path):
                status["checksum"] = "missing"
            else:
                checksum, _, _ = storage.shard_digest(fs, path)
                status["checksum"] = "ok" if checksum == entry.checksum else "mismatch"
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
