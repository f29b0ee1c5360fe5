"""The cache format: every file a cache holds, and how samples become shard columns and back.

A cache is a directory or any fsspec URL (``memory://x``, ``file:///tmp/x``, ``s3://bucket/x``)::

    <root>/build.json                   the build's identity, written first: its content settings
                                        (``BuildConfig.identity``), the data's and the teacher's files
                                        ({"digest", "files": {name: {size, mtime_ns, content}}},
                                        ``fingerprint.files_identity``; the teacher's adds "revision") and
                                        the full config (for ``--repair``); a rerun against the same root
                                        must match it (format 6)
    <root>/build.lock                   present while a build runs: its holder (``kd_cache.lock``)
    <root>/shards/00000/                one Zarr v3 group per shard, immutable once complete
    <root>/shards/00000.complete.json   completion marker, written last for that shard: the shard's
                                        ``ShardEntry`` (name, samples, bytes, checksum, format_version,
                                        sha256 of each file)
    <root>/shards/00000.skipped.json    {"skipped": [{id, reason, detail[, stage]}]}: the records of the
                                        shard's input range the build skipped, written before its data
    <root>/teacher_tokenizer/           the teacher's tokenizer files (``save_pretrained``; sha256 of each
                                        in the manifest's ``teacher.tokenizer_files``), written before it
    <root>/manifest.json                ``kd_cache.schema.Manifest``, written last, atomically, once every
                                        shard is complete; its ``shards`` are the completion markers

A shard without its completion marker is incomplete: readers never use it and ``CacheWriter.write_shard``
deletes its leftovers before writing it again. Every writer (process, rank) owns whole shards.
Every JSON file is written atomically (``storage.atomic_write``: ``.<name>.tmp-<hex>``, then a rename);
the next build deletes the temporary files a killed one left.

Inside a shard group (S samples; T tokens, P positions of one kind, I relation matrices in total)::

    zarr.json: the group's attributes and, consolidated (``zarr.consolidate_metadata``), the metadata of
           every array and sub-group below: a reader reads this one document (its sha256 checked
           against the manifest) instead of one per array; each array's own zarr.json is written too
           (standard zarr layout, re-hashed by ``verify``)
    attrs: format_version, n_samples, sparse_mode ("topk" | "sample"), k, relation (spec string),
           sample_logprobs (bool; True in top-k mode), sample_ids [S] (str), images [S][*] (str),
           extras {kind: {name: {dtype, shape}}},
           meta [S] (only when some sample has notes; the reader returns {} when absent)
    tokens/offsets int64 [S+1]       tokens/input_ids int32 [T]      tokens/labels int32 [T]
    tokens/image_offsets int64 [S+1] tokens/image_token_counts int32 [sum n_img]   (each image's visual count)
    tokens/call_offsets int64 [S+1]  tokens/call uint8 [bytes]       (each sample's processor_call, JSON utf-8)
    tokens/conversation_offsets int64 [S+1]  tokens/conversation uint8 [bytes]   (each sample's
                                     conversation: its role/content turns, JSON utf-8)
    images/data_offsets int64 [I+1]  images/data uint8 [bytes]       (per image, in tokens/image_offsets order:
                                     its original encoded file bytes; an empty range = not stored, read by path)
    <kind>/offsets int64 [S+1]       <kind>/positions int32 [P]      <kind>/tail float32 [P]
      topk:    <kind>/ids int32 [P, K]        <kind>/logprobs float16 [P, K]
      sample:  <kind>/n_entries uint16 [P]    <kind>/entry_offsets int64 [S+1]
               <kind>/ids int32 [E]  <kind>/counts uint16 [E]  <kind>/logp_mean float32 [P]
               (only the real entries of each row, E = sum n_entries; padded back to K on read)
               <kind>/logprobs float16 [E]   only with ``sample_logprobs`` (off by default)
      extras:  <kind>/extra/<name> [P, ...]   (any other ``<kind>_<name>`` array, dtype kept; always
               response/extra/spans int32 [P, 2], response/extra/realised float16 [P] and
               visual/extra/boxes float16 [P, 4]: ``kd_cache.schema.ALIGNMENT_EXTRAS``)
    relation/offsets int64 [S+1]     relation/n int32 [I]            relation/energy float32 [I]
      full:    relation/upper float16 flat,   relation/upper_offsets int64 [I+1]
      lowrank: relation/eigvals float32 flat, relation/eigvals_offsets int64 [I+1]
               relation/eigvecs float16 flat (N x r row-major), relation/eigvecs_offsets int64 [I+1]
      auto:    both sets; matrix i uses the fields of its size's encoding (``resolve_relation_spec``)
    (no relation/ group when the spec is "none")

``logp_mean`` is ``sum_i (c_i / N) log p_i`` per position (N draws, c_i of them on id i), in fp32
from the teacher's fp32 log-probs: it is the only thing the sampled forward-KL estimator
``sum_i (c_i/N)(log p_i - log q_i)`` needs of the teacher's log-probs, so one number per position
replaces ~20 fp16 log-probs (they cost ~40% of a sample-mode cache and are incompressible noise in
their low bits). ``--sample-logprobs`` keeps the per-entry log-probs too (for analysis).

``<kind>`` is each of ``kd_cache.schema.KINDS`` (every shard stores all three; a kind the build did not
distil has no positions). Every array is Blosc/zstd compressed (``default_compressors``) in chunks of
about ``CHUNK_BYTES`` raw bytes, and every chunk ends with a CRC32C of its stored bytes (``stored_codecs``):
zarr checks it each time it decodes the chunk, so a flipped or truncated chunk raises instead of decoding to
other numbers. Every chunk is written, fill values included (``ARRAY_CONFIG``), so each chunk file of an
array exists and a missing one is a missing file (the reader compares each shard's files with its
``ShardEntry.files`` when it opens the shard), never a silent chunk of zeros.

``pack_samples`` turns samples (``CacheSample.to_dict`` form) into these arrays and attributes;
``unpack_sample`` is its inverse for one sample. Each part of a sample (tokens, one kind's arrays,
its extras, the relation matrices) has its packing and unpacking next to each other below.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from zarr.codecs import BloscCodec, Crc32cCodec

from kd_cache.relation import (
    decode_relation,
    encode_relation,
    parse_relation_spec,
    relation_energy,
    resolve_relation_spec,
)
from kd_cache.schema import (
    FORMAT_VERSION,
    KINDS,
    TEACHER_ARRAY,
    TEACHER_ARRAYS,
    CacheSample,
    KindArrays,
    SparseMode,
    choice,
)

MANIFEST_NAME = "manifest.json"
BUILD_NAME = "build.json"
LOCK_NAME = "build.lock"
SHARDS_DIR = "shards"
COMPLETE_SUFFIX = ".complete.json"
SKIPPED_SUFFIX = ".skipped.json"
CHUNK_BYTES = 1 << 20  # raw bytes per chunk: big enough for zstd, small enough for cheap random access

# Stored fields of one relation matrix per encoding, with their dtypes.
RELATION_FIELDS = {"full": {"upper": np.float16}, "lowrank": {"eigvals": np.float32, "eigvecs": np.float16},
                   "none": {}}
# ``auto`` chooses per matrix by its size (``relation.resolve_relation_spec``): both sets of fields, each
# matrix filling the ones of its encoding (the others get an empty range).
RELATION_FIELDS["auto"] = {**RELATION_FIELDS["full"], **RELATION_FIELDS["lowrank"]}

# Reads ``stop - start`` rows of the shard array at a group path (the reader's chunk cache).
ReadRows = Callable[[str, int, int], np.ndarray]


def shard_name(index: int) -> str:
    """``00042``: the name of shard ``index`` (its group and its sibling files)."""
    if index < 0 or index > 99999:
        raise ValueError(f"shard index must lie in [0, 99999], found {index}")
    return f"{index:05d}"


# --------------------------------------------------------------------------------------------------
# codecs and chunks


def default_compressors(dtype: np.dtype) -> list:
    """Codec choice for one array: Blosc zstd level 3 with byte shuffle, one Blosc block per chunk.

    Chosen by ``benchmarks/run_all.py`` on SmolLM2-135M distributions and relation matrices (see
    benchmarks/RESULTS.md). One block per chunk (instead of Blosc's automatic ~256 KiB blocks) gives
    zstd the whole chunk as its window, and with it byte shuffle beats bitshuffle on every array
    (top-64 -3%, full relation matrices -17%) at the same encode speed. Level 5 saves <1% more at
    ~25% slower encoding, level 9 ~5% at 10x slower; lz4 is ~15% larger. ``dtype`` is kept in the
    signature for custom choices (benchmarks pass their own through ``CacheWriter(compressors=...)``).
    """
    del dtype  # one choice fits every dtype the format stores (measured)
    return [BloscCodec(cname="zstd", clevel=3, shuffle="shuffle", blocksize=CHUNK_BYTES)]


def stored_codecs(compressors: list) -> list:
    """The bytes-to-bytes codecs of every stored array: ``compressors``, then a CRC32C of the result.

    Whatever compressors a writer chooses, each chunk carries its checksum, verified by zarr on every
    decode (measured cost: benchmarks/RESULTS.md, loader)."""
    return [*compressors, Crc32cCodec()]


# Array settings of every stored array: chunks equal to the fill value are written too, so that every
# chunk file exists and a missing one is detected (zarr would otherwise read it as fill values).
ARRAY_CONFIG = {"write_empty_chunks": True}


def chunks_for(shape: tuple[int, ...], dtype: np.dtype, chunk_bytes: int) -> tuple[int, ...]:
    """Chunk only along the first axis, about ``chunk_bytes`` raw bytes per chunk."""
    itemsize = np.dtype(dtype).itemsize
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * itemsize if len(shape) > 1 else itemsize
    rows = max(1, chunk_bytes // max(1, row_bytes))
    rows = max(1, min(rows, shape[0]))
    return (rows, *(max(1, s) for s in shape[1:]))


# --------------------------------------------------------------------------------------------------
# shard attributes


@dataclass
class ShardAttrs:
    """The attributes of a shard group (see the module docstring)."""

    n_samples: int
    sparse_mode: str
    k: int
    relation: str
    sample_logprobs: bool
    sample_ids: list[str]
    images: list[list[str]]
    extras: dict[str, dict[str, dict]]  # kind -> extra name -> {"dtype", "shape"} (trailing shape)
    meta: list[dict] | None = None
    format_version: int = FORMAT_VERSION

    @property
    def rel_kind(self) -> str:
        return parse_relation_spec(self.relation)[0]

    def to_attrs(self) -> dict[str, Any]:
        out = {"format_version": self.format_version, "n_samples": self.n_samples, "sparse_mode": self.sparse_mode,
               "k": self.k, "relation": self.relation, "sample_logprobs": self.sample_logprobs,
               "sample_ids": self.sample_ids, "images": self.images, "extras": self.extras}
        if self.meta is not None:
            out["meta"] = self.meta
        return out

    @classmethod
    def from_attrs(cls, attrs: dict, where: str) -> ShardAttrs:
        found = attrs.get("format_version")
        if found != FORMAT_VERSION:
            raise ValueError(
                f"shard {where}: format version {found} found, expected {FORMAT_VERSION}: "
                "rebuild the cache with this version of kd-cache"
            )
        return cls(n_samples=int(attrs["n_samples"]), sparse_mode=attrs["sparse_mode"], k=int(attrs["k"]),
                   relation=attrs["relation"], sample_logprobs=bool(attrs["sample_logprobs"]),
                   sample_ids=attrs["sample_ids"], images=attrs["images"], extras=attrs["extras"],
                   meta=attrs.get("meta"), format_version=int(found))

    def index_arrays(self) -> list[str]:
        """The small arrays a reader keeps in memory: offsets, and the per-matrix relation sizes."""
        names = ["tokens/offsets", "tokens/image_offsets", "tokens/image_token_counts", "tokens/call_offsets",
                 "tokens/conversation_offsets", "images/data_offsets"]
        for kind in KINDS:
            names.append(f"{kind}/offsets")
            if self.sparse_mode == SparseMode.sample.value:
                names.append(f"{kind}/entry_offsets")
        if self.rel_kind != "none":
            names += ["relation/offsets", "relation/n", "relation/energy"]
            names += [f"relation/{f}_offsets" for f in RELATION_FIELDS[self.rel_kind]]
        return names


# --------------------------------------------------------------------------------------------------
# helpers


def _as(a: Any, dtype, name: str, sid: str, ndim: int | None = None, width: int | None = None) -> np.ndarray:
    arr = np.asarray(a)
    if arr.size == 0 and ndim == 2 and width is not None:
        arr = arr.reshape(0, width)  # an empty [0] or [] for "no positions" is fine
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"sample {sid!r}: {name} must have {ndim} dimension(s), found shape {arr.shape}")
    if arr.size and np.dtype(dtype).kind in "iu" and arr.dtype.kind not in "iub":
        raise ValueError(f"sample {sid!r}: {name} must be integer, found dtype {arr.dtype}")
    return arr.astype(dtype, copy=False)


def _offsets(lengths: Sequence[int]) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(np.asarray(lengths, dtype=np.int64), out=out[1:])
    return out


def _cat(parts: list[np.ndarray], dtype, tail_shape: tuple[int, ...] = ()) -> np.ndarray:
    if not parts:
        return np.zeros((0, *tail_shape), dtype=dtype)
    return np.concatenate(parts, axis=0).astype(dtype, copy=False)


def _rows(index: dict[str, np.ndarray], name: str, j: int) -> tuple[int, int]:
    """Sample ``j``'s row range in the arrays that the offsets ``name`` index."""
    off = index[name]
    return int(off[j]), int(off[j + 1])


def sample_logp_mean(logprobs: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``sum_i (c_i / N) log p_i`` per row (fp32 [P]) of sampled ids: ``logprobs``/``counts`` [P, K],
    count 0 on padding. The teacher half of the sampled forward-KL estimator (the only way it uses
    the teacher's log-probs); 0 for a row without draws."""
    c = np.asarray(counts, dtype=np.float64)
    lp = np.where(c > 0, np.asarray(logprobs, dtype=np.float64), 0.0)
    n = c.sum(axis=-1)
    return ((c * lp).sum(axis=-1) / np.maximum(n, 1.0)).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# tokens


# Per-sample JSON documents stored as utf-8 bytes: tokens/<name> with tokens/<name>_offsets.
_DOCUMENTS = ("call", "conversation")


def _json_bytes(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, ensure_ascii=False).encode() if doc else b""


def _pack_tokens(s: CacheSample) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[bytes, ...]]:
    """A sample's validated ``input_ids`` and ``labels`` (int32 [L] each), its per-image visual counts
    (int32 [n_img]) and its documents (``_DOCUMENTS``: processor call, conversation; JSON utf-8)."""
    inp = _as(s.input_ids, np.int32, "input_ids", s.id, 1)
    lab = _as(s.labels, np.int32, "labels", s.id, 1)
    if inp.shape != lab.shape:
        raise ValueError(f"sample {s.id!r}: input_ids has {inp.shape[0]} tokens but labels has {lab.shape[0]}")
    counts = _as(s.image_token_counts, np.int32, "image_token_counts", s.id, 1)
    return inp, lab, counts, (_json_bytes(s.processor_call), _json_bytes(s.conversation))


def _token_arrays(tokens: list[tuple[np.ndarray, np.ndarray, np.ndarray, tuple[bytes, ...]]]) -> dict[str, np.ndarray]:
    out = {"tokens/offsets": _offsets([inp.shape[0] for inp, *_ in tokens]),
           "tokens/input_ids": _cat([inp for inp, *_ in tokens], np.int32),
           "tokens/labels": _cat([lab for _, lab, *_ in tokens], np.int32),
           "tokens/image_offsets": _offsets([len(c) for _, _, c, _ in tokens]),
           "tokens/image_token_counts": _cat([c for _, _, c, _ in tokens], np.int32)}
    for d, name in enumerate(_DOCUMENTS):
        out[f"tokens/{name}_offsets"] = _offsets([len(docs[d]) for *_, docs in tokens])
        out[f"tokens/{name}"] = np.frombuffer(b"".join(docs[d] for *_, docs in tokens), dtype=np.uint8)
    return out


def _unpack_tokens(index: dict[str, np.ndarray], read: ReadRows,
                   j: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict, list]:
    t0, t1 = _rows(index, "tokens/offsets", j)
    i0, i1 = _rows(index, "tokens/image_offsets", j)
    docs = []
    for name in _DOCUMENTS:
        c0, c1 = _rows(index, f"tokens/{name}_offsets", j)
        docs.append(json.loads(read(f"tokens/{name}", c0, c1).tobytes().decode()) if c1 > c0 else None)
    return (read("tokens/input_ids", t0, t1), read("tokens/labels", t0, t1),
            np.asarray(index["tokens/image_token_counts"][i0:i1], dtype=np.int32), docs[0] or {}, docs[1] or [])


# --------------------------------------------------------------------------------------------------
# stored images (the original encoded bytes: the pixels the teacher saw, with no image folder)


def _image_arrays(samples: list[CacheSample]) -> dict[str, np.ndarray]:
    blobs = [b or b"" for s in samples for b in (s.image_bytes or [None] * len(s.images))]
    return {"images/data_offsets": _offsets([len(b) for b in blobs]),
            "images/data": np.frombuffer(b"".join(blobs), dtype=np.uint8)}


def _unpack_images(index: dict[str, np.ndarray], read: ReadRows, j: int) -> list[bytes | None]:
    """Sample ``j``'s stored image bytes, one entry per image (None: not stored)."""
    off = index["images/data_offsets"]
    out = []
    for m in range(*_rows(index, "tokens/image_offsets", j)):
        a, b = int(off[m]), int(off[m + 1])
        out.append(read("images/data", a, b).tobytes() if b > a else None)
    return out


# --------------------------------------------------------------------------------------------------
# one kind's sparse distributions


class _KindColumns:
    """One kind's sparse arrays of a shard, added sample by sample and concatenated by ``arrays``.

    The arrays are those of ``TEACHER_ARRAYS`` that the shard's sparse mode stores: top-k keeps each
    ``[P, K]`` array whole, sample mode only its drawn entries (ids >= 0) with ``n_entries`` per row."""

    def __init__(self, kind: str, sparse_mode: str, k: int, sample_logprobs: bool):
        self.kind, self.mode, self.k, self.sample_logprobs = kind, sparse_mode, k, sample_logprobs
        self.sampled = sparse_mode == SparseMode.sample.value
        self.stored = [a for a in TEACHER_ARRAYS if a.stored(sparse_mode, sample_logprobs)]
        self.parts: dict[str, list[np.ndarray]] = {f: [] for f in ("positions", "n_entries", *(a.name for a in self.stored))}
        self.extras = _ExtraColumns(kind)

    def add(self, s: CacheSample, i: int) -> None:
        """Validate and append sample ``s`` (index ``i`` in the shard); a kind it lacks has no positions."""
        kind, sid = self.kind, s.id
        a = s.kinds.get(kind) or KindArrays(positions=np.zeros(0, np.int32))
        L = len(s.input_ids)
        pos = _as(a.positions, np.int32, f"{kind}_positions", sid, 1)
        P = pos.shape[0]
        if P and (pos.min() < 0 or pos.max() >= L):
            raise ValueError(
                f"sample {sid!r}: {kind}_positions must lie in [0, {L}) (sequence length), "
                f"found values in [{pos.min()}, {pos.max()}]"
            )
        given = self._given(sid, a.teacher, P)
        self.parts["positions"].append(pos)
        mask = None
        if self.sampled:
            mask = given["ids"] >= 0
            self.parts["n_entries"].append(mask.sum(axis=1).astype(np.uint16))
        for arr in self.stored:
            v = given[arr.name]
            self.parts[arr.name].append((v[mask] if mask is not None and arr.per_id else v).astype(arr.dtype))
        self.extras.add(sid, i, a.extras, P)

    def _given(self, sid: str, teacher: dict[str, np.ndarray], P: int) -> dict[str, np.ndarray]:
        """The sample's teacher arrays of this kind, checked against the sparse mode and ``P`` positions:
        every ``[P, K]`` array as wide as the ids (top-k: ``k``; sample mode: at most ``k`` draws), every
        other one ``[P]``; floats as fp32 (sample mode derives ``logp_mean`` from them), ints as int64."""
        kind, mode, k = self.kind, self.mode, self.k
        foreign = [n for n in teacher if not TEACHER_ARRAY[n].stored(mode, True)]
        if foreign:
            raise ValueError(f"sample {sid!r}: {', '.join(f'{kind}_{n}' for n in foreign)} given but the sparse mode "
                             f"is {mode!r}")
        ids = teacher.get("ids")
        width = k  # sample mode: as many columns as the ids have (at most k draws)
        if self.sampled and ids is not None and np.ndim(ids) == 2 and np.shape(ids)[1] <= k:
            width = np.shape(ids)[1]
        out: dict[str, np.ndarray] = {}
        for arr in TEACHER_ARRAYS:
            v = teacher.get(arr.name)
            if v is None:
                continue
            name = f"{kind}_{arr.name}"
            v = _as(v, np.int64 if np.dtype(arr.dtype).kind in "iu" else np.float32, name, sid,
                    2 if arr.per_id else 1, width)
            expected = (P, width) if arr.per_id else (P,)
            if v.shape != expected:
                what = (f"({P} positions x k={k} for sparse mode {mode!r})" if arr.per_id and not self.sampled else
                        f"({P} positions x at most k={k} draws)" if arr.per_id else f"(one per {kind} position)")
                raise ValueError(f"sample {sid!r}: {name} must have shape {expected} {what}, found {v.shape}")
            out[arr.name] = v
        for arr in self.stored:  # a stored array the sample lacks: empty without positions, else derived or an error
            if arr.name in out:
                continue
            if not P:
                out[arr.name] = np.zeros((0, width) if arr.per_id else 0, np.int64 if arr.name == "ids" else np.float32)
            elif arr.name == "logp_mean" and "logprobs" in out and "counts" in out:
                out[arr.name] = sample_logp_mean(out["logprobs"], np.where(out["ids"] >= 0, out["counts"], 0))
            else:
                need = (f"{kind}_logp_mean [P] or {kind}_logprobs [P, K] (to derive it)" if arr.name == "logp_mean"
                        else f"{kind}_{arr.name}" + (" (sample_logprobs=True stores per-entry log-probs)"
                                                     if arr.name == "logprobs" and self.sampled else ""))
                raise ValueError(f"sample {sid!r}: sparse mode {mode!r} needs {need}, found none for its {P} "
                                 f"{kind} positions")
        if self.sampled and P:
            drawn = out["counts"][out["ids"] >= 0]
            if drawn.size and (drawn.min() < 1 or drawn.max() > np.iinfo(np.uint16).max):
                raise ValueError(f"sample {sid!r}: {kind}_counts of drawn ids must lie in [1, 65535], "
                                 f"found [{drawn.min()}, {drawn.max()}]")
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        kind, p = self.kind, self.parts
        out = {f"{kind}/offsets": _offsets([x.shape[0] for x in p["positions"]]),
               f"{kind}/positions": _cat(p["positions"], np.int32)}
        if self.sampled:
            out[f"{kind}/n_entries"] = _cat(p["n_entries"], np.uint16)
            out[f"{kind}/entry_offsets"] = _offsets([int(n.sum()) for n in p["n_entries"]])
        for arr in self.stored:
            whole_rows = arr.per_id and not self.sampled
            out[f"{kind}/{arr.name}"] = _cat(p[arr.name], arr.dtype, (self.k,) if whole_rows else ())
        out.update(self.extras.arrays())
        return out


def _unpack_kind(attrs: ShardAttrs, index: dict[str, np.ndarray], read: ReadRows, kind: str, j: int) -> KindArrays:
    """The inverse of ``_KindColumns.add``: sample ``j``'s arrays of one kind (sample mode padded to K)."""
    p0, p1 = _rows(index, f"{kind}/offsets", j)
    sampled = attrs.sparse_mode == SparseMode.sample.value
    if sampled:
        e0, e1 = _rows(index, f"{kind}/entry_offsets", j)
        n_ent = read(f"{kind}/n_entries", p0, p1).astype(np.int64)
        mask = np.arange(attrs.k)[None, :] < n_ent[:, None]
    teacher = {}
    for arr in TEACHER_ARRAYS:
        if not arr.stored(attrs.sparse_mode, attrs.sample_logprobs):
            continue
        if sampled and arr.per_id:
            teacher[arr.name] = np.full(mask.shape, arr.pad, dtype=arr.dtype)
            teacher[arr.name][mask] = read(f"{kind}/{arr.name}", e0, e1)
        else:
            teacher[arr.name] = read(f"{kind}/{arr.name}", p0, p1)
    return KindArrays(positions=read(f"{kind}/positions", p0, p1), teacher=teacher,
                      extras=_unpack_extras(attrs, read, kind, p0, p1))


# --------------------------------------------------------------------------------------------------
# extra per-position arrays of a kind (e.g. teacher hidden states)


class _ExtraColumns:
    """``<kind>_<name>`` arrays beyond the sparse distribution: same names, dtypes and trailing shapes
    in every sample of a shard."""

    def __init__(self, kind: str):
        self.kind = kind
        self.meta: dict[str, dict] = {}  # name -> {"dtype", "shape"}, the shard's ``extras`` attribute
        self.parts: dict[str, list[np.ndarray]] = {}

    def add(self, sid: str, i: int, extras: dict[str, np.ndarray], P: int) -> None:
        kind = self.kind
        for name, a in extras.items():
            if a.ndim < 1 or a.shape[0] != P:
                raise ValueError(
                    f"sample {sid!r}: {kind}_{name} must have one row per {kind} position ({P}), "
                    f"found shape {a.shape}"
                )
            meta = {"dtype": a.dtype.str, "shape": list(a.shape[1:])}
            if name not in self.meta:
                if i > 0:
                    raise ValueError(
                        f"sample {sid!r} has {kind}_{name} but earlier samples of the shard do not: "
                        "extra per-position arrays must be given for every sample"
                    )
                self.meta[name] = meta
                self.parts[name] = []
            elif self.meta[name] != meta:
                raise ValueError(
                    f"sample {sid!r}: {kind}_{name} has dtype/trailing shape {meta}, "
                    f"earlier samples have {self.meta[name]}"
                )
            self.parts[name].append(a)
        for name, parts in self.parts.items():
            if len(parts) != i + 1:
                raise ValueError(
                    f"sample {sid!r} has no {kind}_{name} but earlier samples of the shard do: "
                    "extra per-position arrays must be given for every sample"
                )

    def arrays(self) -> dict[str, np.ndarray]:
        return {f"{self.kind}/extra/{name}": _cat(parts, np.dtype(self.meta[name]["dtype"]),
                                                  tuple(self.meta[name]["shape"]))
                for name, parts in self.parts.items()}


def _unpack_extras(attrs: ShardAttrs, read: ReadRows, kind: str, p0: int, p1: int) -> dict[str, np.ndarray]:
    return {name: read(f"{kind}/extra/{name}", p0, p1) for name in attrs.extras.get(kind, {})}


# --------------------------------------------------------------------------------------------------
# relation matrices


class _RelationColumns:
    """Each sample's relation matrices (one per image), encoded with the shard's relation spec."""

    def __init__(self, relation: str):
        self.relation = relation
        self.kind, _ = parse_relation_spec(relation)
        self.counts: list[int] = []
        self.n: list[int] = []
        self.energy: list[float] = []
        self.fields: dict[str, list[np.ndarray]] = {}

    def add(self, s: CacheSample) -> None:
        mats = [] if self.kind == "none" else s.relation
        sizes = [np.asarray(R).shape[0] for R in mats]
        if mats and sizes != [int(c) for c in s.image_token_counts]:
            raise ValueError(f"sample {s.id!r}: relation matrices of sizes {sizes}, but its images have "
                             f"{[int(c) for c in s.image_token_counts]} visual positions: one N_i x N_i matrix per image")
        self.counts.append(len(mats))
        for m, R in enumerate(mats):
            R = np.asarray(R, dtype=np.float32)
            try:
                enc = encode_relation(R, self.relation)
            except ValueError as e:
                raise ValueError(f"sample {s.id!r}: relation matrix {m}: {e}") from e
            self.n.append(R.shape[0])
            self.energy.append(relation_energy(enc))
            for name in RELATION_FIELDS[self.kind]:  # one entry per matrix and field (empty when unused)
                self.fields.setdefault(name, []).append(np.asarray(enc.get(name, np.zeros(0))).ravel())

    def arrays(self) -> dict[str, np.ndarray]:
        if self.kind == "none":
            return {}
        out = {"relation/offsets": _offsets(self.counts), "relation/n": np.asarray(self.n, dtype=np.int32),
               "relation/energy": np.asarray(self.energy, dtype=np.float32)}
        for name, dtype in RELATION_FIELDS[self.kind].items():
            parts = self.fields.get(name, [])
            out[f"relation/{name}"] = _cat(parts, dtype)
            out[f"relation/{name}_offsets"] = _offsets([p.shape[0] for p in parts])
        return out


def _unpack_relations(attrs: ShardAttrs, index: dict[str, np.ndarray], read: ReadRows,
                      j: int) -> tuple[list[np.ndarray], list[float]]:
    """Sample ``j``'s decoded relation matrices (float32 [N, N], unit norm) and their energies."""
    if attrs.rel_kind == "none":
        return [], []
    rels, energies = [], []
    for m in range(*_rows(index, "relation/offsets", j)):
        n = int(index["relation/n"][m])
        kind = parse_relation_spec(resolve_relation_spec(attrs.relation, n))[0]
        enc = {f: read(f"relation/{f}", *_rows(index, f"relation/{f}_offsets", m)) for f in RELATION_FIELDS[kind]}
        rels.append(decode_relation(enc, n, attrs.relation))
        energies.append(float(index["relation/energy"][m]))
    return rels, energies


# --------------------------------------------------------------------------------------------------
# whole samples


def pack_samples(
    samples: Sequence[CacheSample | dict], *, sparse_mode: str, k: int, relation: str, sample_logprobs: bool = False
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Turn samples (``CacheSample``s, as the teacher pass gives them, or their ``to_dict`` form) into a
    shard's arrays (by group path) and attributes.

    Sample mode stores ``<kind>_logp_mean`` [P] (given, or computed from ``<kind>_logprobs`` and
    ``<kind>_counts``), and the per-entry log-probs only with ``sample_logprobs``.
    """
    sparse_mode = choice(SparseMode, sparse_mode, "sparse mode").value
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"sparse k must be a positive integer, found {k!r}")
    if sparse_mode == SparseMode.sample.value and k > np.iinfo(np.uint16).max:
        raise ValueError(f"sample mode stores counts as uint16: k={k} draws is above {np.iinfo(np.uint16).max}")
    k = int(k)
    kinds = {kind: _KindColumns(kind, sparse_mode, k, sample_logprobs) for kind in KINDS}
    relations = _RelationColumns(relation)
    typed: list[CacheSample] = []
    tokens = []
    for i, raw in enumerate(samples):
        s = raw if isinstance(raw, CacheSample) else CacheSample.from_dict(raw)
        tokens.append(_pack_tokens(s))
        for columns in kinds.values():
            columns.add(s, i)
        relations.add(s)
        typed.append(s)

    arrays = _token_arrays(tokens)
    arrays.update(_image_arrays(typed))
    for columns in kinds.values():
        arrays.update(columns.arrays())
    arrays.update(relations.arrays())
    attrs = ShardAttrs(
        n_samples=len(typed), sparse_mode=sparse_mode, k=k, relation=relation,
        sample_logprobs=bool(sample_logprobs) if sparse_mode == SparseMode.sample.value else True,
        sample_ids=[s.id for s in typed], images=[s.images for s in typed],
        extras={kind: columns.extras.meta for kind, columns in kinds.items()},
        # per-sample JSON notes, e.g. the reference answers a teacher-generated sample replaced
        meta=[s.meta for s in typed] if any(s.meta for s in typed) else None,
    )
    return arrays, attrs.to_attrs()


def unpack_sample(attrs: ShardAttrs, index: dict[str, np.ndarray], read: ReadRows, j: int) -> dict[str, Any]:
    """Sample ``j`` of a shard as the reader yields it (``CacheSample.to_dict``).

    ``index`` holds the arrays named by ``attrs.index_arrays()``; ``read`` reads rows of the others.
    """
    input_ids, labels, image_token_counts, call, conversation = _unpack_tokens(index, read, j)
    relation, energy = _unpack_relations(attrs, index, read, j)
    return CacheSample(
        id=attrs.sample_ids[j], images=list(attrs.images[j]), image_bytes=_unpack_images(index, read, j),
        input_ids=input_ids, labels=labels,
        image_token_counts=image_token_counts, processor_call=call, conversation=conversation,
        meta=dict(attrs.meta[j]) if attrs.meta else {},
        kinds={kind: _unpack_kind(attrs, index, read, kind, j) for kind in KINDS},
        relation=relation, relation_energy=energy,
    ).to_dict()
