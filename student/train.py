"""``kd-train``: the student training loop for DPT, SFT and DFT, streaming a teacher cache.

The teacher is never imported or loaded here: everything the losses need comes from the cache.
``train(TrainConfig)`` is one explicit loop (no ``Trainer``) under ``accelerate``; its pieces:

* ``TrainConfig``: one typed config, validated in ``__post_init__`` (messages name the flag), resolved
  against the stage recipe and written into ``OUT`` and every checkpoint;
* ``accumulate_gradients``: forward/backward over the micro-batches of one optimizer step with every
  loss normalised by the *global* count of its valid positions (all micro-batches, all ranks), so
  grad-accum 4 x batch 2, batch 8, and 2 ranks x batch 4 give the same gradient;
* checkpoints ``OUT/checkpoints/step-N/`` (model, optimizer, scheduler, RNG via
  ``Accelerator.save_state``; data position and config as JSON; a ``COMPLETE`` marker written last).

Methods. The defaults are LLaVA-KD: MDist at response + visual positions, RDist, CE. LLaVADI's
strategies are options on the same loop: ``--positions response,visual,prompt`` (all-token logit
distillation, ``--delta`` weighs the prompt positions), ``--hidden-weight``/``--hidden-loss``
(final hidden states through a 2-layer MLP to the teacher's width, compared with the cached teacher
states; the MLP trains with the student, lives in its checkpoints and is saved beside the final model
as ``OUT/hidden_projector/``), ``--affinity-weight`` (visual x response similarity matrices) and
``--zscore`` (logit standardisation, see ``student.losses``). Every option is refused with a message
when the cache lacks what it needs.

Distributed runs: ``accelerate launch`` (or torchrun). DDP is tested (2 CPU processes over gloo equal
one process). FSDP and DeepSpeed go through the same code (loss computed inside the wrapped module's
forward, full state dict gathered for the final save, DeepSpeed's engine stepped only at the
accumulation boundary) but have not been run in this repository's tests: no GPU there. With FSDP
and a partly frozen model use ``use_orig_params``; with DeepSpeed set clipping in its config.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from enum import Enum
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from kd_cache.schema import Manifest
from student.distill import (
    COUNT_KEYS,
    DEFAULT_KINDS,
    PROJECTOR_DIR,
    SUM_KEYS,
    DistillStudent,
    LossSettings,
    LossWeights,
    batch_counts,
)
from student.stages import RECIPES, Stage, parse_modules

CONFIG_NAME = "train_config.json"
STATE_NAME = "trainer_state.json"
METRICS_NAME = "metrics.jsonl"
COMPLETE_MARKER = "COMPLETE"


class Divergence(str, Enum):
    fkl = "fkl"
    rkl = "rkl"
    jsd = "jsd"
    tvd = "tvd"
    skl = "skl"


class KDMode(str, Enum):
    tail = "tail"
    renorm = "renorm"


class HiddenLoss(str, Enum):
    mse = "mse"
    cosine = "cosine"


class ReportTo(str, Enum):
    none = "none"
    tensorboard = "tensorboard"
    wandb = "wandb"


class Precision(str, Enum):
    auto = "auto"  # bf16 autocast on GPU, fp32 on CPU
    no = "no"
    bf16 = "bf16"


# Settings that decide which samples a step sees and what its loss is: a resumed run must match them.
RESUME_KEYS = ("stage", "cache", "batch_size", "grad_accum", "seed", "shuffle", "block_shards", "lr",
               "warmup_ratio", "weight_decay", "alpha", "beta", "gamma", "divergence", "jsd_beta",
               "sparse_mode", "train_modules", "epochs", "max_steps", "positions", "delta", "hidden_weight",
               "hidden_loss", "affinity_weight", "zscore")


@dataclass
class TrainConfig:
    """Resolved settings of one ``kd-train`` run (see ``cli/kd_train_cli.py`` for each flag's help)."""

    stage: Stage
    student: str
    cache: str
    out: str
    image_folder: str | None = None
    epochs: int = 1
    max_steps: int | None = None
    lr: float | None = None  # None: the stage's default
    batch_size: int = 1
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 1.0
    divergence: Divergence = Divergence.fkl
    jsd_beta: float = 0.5
    sparse_mode: KDMode = KDMode.tail
    positions: str | tuple[str, ...] = ",".join(DEFAULT_KINDS)  # MDist (and hidden) position kinds
    delta: float = 1.0  # MDist weight at prompt positions
    hidden_weight: float = 0.0  # LLaVADI hidden-state alignment (0: off)
    hidden_loss: HiddenLoss = HiddenLoss.mse
    affinity_weight: float = 0.0  # LLaVADI affinity (0: off)
    zscore: bool = False
    chunk_size: int = 1024
    head_memory_mb: int = 1024
    num_workers: int = 0
    shuffle: bool = True
    block_shards: int = 4
    save_every: int = 0
    resume: bool = False
    report_to: ReportTo = ReportTo.none
    train_modules: str | tuple[str, ...] | None = None  # None: the stage's default
    gradient_checkpointing: bool = False
    mixed_precision: Precision = Precision.auto
    any_template: bool = False
    progress: bool = True
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        def enum(value, cls, flag):
            try:
                return cls(value.value if isinstance(value, Enum) else value)
            except ValueError:
                choices = ", ".join(m.value for m in cls)
                raise ValueError(f"{flag} {value!r}: expected one of {choices}") from None

        self.stage = enum(self.stage, Stage, "--stage")
        self.divergence = enum(self.divergence, Divergence, "--divergence")
        self.sparse_mode = enum(self.sparse_mode, KDMode, "--sparse-mode")
        self.report_to = enum(self.report_to, ReportTo, "--report-to")
        self.hidden_loss = enum(self.hidden_loss, HiddenLoss, "--hidden-loss")
        self.mixed_precision = enum(self.mixed_precision, Precision, "--mixed-precision")
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
        from kd_cache.schema import parse_positions  # raises naming --positions

        self.positions = parse_positions(self.positions)
        if not recipe.distill:
            for flag, value in (("--hidden-weight", self.hidden_weight), ("--affinity-weight", self.affinity_weight)):
                if value > 0:
                    raise ValueError(f"{flag} {value}: the {self.stage.value} stage trains on CE only and ignores the "
                                     "teacher; use it with --stage dpt or dft")
        if not 0.0 <= self.jsd_beta <= 1.0:
            raise ValueError(f"--jsd-beta must lie in [0, 1] (0 = forward KL, 1 = reverse KL), got {self.jsd_beta}")
        for flag, value in (("--num-workers", self.num_workers), ("--save-every", self.save_every),
                            ("--head-memory-mb", self.head_memory_mb)):
            if value < 0:
                raise ValueError(f"{flag} must be >= 0, got {value}")
        self.train_modules = parse_modules(recipe.train_modules if self.train_modules is None else self.train_modules)

    @property
    def distill(self) -> bool:
        return RECIPES[self.stage].distill

    @property
    def weights(self) -> LossWeights:
        return LossWeights(alpha=self.alpha, beta=self.beta, gamma=self.gamma, delta=self.delta,
                           hidden=self.hidden_weight, affinity=self.affinity_weight)

    def loss_settings(self) -> LossSettings:
        return LossSettings(distill=self.distill, divergence=self.divergence.value, mode=self.sparse_mode.value,
                            jsd_beta=self.jsd_beta, chunk_size=self.chunk_size, head_memory_mb=self.head_memory_mb,
                            kinds=tuple(self.positions),
                            zscore=self.zscore, hidden_loss=self.hidden_loss.value if self.hidden_weight > 0 else None,
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


# ------------------------------------------------------------------------------------------- one step


def _to_device(batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}


def accumulate_gradients(accelerator, model, micro_batches: Sequence[dict], *, distill: bool | None = None,
                         weights: LossWeights | Sequence[float] | None = None,
                         settings: LossSettings | None = None) -> dict[str, float]:
    """Forward and backward over one optimizer step's micro-batches; returns the step's metrics.

    Each loss is a sum over its valid items divided by the step's *global* count of them (all
    micro-batches, all ranks), known from the data before the first backward. Data-parallel
    wrappers average gradients over ranks, so the loss is scaled by the world size to make the
    result the global mean. Metrics (``loss``, ``ce``, ``mdist_response``, ``mdist_visual``,
    ``mdist_prompt``, ``rdist``, ``hidden``, ``affinity``; None for a term that is off) are the same
    global means, computed in this forward pass, before the update.

    ``weights``: a ``LossWeights`` or a tuple in its field order (alpha, beta, gamma, delta, hidden,
    affinity); ``settings`` defaults to the wrapped ``DistillStudent``'s, ``distill`` to its ``distill``.
    """
    from accelerate.utils import DistributedType

    if settings is None:
        settings = accelerator.unwrap_model(model).settings
    if distill is None:
        distill = settings.distill
    w = weights if isinstance(weights, LossWeights) else LossWeights(*(weights or ()))
    device = accelerator.device
    world = accelerator.num_processes
    local = sum(batch_counts(b, settings) for b in micro_batches)
    counts = accelerator.reduce(local.to(device), reduction="sum") if world > 1 else local.to(device)
    denom = counts.to(torch.float32).clamp_min(1)  # an empty count gives 0, not NaN
    scale = torch.tensor(w.vector(), device=device) / denom * world

    totals = torch.zeros(len(SUM_KEYS), dtype=torch.float64, device=device)
    for i, mb in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            # DeepSpeed steps its engine inside backward at a sync boundary: only the last one.
            accelerator.gradient_state._set_sync_gradients(last)
        # Gradients are synchronised once per step, on the last micro-batch's backward.
        with nullcontext() if last else accelerator.no_sync(model):
            sums = model(_to_device(mb, device))
            parts = torch.stack([sums[k].float() for k in SUM_KEYS])
            accelerator.backward((parts * scale).sum())
        totals += parts.detach().double()
    if world > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    means = dict(zip(SUM_KEYS, (totals / counts.clamp_min(1)).tolist()))
    n = counts.tolist()
    active = {
        "kd_response_sum": distill and "response" in settings.kinds,
        "kd_visual_sum": distill and "visual" in settings.kinds,
        "kd_prompt_sum": distill and "prompt" in settings.kinds,
        "rdist_sum": distill,
        "hidden_sum": distill and settings.hidden_loss is not None,
        "affinity_sum": distill and settings.affinity,
    }
    names = {"ce_sum": "ce", "kd_response_sum": "mdist_response", "kd_visual_sum": "mdist_visual",
             "kd_prompt_sum": "mdist_prompt", "rdist_sum": "rdist", "hidden_sum": "hidden", "affinity_sum": "affinity"}
    metrics: dict[str, Any] = {"loss": sum(c * means[k] for c, k in zip(w.vector(), SUM_KEYS))}
    for key, name in names.items():
        metrics[name] = means[key] if active.get(key, True) else None
    metrics["positions"] = {k.removesuffix("_count"): int(v) for k, v in zip(COUNT_KEYS, n)}
    return metrics


# -------------------------------------------------------------------------------------- checkpoints


def checkpoint_dirs(out: str | Path) -> list[Path]:
    """Complete checkpoints under ``OUT/checkpoints``, oldest first."""
    root = Path(out) / "checkpoints"
    found = []
    for p in root.glob("step-*") if root.is_dir() else []:
        if (p / COMPLETE_MARKER).is_file() and p.name[5:].isdigit():
            found.append((int(p.name[5:]), p))
    return [p for _, p in sorted(found)]


def _write_json(path: Path, obj: dict) -> None:
    from kd_cache.storage import atomic_write

    atomic_write(None, str(path), (json.dumps(obj, indent=2) + "\n").encode())


def save_checkpoint(accelerator, out: Path, step: int, data_state: dict, cfg: TrainConfig) -> Path:
    ckpt = out / "checkpoints" / f"step-{step}"
    if accelerator.is_main_process and ckpt.exists():
        shutil.rmtree(ckpt)  # a leftover without COMPLETE from a killed run
    accelerator.wait_for_everyone()
    accelerator.save_state(str(ckpt), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_json(ckpt / STATE_NAME, {"step": step, **data_state, "world_size": accelerator.num_processes})
        _write_json(ckpt / CONFIG_NAME, cfg.to_dict())
        (ckpt / COMPLETE_MARKER).write_text("")  # last: a checkpoint without it is ignored
    accelerator.wait_for_everyone()
    return ckpt


def _field_defaults() -> dict[str, Any]:
    from dataclasses import MISSING, fields

    out = {}
    for f in fields(TrainConfig):
        if f.default is not MISSING:
            out[f.name] = f.default.value if isinstance(f.default, Enum) else f.default
    return out


def _check_resume(saved: dict, cfg: TrainConfig, ckpt: Path) -> None:
    now = cfg.to_dict()
    defaults = _field_defaults()  # a checkpoint from before a setting existed ran with its default
    saved = {k: saved.get(k, defaults.get(k)) for k in RESUME_KEYS}
    diffs = [k for k in RESUME_KEYS if saved[k] != now.get(k)]
    if diffs:
        lines = [f"  --{k.replace('_', '-')}: checkpoint has {saved[k]!r}, this run asks for {now.get(k)!r}"
                 for k in diffs]
        raise ValueError(f"--resume: {ckpt} was written with different settings:\n" + "\n".join(lines)
                         + "\nResume with the original settings, or train into another --out.")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint we resume from (the run died past it)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # a line cut short by the kill
    path.write_text("".join(line + "\n" for line in keep))


# -------------------------------------------------------------------------------------------- train


def enable_activation_checkpointing(model) -> None:
    """Recompute decoder activations in backward (non-reentrant: works with frozen embeddings)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    precision = cfg.mixed_precision.value
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "no"
    log_with = None if cfg.report_to is ReportTo.none else cfg.report_to.value
    if log_with == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            try:
                import tensorboardX  # noqa: F401
            except ImportError:
                raise ValueError("--report-to tensorboard needs the tensorboard package: pip install tensorboard") \
                    from None
    if log_with == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ValueError("--report-to wandb needs the wandb package: pip install wandb") from None
    return Accelerator(
        # Without a GPU run on CPU, data-parallel over gloo when launched with several processes
        # (`accelerate launch --multi_gpu --num_processes N` or torchrun set the rank environment).
        cpu=not torch.cuda.is_available(),
        mixed_precision=precision,
        log_with=log_with,
        project_dir=cfg.out,
        # The loop steps the scheduler once per optimizer step itself; accelerate would otherwise
        # step it once per process.
        step_scheduler_with_optimizer=False,
        # Every trainable parameter gets a gradient on every rank (see DistillStudent), so DDP can
        # skip its per-step search for unused parameters.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)  # no decay on biases and norm scales
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)


def split_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A ``DistillStudent`` state dict -> ``{"student": ..., "hidden_projector": ...}`` without the prefixes."""
    parts: dict[str, dict[str, torch.Tensor]] = {"student": {}, "hidden_projector": {}}
    for k, v in state_dict.items():
        head, _, rest = k.partition(".")
        if head not in parts:
            raise ValueError(f"unexpected parameter {k!r} in the trained model's state dict")
        parts[head][rest] = v
    return parts


def check_cache_options(cfg: TrainConfig, manifest: Manifest) -> int | None:
    """Refuse the options the cache cannot serve; returns the teacher's hidden size when hidden states are used.

    ``manifest.positions`` lists the cached position kinds; ``manifest.hidden`` says whether teacher
    hidden states were stored (``--hidden``).
    """
    cached = list(manifest.positions)
    missing = [k for k in cfg.positions if k not in cached]
    if missing:
        want = ",".join(k for k in ("response", "visual", "prompt") if k in cached or k in missing)
        raise ValueError(f"--positions {','.join(cfg.positions)}: the cache {cfg.cache} holds teacher distributions "
                         f"at {','.join(cached)} positions only, not {','.join(missing)}; rebuild it with "
                         f"`kd-cache build --positions {want}` or leave {','.join(missing)} out of --positions")
    if cfg.zscore and manifest.sparse.mode == "sample":
        raise ValueError("--zscore: the cache holds sampled teacher tokens (sparse mode 'sample'); standardising "
                         "needs the teacher's log-probs on a fixed set of ids: rebuild with kd-cache build --sparse topk")
    needs = [(f, v) for f, v in (("--hidden-weight", cfg.hidden_weight), ("--affinity-weight", cfg.affinity_weight))
             if v > 0]
    if not needs:
        return None
    flag, value = needs[0]
    if not manifest.hidden.stored:
        raise ValueError(f"{flag} {value}: needs the teacher's final hidden states, but the cache {cfg.cache} was "
                         "built without them: rebuild the cache with kd-cache build --hidden")
    if cfg.affinity_weight > 0 and not {"response", "visual"} <= set(cached):
        raise ValueError(f"--affinity-weight {cfg.affinity_weight}: needs the teacher's hidden states at response "
                         f"and visual positions, the cache {cfg.cache} holds {','.join(cached)}: rebuild it with "
                         "kd-cache build --hidden --positions response,visual")
    return int(manifest.hidden.size)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run one stage; returns ``{"step", "out", "metrics" (the last step's), "main_process"}``."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    from kd_cache.reader import open_cache
    from student.model import check_compatibility, load_student
    from student.stages import set_trainable
    from student.stream import StreamingKDDataset, make_loader, steps_per_epoch

    out = Path(cfg.out)
    if not cfg.resume and checkpoint_dirs(out):
        raise ValueError(f"--out {out} already holds checkpoints of an earlier run ({checkpoint_dirs(out)[-1].name}): "
                         "pass --resume to continue it, or choose another --out")
    accelerator = _accelerator(cfg)
    main = accelerator.is_main_process
    set_seed(cfg.seed)

    # --- cache and student: check they belong together before any work ----------------------------
    cache = open_cache(cfg.cache, cfg.storage_options or None)
    manifest = cache.manifest
    model, processor = load_student(cfg.student)
    recipe = RECIPES[cfg.stage]
    check_compatibility(manifest, model, processor, template=None if cfg.any_template else recipe.template)
    if cfg.distill and manifest.sparse.mode == "sample" and cfg.divergence is not Divergence.fkl:
        raise ValueError(f"--divergence {cfg.divergence.value}: the cache holds sampled teacher tokens "
                         "(sparse mode 'sample'), for which only forward KL is unbiased; use --divergence fkl")
    if cfg.image_folder is None:
        cfg.image_folder = manifest.image_folder
    if len(cache) == 0:
        raise ValueError(f"--cache {cfg.cache}: the cache holds no samples")
    teacher_hidden_size = check_cache_options(cfg, manifest) if cfg.distill else None

    set_trainable(model, cfg.train_modules)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
    model.config.use_cache = False
    settings = cfg.loss_settings()
    wrapper = DistillStudent(model, settings, teacher_hidden_size=teacher_hidden_size)  # seeded by set_seed above
    wrapper.train()

    world, rank = accelerator.num_processes, accelerator.process_index
    per_epoch = steps_per_epoch(len(cache), world, cfg.batch_size, cfg.grad_accum)
    if per_epoch == 0:
        raise ValueError(f"--cache {cfg.cache}: {len(cache)} samples cannot feed {world} processes")
    total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * per_epoch
    optimizer = _optimizer(wrapper, cfg)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(cfg.warmup_ratio * total_steps), total_steps)
    ds_plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if ds_plugin is not None:  # no prepared DataLoader to read the micro-batch size from
        ds_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
    wrapper, optimizer = accelerator.prepare(wrapper, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    dataset = StreamingKDDataset(cache, processor, image_folder=cfg.image_folder, batch_size=cfg.batch_size,
                                 seed=cfg.seed, rank=rank, world_size=world, shuffle=cfg.shuffle,
                                 block_shards=cfg.block_shards, with_teacher=cfg.distill, kinds=settings.kinds,
                                 hidden_kinds=settings.kinds if settings.hidden_loss else (),
                                 affinity=settings.affinity)

    # --- resume -----------------------------------------------------------------------------------
    step, epoch, seen = 0, 0, 0
    metrics_path = out / METRICS_NAME
    if cfg.resume:
        ckpts = checkpoint_dirs(out)
        if ckpts:
            ckpt = ckpts[-1]
            _check_resume(json.loads((ckpt / CONFIG_NAME).read_text()), cfg, ckpt)
            accelerator.load_state(str(ckpt))
            state = json.loads((ckpt / STATE_NAME).read_text())
            step, epoch, seen = state["step"], state["epoch"], state["samples_seen"]
            if main and state.get("world_size", world) != world:
                print(f"kd-train: warning: {ckpt} was written by {state['world_size']} processes, this run has "
                      f"{world}: the global batch changes, so later losses will differ from the original run "
                      "(no sample is skipped or repeated)", file=sys.stderr)
            if main:
                _truncate_metrics(metrics_path, step)
                print(f"kd-train: resuming from {ckpt} (step {step}, epoch {epoch}, {seen} samples seen)",
                      file=sys.stderr)
        elif main:
            print(f"kd-train: --resume given but {out / 'checkpoints'} holds no complete checkpoint; "
                  "starting from scratch", file=sys.stderr)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / CONFIG_NAME, cfg.to_dict())
        if step == 0:
            metrics_path.write_text("")
    if cfg.report_to is not ReportTo.none:
        accelerator.init_trackers("kd-train", config={k: v for k, v in cfg.to_dict().items()
                                                     if isinstance(v, (int, float, str, bool))})

    # --- the loop -----------------------------------------------------------------------------------
    params = list(wrapper.parameters())  # all of them: FSDP clips through the wrapper only when they match
    weights = cfg.weights
    bar = tqdm(total=total_steps, initial=step, disable=not (main and cfg.progress), desc=f"kd-train {cfg.stage.value}",
               unit="step", dynamic_ncols=True)
    last: dict[str, Any] = {}
    while step < total_steps:
        if cfg.max_steps is None and epoch >= cfg.epochs:
            break
        dataset.set_position(epoch, seen)
        batches = iter(make_loader(dataset, cfg.num_workers))
        while step < total_steps:
            t0 = time.perf_counter()
            micro = list(islice(batches, cfg.grad_accum))  # a step never spans two epochs
            if not micro:
                break
            m = accumulate_gradients(accelerator, wrapper, micro, distill=cfg.distill, weights=weights,
                                     settings=settings)
            grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
            lr = scheduler.get_last_lr()[0]  # the rate this update uses
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            seen = micro[-1]["data_position"]
            n_samples = sum(b["n_samples"] for b in micro) * world
            last = {"step": step, "epoch": epoch, "samples_seen": seen, "loss": m["loss"], "ce": m["ce"],
                    "mdist_response": m["mdist_response"], "mdist_visual": m["mdist_visual"],
                    "mdist_prompt": m["mdist_prompt"], "rdist": m["rdist"], "hidden": m["hidden"],
                    "affinity": m["affinity"], "lr": lr,
                    "grad_norm": None if grad_norm is None else float(grad_norm),  # None under DeepSpeed
                    "samples": n_samples, "samples_per_s": n_samples / max(time.perf_counter() - t0, 1e-9),
                    "positions": m["positions"]}
            if main:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(last) + "\n")
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{lr:.2e}")
            if cfg.report_to is not ReportTo.none:
                accelerator.log({k: v for k, v in last.items() if isinstance(v, (int, float))}, step=step)
            if cfg.save_every and step % cfg.save_every == 0:
                save_checkpoint(accelerator, out, step, {"epoch": epoch, "samples_seen": seen}, cfg)
        del batches
        if step < total_steps:
            epoch, seen = epoch + 1, 0
    bar.close()

    # --- final model: plain from_pretrained-loadable LLaVA + processor + resolved config -----------------
    # The hidden projector (LLaVADI) goes beside it, in OUT/hidden_projector/, never into the LLaVA.
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(wrapper)
    if main:
        unwrapped = accelerator.unwrap_model(wrapper)
        parts = split_state_dict(state_dict)
        unwrapped.student.save_pretrained(out, state_dict=parts["student"])
        processor.save_pretrained(out)
        if unwrapped.hidden_projector is not None:
            unwrapped.hidden_projector.save_pretrained(
                out / PROJECTOR_DIR, state_dict=parts["hidden_projector"],
                extra={"hidden_loss": cfg.hidden_loss.value, "hidden_weight": cfg.hidden_weight,
                       "positions": list(cfg.positions), "step": step,
                       "teacher": manifest.teacher.path, "cache": cfg.cache})
        elif (out / PROJECTOR_DIR).exists():
            shutil.rmtree(out / PROJECTOR_DIR)  # an earlier run's, not trained with this model
        _write_json(out / CONFIG_NAME, cfg.to_dict())
        _write_json(out / STATE_NAME, {"step": step, "epoch": epoch, "samples_seen": seen,
                                       "world_size": world, "train_modules": list(cfg.train_modules),
                                       "hidden_projector": PROJECTOR_DIR if unwrapped.hidden_projector is not None
                                       else None})
    accelerator.wait_for_everyone()
    if cfg.report_to is not ReportTo.none:
        accelerator.end_training()
    return {"step": step, "out": str(out), "metrics": last, "main_process": main}
