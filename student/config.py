"""``TrainConfig``: every setting of a ``kd-train train`` run, written once.

Each field carries its ``--flag`` help in ``metadata["help"]`` (``cli.options`` builds the command
from it) and ``metadata["resume"]`` when a resumed run must match it (``RESUME_KEYS``; a ``path``
field is compared as an absolute path). The resume rule of each field: everything that decides which
samples a step sees, its loss, the update or the numerics is checked; memory and speed knobs
(``--chunk-size``, ``--head-memory-mb``, ``--num-workers``, ``--gradient-checkpointing``), where
checkpoints go (``--save-every``) and what is shown (``--progress``, ``--report-to``) may change. The
student and the cache are checked by content, not by path (``student.checkpoints.check_resume``).
``__post_init__`` validates and resolves the values (against the stage's recipe) with messages that
name the flag; ``to_dict`` is what ``OUT/train_config.json`` and every checkpoint hold.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from enum import Enum
from typing import Any

from kd_cache.schema import DEFAULT_KINDS, choice, parse_positions
from kd_cache.storage import STORAGE_OPTIONS_HELP, parse_storage_options
from student.alignment import AlignmentMode, VisualAlignment
from student.distill import LossSettings
from student.losses import Divergence, HiddenLoss, TailMode
from student.stages import RECIPES, Stage, parse_modules
from student.terms import LossWeights


class ReportTo(str, Enum):
    none = "none"
    tensorboard = "tensorboard"
    wandb = "wandb"


class Precision(str, Enum):
    auto = "auto"  # bf16 autocast on GPU, fp32 on CPU
    no = "no"
    bf16 = "bf16"


def _setting(default: Any = MISSING, *, help: str, resume: bool = False, **meta: Any) -> Any:
    """A field with its flag's help (``MISSING``: a required flag); ``resume``: a resumed run must match it."""
    return field(default=default, metadata={"help": help, "resume": resume, **meta})


@dataclass
class TrainConfig:
    """Resolved settings of one ``kd-train`` run."""

    stage: Stage = _setting(resume=True, help=(
        "dpt: projector only, caption cache, CE+MDist+RDist, lr 1e-3; sft: projector+LLM, CE only (teacher "
        "arrays ignored), lr 2e-5; dft: projector+LLM, CE+MDist+RDist, lr 2e-5."))
    student: str = _setting(help=(
        "Student model + processor to train: a directory or hub id of a supported image-text-to-text family "
        "(README: Supported model families), e.g. the OUT of kd-train init-student or of an earlier stage."))
    cache: str = _setting(help=(
        "Teacher cache: a directory or fsspec URL written by kd-cache build."))
    out: str = _setting(help=(
        "Output directory: metrics.jsonl, checkpoints/step-N/, and the final model + processor + "
        "train_config.json."))
    image_folder: str | None = _setting(None, resume=True, path=True, help=(
        "Where the cache's relative image paths resolve (default: the folder recorded in the cache)."))
    epochs: int = _setting(1, resume=True, help="Passes over the cache (ignored when --max-steps is given).")
    max_steps: int | None = _setting(None, resume=True, help=(
        "Stop after this many optimizer steps (cycling epochs as needed); overrides --epochs."))
    lr: float | None = _setting(None, resume=True, help=(
        "Peak learning rate (default: 1e-3 for dpt, 2e-5 for sft/dft)."))
    batch_size: int = _setting(1, resume=True, help="Samples per device per micro-batch.")
    grad_accum: int = _setting(1, resume=True, help=(
        "Micro-batches per optimizer step; losses are normalised over the whole step, so 4 x 2 equals a batch "
        "of 8."))
    warmup_ratio: float = _setting(0.03, resume=True, help=(
        "Fraction of the steps spent in linear warmup before cosine decay."))
    weight_decay: float = _setting(0.0, resume=True, help=(
        "AdamW weight decay (not applied to biases and norm scales)."))
    max_grad_norm: float = _setting(1.0, resume=True, help="Gradient clipping norm (0 disables clipping).")
    seed: int = _setting(0, resume=True, help="Seed for the data order and initialisation.")
    alpha: float = _setting(1.0, resume=True, help="Weight of MDist on response positions.")
    beta: float = _setting(1.0, resume=True, help="Weight of MDist on visual positions.")
    gamma: float = _setting(1.0, resume=True, help="Weight of RDist (visual-token relation matrices).")
    positions: str | tuple[str, ...] = _setting(",".join(DEFAULT_KINDS), resume=True, type=str, help=(
        "Position kinds that get MDist (and --hidden-weight), comma-separated subset of response,visual,prompt. "
        "response,visual is LLaVA-KD; response,visual,prompt is LLaVADI's all-token distillation (prompt = every "
        "other text position). The cache must hold them (kd-cache build --positions)."))
    delta: float = _setting(1.0, resume=True, help="Weight of MDist on prompt positions (with --positions ...,prompt).")
    hidden_weight: float = _setting(0.0, resume=True, help=(
        "LLaVADI hidden-state alignment weight (0: off). A fresh 2-layer MLP (Linear-GELU-Linear) maps the "
        "student's final hidden states at the --positions positions to the teacher's width; it trains with the "
        "student and is saved as OUT/hidden_projector/, not inside the model. Needs a cache built with "
        "kd-cache build --hidden."))
    hidden_loss: HiddenLoss = _setting(HiddenLoss.mse, resume=True, help=(
        "Hidden-state distance: mse (mean over features) or cosine (1 - cosine similarity)."))
    affinity_weight: float = _setting(0.0, resume=True, help=(
        "LLaVADI affinity weight (0: off): MSE between the student's and teacher's cosine-similarity matrices "
        "of final hidden states, visual x response positions, per sample. Needs kd-cache build --hidden."))
    zscore: bool = _setting(False, resume=True, help=(
        "Z-score logit standardisation before MDist. The cache holds only the teacher's top-k, so both sides "
        "are standardised over the k stored ids (teacher log-probs = logits up to a shift) and compared over "
        "those ids, without the tail bin: exact for a cache whose k covers the vocabulary, an approximation "
        "restricted to the top-k otherwise. Not for sampled caches."))
    divergence: Divergence = _setting(Divergence.fkl, resume=True, help=(
        "MDist divergence: forward KL, reverse KL, JSD(beta), total variation, skew KL KL(p||a p+(1-a) q), skew "
        "reverse KL KL(q||a q+(1-a) p) (a = --skew). Sampled caches allow fkl only."))
    jsd_beta: float = _setting(0.5, resume=True, help=(
        "beta of --divergence jsd (0 = forward KL, 1 = reverse KL, 0.5 = symmetric JSD)."))
    skew: float = _setting(0.1, resume=True, help=(
        "Mixing weight a of --divergence skl/srkl, in [0, 1) (0 = forward / reverse KL)."))
    temperature: float = _setting(1.0, resume=True, help=(
        "Divides the student's logits in MDist (> 0; with --zscore both standardised sides); the teacher's "
        "distribution is used as cached, CE is never scaled."))
    tail_mode: TailMode = _setting(TailMode.tail, resume=True, help=(
        "tail: compare the k teacher ids plus one 'everything else' bin; renorm: renormalise both sides over "
        "the k ids."))
    chunk_size: int = _setting(1024, help=(
        "Positions per chunk when applying the LM head (bounds the [chunk, vocab] logits kept in memory)."))
    head_memory_mb: int = _setting(1024, help=(
        "Keep the LM-head logits of a micro-batch for backward when they fit in this many MiB (faster); above "
        "it, each chunk's logits are recomputed in backward. 0: always recompute."))
    num_workers: int = _setting(0, help=(
        "DataLoader worker processes (read shards, load and process images, collate). With --grad-accum a "
        "multiple of it, each worker keeps reading the same part of every step (fewer chunk decodes)."))
    shuffle: bool = _setting(True, resume=True, help=(
        "Shuffle the samples each epoch (a pure function of seed and epoch)."))
    block_shards: int = _setting(4, resume=True, help="Shards shuffled together (more mixing, more shards open per worker).")
    save_every: int = _setting(0, help="Save a checkpoint every N optimizer steps (0: only the final model).")
    resume: bool = _setting(False, help=(
        "Continue from the newest complete checkpoint in OUT/checkpoints (same next samples, same losses)."))
    overwrite: bool = _setting(False, help=(
        "Replace the finished run (or the checkpoints of an earlier run) in OUT: its files are deleted once the "
        "new run's checks pass, before its first step. Without it such an OUT is refused."))
    report_to: ReportTo = _setting(ReportTo.none, help="Experiment tracker (metrics.jsonl is always written).")
    train_modules: str | tuple[str, ...] | None = _setting(None, resume=True, type=str | None, help=(
        "Override the trained parts, comma-separated subset of vision,projector,llm (default: the stage's)."))
    gradient_checkpointing: bool = _setting(False, help="Recompute LLM activations in backward to save memory.")
    lora_r: int = _setting(0, resume=True, help=(
        "LoRA rank (0: off). With R > 0 (sft and dft) the language model trains through peft LoRA adapters of "
        "rank R on its attention and MLP projections (the family's defaults, or --lora-target-modules), the "
        "projector trains in full, everything else is frozen; add vision to --train-modules to put adapters on "
        "the vision tower too. OUT then holds the adapter in peft's format (PeftModel.from_pretrained on the "
        "--student, or --student / kd-eval --model OUT directly); --merge also writes OUT/merged/."))
    lora_alpha: float | None = _setting(None, resume=True, help=(
        "LoRA scaling numerator: the adapter's update is scaled by alpha / r (default: 2 x --lora-r)."))
    lora_dropout: float = _setting(0.0, resume=True, help="Dropout on the LoRA adapters' input, in [0, 1).")
    lora_target_modules: str | tuple[str, ...] | None = _setting(None, resume=True, type=str | None, help=(
        "Comma-separated names (last component) of the nn.Linear layers that get adapters, in every adapted "
        "part (default: the family's, kd_cache/families.py: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,"
        "down_proj in the language model)."))
    merge: bool = _setting(False, help=(
        "With --lora-r: also write OUT/merged/, the adapters merged into the student, a checkpoint of the "
        "student's own class that loads with plain transformers."))
    load_in_4bit: bool = _setting(False, resume=True, help=(
        "QLoRA (with --lora-r, CUDA GPU only): the language model's frozen weights in bitsandbytes NF4 (bf16 "
        "compute, double quantisation); vision tower, projector and LM head stay in full precision. Needs "
        "pip install -e '.[quant]'."))
    mixed_precision: Precision = _setting(Precision.auto, resume=True, help="auto: bf16 autocast on GPU, fp32 on CPU.")
    alignment: AlignmentMode = _setting(AlignmentMode.auto, resume=True, help=(
        "How the student meets the cache. auto: the student's processor is tried on a few cached samples; "
        "when it gives the cached tokens, today's path (no alignment), else (another tokenizer, chat template "
        "or image expansion) each sample is re-encoded by the student's own processor and the teacher's "
        "distributions are aligned to it (answer tokens by text offsets, GOLD's loss over a vocabulary "
        "projection; visual tokens by image-region overlap). same: require the cached tokens. cross: always "
        "align."))
    visual_alignment: VisualAlignment = _setting(VisualAlignment.overlap, resume=True, help=(
        "How teacher visual tokens map onto a student's of another layout: overlap (each student token gets "
        "the teacher tokens covering its image region, weighted by the share they cover) or hungarian (a "
        "one-to-one matching by region IoU)."))
    any_template: bool = _setting(False, help=(
        "Allow a cache whose template is not the stage's (pretrain for dpt, chat for sft/dft)."))
    storage_options: dict[str, Any] = field(default_factory=dict, metadata={
        "help": STORAGE_OPTIONS_HELP, "parse": parse_storage_options})
    progress: bool = _setting(True, help="Show a progress bar.")

    def __post_init__(self):
        self.stage = choice(Stage, self.stage, "--stage")
        self.divergence = choice(Divergence, self.divergence, "--divergence")
        self.tail_mode = choice(TailMode, self.tail_mode, "--tail-mode")
        self.report_to = choice(ReportTo, self.report_to, "--report-to")
        self.hidden_loss = choice(HiddenLoss, self.hidden_loss, "--hidden-loss")
        self.mixed_precision = choice(Precision, self.mixed_precision, "--mixed-precision")
        self.alignment = choice(AlignmentMode, self.alignment, "--alignment")
        self.visual_alignment = choice(VisualAlignment, self.visual_alignment, "--visual-alignment")
        for flag, value in (("--student", self.student), ("--cache", self.cache), ("--out", self.out)):
            if not value:
                raise ValueError(f"{flag} is required")
        positive = {"--epochs": self.epochs, "--batch-size": self.batch_size, "--grad-accum": self.grad_accum,
                    "--chunk-size": self.chunk_size, "--block-shards": self.block_shards}
        for flag, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{flag} must be an integer >= 1, got {value!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--max-steps must be >= 1 (or left out to run --epochs), got {self.max_steps}")
        recipe = RECIPES[self.stage]
        self.lr = recipe.lr if self.lr is None else float(self.lr)
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"--warmup-ratio must lie in [0, 1), got {self.warmup_ratio}")
        for flag, value in (("--weight-decay", self.weight_decay), ("--alpha", self.alpha), ("--beta", self.beta),
                            ("--gamma", self.gamma), ("--max-grad-norm", self.max_grad_norm), ("--delta", self.delta),
                            ("--hidden-weight", self.hidden_weight), ("--affinity-weight", self.affinity_weight)):
            if value < 0:
                raise ValueError(f"{flag} must be >= 0, got {value}")
        self.positions = parse_positions(self.positions)
        if not recipe.distill:
            for flag, value in (("--hidden-weight", self.hidden_weight), ("--affinity-weight", self.affinity_weight)):
                if value > 0:
                    raise ValueError(f"{flag} {value}: the {self.stage.value} stage trains on CE only and ignores the "
                                     "teacher; use it with --stage dpt or dft")
        self.loss_settings()  # validates --divergence, --jsd-beta, --skew, --temperature
        for flag, value in (("--num-workers", self.num_workers), ("--save-every", self.save_every),
                            ("--head-memory-mb", self.head_memory_mb)):
            if value < 0:
                raise ValueError(f"{flag} must be >= 0, got {value}")
        self.train_modules = parse_modules(recipe.train_modules if self.train_modules is None else self.train_modules)
        self._check_lora()

    def _check_lora(self) -> None:
        """Validate and resolve the LoRA settings (``student.lora`` applies them)."""
        if not isinstance(self.lora_r, int) or self.lora_r < 0:
            raise ValueError(f"--lora-r must be an integer >= 0 (0: no adapters), got {self.lora_r!r}")
        if not self.lora_r:
            for flag, on in (("--merge", self.merge), ("--load-in-4bit", self.load_in_4bit),
                             ("--lora-target-modules", self.lora_target_modules is not None),
                             ("--lora-alpha", self.lora_alpha is not None), ("--lora-dropout", self.lora_dropout)):
                if on:
                    raise ValueError(f"{flag} needs LoRA adapters: pass --lora-r R (e.g. 16)")
            return
        if self.stage is Stage.DPT:
            raise ValueError("--lora-r: dpt trains the projector only, in full; LoRA adapters are for the language "
                             "model in --stage sft and dft")
        if not {"llm", "vision"} & set(self.train_modules):
            raise ValueError(f"--lora-r with --train-modules {','.join(self.train_modules)}: adapters go on the "
                             "language model and/or the vision tower; train llm or vision")
        self.lora_alpha = 2.0 * self.lora_r if self.lora_alpha is None else float(self.lora_alpha)
        if not self.lora_alpha > 0:
            raise ValueError(f"--lora-alpha must be > 0, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"--lora-dropout must lie in [0, 1), got {self.lora_dropout}")
        if self.lora_target_modules is not None:
            spec = self.lora_target_modules
            names = tuple(x.strip() for x in (spec.split(",") if isinstance(spec, str) else spec) if x.strip())
            if not names:
                raise ValueError(f"--lora-target-modules {spec!r}: expected comma-separated module names, e.g. "
                                 "q_proj,v_proj")
            self.lora_target_modules = names

    @property
    def distill(self) -> bool:
        return RECIPES[self.stage].distill

    @property
    def weights(self) -> LossWeights:
        return LossWeights(alpha=self.alpha, beta=self.beta, gamma=self.gamma, delta=self.delta,
                           hidden=self.hidden_weight, affinity=self.affinity_weight)

    def loss_settings(self) -> LossSettings:
        return LossSettings(distill=self.distill, divergence=self.divergence, mode=self.tail_mode,
                            jsd_beta=self.jsd_beta, skew=self.skew, temperature=self.temperature,
                            chunk_size=self.chunk_size, head_memory_mb=self.head_memory_mb,
                            kinds=tuple(self.positions), zscore=self.zscore,
                            hidden_loss=self.hidden_loss if self.hidden_weight > 0 else None,
                            affinity=self.affinity_weight > 0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready resolved settings; storage option values are redacted (they may be credentials)."""
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, Enum):
                d[k] = v.value
            elif isinstance(v, tuple):
                d[k] = ",".join(v)
        d["storage_options"] = {k: "<redacted>" for k in self.storage_options}
        return d


# Settings that decide which samples a step sees, its loss and its update: a resumed run must match them.
RESUME_KEYS = tuple(f.name for f in fields(TrainConfig) if f.metadata.get("resume"))
# Resume keys that name a local path: compared as absolute paths (a relative and an absolute spelling match).
PATH_KEYS = tuple(f.name for f in fields(TrainConfig) if f.metadata.get("path"))
