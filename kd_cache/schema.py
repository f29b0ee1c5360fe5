"""The contract between the teacher pass and the trainer: what one cached sample and a manifest hold.

This module is the one place that defines

* the label convention (``IGNORE_INDEX``) and the position kinds (``KINDS``), with how the positions
  of each kind are derived from a sample's tokens;
* ``CacheSample`` / ``KindArrays``: one sample as the teacher pass produces it and as
  ``kd_cache.open_cache`` yields it (``to_dict`` / ``from_dict`` give the flat dict of numpy arrays
  the reader API returns);
* ``Manifest`` and its parts: the cache-level facts a trainer checks before step 1
  (``to_json`` / ``from_json`` are the only code that knows its field names and defaults).

The shard layout that stores these (arrays, offsets, codecs) is ``kd_cache.format``.

A sample, as a flat dict (``CacheSample.to_dict``)::

    id               str
    images           list[str]       image paths as given in the data, in placeholder order ("" = none)
    image_bytes      list[bytes|None] per image: its original encoded file bytes when the cache stores it
                                     (embedded images always, path images with --store-images), else None
    input_ids        int32 [L]       token ids exactly as the teacher saw them
    labels           int32 [L]       labels[t] is the target of the logits at t - 1; IGNORE_INDEX = no loss
    image_token_counts int32 [n_img] per image, in order: its visual positions (tokens the model fills with
                                     that image's features); each image has its own count (size, tiles,
                                     LLaVA-OneVision: the sample's number of images)
    processor_call   dict            what the teacher's processor was called with besides the images:
                                     {"text": rendered text before placeholder expansion, **kwargs}
                                     (``add_special_tokens``, PaliGemma's ``suffix``); a student's
                                     processor reproduces the sample from it and the images ({} = not kept)
    conversation     list[dict]      the conversation as {"role", "content"} turns (``<image>`` tags in the
                                     content), as the teacher's template rendered it: a student of
                                     another template renders it with its own ([] = not kept)
    meta             dict            per-sample JSON notes ({} when none)
    relation         list of float32 [N_i, N_i]   per image (N_i = image_token_counts[i]): R / ||R||_F of the
                                     teacher's logits at that image's visual positions
    relation_energy  list of float   share of R's Frobenius energy the stored encoding keeps
    <kind>_positions int32 [P]       distilled positions t (the logits at t predict token t + 1)
    <kind>_tail      float32 [P]     log of the teacher's probability mass outside the stored ids
      top-k:   <kind>_ids int32 [P, K], <kind>_logprobs float32 [P, K] (fp16 precision when read)
      sample:  <kind>_ids int32 [P, K] (-1 pad), <kind>_counts uint16 [P, K] (0 pad),
               <kind>_logp_mean float32 [P] = sum_i (c_i / N) log p_i,
               <kind>_logprobs [P, K] only when the build kept them (--sample-logprobs)
    <kind>_<name>    [P, ...]        extra per-position arrays, e.g. <kind>_hidden (teacher hidden states)
                                     and ``ALIGNMENT_EXTRAS``: response_spans int32 [P, 2] (the characters
                                     of the answer text that the token predicted at each response
                                     position covers; (-1, -1): none, e.g. an end-of-turn marker),
                                     response_realised float16 [P] (the teacher's log-prob of that token,
                                     stored ids or not), visual_boxes float16 [P, 4] (the box of its
                                     original image each visual position covers, normalised; NaN: none)

with ``<kind>`` each of ``KINDS``: ``response`` (t whose next token is labelled), ``visual`` (t whose
token is the image token: LLaVA-KD distils the output at the image-feature positions, unshifted) and
``prompt`` (every other text position; LLaVADI's all-token distillation).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from typing import Any

import numpy as np

FORMAT_VERSION = 7
TEACHER_TOKENIZER_DIR = "teacher_tokenizer"  # <root>/teacher_tokenizer/: the teacher's tokenizer files
IGNORE_INDEX = -100

KINDS = ("response", "visual", "prompt")
DEFAULT_KINDS = ("response", "visual")  # LLaVA-KD
SAMPLE_FIELDS = ("id", "images", "image_bytes", "input_ids", "labels", "image_token_counts", "processor_call",
                 "conversation", "relation", "relation_energy", "meta")
# Per-kind extras the teacher pass always writes, for a student of another tokenizer, template or image
# layout (``student.alignment``): kind -> names (see the sample layout above).
ALIGNMENT_EXTRAS = {"response": ("spans", "realised"), "visual": ("boxes",)}


class SparseMode(str, Enum):
    """How the teacher's next-token distribution at a position is stored."""

    topk = "topk"  # the k most likely ids, their log-probs and the exact tail mass
    sample = "sample"  # ids drawn from the distribution with their counts (random-sampling KD)


@dataclass(frozen=True)
class TeacherArray:
    """One per-position array of a kind's sparse teacher distribution: ``<kind>_<name>`` in a sample.

    Packing (``kd_cache.format``), unpacking, collation (``student.stream``) and the loss's
    ``SparseTeacher`` (``student.distill.teacher_arrays``) all loop over ``TEACHER_ARRAYS``.
    """

    name: str
    dtype: type  # as stored in a shard and returned by the reader (the teacher pass may give more precision)
    per_id: bool  # [P, K], one value per stored id (sample mode stores only the drawn entries); else [P]
    pad: int | float  # the value at padded ids (-1 ids): a sample-mode row padded to K, a batch padded to its widest K
    modes: tuple[str, ...]  # the sparse modes whose caches always hold it
    on_request: tuple[str, ...] = ()  # the modes whose caches hold it only when the build keeps it (--sample-logprobs)

    def stored(self, mode: str, kept: bool) -> bool:
        """Whether a cache of sparse mode ``mode`` holds it (``kept``: the build kept the on-request arrays)."""
        return mode in self.modes or (kept and mode in self.on_request)


TEACHER_ARRAYS = (
    TeacherArray("ids", np.int32, per_id=True, pad=-1, modes=("topk", "sample")),
    TeacherArray("counts", np.uint16, per_id=True, pad=0, modes=("sample",)),  # draws of each id
    TeacherArray("logprobs", np.float16, per_id=True, pad=0.0, modes=("topk",), on_request=("sample",)),
    TeacherArray("logp_mean", np.float32, per_id=False, pad=0.0, modes=("sample",)),  # sum_i (c_i / N) log p_i
    TeacherArray("tail", np.float32, per_id=False, pad=0.0, modes=("topk", "sample")),  # log mass outside the ids
)
TEACHER_ARRAY = {a.name: a for a in TEACHER_ARRAYS}
# Per-kind fields with a meaning of their own; any other ``<kind>_<name>`` array is an extra.
KIND_FIELDS = ("positions", *TEACHER_ARRAY)


class SampleScheme(str, Enum):
    """How sample mode draws (both unbiased)."""

    systematic = "systematic"
    multinomial = "multinomial"


class Template(str, Enum):
    """How a record becomes text: the chat template, or LLaVA's caption template for pre-training."""

    chat = "chat"
    pretrain = "pretrain"


class DType(str, Enum):
    """A model dtype by name (``--dtype`` of kd-cache build, kd-eval and kd-train init-student)."""

    auto = "auto"  # bf16 on GPU, fp32 on CPU
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


def choice(enum: type[Enum], value: Any, flag: str) -> Enum:
    """``value`` as a member of ``enum``, or a ValueError that names ``flag`` and the choices."""
    try:
        return enum(value.value if isinstance(value, Enum) else value)
    except ValueError:
        raise ValueError(f"{flag} {value!r}: expected one of {', '.join(m.value for m in enum)}") from None


# ------------------------------------------------------------------------------------------ positions


def parse_positions(spec: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``"response,visual"`` -> ("response", "visual"), validated, in canonical order."""
    items = [x.strip() for x in (spec.split(",") if isinstance(spec, str) else spec) if x.strip()]
    bad = [x for x in items if x not in KINDS]
    if bad or not items:
        raise ValueError(f"--positions {spec!r}: expected a comma-separated subset of {', '.join(KINDS)}")
    return tuple(k for k in KINDS if k in items)


def response_positions(labels: np.ndarray) -> np.ndarray:
    """Positions t whose logits predict a labelled token t + 1 (int32 [P])."""
    labels = np.asarray(labels)
    return np.nonzero(labels[1:] != IGNORE_INDEX)[0].astype(np.int32)


def predicted_tokens(labels: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The tokens response positions predict: ``labels[t + 1]`` (int64 [P])."""
    positions = np.asarray(positions, dtype=np.int64)
    return np.asarray(labels, dtype=np.int64)[positions + 1] if len(positions) else np.zeros(0, np.int64)


def visual_positions(input_ids: np.ndarray, image_token_id: int | None) -> np.ndarray:
    """Positions holding the image token, i.e. filled with image features (int32 [P])."""
    if image_token_id is None:
        return np.zeros(0, dtype=np.int32)
    return np.nonzero(np.asarray(input_ids) == image_token_id)[0].astype(np.int32)


def prompt_positions(input_ids: np.ndarray, labels: np.ndarray, image_token_id: int | None) -> np.ndarray:
    """All other text positions: t < L - 1 that are neither response nor image-token positions."""
    input_ids, labels = np.asarray(input_ids), np.asarray(labels)
    keep = np.ones(max(len(input_ids) - 1, 0), dtype=bool)
    keep &= labels[1:] == IGNORE_INDEX
    if image_token_id is not None:
        keep &= input_ids[:-1] != image_token_id
    return np.nonzero(keep)[0].astype(np.int32)


def derive_positions(kind: str, input_ids: np.ndarray, labels: np.ndarray, image_token_id: int | None) -> np.ndarray:
    """The positions of one kind, from a sample's tokens (int32 [P])."""
    if kind == "response":
        return response_positions(labels)
    if kind == "visual":
        return visual_positions(input_ids, image_token_id)
    if kind == "prompt":
        return prompt_positions(input_ids, labels, image_token_id)
    raise ValueError(f"unknown position kind {kind!r}: expected one of {', '.join(KINDS)}")


# --------------------------------------------------------------------------------------------- sample


@dataclass
class KindArrays:
    """The teacher's arrays at the positions of one kind (``P`` positions, ``K`` ids per position)."""

    positions: np.ndarray  # int32 [P]
    # ``TEACHER_ARRAYS`` name -> array, those the sample holds (e.g. ids [P, K], tail [P])
    teacher: dict[str, np.ndarray] = field(default_factory=dict)
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. "hidden": [P, D]

    def to_dict(self, kind: str) -> dict[str, np.ndarray]:
        out = {f"{kind}_positions": self.positions}
        out.update({f"{kind}_{a.name}": self.teacher[a.name] for a in TEACHER_ARRAYS if a.name in self.teacher})
        out.update({f"{kind}_{name}": v for name, v in self.extras.items()})
        return out

    @classmethod
    def from_dict(cls, d: dict, kind: str) -> KindArrays | None:
        """The kind's arrays in a flat sample dict, or None when it holds none of them."""
        prefix = kind + "_"
        own = {key[len(prefix):]: v for key, v in d.items() if key.startswith(prefix)}
        if not own:
            return None
        return cls(positions=np.asarray(own.get("positions", np.zeros(0, np.int32))),
                   teacher={name: np.asarray(v) for name, v in own.items() if name in TEACHER_ARRAY and v is not None},
                   extras={name: np.asarray(v) for name, v in own.items() if name not in KIND_FIELDS})


@dataclass
class CacheSample:
    """One cached sample (see the module docstring for every array's meaning and shape).

    Built by the teacher pass, by ``from_dict`` and by the reader; construction checks the per-sample
    fields and normalises their types (``image_token_counts`` int32, image paths str)."""

    id: str
    input_ids: np.ndarray
    labels: np.ndarray
    images: list[str] = field(default_factory=list)
    image_bytes: list[bytes | None] = field(default_factory=list)  # [] = none stored
    image_token_counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    processor_call: dict = field(default_factory=dict)
    conversation: list[dict] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    kinds: dict[str, KindArrays] = field(default_factory=dict)
    relation: list[np.ndarray] = field(default_factory=list)
    relation_energy: list[float] = field(default_factory=list)

    def __post_init__(self):
        sid = self.id = str(self.id)
        self.meta = self.meta or {}
        if not isinstance(self.meta, dict):
            raise TypeError(f"sample {sid!r}: meta must be a JSON-serialisable dict, found {type(self.meta).__name__}")
        images = self.images or []
        if isinstance(images, str):
            raise TypeError(f"sample {sid!r}: images must be a list of paths, found a string {images!r}")
        self.images = [str(p) for p in images]
        call = self.processor_call = self.processor_call or {}
        if not isinstance(call, dict) or (call and not isinstance(call.get("text"), str)):
            raise TypeError(f"sample {sid!r}: processor_call must be a dict with the processor's 'text', found {call!r}")
        conv = self.conversation = [dict(t) for t in (self.conversation or [])]
        if not all(isinstance(t.get("role"), str) and isinstance(t.get("content"), str) for t in conv):
            raise TypeError(f"sample {sid!r}: conversation must be a list of {{'role': str, 'content': str}} turns")
        data = self.image_bytes = list(self.image_bytes or [])
        if data and (len(data) != len(images) or not all(b is None or isinstance(b, bytes) for b in data)):
            raise ValueError(f"sample {sid!r}: image_bytes must hold one bytes object or None per image "
                             f"({len(images)}), found {[type(b).__name__ for b in data]}")
        counts = np.asarray(self.image_token_counts, dtype=np.int64)
        if counts.ndim != 1 or len(counts) != len(images) or (counts < 0).any():
            raise ValueError(f"sample {sid!r}: image_token_counts must hold one count >= 0 per image ({len(images)}), "
                             f"found {counts.tolist()}")
        self.image_token_counts = counts.astype(np.int32)
        self.input_ids, self.labels = np.asarray(self.input_ids), np.asarray(self.labels)
        self.relation, self.relation_energy = list(self.relation or []), list(self.relation_energy or [])

    def to_dict(self) -> dict[str, Any]:
        stored = list(self.image_bytes) or [None] * len(self.images)
        out: dict[str, Any] = {"id": self.id, "images": list(self.images), "image_bytes": stored,
                               "input_ids": self.input_ids,
                               "labels": self.labels, "image_token_counts": self.image_token_counts,
                               "processor_call": dict(self.processor_call),
                               "conversation": [dict(t) for t in self.conversation], "meta": dict(self.meta)}
        for kind in KINDS:
            if kind in self.kinds:
                out.update(self.kinds[kind].to_dict(kind))
        out["relation"] = list(self.relation)
        out["relation_energy"] = list(self.relation_energy)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> CacheSample:
        unknown = [key for key in d if key not in SAMPLE_FIELDS and not any(key.startswith(k + "_") for k in KINDS)]
        sid = str(d.get("id", "?"))
        if unknown:
            raise ValueError(
                f"sample {sid!r}: unknown keys {sorted(unknown)}; a sample holds {', '.join(SAMPLE_FIELDS)} "
                f"and per-position arrays named <kind>_<name> with kind in {KINDS}"
            )
        for key in ("id", "input_ids", "labels"):
            if key not in d:
                raise ValueError(f"sample {sid!r} has no {key!r}")
        kinds = {k: a for k in KINDS if (a := KindArrays.from_dict(d, k)) is not None}
        return cls(id=d["id"], input_ids=d["input_ids"], labels=d["labels"], images=d.get("images"),
                   image_bytes=d.get("image_bytes"), image_token_counts=d.get("image_token_counts", []),
                   processor_call=d.get("processor_call"), conversation=d.get("conversation"), meta=d.get("meta"),
                   kinds=kinds,
                   relation=d.get("relation"), relation_energy=d.get("relation_energy"))


# ------------------------------------------------------------------------------------------- manifest


@dataclass
class TeacherInfo:
    path: str
    model_type: str
    revision: str | None
    config_hash: str
    multimodal: bool
    # Content identity of the teacher's files (``fingerprint.teacher_identity``: sha256 or Hub blob ids).
    weights: str | None = None
    # The teacher's tokenizer files saved in the cache (``TEACHER_TOKENIZER_DIR``): name -> sha256. What a
    # student of another tokenizer aligns and projects with, without the teacher checkpoint.
    tokenizer_files: dict[str, str] = field(default_factory=dict)


@dataclass
class SparseInfo:
    """The stored distribution: ``k`` ids per position (top-k), or ``samples`` draws (sample mode)."""

    mode: str
    k: int
    seed: int = 0
    samples: int | None = None  # sample mode
    scheme: str | None = None  # sample mode
    logprobs_stored: bool | None = None  # sample mode: per-entry log-probs kept

    def to_dict(self) -> dict[str, Any]:
        extra = ({"samples": self.samples, "scheme": self.scheme, "logprobs_stored": self.logprobs_stored}
                 if self.mode == SparseMode.sample.value else {"top_k": self.k})
        return {"mode": self.mode, "k": self.k, **extra, "seed": self.seed}

    @classmethod
    def from_dict(cls, d: dict) -> SparseInfo:
        return cls(mode=d["mode"], k=int(d["k"]), seed=int(d.get("seed", 0)), samples=d.get("samples"),
                   scheme=d.get("scheme"), logprobs_stored=d.get("logprobs_stored"))


@dataclass
class HiddenInfo:
    """Teacher final hidden states stored at the distilled positions (``--hidden``)."""

    stored: bool = False
    size: int | None = None
    dtype: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"stored": True, "size": self.size, "dtype": self.dtype} if self.stored else {"stored": False}


@dataclass
class GeneratedInfo:
    """The teacher wrote the answers it is distilled on (``--generate``)."""

    max_new_tokens: int
    temperature: float


@dataclass
class ShardEntry:
    """One complete shard: its completion marker (``shards/NNNNN.complete.json``) and its manifest entry."""

    name: str
    samples: int
    bytes: int  # all files of the shard together
    checksum: str  # sha256 over the shard's files (``kd_cache.storage.shard_digest``)
    format_version: int = FORMAT_VERSION
    files: dict[str, str] = field(default_factory=dict)  # sha256 of each file, by path in the shard
    max_tokens: int = 0  # the token count of the shard's longest sample

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ShardEntry:
        return cls(**{f.name: d[f.name] for f in fields(cls)})


@dataclass
class SkippedRecord:
    id: str
    reason: str


@dataclass
class Manifest:
    """What ``manifest.json`` holds: the facts a trainer checks, the build's settings, the shards."""

    teacher: TeacherInfo
    tokenizer_hash: str
    vocab_size: int  # distributions cover the tokenizer's tokens only
    teacher_head_rows: int
    image_token_id: int | None  # the model config's: its positions are the visual ones
    template: str
    max_length: int
    sparse: SparseInfo
    relation: str
    positions: tuple[str, ...]
    hidden: HiddenInfo
    generated: GeneratedInfo | None
    dataset_fingerprint: str
    build_config: dict[str, Any]
    shards: list[ShardEntry]
    skipped: list[SkippedRecord] = field(default_factory=list)
    # ids of the samples whose text ``--max-length`` cut (kept, with the end of the answer missing)
    truncated: list[str] = field(default_factory=list)
    format_version: int = FORMAT_VERSION

    @property
    def num_samples(self) -> int:
        return sum(e.samples for e in self.shards)

    @property
    def longest_sample(self) -> int:
        """Tokens of the longest cached sample (a student needs that many positions, not ``max_length``)."""
        return max((e.max_tokens for e in self.shards), default=0)

    @property
    def skipped_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(x.reason for x in self.skipped).items()))

    @property
    def total_bytes(self) -> int:
        return sum(e.bytes for e in self.shards)

    @property
    def image_folder(self) -> str | None:
        return self.build_config.get("image_folder")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "teacher": asdict(self.teacher),
            "tokenizer_hash": self.tokenizer_hash,
            "vocab_size": self.vocab_size,
            "teacher_head_rows": self.teacher_head_rows,
            "image_token_id": self.image_token_id,
            "template": self.template,
            "max_length": self.max_length,
            "sparse": self.sparse.to_dict(),
            "relation": self.relation,
            "positions": list(self.positions),
            "hidden": self.hidden.to_dict(),
            "generated": asdict(self.generated) if self.generated is not None else None,
            "dataset_fingerprint": self.dataset_fingerprint,
            "build_config": dict(self.build_config),
            "num_samples": self.num_samples,
            "longest_sample": self.longest_sample,
            "shards": [e.to_dict() for e in self.shards],
            "skipped": [asdict(x) for x in self.skipped],
            "skipped_counts": self.skipped_counts,
            "truncated": list(self.truncated),
            "truncated_count": len(self.truncated),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict, where: str = "manifest.json") -> Manifest:
        """Parse a manifest; a missing field or an unknown format version raises naming ``where``."""
        if not isinstance(d, dict):
            raise TypeError(f"{where}: expected a JSON object, found {type(d).__name__}")
        found = d.get("format_version")
        if found != FORMAT_VERSION:
            raise ValueError(
                f"{where}: cache format version {found} found, expected {FORMAT_VERSION}: rebuild the cache "
                "with this version of kd-cache, or read it with the version that wrote it"
            )
        try:
            gen = d["generated"]
            return cls(
                teacher=TeacherInfo(**d["teacher"]),
                tokenizer_hash=d["tokenizer_hash"],
                vocab_size=int(d["vocab_size"]),
                teacher_head_rows=int(d["teacher_head_rows"]),
                image_token_id=d["image_token_id"],
                template=d["template"],
                max_length=int(d["max_length"]),
                sparse=SparseInfo.from_dict(d["sparse"]),
                relation=d["relation"],
                positions=parse_positions(d["positions"]),
                hidden=HiddenInfo(**d["hidden"]),
                generated=GeneratedInfo(**gen) if gen is not None else None,
                dataset_fingerprint=d["dataset_fingerprint"],
                build_config=dict(d["build_config"]),
                shards=[ShardEntry.from_dict(e) for e in d["shards"]],
                skipped=[SkippedRecord(id=x["id"], reason=x["reason"]) for x in d.get("skipped", [])],
                truncated=[str(x) for x in d.get("truncated", [])],
                format_version=int(found),
            )
        except KeyError as e:
            raise ValueError(f"{where}: the manifest has no {e.args[0]!r} field; rebuild the cache") from None

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "manifest.json") -> Manifest:
        try:
            d = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{where} is not valid JSON ({e})") from e
        return cls.from_dict(d, where)
