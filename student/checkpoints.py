"""What a ``kd-train`` run writes into ``OUT`` and reads back on ``--resume``.

    OUT/train_config.json        the resolved TrainConfig (TrainConfig.to_dict)
    OUT/metrics.jsonl            one line per optimizer step
    OUT/checkpoints/step-N/      Accelerator.save_state (model, optimizer, scheduler, RNG),
                                 trainer_state.json (step, epoch, samples_seen, world_size),
                                 train_config.json, and COMPLETE, written last: a checkpoint
                                 without it is ignored
    OUT/ (final)                 the student as a from_pretrained-loadable LLaVA + processor,
                                 trainer_state.json; OUT/hidden_projector/ when LLaVADI's hidden
                                 alignment trained one (never inside the LLaVA)

A resumed run continues from the newest complete checkpoint with the same next samples and losses,
so it must match the checkpoint in every ``RESUME_KEYS`` setting.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from kd_cache.storage import atomic_write
from student.config import RESUME_KEYS, TrainConfig
from student.distill import PROJECTOR_DIR

CONFIG_NAME = "train_config.json"
STATE_NAME = "trainer_state.json"
METRICS_NAME = "metrics.jsonl"
COMPLETE_MARKER = "COMPLETE"


@dataclass
class Position:
    """Where a run stands: optimizer steps done, the epoch, and the samples of it already seen."""

    step: int = 0
    epoch: int = 0
    samples_seen: int = 0


def checkpoint_dirs(out: str | Path) -> list[Path]:
    """Complete checkpoints under ``OUT/checkpoints``, oldest first."""
    root = Path(out) / "checkpoints"
    found = []
    for p in root.glob("step-*") if root.is_dir() else []:
        if (p / COMPLETE_MARKER).is_file() and p.name[5:].isdigit():
            found.append((int(p.name[5:]), p))
    return [p for _, p in sorted(found)]


def write_json(path: Path, obj: dict) -> None:
    atomic_write(None, str(path), (json.dumps(obj, indent=2) + "\n").encode())


def save_checkpoint(accelerator, out: Path, step: int, data_state: dict, cfg: TrainConfig) -> Path:
    ckpt = out / "checkpoints" / f"step-{step}"
    if accelerator.is_main_process and ckpt.exists():
        shutil.rmtree(ckpt)  # a leftover without COMPLETE from a killed run
    accelerator.wait_for_everyone()
    accelerator.save_state(str(ckpt), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(ckpt / STATE_NAME, {"step": step, **data_state, "world_size": accelerator.num_processes})
        write_json(ckpt / CONFIG_NAME, cfg.to_dict())
        (ckpt / COMPLETE_MARKER).write_text("")  # last: a checkpoint without it is ignored
    accelerator.wait_for_everyone()
    return ckpt


def check_resume(saved: dict, cfg: TrainConfig, ckpt: Path) -> None:
    """Refuse to resume ``ckpt`` (its saved config) with different ``RESUME_KEYS`` settings."""
    now = cfg.to_dict()
    diffs = [k for k in RESUME_KEYS if saved.get(k) != now[k]]
    if diffs:
        lines = [f"  --{k.replace('_', '-')}: checkpoint has {saved.get(k)!r}, this run asks for {now[k]!r}"
                 for k in diffs]
        raise ValueError(f"--resume: {ckpt} was written with different settings:\n" + "\n".join(lines)
                         + "\nResume with the original settings, or train into another --out.")


def truncate_metrics(path: Path, step: int) -> None:
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


def resume(accelerator, cfg: TrainConfig) -> Position:
    """Load the newest complete checkpoint of ``cfg.out`` into the prepared objects; where it stood.

    Without a checkpoint the run starts from scratch (with a note). Only the main process prints.
    """
    out, main, world = Path(cfg.out), accelerator.is_main_process, accelerator.num_processes
    ckpts = checkpoint_dirs(out)
    if not ckpts:
        if main:
            print(f"kd-train: --resume given but {out / 'checkpoints'} holds no complete checkpoint; "
                  "starting from scratch", file=sys.stderr)
        return Position()
    ckpt = ckpts[-1]
    check_resume(json.loads((ckpt / CONFIG_NAME).read_text()), cfg, ckpt)
    accelerator.load_state(str(ckpt))
    state = json.loads((ckpt / STATE_NAME).read_text())
    at = Position(state["step"], state["epoch"], state["samples_seen"])
    if main:
        if state["world_size"] != world:
            print(f"kd-train: warning: {ckpt} was written by {state['world_size']} processes, this run has "
                  f"{world}: the global batch changes, so later losses will differ from the original run "
                  "(no sample is skipped or repeated)", file=sys.stderr)
        truncate_metrics(out / METRICS_NAME, at.step)
        print(f"kd-train: resuming from {ckpt} (step {at.step}, epoch {at.epoch}, {at.samples_seen} samples seen)",
              file=sys.stderr)
    return at


def split_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A ``DistillStudent`` state dict -> ``{"student": ..., "hidden_projector": ...}`` without the prefixes."""
    parts: dict[str, dict[str, torch.Tensor]] = {"student": {}, "hidden_projector": {}}
    for k, v in state_dict.items():
        head, _, rest = k.partition(".")
        if head not in parts:
            raise ValueError(f"unexpected parameter {k!r} in the trained model's state dict")
        parts[head][rest] = v
    return parts


def save_final(accelerator, wrapper, processor, cfg: TrainConfig, at: Position, teacher: str | None,
               trainable: dict | None = None) -> None:
    """The final model, as its own class, + processor in OUT, the hidden projector (if any) beside it;
    ``trainable`` (per part: parameters and trainable parameters) goes into trainer_state.json."""
    out = Path(cfg.out)
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(wrapper)  # every process takes part (FSDP gathers)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(wrapper)
        parts = split_state_dict(state_dict)
        unwrapped.student.save_pretrained(out, state_dict=parts["student"])
        processor.save_pretrained(out)
        projector = unwrapped.hidden_projector
        if projector is not None:
            projector.save_pretrained(
                out / PROJECTOR_DIR, state_dict=parts["hidden_projector"],
                extra={"hidden_loss": cfg.hidden_loss.value, "hidden_weight": cfg.hidden_weight,
                       "positions": list(cfg.positions), "step": at.step, "teacher": teacher, "cache": cfg.cache})
        elif (out / PROJECTOR_DIR).exists():
            shutil.rmtree(out / PROJECTOR_DIR)  # an earlier run's, not trained with this model
        write_json(out / CONFIG_NAME, cfg.to_dict())
        write_json(out / STATE_NAME, {"step": at.step, "epoch": at.epoch, "samples_seen": at.samples_seen,
                                      "world_size": accelerator.num_processes,
                                      "train_modules": list(cfg.train_modules), "trainable": trainable,
                                      "hidden_projector": PROJECTOR_DIR if projector is not None else None})
    accelerator.wait_for_everyone()
