"""The cache's shard format: writer, reader, manifest and checksums.

A cache is a directory or any fsspec URL (``memory://x``, ``file:///tmp/x``, ``s3://bucket/x``)::

    <root>/manifest.json                     written last, atomically (by the build, via write_manifest)
    <root>/shards/00000/                     one Zarr v3 group per shard, immutable once complete
    <root>/shards/00000.complete.json        completion record, written last for that shard

A shard without its completion record is incomplete: readers never use it and ``write_shard``
deletes its leftovers before writing it again. Every writer (process, rank) owns whole shards.

Inside a shard group (S samples; T tokens, P positions of one kind, I relation matrices in total)::

    attrs: format_version, n_samples, sparse_mode ("topk" | "sample"), k, relation (spec string),
           sample_logprobs (bool, sample mode), sample_ids [S] (str), images [S][*] (str),
           extras {kind: {name: {dtype, shape}}},
           meta [S] (optional per-sample JSON dicts; the reader returns {} when absent)
    tokens/offsets int64 [S+1]       tokens/input_ids int32 [T]      tokens/labels int32 [T]
    <kind>/offsets int64 [S+1]       <kind>/positions int32 [P]      <kind>/tail float32 [P]
      topk:    <kind>/ids int32 [P, K]        <kind>/logprobs float16 [P, K]
      sample:  <kind>/n_entries uint16 [P]    <kind>/entry_offsets int64 [S+1]
               <kind>/ids int32 [E]  <kind>/counts uint16 [E]  <kind>/logp_mean float32 [P]
               (only the real entries of each row, E = sum n_entries; padded back to K on read)
               <kind>/logprobs float16 [E]   only with ``sample_logprobs`` (off by default)
      extras:  <kind>/extra/<name> [P, ...]   (any other ``<kind>_<name>`` array, dtype kept)
    relation/offsets int64 [S+1]     relation/n int32 [I]            relation/energy float32 [I]
      full:    relation/upper float16 flat,   relation/upper_offsets int64 [I+1]
      lowrank: relation/eigvals float32 flat, relation/eigvals_offsets int64 [I+1]
               relation/eigvecs float16 flat (N x r row-major), relation/eigvecs_offsets int64 [I+1]
    (no relation/ group when the spec is "none")

``logp_mean`` is ``sum_i (c_i / N) log p_i`` per position (N draws, c_i of them on id i), in fp32
from the teacher's fp32 log-probs: it is the only thing the sampled forward-KL estimator
``sum_i (c_i/N)(log p_i - log q_i)`` needs of the teacher's log-probs, so one number per position
replaces ~20 fp16 log-probs (they cost ~40% of a sample-mode cache and are incompressible noise in
their low bits). ``--sample-logprobs`` keeps the per-entry log-probs too (for analysis).
Format version 1 (no ``logp_mean``, per-entry log-probs always) is still read: ``logp_mean`` is then
computed from the stored log-probs.

``<kind>`` is ``response``, ``visual`` or ``prompt``. Every array is Blosc/zstd compressed (see
``default_compressors``) in chunks of about ``CHUNK_BYTES`` raw bytes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import posixpath
import shutil
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import fsspec
import numpy as np
import zarr
from zarr.codecs import BloscCodec
from zarr.storage import FsspecStore, LocalStore

from kd_cache.relation import decode_relation, encode_relation, parse_relation_spec, relation_energy

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: sample mode always stored per-entry log-probs, no logp_mean
KINDS = ("response", "visual", "prompt")  # prompt: other text positions (LLaVADI all-token KD)
SPARSE_MODES = ("topk", "sample")
IGNORE_INDEX = -100
MANIFEST_NAME = "manifest.json"
SHARDS_DIR = "shards"
COMPLETE_SUFFIX = ".complete.json"
CHUNK_BYTES = 1 << 20  # raw bytes per chunk: big enough for zstd, small enough for cheap random access
READER_CACHE_BYTES = 64 << 20  # decoded chunks a reader keeps (all arrays and open shards together)

_OPENINGS = itertools.count()  # shard openings in this process (chunk cache keys)

INCOMPLETE_HINT = "cache incomplete: run kd-cache build again to finish it"

_SAMPLE_KEYS = {"id", "images", "input_ids", "labels", "relation", "relation_energy", "meta"}
_KIND_FIELDS = ("positions", "ids", "logprobs", "tail", "counts", "logp_mean")


# --------------------------------------------------------------------------------------------------
# storage helpers


def default_compressors(dtype: np.dtype) -> list:
    """Codec choice for one array: Blosc zstd level 3 with byte shuffle, one Blosc block per chunk.

    Chosen by ``benchmarks/run_all.py`` on SmolLM2-135M distributions and relation matrices (see
    benchmarks/RESULTS.md). One block per chunk (instead of Blosc's automatic ~256 KiB blocks) gives
    zstd the whole chunk as its window, and with it byte shuffle beats bitshuffle on every array:
    top-64 -3%, full relation matrices -17% against the former bitshuffle-for-floats default, at the
    same encode speed. Level 5 saves <1% more at ~25% slower encoding, level 9 ~5% at 10x slower;
    lz4 is ~15% larger. ``dtype`` is kept in the signature for custom choices (benchmarks pass
    their own through ``CacheWriter(compressors=...)``).
    """
    del dtype  # one choice fits every dtype the format stores (measured)
    return [BloscCodec(cname="zstd", clevel=3, shuffle="shuffle", blocksize=CHUNK_BYTES)]


def _chunks_for(shape: tuple[int, ...], dtype: np.dtype, chunk_bytes: int) -> tuple[int, ...]:
    """Chunk only along the first axis, about ``chunk_bytes`` raw bytes per chunk."""
    itemsize = np.dtype(dtype).itemsize
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * itemsize if len(shape) > 1 else itemsize
    rows = max(1, chunk_bytes // max(1, row_bytes))
    rows = max(1, min(rows, shape[0]))
    return (rows, *(max(1, s) for s in shape[1:]))


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


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def _zarr_store(fs: fsspec.AbstractFileSystem, path: str, read_only: bool):
    if _is_local(fs):
        return LocalStore(path, read_only=read_only)
    return FsspecStore(fs=_async_fs(fs), path=path, read_only=read_only)


def _display(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The path as a user would type it (protocol included for non-local filesystems)."""
    return path if _is_local(fs) else fs.unstrip_protocol(path)


def _atomic_write(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to a temporary name next to ``path``, then rename it into place."""
    parent = posixpath.dirname(path)
    tmp = posixpath.join(parent, f".{posixpath.basename(path)}.tmp-{uuid.uuid4().hex}")
    if _is_local(fs):
        os.makedirs(parent, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX
        return
    fs.makedirs(parent, exist_ok=True)
    fs.pipe_file(tmp, data)
    try:
        fs.mv(tmp, path)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)


def _read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    """Parsed JSON at ``path``, or None when the file does not exist. Bad JSON raises ValueError."""
    try:
        raw = fs.cat_file(path)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{_display(fs, path)} is not valid JSON ({e})") from e


def _list_files(fs: fsspec.AbstractFileSystem, root: str) -> list[tuple[str, str]]:
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


def _remove_tree(fs: fsspec.AbstractFileSystem, root: str) -> None:
    """Delete every file under ``root`` (and, locally, its directories); siblings are untouched."""
    if _is_local(fs):
        shutil.rmtree(root, ignore_errors=True)
        if os.path.exists(root):
            raise OSError(f"could not delete the partial shard {root}")
        return
    files = [full for _, full in _list_files(fs, root)]
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
    for rel, full in _list_files(fs, root):
        data = fs.cat_file(full)
        nbytes += len(data)
        files[rel] = hashlib.sha256(data).hexdigest()
        total.update(rel.encode("utf-8") + b"\0" + len(data).to_bytes(8, "little"))
        total.update(data)
    return total.hexdigest(), nbytes, files


# --------------------------------------------------------------------------------------------------
# packing samples into columns


def _as(a: Any, dtype, name: str, sid: str, ndim: int | None = None, width: int | None = None) -> np.ndarray:
    arr = np.asarray(a)
    if arr.size == 0 and ndim == 2 and width is not None:
        arr = arr.reshape(0, width)  # an empty [0] or [] for "no positions" is fine
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"sample {sid!r}: {name} must have {ndim} dimension(s), found shape {arr.shape}")
    if arr.size and np.dtype(dtype).kind in "iu" and arr.dtype.kind not in "iub":
        raise ValueError(f"sample {sid!r}: {name} must be integer, found dtype {arr.dtype}")
    return arr.astype(dtype, copy=False)


def _kind_extras(sample: dict, kind: str) -> dict[str, np.ndarray]:
    prefix = kind + "_"
    return {
        key[len(prefix) :]: np.asarray(v)
        for key, v in sample.items()
        if key.startswith(prefix) and key[len(prefix) :] not in _KIND_FIELDS
    }


def _offsets(lengths: Sequence[int]) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(np.asarray(lengths, dtype=np.int64), out=out[1:])
    return out


def _cat(parts: list[np.ndarray], dtype, tail_shape: tuple[int, ...] = ()) -> np.ndarray:
    if not parts:
        return np.zeros((0, *tail_shape), dtype=dtype)
    return np.concatenate(parts, axis=0).astype(dtype, copy=False)


def sample_logp_mean(logprobs: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``sum_i (c_i / N) log p_i`` per row (fp32 [P]) of sampled ids: ``logprobs``/``counts`` [P, K],
    count 0 on padding. The teacher half of the sampled forward-KL estimator (the only way it uses
    the teacher's log-probs); 0 for a row without draws."""
    c = np.asarray(counts, dtype=np.float64)
    lp = np.where(c > 0, np.asarray(logprobs, dtype=np.float64), 0.0)
    n = c.sum(axis=-1)
    return ((c * lp).sum(axis=-1) / np.maximum(n, 1.0)).astype(np.float32)


def pack_samples(
    samples: Sequence[dict], *, sparse_mode: str, k: int, relation: str, sample_logprobs: bool = False
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Turn per-sample dicts into the shard's flat arrays (by group path) and its attributes.

    Sample mode stores ``<kind>_logp_mean`` [P] (given, or computed from ``<kind>_logprobs`` and
    ``<kind>_counts``), and the per-entry log-probs only with ``sample_logprobs``.
    """
    if sparse_mode not in SPARSE_MODES:
        raise ValueError(f"sparse mode {sparse_mode!r} not understood: expected one of {SPARSE_MODES}")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"sparse k must be a positive integer, found {k!r}")
    if sparse_mode == "sample" and k > np.iinfo(np.uint16).max:
        raise ValueError(
            f"sample mode stores counts as uint16: k={k} draws is above {np.iinfo(np.uint16).max}"
        )
    rel_kind, _ = parse_relation_spec(relation)
    k = int(k)

    arrays: dict[str, np.ndarray] = {}
    ids: list[str] = []
    images: list[list[str]] = []
    tok_ids, tok_labels = [], []
    per_kind: dict[str, dict[str, list]] = {
        kind: {f: [] for f in _KIND_FIELDS + ("n_entries",)} for kind in KINDS
    }
    extras: dict[str, dict[str, list]] = {kind: {} for kind in KINDS}
    extra_meta: dict[str, dict[str, dict]] = {kind: {} for kind in KINDS}
    metas: list[dict] = []
    rel_counts: list[int] = []
    rel_n: list[int] = []
    rel_energy: list[float] = []
    rel_fields: dict[str, list[np.ndarray]] = {}

    for i, s in enumerate(samples):
        sid = str(s.get("id", f"#{i}"))
        unknown = [
            key for key in s if key not in _SAMPLE_KEYS and not any(key.startswith(kd + "_") for kd in KINDS)
        ]
        if unknown:
            raise ValueError(
                f"sample {sid!r}: unknown keys {sorted(unknown)}; a shard stores id, images, input_ids, "
                f"labels, relation and per-position arrays named <kind>_<name> with kind in {KINDS}"
            )
        for key in ("id", "input_ids", "labels"):
            if key not in s:
                raise ValueError(f"sample {sid!r} (index {i} in the shard) has no {key!r}")
        ids.append(str(s["id"]))
        meta = s.get("meta") or {}
        if not isinstance(meta, dict):
            raise TypeError(f"sample {sid!r}: meta must be a JSON-serialisable dict, found {type(meta).__name__}")
        metas.append(meta)
        imgs = s.get("images") or []
        if isinstance(imgs, str):
            raise TypeError(f"sample {sid!r}: images must be a list of paths, found a string {imgs!r}")
        images.append([str(p) for p in imgs])
        inp = _as(s["input_ids"], np.int32, "input_ids", sid, 1)
        lab = _as(s["labels"], np.int32, "labels", sid, 1)
        if inp.shape != lab.shape:
            raise ValueError(
                f"sample {sid!r}: input_ids has {inp.shape[0]} tokens but labels has {lab.shape[0]}"
            )
        tok_ids.append(inp)
        tok_labels.append(lab)
        L = inp.shape[0]

        for kind in KINDS:
            acc = per_kind[kind]
            pos = _as(
                s.get(f"{kind}_positions", np.zeros(0, np.int32)), np.int32, f"{kind}_positions", sid, 1
            )
            P = pos.shape[0]
            if P and (pos.min() < 0 or pos.max() >= L):
                raise ValueError(
                    f"sample {sid!r}: {kind}_positions must lie in [0, {L}) (sequence length), "
                    f"found values in [{pos.min()}, {pos.max()}]"
                )
            tid = _as(s.get(f"{kind}_ids", np.zeros((0, k), np.int32)), np.int32, f"{kind}_ids", sid, 2, k)
            has_lp = f"{kind}_logprobs" in s
            # fp32 as given (sample mode derives logp_mean from it); stored as fp16
            lp = _as(s.get(f"{kind}_logprobs", np.zeros((0, k), np.float32)), np.float32, f"{kind}_logprobs", sid,
                     2, k)
            tail = _as(s.get(f"{kind}_tail", np.zeros(0, np.float32)), np.float32, f"{kind}_tail", sid, 1)
            if sparse_mode == "topk":
                expected = (P, k)
                if f"{kind}_counts" in s:
                    raise ValueError(f"sample {sid!r}: {kind}_counts given but the sparse mode is 'topk'")
            else:
                expected = (P, tid.shape[1]) if tid.ndim == 2 and tid.shape[1] <= k else (P, k)
            checked = [(f"{kind}_ids", tid)]
            if sparse_mode == "topk" or has_lp:
                checked.append((f"{kind}_logprobs", lp))
            elif P and f"{kind}_logp_mean" not in s:
                raise ValueError(
                    f"sample {sid!r}: sample mode needs {kind}_logp_mean [P] or {kind}_logprobs [P, K] "
                    f"(to derive it), found neither for its {P} {kind} positions"
                )
            if sample_logprobs and sparse_mode == "sample" and P and not has_lp:
                raise ValueError(
                    f"sample {sid!r}: sample_logprobs=True stores per-entry log-probs, but {kind}_logprobs "
                    "is missing"
                )
            for name, a in checked:
                if a.shape != expected:
                    raise ValueError(
                        f"sample {sid!r}: {name} must have shape {expected} ({P} positions x k={k} for "
                        f"sparse mode {sparse_mode!r}), found {a.shape}"
                    )
            if tail.shape != (P,):
                raise ValueError(f"sample {sid!r}: {kind}_tail must have shape ({P},), found {tail.shape}")
            acc["positions"].append(pos)
            acc["tail"].append(tail)
            if sparse_mode == "topk":
                acc["ids"].append(tid)
                acc["logprobs"].append(lp.astype(np.float16))
            else:
                cnt = np.asarray(s.get(f"{kind}_counts", np.zeros((0, k), np.int64)))
                if cnt.size == 0 and tid.size == 0:
                    cnt = cnt.reshape(tid.shape)
                if cnt.shape != tid.shape:
                    raise ValueError(
                        f"sample {sid!r}: {kind}_counts must have shape {tid.shape}, found {cnt.shape}"
                    )
                mask = tid >= 0
                if mask.any() and (cnt[mask].min() < 1 or cnt[mask].max() > np.iinfo(np.uint16).max):
                    raise ValueError(
                        f"sample {sid!r}: {kind}_counts of drawn ids must lie in [1, 65535], "
                        f"found [{cnt[mask].min()}, {cnt[mask].max()}]"
                    )
                acc["n_entries"].append(mask.sum(axis=1).astype(np.uint16))
                acc["ids"].append(tid[mask])
                acc["counts"].append(cnt[mask].astype(np.uint16))
                if sample_logprobs:
                    acc["logprobs"].append(lp[mask].astype(np.float16))
                if f"{kind}_logp_mean" in s:
                    lm = _as(s[f"{kind}_logp_mean"], np.float32, f"{kind}_logp_mean", sid, 1)
                    if lm.shape != (P,):
                        raise ValueError(
                            f"sample {sid!r}: {kind}_logp_mean must have shape ({P},), found {lm.shape}"
                        )
                elif P:
                    lm = sample_logp_mean(lp, np.where(mask, cnt, 0))
                else:
                    lm = np.zeros(0, np.float32)
                acc["logp_mean"].append(lm)
            for name, a in _kind_extras(s, kind).items():
                if a.ndim < 1 or a.shape[0] != P:
                    raise ValueError(
                        f"sample {sid!r}: {kind}_{name} must have one row per {kind} position ({P}), "
                        f"found shape {a.shape}"
                    )
                meta = {"dtype": a.dtype.str, "shape": list(a.shape[1:])}
                if name not in extra_meta[kind]:
                    if i > 0:
                        raise ValueError(
                            f"sample {sid!r} has {kind}_{name} but earlier samples of the shard do not: "
                            "extra per-position arrays must be given for every sample"
                        )
                    extra_meta[kind][name] = meta
                    extras[kind][name] = []
                elif extra_meta[kind][name] != meta:
                    raise ValueError(
                        f"sample {sid!r}: {kind}_{name} has dtype/trailing shape {meta}, "
                        f"earlier samples have {extra_meta[kind][name]}"
                    )
                extras[kind][name].append(a)
            for name, parts in extras[kind].items():
                if len(parts) != i + 1:
                    raise ValueError(
                        f"sample {sid!r} has no {kind}_{name} but earlier samples of the shard do: "
                        "extra per-position arrays must be given for every sample"
                    )

        mats = [] if rel_kind == "none" else list(s.get("relation") or [])
        rel_counts.append(len(mats))
        for m, R in enumerate(mats):
            R = np.asarray(R, dtype=np.float32)
            try:
                enc = encode_relation(R, relation)
            except ValueError as e:
                raise ValueError(f"sample {sid!r}: relation matrix {m}: {e}") from e
            rel_n.append(R.shape[0])
            rel_energy.append(relation_energy(enc))
            for name, v in enc.items():
                if name != "energy":
                    rel_fields.setdefault(name, []).append(np.asarray(v).ravel())

    arrays["tokens/offsets"] = _offsets([a.shape[0] for a in tok_ids])
    arrays["tokens/input_ids"] = _cat(tok_ids, np.int32)
    arrays["tokens/labels"] = _cat(tok_labels, np.int32)
    for kind in KINDS:
        acc = per_kind[kind]
        arrays[f"{kind}/offsets"] = _offsets([p.shape[0] for p in acc["positions"]])
        arrays[f"{kind}/positions"] = _cat(acc["positions"], np.int32)
        arrays[f"{kind}/tail"] = _cat(acc["tail"], np.float32)
        if sparse_mode == "topk":
            arrays[f"{kind}/ids"] = _cat(acc["ids"], np.int32, (k,))
            arrays[f"{kind}/logprobs"] = _cat(acc["logprobs"], np.float16, (k,))
        else:
            arrays[f"{kind}/n_entries"] = _cat(acc["n_entries"], np.uint16)
            arrays[f"{kind}/entry_offsets"] = _offsets([int(n.sum()) for n in acc["n_entries"]])
            arrays[f"{kind}/ids"] = _cat(acc["ids"], np.int32)
            arrays[f"{kind}/counts"] = _cat(acc["counts"], np.uint16)
            arrays[f"{kind}/logp_mean"] = _cat(acc["logp_mean"], np.float32)
            if sample_logprobs:
                arrays[f"{kind}/logprobs"] = _cat(acc["logprobs"], np.float16)
        for name, parts in extras[kind].items():
            meta = extra_meta[kind][name]
            arrays[f"{kind}/extra/{name}"] = _cat(parts, np.dtype(meta["dtype"]), tuple(meta["shape"]))
    if rel_kind != "none":
        arrays["relation/offsets"] = _offsets(rel_counts)
        arrays["relation/n"] = np.asarray(rel_n, dtype=np.int32)
        arrays["relation/energy"] = np.asarray(rel_energy, dtype=np.float32)
        field_names = ("upper",) if rel_kind == "full" else ("eigvals", "eigvecs")
        field_dtypes = {"upper": np.float16, "eigvals": np.float32, "eigvecs": np.float16}
        for name in field_names:
            parts = rel_fields.get(name, [])
            arrays[f"relation/{name}"] = _cat(parts, field_dtypes[name])
            arrays[f"relation/{name}_offsets"] = _offsets([p.shape[0] for p in parts])

    attrs = {
        "format_version": FORMAT_VERSION,
        "n_samples": len(ids),
        "sparse_mode": sparse_mode,
        "k": k,
        "relation": relation,
        "sample_logprobs": bool(sample_logprobs) if sparse_mode == "sample" else True,
        "sample_ids": ids,
        "images": images,
        "extras": extra_meta,
    }
    if any(metas):  # per-sample JSON notes, e.g. the reference answers a teacher-generated sample replaced
        attrs["meta"] = metas
    return arrays, attrs


# --------------------------------------------------------------------------------------------------
# writer


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
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self.compressors = compressors or default_compressors
        self.chunk_bytes = int(chunk_bytes)
        # The layout exists as soon as a writer does (a no-op on object stores), so files the build
        # puts next to shards (e.g. per-shard skip lists) can be written before the first shard.
        self.fs.makedirs(posixpath.join(self.root, SHARDS_DIR), exist_ok=True)

    # paths ------------------------------------------------------------------------------------
    def shard_name(self, index: int) -> str:
        if index < 0 or index > 99999:
            raise ValueError(f"shard index must lie in [0, 99999], found {index}")
        return f"{index:05d}"

    def shard_path(self, index: int) -> str:
        return posixpath.join(self.root, SHARDS_DIR, self.shard_name(index))

    def record_path(self, index: int) -> str:
        return posixpath.join(self.root, SHARDS_DIR, self.shard_name(index) + COMPLETE_SUFFIX)

    @property
    def manifest_path(self) -> str:
        return posixpath.join(self.root, MANIFEST_NAME)

    # completion records -----------------------------------------------------------------------
    def read_complete_entry(self, index: int) -> dict | None:
        """The shard's completion record, or None when it is missing or unreadable."""
        try:
            rec = _read_json(self.fs, self.record_path(index))
        except ValueError:
            return None
        if not isinstance(rec, dict) or rec.get("name") != self.shard_name(index):
            return None
        return rec

    def is_complete(self, index: int) -> bool:
        return self.read_complete_entry(index) is not None

    # shards -----------------------------------------------------------------------------------
    def write_shard(
        self, index: int, samples: list[dict], *, sparse_mode: str, k: int, relation: str,
        sample_logprobs: bool = False,
    ) -> dict:
        """Write shard ``index`` from scratch; return its entry ``{name, samples, bytes, checksum}``.

        Leftovers of an earlier attempt (record first, then data) are deleted before anything is
        written, and the completion record is written last, so a crash at any point leaves a shard
        that readers ignore and the next build rewrites.
        """
        name = self.shard_name(index)
        arrays, attrs = pack_samples(samples, sparse_mode=sparse_mode, k=k, relation=relation,
                                     sample_logprobs=sample_logprobs)
        path, record = self.shard_path(index), self.record_path(index)
        if self.fs.exists(record):
            self.fs.rm(record)
        _remove_tree(self.fs, path)
        self.fs.invalidate_cache(posixpath.dirname(path))

        group = zarr.open_group(store=_zarr_store(self.fs, path, read_only=False), mode="w", zarr_format=3)
        for key, data in arrays.items():
            parent, _, leaf = key.rpartition("/")
            g = group.require_group(parent) if parent else group
            g.create_array(
                leaf,
                data=data,
                chunks=_chunks_for(data.shape, data.dtype, self.chunk_bytes),
                compressors=self.compressors(data.dtype),
                overwrite=True,
            )
        group.attrs.update(attrs)

        checksum, nbytes, files = shard_digest(self.fs, path)
        entry = {"name": name, "samples": len(samples), "bytes": nbytes, "checksum": checksum}
        rec = dict(entry, format_version=FORMAT_VERSION, files=files)
        _atomic_write(self.fs, record, json.dumps(rec, indent=1).encode("utf-8"))
        return entry

    # manifest ---------------------------------------------------------------------------------
    def read_manifest(self) -> dict | None:
        return _read_json(self.fs, self.manifest_path)

    def write_manifest(self, manifest: dict) -> None:
        """Write ``manifest.json`` atomically (temp file, then rename), with ``format_version``."""
        m = dict(manifest)
        m["format_version"] = FORMAT_VERSION
        _atomic_write(self.fs, self.manifest_path, json.dumps(m, indent=1, sort_keys=False).encode("utf-8"))


# --------------------------------------------------------------------------------------------------
# reader


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
    """One open shard: attributes and offsets in memory, data arrays read through _ChunkReader.

    Decoded chunks live in the ``ChunkCache`` handed to ``sample`` (the reading ``KDCache``'s).
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str):
        self.path = path
        self.token = next(_OPENINGS)  # names this opening in chunk cache keys
        self.display = _display(fs, path)
        if not fs.exists(posixpath.join(path, "zarr.json")):
            raise FileNotFoundError(f"shard {self.display} is missing: {INCOMPLETE_HINT}")
        self.group = zarr.open_group(store=_zarr_store(fs, path, read_only=True), mode="r", zarr_format=3)
        attrs = dict(self.group.attrs)
        found = attrs.get("format_version")
        if found not in READABLE_VERSIONS:
            raise ValueError(
                f"shard {self.display}: format version {found} found, expected {FORMAT_VERSION}: "
                "rebuild the cache with this version of kd-cache"
            )
        self.version = int(found)
        # Version 1 sample shards always hold per-entry log-probs and no logp_mean.
        self.sample_logprobs = bool(attrs.get("sample_logprobs", True))
        self.n = int(attrs["n_samples"])
        self.mode = attrs["sparse_mode"]
        self.k = int(attrs["k"])
        self.relation = attrs["relation"]
        self.rel_kind, _ = parse_relation_spec(self.relation)
        self.ids: list[str] = attrs["sample_ids"]
        self.images: list[list[str]] = attrs["images"]
        self.meta: list[dict] | None = attrs.get("meta")
        self.extras: dict[str, dict[str, dict]] = attrs.get("extras", {})
        self._readers: dict[str, _ChunkReader] = {}
        self.off = {"tokens": self._full("tokens/offsets")}
        for kind in KINDS:
            self.off[kind] = self._full(f"{kind}/offsets")
            if self.mode == "sample":
                self.off[f"{kind}/entries"] = self._full(f"{kind}/entry_offsets")
        if self.rel_kind != "none":
            self.off["relation"] = self._full("relation/offsets")
            self.rel_n = self._full("relation/n")
            self.rel_energy = self._full("relation/energy")
            self.rel_fields = ("upper",) if self.rel_kind == "full" else ("eigvals", "eigvecs")
            for f in self.rel_fields:
                self.off[f"relation/{f}"] = self._full(f"relation/{f}_offsets")

    def _full(self, name: str) -> np.ndarray:
        return np.asarray(self.group[name][...])

    def _get(self, cache: ChunkCache, name: str, start: int, stop: int) -> np.ndarray:
        r = self._readers.get(name)
        if r is None:
            r = self._readers[name] = _ChunkReader(self.group[name], (self.token, name))
        return r.get(start, stop, cache)

    def sample(self, j: int, cache: ChunkCache) -> dict:
        if not 0 <= j < self.n:
            raise IndexError(f"sample {j} out of range for shard {self.display} with {self.n} samples")
        t0, t1 = self.off["tokens"][j], self.off["tokens"][j + 1]
        out: dict[str, Any] = {
            "id": self.ids[j],
            "images": list(self.images[j]),
            "input_ids": self._get(cache, "tokens/input_ids", t0, t1),
            "labels": self._get(cache, "tokens/labels", t0, t1),
            "meta": dict(self.meta[j]) if self.meta else {},
        }
        K = self.k
        for kind in KINDS:
            p0, p1 = self.off[kind][j], self.off[kind][j + 1]
            out[f"{kind}_positions"] = self._get(cache, f"{kind}/positions", p0, p1)
            if self.mode == "topk":
                out[f"{kind}_ids"] = self._get(cache, f"{kind}/ids", p0, p1)
                out[f"{kind}_logprobs"] = self._get(cache, f"{kind}/logprobs", p0, p1)
            else:
                n_ent = self._get(cache, f"{kind}/n_entries", p0, p1).astype(np.int64)
                eo = self.off[f"{kind}/entries"]
                e0, e1 = eo[j], eo[j + 1]
                mask = np.arange(K)[None, :] < n_ent[:, None]
                P = p1 - p0
                ids = np.full((P, K), -1, dtype=np.int32)
                cnt = np.zeros((P, K), dtype=np.uint16)
                ids[mask] = self._get(cache, f"{kind}/ids", e0, e1)
                cnt[mask] = self._get(cache, f"{kind}/counts", e0, e1)
                out[f"{kind}_ids"], out[f"{kind}_counts"] = ids, cnt
                if self.sample_logprobs:
                    lps = np.zeros((P, K), dtype=np.float16)
                    lps[mask] = self._get(cache, f"{kind}/logprobs", e0, e1)
                    out[f"{kind}_logprobs"] = lps
                if self.version >= 2:
                    out[f"{kind}_logp_mean"] = self._get(cache, f"{kind}/logp_mean", p0, p1)
                else:
                    out[f"{kind}_logp_mean"] = sample_logp_mean(lps, cnt)
            out[f"{kind}_tail"] = self._get(cache, f"{kind}/tail", p0, p1)
            for name in self.extras.get(kind, {}):
                out[f"{kind}_{name}"] = self._get(cache, f"{kind}/extra/{name}", p0, p1)
        rels, energies = [], []
        if self.rel_kind != "none":
            for m in range(int(self.off["relation"][j]), int(self.off["relation"][j + 1])):
                enc = {}
                for f in self.rel_fields:
                    fo = self.off[f"relation/{f}"]
                    enc[f] = self._get(cache, f"relation/{f}", fo[m], fo[m + 1])
                rels.append(decode_relation(enc, int(self.rel_n[m]), self.relation))
                energies.append(float(self.rel_energy[m]))
        out["relation"] = rels
        out["relation_energy"] = energies
        return out

    def arrays(self) -> Iterator[tuple[str, Any]]:
        for name, obj in sorted(self.group.members(max_depth=None), key=lambda x: x[0]):
            if isinstance(obj, zarr.Array):
                yield name, obj


def _cache_paths(url: str, storage_options: dict | None):
    fs, root = fsspec.core.url_to_fs(str(url), **(storage_options or {}))
    return fs, root


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
        fs, root = _cache_paths(self.url, self.storage_options)
        path = posixpath.join(root, MANIFEST_NAME)
        if not fs.exists(root):
            raise FileNotFoundError(f"no cache at {_display(fs, root)}: run kd-cache build to create it")
        manifest = _read_json(fs, path)
        if manifest is None:
            raise FileNotFoundError(f"{_display(fs, path)} not found: {INCOMPLETE_HINT}")
        if not isinstance(manifest, dict):
            raise TypeError(f"{_display(fs, path)}: expected a JSON object, found {type(manifest).__name__}")
        found = manifest.get("format_version")
        if found not in READABLE_VERSIONS:
            raise ValueError(
                f"{_display(fs, path)}: cache format version {found} found, expected {FORMAT_VERSION}: "
                "rebuild the cache with this version of kd-cache, or read it with the version that wrote it"
            )
        if "shards" not in manifest:
            raise ValueError(f"{_display(fs, path)}: no 'shards' list in the manifest: {INCOMPLETE_HINT}")
        self.manifest: dict = manifest
        self.shard_sizes: list[int] = [int(e["samples"]) for e in manifest["shards"]]
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
            self._fs, self._root = _cache_paths(self.url, self.storage_options)
            self._reader = None
            self._pid = os.getpid()
        return self._fs

    # paths ------------------------------------------------------------------------------------
    def shard_name(self, shard_index: int) -> str:
        return str(self.manifest["shards"][shard_index]["name"])

    def shard_path(self, shard_index: int) -> str:
        self._filesystem()
        return posixpath.join(self._root, SHARDS_DIR, self.shard_name(shard_index))

    def record_path(self, shard_index: int) -> str:
        self._filesystem()
        return posixpath.join(self._root, SHARDS_DIR, self.shard_name(shard_index) + COMPLETE_SUFFIX)

    def display_path(self, path: str) -> str:
        return _display(self._filesystem(), path)

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
        record = self.record_path(shard_index)
        if not fs.exists(record):
            raise FileNotFoundError(
                f"shard {self.shard_name(shard_index)} has no completion record {_display(fs, record)}: "
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
        for idx, entry in enumerate(self.manifest["shards"]):
            name = str(entry.get("name"))
            path, record = self.shard_path(idx), self.record_path(idx)
            shown = _display(fs, path)
            try:
                rec = _read_json(fs, record)
            except ValueError as e:
                problems.append(f"shard {name}: unreadable completion record: {e}")
                rec = {}
            if rec is None:
                problems.append(f"shard {name}: completion record {_display(fs, record)} is missing")
                rec = {}
            if not fs.exists(path):
                problems.append(f"shard {name}: shard directory {shown} is missing")
                continue
            checksum, nbytes, files = shard_digest(fs, path)
            if checksum != entry.get("checksum"):
                changed = []
                expected_files = rec.get("files") or {}
                for rel in sorted(set(expected_files) | set(files)):
                    if rel not in files:
                        changed.append(f"{posixpath.join(shown, rel)} (missing)")
                    elif rel not in expected_files:
                        changed.append(f"{posixpath.join(shown, rel)} (unexpected file)")
                    elif files[rel] != expected_files[rel]:
                        changed.append(f"{posixpath.join(shown, rel)} (content changed)")
                detail = ("; files: " + ", ".join(changed)) if changed else ""
                problems.append(
                    f"shard {name}: checksum mismatch in {shown}: manifest {entry.get('checksum')}, "
                    f"recomputed {checksum}{detail}"
                )
            if rec and rec.get("checksum") != entry.get("checksum"):
                problems.append(
                    f"shard {name}: completion record {_display(fs, record)} has checksum "
                    f"{rec.get('checksum')} but the manifest has {entry.get('checksum')}"
                )
            if "bytes" in entry and nbytes != entry["bytes"]:
                problems.append(f"shard {name}: {shown} holds {nbytes} bytes, manifest says {entry['bytes']}")
        return problems

    def shard_status(self, shard_index: int, check: bool = True) -> dict:
        """Completion and (optionally) checksum status of one shard."""
        fs = self._filesystem()
        entry = self.manifest["shards"][shard_index]
        path = self.shard_path(shard_index)
        try:
            rec = _read_json(fs, self.record_path(shard_index))
        except ValueError:
            rec = None
        status = {"complete": rec is not None, "path": _display(fs, path), "checksum": "not checked"}
        if check:
            if not fs.exists(path):
                status["checksum"] = "missing"
            else:
                checksum, _, _ = shard_digest(fs, path)
                status["checksum"] = "ok" if checksum == entry.get("checksum") else "mismatch"
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
