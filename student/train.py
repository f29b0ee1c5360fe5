"""``kd-train``: the student training loop for DPT, SFT and DFT, streaming a teacher cache.

The teacher is never imported or loaded here: everything the losses need comes from the cache.
``train(TrainConfig)`` is one explicit loop (no ``Trainer``) under ``accelerate``; its pieces:

* ``student.config.TrainConfig``: one typed config, validated in ``__post_init__`` (messages name
  the flag), resolved against the stage recipe and written into ``OUT`` and every checkpoint;
* ``student.cache_checks``: the options the cache was not built for are refused before any work;
* ``accumulate_gradients`` (here): forward/backward over the micro-batches of one optimizer step with
  every loss normalised by the *global* count of its valid positions (all micro-batches, all ranks),
  so grad-accum 4 x batch 2, batch 8, and 2 ranks x batch 4 give the same gradient; the terms and
  their metric names are the registry ``student.terms.TERMS``;
* ``student.checkpoints``: ``OUT/checkpoints/step-N/`` (model, optimizer, scheduler, RNG via
  ``Accelerator.save_state``; data position and config as JSON; a ``COMPLETE`` marker written last),
  resumption, and the final model.

Methods. The defaults are LLaVA-KD: MDist at response + visual positions, RDist, CE. LLaVADI's
strategies are options on the same loop: ``--positions response,visual,prompt`` (all-token logit
distillation, ``--delta`` weighs the prompt positions), ``--hidden-weight``/``--hidden-loss``
(final hidden states through a 2-layer MLP to the teacher's width, compared with the cached teacher
states; the MLP trains with the student, lives in its checkpoints and is saved beside the final model
as ``OUT/hidden_projector/``), ``--affinity-weight`` (visual x response similarity matrices) and
``--zscore`` (logit standardisation, see ``student.losses``). Every option is refused with a message
when the cache lacks what it needs.

Distributed runs: ``accelerate launch`` (or torchrun). DDP and FSDP2 are tested on 2 CPU processes over
gloo, each equal to one process (tests/test_train_ddp.py, tests/test_train_fsdp.py with
``docs/accelerate/fsdp2.yaml``: losses, final weights, resume from a sharded checkpoint, DPT's frozen
parts). Under FSDP the loss is computed inside the wrapped module's forward, every rank runs the same
modules in the same order (``DistillStudent``'s blank-image pass, inputs that require grad), and the
full state dict is gathered for the final save. DeepSpeed goes through the same code (its engine
stepped only at the accumulation boundary; set clipping in its config) but needs a GPU to run; see
SCALING.md.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from contextlib import nullcontext, suppress
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from kd_cache.lock import FolderLock
from kd_cache.reader import CorruptCacheError
from student.alignment import PairingError, detect_pairing
from student.cache_checks import check_cache_options
from student.checkpoints import (
    COMPLETE_MARKER,
    CONFIG_NAME,
    METRICS_NAME,
    OutputError,
    Position,
    check_free_space,
    check_output,
    check_target,
    clear_run,
    lock_output,
    reset_metrics,
    resume,
    save_checkpoint,
    save_final,
    write_json,
)
from student.config import ReportTo, TrainConfig
from student.distill import DistillStudent, LossSettings, batch_counts
from student.lora import check_quantization
from student.stages import RECIPES
from student.terms import TERM_NAMES, TERMS, LossTerm, LossWeights

# ------------------------------------------------------------------------------------------- one step


def term_active(term: LossTerm, settings: LossSettings) -> bool:
    """Whether ``settings`` switch ``term`` on (a term that is off reports None as its metric)."""
    if term.name == "ce":
        return True
    if not settings.distill:
        return False
    if term.kind is not None:
        return term.kind in settings.kinds
    if term.name == "hidden":
        return settings.hidden_loss is not None
    if term.name == "affinity":
        return settings.affinity
    return True  # rdist


def _to_device(batch: dict, device: torch.device) -> dict[str, Any]:
    """The batch's tensors on ``device``, the nested ``model_inputs`` dict included; other values dropped."""
    out: dict[str, Any] = {k: v.to(device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}
    if "model_inputs" in batch:
        out["model_inputs"] = {k: v.to(device, non_blocking=True) for k, v in batch["model_inputs"].items()}
    return out


def accumulate_gradients(accelerator, model, micro_batches: Sequence[dict], *, weights: LossWeights | None = None,
                         settings: LossSettings | None = None) -> dict[str, Any]:
    """Forward and backward over one optimizer step's micro-batches; returns the step's metrics.

    Each loss is a sum over its valid items divided by the step's *global* count of them (all
    micro-batches, all ranks), known from the data before the first backward. Data-parallel
    wrappers average gradients over ranks, so the loss is scaled by the world size to make the
    result the global mean. Metrics: ``loss`` and one per term of ``TERMS`` (None for a term that is
    off), the same global means, computed in this forward pass, before the update; ``positions``:
    the step's global count of items per term.

    ``settings`` defaults to the wrapped ``DistillStudent``'s, ``weights`` to ``LossWeights()``.
    """
    from accelerate.utils import DistributedType

    if settings is None:
        settings = accelerator.unwrap_model(model).settings
    w = (weights or LossWeights()).vector()
    device = accelerator.device
    world = accelerator.num_processes
    local = sum(batch_counts(b, settings) for b in micro_batches)
    counts = accelerator.reduce(local.to(device), reduction="sum") if world > 1 else local.to(device)
    denom = counts.to(torch.float32).clamp_min(1)  # an empty count gives 0, not NaN
    scale = torch.tensor(w, device=device) / denom * world

    totals = torch.zeros(len(TERMS), dtype=torch.float64, device=device)
    for i, mb in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            # DeepSpeed steps its engine inside backward at a sync boundary: only the last one.
            accelerator.gradient_state._set_sync_gradients(last)
        # Gradients are synchronised once per step, on the last micro-batch's backward.
        with nullcontext() if last else accelerator.no_sync(model):
            sums = model(_to_device(mb, device))
            parts = torch.stack([sums[t.sum_key].float() for t in TERMS])
            accelerator.backward((parts * scale).sum())
        totals += parts.detach().double()
    if world > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    means = (totals / counts.clamp_min(1)).tolist()
    metrics: dict[str, Any] = {"loss": sum(c * m for c, m in zip(w, means))}
    for t, mean in zip(TERMS, means):
        metrics[t.name] = mean if term_active(t, settings) else None
    metrics["positions"] = {t.name: int(n) for t, n in zip(TERMS, counts.tolist())}
    if any("cross_answer_positions" in mb for mb in micro_batches):
        # the share of the student's answer positions in one-to-one groups with the teacher's
        aligned = torch.tensor([float(sum(mb.get(k, 0) for mb in micro_batches))
                                for k in ("cross_one_to_one", "cross_answer_positions")], device=device)
        if world > 1:
            aligned = accelerator.reduce(aligned, reduction="sum")
        metrics["aligned_share"] = float(aligned[0] / aligned[1].clamp_min(1))
    return metrics


# ---------------------------------------------------------------------------------------------- setup


def enable_activation_checkpointing(model) -> None:
    """Recompute decoder activations in backward (non-reentrant: works with frozen embeddings)."""
    kwargs = {"use_reentrant": False}
    # transformers 5.23 renamed gradient_checkpointing_enable (kept as a deprecated alias until v6); the
    # transformers 5.0-5.22 that pyproject.toml accepts have only the old name.
    if hasattr(model, "activation_checkpointing_enable"):
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
    accelerator = Accelerator(
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
    _fsdp_on_cpu(accelerator)
    return accelerator


def _fsdp_on_cpu(accelerator) -> None:
    """Run an FSDP launch on CPU ranks as FSDP.

    ``accelerate launch`` with an FSDP config sets ``ACCELERATE_USE_FSDP``, but accelerate selects FSDP
    only on accelerator devices: on CPU processes it silently runs plain data parallelism (MULTI_CPU).
    PyTorch's FSDP2 (``fully_shard``) itself runs on CPU over gloo, so when the launch asked for FSDP2
    the state is switched to it here; ``prepare`` then shards the model as it would on GPUs. This is
    what lets the FSDP path run in CI (tests/test_train_fsdp.py).
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return
    plugin = FullyShardedDataParallelPlugin()  # reads the launch's FSDP_* settings
    if getattr(plugin, "fsdp_version", 1) != 2:
        raise ValueError("an FSDP launch on CPU needs FSDP2 (fsdp_version: 2 in the accelerate config): "
                         "FSDP1 needs a GPU")
    # Both shared states: a later AcceleratorState() copies PartialState's type over its own.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)  # no decay on biases and norm scales
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)



@dataclass
class _Run:
    """The prepared objects of one run."""

    accelerator: Any
    model: Any  # the DistillStudent, wrapped by accelerate
    optimizer: torch.optim.Optimizer
    scheduler: Any
    dataset: Any  # student.stream.StreamingKDDataset
    processor: Any
    settings: LossSettings
    total_steps: int
    teacher: str | None  # the cache's teacher, recorded beside a hidden projector
    trainable: dict[str, dict[str, int]]  # per part: parameters, trainable, tensors (stages.trainable_summary)
    identity: dict[str, str]  # content digests of the student and the cache, checked on --resume
    adapter: Any = None  # the PeftModel of a LoRA run (student.lora): what saves the adapter
    lock: FolderLock | None = None  # OUT's lock, on rank 0: checked before every save into OUT
    alignment: dict | None = None  # how the student meets the cache (``Pairing.record``), in trainer_state.json


def _load(cfg: TrainConfig):
    """Open the cache and the student and check they belong together; (cache, model, processor, hidden size)."""
    from kd_cache.reader import open_cache
    from student.model import CompatibilityError, check_compatibility, load_student
    from student.stream import load_sample_images

    cache = open_cache(cfg.cache, cfg.storage_options or None)
    manifest = cache.manifest
    # The whole cache, before step 1: a damaged shard stops the run here, not mid-epoch.
    checked = cache.check()
    if not checked.ok:
        lines = checked.lines()
        raise ValueError(f"--cache {cfg.cache}: the cache is damaged ({len(lines)} problem(s), shards "
                         f"{' '.join(checked.failing) or '-'}):\n  " + "\n  ".join(lines[:20])
                         + ("\n  ..." if len(lines) > 20 else "")
                         + f"\n`kd-cache verify {cfg.cache}` lists every problem; `kd-cache verify --repair {cfg.cache}` "
                         "rebuilds the shards it names")
    model, processor = load_student(cfg.student, load_in_4bit=cfg.load_in_4bit)
    if cfg.image_folder is None:
        cfg.image_folder = manifest.image_folder
    if len(cache) == 0:
        raise ValueError(f"--cache {cfg.cache}: the cache holds no samples")
    folder = cfg.image_folder
    template = None if cfg.any_template else RECIPES[cfg.stage].template
    try:
        pairing = detect_pairing(cache, processor, model.config, mode=cfg.alignment.value,
                                 visual=cfg.visual_alignment.value, load_images=lambda s: load_sample_images(s, folder))
    except PairingError as e:
        # what differs first (vocabulary, image token, ...), then why aligning cannot bridge it
        try:
            check_compatibility(manifest, model, processor, template=template)
        except CompatibilityError as c:
            raise CompatibilityError(f"{c}\nand kd-train cannot align the student to this cache: {e}") from e
        raise
    check_compatibility(manifest, model, processor, template=template, cross=pairing.cross)
    teacher_hidden_size = check_cache_options(cfg, manifest, pairing) if cfg.distill else None
    return cache, model, processor, teacher_hidden_size, pairing


def _prepare(cfg: TrainConfig, accelerator) -> _Run:
    """Student, optimizer, schedule and data stream, placed by ``accelerator``."""
    from transformers import get_cosine_schedule_with_warmup

    from student.lora import add_adapters, student_path
    from student.stages import describe_trainable, set_trainable, trainable_summary
    from student.stream import StreamingKDDataset, steps_per_epoch

    cache, model, processor, teacher_hidden_size, pairing = _load(cfg)
    adapter = None
    if cfg.lora_r:
        # peft injects the adapters into ``model`` in place; ``adapter`` (the PeftModel) only saves them.
        adapter = add_adapters(model, cfg.train_modules, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                               targets=cfg.lora_target_modules, base=student_path(cfg.student))
    else:
        set_trainable(model, cfg.train_modules)
    trainable = trainable_summary(model)
    if accelerator.is_main_process:
        how = f" (LoRA r={cfg.lora_r}, alpha={cfg.lora_alpha:g})" if cfg.lora_r else ""
        print(f"kd-train {cfg.stage.value}: {type(model).__name__}, trains {','.join(cfg.train_modules)}{how}\n"
              + describe_trainable(trainable) + f"\nalignment with the teacher cache: {pairing.describe()}", flush=True)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
    if getattr(accelerator, "is_fsdp2", False):
        # FSDP2 all-gathers a layer's weights again in backward, a collective every rank must join; with
        # the embeddings frozen (DPT) a text-only micro-batch would skip the language model's backward on
        # its rank and the other ranks would wait forever. Inputs that require grad keep backward in step.
        model.enable_input_require_grads()
    model.config.use_cache = False
    settings = cfg.loss_settings()
    wrapper = DistillStudent(model, settings, teacher_hidden_size=teacher_hidden_size,  # seeded by the caller
                             projection=pairing.projection)
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
                                 seed=cfg.seed, rank=rank, world_size=world, grad_accum=cfg.grad_accum,
                                 shuffle=cfg.shuffle, block_shards=cfg.block_shards, with_teacher=cfg.distill,
                                 kinds=settings.kinds, hidden_kinds=settings.kinds if settings.hidden_loss else (),
                                 affinity=settings.affinity, pairing=pairing)
    from kd_cache.fingerprint import config_hash, tokenizer_hash

    identity = {"cache": cache.content_digest(),
                "student": f"{config_hash(model.config)}-{tokenizer_hash(getattr(processor, 'tokenizer', processor))}"}
    return _Run(accelerator, wrapper, optimizer, scheduler, dataset, processor, settings, total_steps,
                cache.manifest.teacher.path, trainable, identity, adapter, alignment=pairing.record())


# ----------------------------------------------------------------------------------------------- loop


def _optimizer_step(cfg: TrainConfig, run: _Run, params: list, micro: list[dict]) -> dict[str, Any]:
    """Accumulate, clip, update; the step's metrics with the learning rate this update used."""
    m = accumulate_gradients(run.accelerator, run.model, micro, weights=cfg.weights, settings=run.settings)
    clip = cfg.max_grad_norm > 0
    grad_norm = run.accelerator.clip_grad_norm_(params, cfg.max_grad_norm) if clip else None
    m["lr"] = run.scheduler.get_last_lr()[0]
    m["grad_norm"] = None if grad_norm is None else float(grad_norm)  # None under DeepSpeed too
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return m


def _save_checkpoint(cfg: TrainConfig, run: _Run, at: Position) -> None:
    """``OUT/checkpoints/step-N`` of the step ``at`` reached, once rank 0 has checked that it still holds OUT."""
    if run.lock is not None:
        run.lock.check()
    save_checkpoint(run.accelerator, Path(cfg.out), at.step, {"epoch": at.epoch, "samples_seen": at.samples_seen},
                    cfg, identity=run.identity)


def _metrics_line(at: Position, m: dict[str, Any], n_samples: int, seconds: float) -> dict[str, Any]:
    """One line of ``metrics.jsonl``."""
    return {"step": at.step, "epoch": at.epoch, "samples_seen": at.samples_seen, "loss": m["loss"],
            **{name: m[name] for name in TERM_NAMES}, "lr": m["lr"], "grad_norm": m["grad_norm"],
            "samples": n_samples, "samples_per_s": n_samples / max(seconds, 1e-9), "positions": m["positions"],
            **({"aligned_share": m["aligned_share"]} if "aligned_share" in m else {})}


def _loop(cfg: TrainConfig, run: _Run, at: Position) -> dict[str, Any]:
    """Optimizer steps from ``at`` (advanced in place) to the end; returns the last step's metrics line."""
    from tqdm.auto import tqdm

    from student.stream import make_loader

    accelerator, out = run.accelerator, Path(cfg.out)
    main, world = accelerator.is_main_process, accelerator.num_processes
    params = list(run.model.parameters())  # all of them: FSDP clips through the wrapper only when they match
    bar = tqdm(total=run.total_steps, initial=at.step, disable=not (main and cfg.progress),
               desc=f"kd-train {cfg.stage.value}", unit="step", dynamic_ncols=True)
    last: dict[str, Any] = {}
    while at.step < run.total_steps:
        if cfg.max_steps is None and at.epoch >= cfg.epochs:
            break
        run.dataset.set_position(at.epoch, at.samples_seen)
        batches = iter(make_loader(run.dataset, cfg.num_workers))
        while at.step < run.total_steps:
            t0 = time.perf_counter()
            try:
                micro = list(islice(batches, cfg.grad_accum))  # a step never spans two epochs
            except CorruptCacheError as e:
                raise _stop_on_damage(cfg, run, at, e) from e
            if not micro:
                break
            m = _optimizer_step(cfg, run, params, micro)
            at.step += 1
            at.samples_seen = micro[-1]["data_position"]
            n_samples = sum(b["n_samples"] for b in micro) * world
            last = _metrics_line(at, m, n_samples, time.perf_counter() - t0)
            if main:
                try:
                    with (out / METRICS_NAME).open("a") as f:
                        f.write(json.dumps(last) + "\n")
                except OSError as e:
                    raise OutputError(f"--out {out}: cannot append to {out / METRICS_NAME} ({e.strerror or e})") from e
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}")
            if cfg.report_to is not ReportTo.none:
                accelerator.log({k: v for k, v in last.items() if isinstance(v, (int, float))}, step=at.step)
            if cfg.save_every and at.step % cfg.save_every == 0:
                _save_checkpoint(cfg, run, at)
        del batches
        if at.step < run.total_steps:
            at.epoch, at.samples_seen = at.epoch + 1, 0
    bar.close()
    return last


def _stop_on_damage(cfg: TrainConfig, run: _Run, at: Position, err: Exception) -> ValueError:
    """A chunk failed its checksum while a step's data was read (the up-front check does not decode
    chunks): nothing of it was used. A single process keeps the steps done so far as a checkpoint
    (the model is at a step boundary) so that the run resumes once the cache is repaired."""
    kept = ""
    if run.accelerator.num_processes == 1 and at.step > 0:
        out = Path(cfg.out)
        ckpt = out / "checkpoints" / f"step-{at.step}"
        if not (ckpt / COMPLETE_MARKER).is_file():
            _save_checkpoint(cfg, run, at)
        kept = f"; the {at.step} steps done are kept in {ckpt}: repair the cache and rerun with --resume"
    return ValueError(f"{err}{kept}")


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run one stage; returns ``{"step", "out", "metrics" (the last step's), "main_process"}``.

    Rank 0 holds OUT's lock (``OUT/train.lock``) for the whole run, as a build holds its cache's: a
    second run into the same OUT is refused while this one runs, before it looks into OUT. The other
    ranks of a launch share it and wait for rank 0 to hold it before they look into OUT themselves."""
    out = Path(cfg.out)
    check_target(cfg)  # --out is the student: refused before the lock file is written there
    check_quantization(cfg.load_in_4bit)  # QLoRA without a GPU: refused before any work
    accelerator = _accelerator(cfg)
    main = accelerator.is_main_process
    created, lock = main and not out.exists(), None
    try:
        if main:
            lock = lock_output(out, accelerator.num_processes)
        accelerator.wait_for_everyone()
        return _train(cfg, accelerator, lock)
    finally:
        if lock is not None:
            lock.release()
        if created:
            with suppress(OSError):  # not empty: the run wrote into it
                out.rmdir()  # a run refused before it wrote anything leaves no empty OUT behind


def _train(cfg: TrainConfig, accelerator, lock: FolderLock | None) -> dict[str, Any]:
    """``train`` once OUT is held: the checks of OUT, the run, the final save."""
    from accelerate.utils import set_seed

    out = Path(cfg.out)
    check_output(cfg)  # a finished run, an unwritable OUT: refused before any work
    main = accelerator.is_main_process
    set_seed(cfg.seed)  # before the hidden projector is created
    run = _prepare(cfg, accelerator)
    run.lock = lock
    at = resume(accelerator, cfg, run.identity) if cfg.resume else Position()
    check_free_space(out, accelerator.unwrap_model(run.model), cfg, at, run.total_steps)
    accelerator.wait_for_everyone()
    if main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            if cfg.overwrite:
                clear_run(out)  # every check passed: the earlier run goes now, model first
            write_json(out / CONFIG_NAME, cfg.to_dict())
            if at.step == 0:
                reset_metrics(out / METRICS_NAME)
        except OSError as e:
            raise OutputError(f"--out {out}: cannot write there ({e.strerror or e})") from e
    tracking = cfg.report_to is not ReportTo.none
    if tracking:
        accelerator.init_trackers("kd-train", config={k: v for k, v in cfg.to_dict().items()
                                                     if isinstance(v, (int, float, str, bool))})
    last = _loop(cfg, run, at)
    if lock is not None:
        lock.check()  # the final save replaces OUT's model: only while this run still holds OUT
    save_final(accelerator, run.model, run.processor, cfg, at, run.teacher, run.trainable, run.identity,
               adapter=run.adapter, alignment=run.alignment)
    if tracking:
        accelerator.end_training()
    return {"step": at.step, "out": str(out), "metrics": last, "main_process": main}
