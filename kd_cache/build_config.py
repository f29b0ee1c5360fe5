"""``BuildConfig``: every setting of a ``kd-cache build`` run, written once.

Each field carries its ``--flag`` help in ``metadata["help"]`` (``cli.options`` builds the command
from it; choices from the ``kd_cache.schema`` enums, the values stay plain strings) and
``metadata["identity"]`` when it changes what the cache contains (``CONTENT_KEYS``: a rerun against
the same ``--out`` must match them). The resolved config is written into the manifest
(``build_config``) in field order.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from kd_cache.records import resolve_image_folder
from kd_cache.relation import parse_relation_spec
from kd_cache.runtime import Quantize, check_max_memory, parse_max_memory
from kd_cache.schema import DEFAULT_KINDS, DType, SampleScheme, SparseMode, Template, choice, parse_positions
from kd_cache.storage import STORAGE_OPTIONS_HELP, parse_storage_options


def _setting(default: Any = MISSING, *, help: str, identity: bool = False, **meta: Any) -> Any:
    """A field with its flag's help (``MISSING``: a required flag); ``identity``: it changes the cache's content."""
    return field(default=default, metadata={"help": help, "identity": identity, **meta})


@dataclass
class BuildConfig:
    """Resolved settings of one ``kd-cache build`` run (written into the manifest)."""

    teacher: str = _setting(identity=True, help=(
        "Teacher model directory or hub id (image-text-to-text or causal LM)."))
    data: str = _setting(identity=True, help=(
        "The records: a JSON/JSONL file, parquet file(s) (path or glob), a `datasets` save_to_disk dir, or a Hub "
        "dataset id (read with `datasets`; --split, --subset, --streaming). LLaVA conversations, role/content "
        "messages (TRL) and The Cauldron's texts are recognised; images as paths or embedded."))
    out: str = _setting(help="Cache directory or fsspec URL (e.g. s3://bucket/cache).")
    split: str = _setting("train", identity=True, help="Split of a Hub dataset or a DatasetDict.")
    subset: str | None = _setting(None, identity=True, help="Configuration (subset) of a Hub dataset.")
    streaming: bool = _setting(False, help=(
        "Read the dataset as a stream (nothing downloaded up front; for sets that do not fit on disk)."))
    id_column: str | None = _setting(None, identity=True, help="Column holding the record id (default: id; a record "
                                     "without one gets an id derived from its content).")
    image_column: str | None = _setting(None, identity=True, help="Column holding the images (default: images or "
                                        "image).")
    conversation_column: str | None = _setting(None, identity=True, help=(
        "Column holding the conversation (default: conversations, messages or texts; prompt + completion)."))
    image_folder: str | None = _setting(None, identity=True, help="Folder the records' image paths are relative to.")
    store_images: bool = _setting(False, identity=True, help=(
        "Store each image's original file bytes in the shards (embedded images are always stored), so training "
        "needs only the cache."))
    template: str = _setting(Template.chat.value, identity=True, choices=Template, help=(
        "chat: the processor's chat template, loss on assistant turns; pretrain: image + caption, loss on the "
        "caption (DPT)."))
    sparse: str = _setting(SparseMode.topk.value, identity=True, choices=SparseMode, help=(
        "topk: k most likely ids + exact tail mass; sample: N draws from the teacher (unbiased random-sampling "
        "KD)."))
    top_k: int = _setting(64, identity=True, help="Ids kept per position in topk mode.")
    samples: int = _setting(64, identity=True, help="Draws per position in sample mode.")
    sample_scheme: str = _setting(SampleScheme.systematic.value, identity=True, choices=SampleScheme, help=(
        "How sample mode draws (both unbiased): systematic = one random offset, N evenly spaced points through "
        "the CDF (much lower variance, fewer distinct ids); multinomial = N independent draws."))
    sample_logprobs: bool = _setting(False, identity=True, help=(
        "Sample mode: also store each drawn id's log-prob (fp16). Off by default: the loss needs only "
        "sum_i (c_i/N) log p_i per position, which is always stored (fp32); the per-id log-probs add ~40% to "
        "the cache."))
    relation: str = _setting("auto", identity=True, help=(
        "Relation matrix encoding per image: auto (full up to 576 visual tokens, lowrank:32 above: bounded "
        "per image) | full | lowrank:R | none."))
    batch_size: int = _setting(8, help="Samples per teacher forward (does not change the cache).")
    max_batch_tokens: int | None = _setting(None, help=(
        "Form each teacher forward by a token budget instead of --batch-size: within each --sort-window samples "
        "(in data order, never across shards) sort by length (tokens after image expansion) and put as many "
        "samples in a forward as fit, padded, in this many tokens (a longer sample goes alone). Less padding, and "
        "peak memory bounded by the budget. Shards keep their samples and order; values agree within float "
        "tolerance (as for --batch-size). With --generate (lengths known only after the answers) --batch-size "
        "groups the samples."))
    sort_window: int = _setting(128, help=(
        "Samples sorted together by --max-batch-tokens (more: less padding, more encoded samples held in "
        "memory)."))
    shard_size: int = _setting(1024, identity=True, help=(
        "Samples per shard (the unit of resumption and of parallelism)."))
    max_length: int = _setting(2048, identity=True, help="Truncate tokenised samples to this many tokens.")
    dtype: str = _setting(DType.auto.value, identity=True, choices=DType, help=(
        "Teacher dtype; auto = bf16 on GPU, fp32 on CPU."))
    device: str = _setting("auto", help="auto (the accelerate process's device), cpu, cuda, cuda:1 ...")
    gpus_per_teacher: int = _setting(1, help=(
        "GPUs one teacher replica spreads its layers over (accelerate's big-model dispatch, balanced). Launch one "
        "process per replica, e.g. 8 GPUs, 4 per teacher: accelerate launch --num_processes 2 ...; process i "
        "takes GPUs i*N .. i*N+N-1 of its node and the replicas build disjoint shards."))
    max_memory: dict[str, Any] | None = _setting(None, parse=parse_max_memory, help=(
        "JSON memory budget per device for the teacher's dispatch, e.g. '{\"0\": \"70GiB\", \"1\": \"70GiB\", "
        "\"cpu\": \"200GiB\"}' (GPU keys count within this replica's GPUs); layers past the budgets are "
        "offloaded to disk (a temporary folder). Default: the whole teacher on --device, or balanced over the "
        "--gpus-per-teacher GPUs."))
    quantize: str = _setting(Quantize.none.value, identity=True, choices=Quantize, help=(
        "Load the teacher's linear layers in 8 or 4 bits (bitsandbytes; CUDA only): half or a quarter of the "
        "bf16 memory, at a small cost in fidelity of the cached distributions."))
    strict: bool = _setting(False, help="Stop at the first bad record instead of skipping and listing it.")
    max_skip_share: float = _setting(0.5, help=(
        "Fail the build (exit non-zero, no manifest) when more than this share of the records is skipped; a "
        "build that cached nothing always fails."))
    limit: int | None = _setting(None, identity=True, help="Use only the first N records.")
    seed: int = _setting(0, identity=True, help="Seed for sample mode draws and sampled generation.")
    positions: str = _setting(",".join(DEFAULT_KINDS), identity=True, help=(
        "Distilled positions, comma-separated subset of response, visual, prompt (all other text; LLaVADI's "
        "all-token KD)."))
    hidden: bool = _setting(False, identity=True, help=(
        "Also store the teacher's final-layer hidden states (fp16) at the distilled positions, for hidden-state "
        "alignment."))
    generate: bool = _setting(False, identity=True, help=(
        "Let the teacher answer every user turn first and distil on its own answers (references kept in each "
        "sample's meta)."))
    max_new_tokens: int = _setting(128, identity=True, help="Longest teacher answer with --generate.")
    generate_temperature: float = _setting(0.0, identity=True, help="Sampling temperature with --generate; 0 = greedy.")
    progress: bool = _setting(True, help="Show a progress bar.")
    repair: bool = _setting(False, help=(
        "Re-check every shard already at --out and rebuild exactly those that fail (missing, incomplete, "
        "checksum mismatch); good shards are kept. Same settings, data and teacher as the cache's build."))
    overwrite: bool = _setting(False, help=(
        "Delete the cache at --out (its build.json, manifest and shards; nothing else) and build it anew: "
        "the way to rebuild after the data or the teacher changed."))
    # fsspec options of a remote --out (not written into the manifest or build.json: they may hold credentials).
    storage_options: dict[str, Any] = field(default_factory=dict, metadata={
        "help": STORAGE_OPTIONS_HELP, "parse": parse_storage_options})

    def __post_init__(self):
        self.template = choice(Template, self.template, "--template").value
        self.sparse = choice(SparseMode, self.sparse, "--sparse").value
        self.quantize = choice(Quantize, self.quantize, "--quantize").value
        for name in ("top_k", "samples", "batch_size", "shard_size", "max_length", "sort_window", "gpus_per_teacher"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        self.sample_scheme = choice(SampleScheme, self.sample_scheme, "--sample-scheme").value
        if self.samples > 65535:
            raise ValueError(f"--samples {self.samples}: at most 65535 draws per position (counts are uint16)")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")
        parse_relation_spec(self.relation)  # raises with the accepted forms
        self.positions = ",".join(parse_positions(self.positions))
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.generate_temperature < 0:
            raise ValueError(f"--generate-temperature must be >= 0 (0 = greedy), got {self.generate_temperature}")
        self.image_folder = resolve_image_folder(self.image_folder)
        if self.max_batch_tokens is not None and self.max_batch_tokens < 1:
            raise ValueError(f"--max-batch-tokens must be >= 1, got {self.max_batch_tokens}")
        self.max_memory = check_max_memory(self.max_memory)
        if not 0.0 <= self.max_skip_share <= 1.0:
            raise ValueError(f"--max-skip-share must lie in [0, 1], got {self.max_skip_share}")

    def identity(self) -> dict:
        """The ``CONTENT_KEYS`` settings (``build.json``); the draw settings count in sample mode only."""
        out = {k: getattr(self, k) for k in CONTENT_KEYS}
        if self.sparse != SparseMode.sample.value:
            out["sample_scheme"] = None  # no draws: the scheme does not change a top-k cache
            out["sample_logprobs"] = None
        return out


# Settings that change what a cache contains: a rerun against the same --out must match them.
CONTENT_KEYS = tuple(f.name for f in fields(BuildConfig) if f.metadata.get("identity"))
