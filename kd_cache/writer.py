"""``CacheWriter``: writes the shards of a cache, their completion markers and the manifest.

Shards are immutable once complete and the manifest is written last, atomically (layout in
``kd_cache.format``). ``kd_cache.build`` drives a writer; tests and benchmarks use one directly to
write synthetic caches with exactly the build's layout.
"""

from __future__ import annotations

import os
import posixpath
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zarr

from kd_cache import storage
from kd_cache.format import (
    ARRAY_CONFIG,
    CHUNK_BYTES,
    COMPLETE_SUFFIX,
    MANIFEST_NAME,
    SHARDS_DIR,
    SKIPPED_SUFFIX,
    chunks_for,
    default_compressors,
    pack_samples,
    shard_name,
    stored_codecs,
)
from kd_cache.schema import TEACHER_TOKENIZER_DIR, CacheSample, Manifest, ShardEntry


class CacheWriter:
    """Writes shards (and, for the build, the manifest) of one cache.

    ``compressors(dtype) -> list of zarr codecs`` and ``chunk_bytes`` are for benchmarks; the
    defaults are what the build uses.
    """

    def __init__(
        self,
        url: str,
        storage_options: dict | None = None,
        *,
        compressors: Callable[[np.dtype], list] | None = None,
        chunk_bytes: int = CHUNK_BYTES,
    ):
        self.url = str(url)
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = storage.open_fs(self.url, self.storage_options)
        self.compressors = compressors or default_compressors
        self.chunk_bytes = int(chunk_bytes)
        # The layout exists as soon as a writer does, so files the build puts next to shards (the per-shard
        # skip lists) can be written before the first shard. An object store has no folders (and s3fs would
        # create a missing bucket: a mistyped bucket must be an error, not a new bucket).
        if not storage.is_object_store(self.fs):
            with storage.writing(self.fs, self.root):
                self.fs.makedirs(posixpath.join(self.root, SHARDS_DIR), exist_ok=True)

    # paths ------------------------------------------------------------------------------------
    def shard_name(self, index: int) -> str:
        return shard_name(index)

    def shard_path(self, index: int) -> str:
        return posixpath.join(self.root, SHARDS_DIR, shard_name(index))

    def marker_path(self, index: int) -> str:
        """The shard's completion marker."""
        return posixpath.join(self.root, SHARDS_DIR, shard_name(index) + COMPLETE_SUFFIX)

    def skipped_path(self, index: int) -> str:
        """The list of records the build skipped in the shard's input range."""
        return posixpath.join(self.root, SHARDS_DIR, shard_name(index) + SKIPPED_SUFFIX)

    @property
    def manifest_path(self) -> str:
        return posixpath.join(self.root, MANIFEST_NAME)

    # completion markers -----------------------------------------------------------------------
    def read_marker(self, index: int) -> ShardEntry | None:
        """The shard's completion marker, or None when it is missing or unreadable."""
        try:
            d = storage.read_json(self.fs, self.marker_path(index))
        except ValueError:
            return None
        if not isinstance(d, dict) or d.get("name") != shard_name(index):
            return None
        try:
            return ShardEntry.from_dict(d)
        except (KeyError, TypeError):
            return None

    def is_complete(self, index: int) -> bool:
        return self.read_marker(index) is not None

    def complete_shards(self) -> list[str]:
        """Names of the completion markers present (any index)."""
        folder = posixpath.join(self.root, SHARDS_DIR)
        self.fs.invalidate_cache(folder)
        try:
            names = [posixpath.basename(str(p).rstrip("/")) for p in self.fs.ls(folder, detail=False)]
        except FileNotFoundError:
            return []
        return sorted(n for n in names if n.endswith(COMPLETE_SUFFIX) and not n.startswith("."))

    def forget(self, index: int) -> None:
        """Remove shard ``index``'s completion marker: the next build rewrites the shard."""
        with storage.writing(self.fs, self.marker_path(index)):
            if self.fs.exists(self.marker_path(index)):
                self.fs.rm(self.marker_path(index))

    def remove_temp_files(self) -> list[str]:
        """Delete the temporary files of interrupted atomic writes (root and shard folder)."""
        return (storage.remove_temp_files(self.fs, self.root)
                + storage.remove_temp_files(self.fs, posixpath.join(self.root, SHARDS_DIR)))

    # shards -----------------------------------------------------------------------------------
    def write_shard(
        self, index: int, samples: list[CacheSample | dict], *, sparse_mode: str, k: int, relation: str,
        sample_logprobs: bool = False,
    ) -> ShardEntry:
        """Write shard ``index`` from scratch; return its entry (the completion marker's content).

        Leftovers of an earlier attempt (marker first, then data) are deleted before anything is
        written, and the completion marker is written last, so a crash at any point leaves a shard
        that readers ignore and the next build rewrites.
        """
        arrays, attrs = pack_samples(samples, sparse_mode=sparse_mode, k=k, relation=relation,
                                     sample_logprobs=sample_logprobs)
        with storage.writing(self.fs, self.shard_path(index)):
            return self._write_shard(index, arrays, attrs, len(samples))

    def _write_shard(self, index: int, arrays: dict, attrs: dict, n: int) -> ShardEntry:
        path, marker = self.shard_path(index), self.marker_path(index)
        if storage.is_object_store(self.fs):
            checksum, nbytes, files = self._upload_shard(path, marker, arrays, attrs)
        else:
            if self.fs.exists(marker):
                self.fs.rm(marker)
            storage.remove_tree(self.fs, path)
            self.fs.invalidate_cache(posixpath.dirname(path))
            self._encode(storage.zarr_store(self.fs, path, read_only=False), arrays, attrs)
            checksum, nbytes, files = storage.shard_digest(self.fs, path)
        offsets = arrays["tokens/offsets"]
        entry = ShardEntry(name=shard_name(index), samples=n, bytes=nbytes, checksum=checksum, files=files,
                           max_tokens=int(np.diff(offsets).max()) if len(offsets) > 1 else 0)
        storage.write_json(self.fs, marker, entry.to_dict())
        return entry

    def _encode(self, store, arrays: dict, attrs: dict) -> None:
        """The shard's zarr group (every array, its attributes, the consolidated metadata) into ``store``."""
        group = zarr.open_group(store=store, mode="w", zarr_format=3)
        for key, data in arrays.items():
            parent, _, leaf = key.rpartition("/")
            g = group.require_group(parent) if parent else group
            g.create_array(
                leaf,
                data=data,
                chunks=chunks_for(data.shape, data.dtype, self.chunk_bytes),
                compressors=stored_codecs(self.compressors(data.dtype)),
                config=ARRAY_CONFIG,
                overwrite=True,
            )
        group.attrs.update(attrs)
        # Every array's metadata into the shard's zarr.json too: a reader opens the shard with one read.
        with warnings.catch_warnings():  # "not part of the Zarr 3 specification yet": zarr-python reads it
            warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
            zarr.consolidate_metadata(store)

    def _upload_shard(self, path: str, marker: str, arrays: dict, attrs: dict) -> tuple[str, int, dict[str, str]]:
        """An object store's shard: encoded in memory, digested from those bytes, then one PUT per object.

        zarr writing straight to an object store asks whether every metadata document exists before it
        writes it, and the digest would read every object back: ~11 requests per object written. Here: one
        listing of the shard's prefix, one delete of the marker and of any earlier attempt's objects, one PUT
        per object. The bytes are the ones zarr writes to a disk (same codecs, same metadata)."""
        buffers: dict = {}
        self._encode(zarr.storage.MemoryStore(store_dict=buffers), arrays, attrs)
        files = {key: buf.to_bytes() for key, buf in sorted(buffers.items())}
        digest = storage.digest_files(files.items())
        self.fs.invalidate_cache(path)
        try:
            stale = [str(p) for p in self.fs.find(path)]
        except FileNotFoundError:
            stale = []
        self.fs.rm([marker, *stale])  # the marker first: a shard is incomplete from here until its marker is written
        self.fs.pipe({posixpath.join(path, key): data for key, data in files.items()})
        self.fs.invalidate_cache(path)
        return digest

    # the teacher's tokenizer -------------------------------------------------------------------
    def write_tokenizer(self, tokenizer) -> dict[str, str]:
        """Save the teacher's tokenizer files under ``<root>/teacher_tokenizer/`` (each written atomically);
        returns name -> sha256, for the manifest (``TeacherInfo.tokenizer_files``)."""
        import hashlib
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save_pretrained(tmp)
            files = {name: Path(tmp, name).read_bytes() for name in sorted(os.listdir(tmp))
                     if Path(tmp, name).is_file()}
        for name, data in files.items():
            storage.atomic_write(self.fs, posixpath.join(self.root, TEACHER_TOKENIZER_DIR, name), data)
        return {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}

    # manifest ---------------------------------------------------------------------------------
    def read_manifest(self) -> Manifest | None:
        raw = storage.read_json(self.fs, self.manifest_path)
        return None if raw is None else Manifest.from_dict(raw, storage.display(self.fs, self.manifest_path))

    def write_manifest(self, manifest: Manifest) -> None:
        """Write ``manifest.json`` atomically (temp file, then rename)."""
        storage.atomic_write(self.fs, self.manifest_path, manifest.to_json().encode("utf-8"))

