"""What a ``kd-train`` run writes into ``OUT`` and reads back on ``--resume``.

    OUT/train.lock               present while a run trains into OUT: its holder (``lock_output``)
    OUT/train_config.json        the resolved TrainConfig (TrainConfig.to_dict)
    OUT/metrics.jsonl            one line per optimizer step
    OUT/checkpoints/step-N/      Accelerator.save_state (model, optimizer, scheduler, RNG),
                                 trainer_state.json (step, epoch, samples_seen, world_size),
                                 train_config.json, and COMPLETE, written last: a checkpoint
                                 without it is ignored
    OUT/ (final)                 the student as a from_pretrained-loadable model of its own class
                                 + processor, trainer_state.json (written last: a finished run has it);
                                 OUT/hidden_projector/ when LLaVADI's hidden alignment trained one
                                 (never inside the model). A LoRA run (``--lora-r``) writes the
                                 adapter in peft's format instead of the model (adapter_config.json,
                                 adapter_model.safetensors) and, with ``--merge``, OUT/merged/: the
                                 merged student + processor (``student.lora``)

A resumed run continues from the newest complete checkpoint with the same next samples and losses,
so it must match the checkpoint in every ``RESUME_KEYS`` setting, and train on the same content: the
student's architecture and tokenizer and the cache's shards (``identity``), wherever they are now.

Protection of ``OUT``: it may not be or hold the ``--student`` (``check_target``, before anything is
written there). Then one run at a time trains into it: rank 0 holds ``OUT/train.lock`` (``lock_output``,
a ``kd_cache.lock.FolderLock`` as a build's ``build.lock``: a second run is refused naming the holder)
from before ``OUT`` is looked into until the run ends. Holding it, ``check_output`` refuses a finished
run or an earlier run's checkpoints without ``--resume`` / ``--overwrite``; ``OUT`` must be writable
and have room for what the run will save (``check_free_space``). The lock file is no run content: an
earlier run is recognised, and cleared by ``--overwrite``, by its own files only.

The final model is written into ``OUT/.final-tmp/`` and moved into place, ``trainer_state.json`` last;
when that fails, the model is saved to a rescue folder under the system's temporary directory and the
error names it. Every rewrite of an existing file (``metrics.jsonl`` on resume, the JSON files) is
atomic.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import fsspec
import torch

from kd_cache.errors import UserError
from kd_cache.lock import HEARTBEAT_S, STALE_S, FolderLock
from kd_cache.storage import StorageError, atomic_write
from student.config import PATH_KEYS, RESUME_KEYS, TrainConfig
from student.distill import PROJECTOR_DIR
from student.lora import MERGED_DIR, adapter_state_dict, load_merged

CONFIG_NAME = "train_config.json"
STATE_NAME = "trainer_state.json"
METRICS_NAME = "metrics.jsonl"
COMPLETE_MARKER = "COMPLETE"
FINAL_TMP = ".final-tmp"  # the final save is written here, then moved into OUT
LOCK_NAME = "train.lock"  # held by the run training into OUT
# A saved model has them (a LoRA run's OUT: the adapter's).
MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "adapter_config.json",
               "adapter_model.safetensors")
SPACE_MARGIN = 1.1  # free space asked for beyond the estimate (processor files, JSON, filesystem slack)


class OutputError(UserError, RuntimeError):
    """``--out`` cannot hold the run (read-only, full, or a save failed); the message names the path."""


def _is_write_error(e: BaseException) -> bool:
    from safetensors import SafetensorError

    return isinstance(e, (OSError, SafetensorError))


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


def save_checkpoint(accelerator, out: Path, step: int, data_state: dict, cfg: TrainConfig,
                    identity: dict | None = None) -> Path:
    """``OUT/checkpoints/step-N``; ``identity`` (student and cache content digests) is checked on resume.
    A failed write raises ``OutputError`` naming the checkpoint and the last complete one."""
    ckpt = out / "checkpoints" / f"step-{step}"
    try:
        if accelerator.is_main_process and ckpt.exists():
            shutil.rmtree(ckpt)  # a leftover without COMPLETE from a killed run
        accelerator.wait_for_everyone()
        accelerator.save_state(str(ckpt), safe_serialization=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_json(ckpt / STATE_NAME, {"step": step, **data_state, "world_size": accelerator.num_processes,
                                           "identity": identity or {}})
            write_json(ckpt / CONFIG_NAME, cfg.to_dict())
            (ckpt / COMPLETE_MARKER).write_text("")  # last: a checkpoint without it is ignored
    except Exception as e:
        if not _is_write_error(e):
            raise
        done = [c for c in checkpoint_dirs(out) if c != ckpt]
        raise OutputError(f"--out {out}: could not write the checkpoint {ckpt} ({e}); "
                          + (f"the last complete checkpoint is {done[-1]} (resume from it with --resume once "
                             "there is room)" if done else "no earlier checkpoint exists")) from e
    accelerator.wait_for_everyone()
    return ckpt


def _same(key: str, a, b) -> bool:
    if key in PATH_KEYS and isinstance(a, str) and isinstance(b, str) and "://" not in a + b:
        return os.path.abspath(a) == os.path.abspath(b)
    return a == b


def check_resume(saved: dict, cfg: TrainConfig, ckpt: Path, saved_identity: dict | None = None,
                 identity: dict | None = None) -> None:
    """Refuse to resume ``ckpt`` (its saved config and identity) with different ``RESUME_KEYS`` settings
    or another student / cache content (``identity``: ``{"student": ..., "cache": ...}`` digests)."""
    now = cfg.to_dict()
    diffs = [k for k in RESUME_KEYS if not _same(k, saved.get(k), now[k])]
    lines = [f"  --{k.replace('_', '-')}: checkpoint has {saved.get(k)!r}, this run asks for {now[k]!r}"
             for k in diffs]
    what = {"cache": ("--cache", "a cache with other content (rebuilt from other data or by another teacher, "
                      "or other shards)"),
            "student": ("--student", "a student of another architecture or tokenizer")}
    for key, (flag, text) in what.items():
        old, new = (saved_identity or {}).get(key), (identity or {}).get(key)
        if old != new:
            lines.append(f"  {flag}: {getattr(cfg, key)} is {text} than the checkpoint was trained on "
                         f"(content digest {old} then, {new} now)")
    if lines:
        raise ValueError(f"--resume: {ckpt} was written with different settings:\n" + "\n".join(lines)
                         + "\nResume with the original settings, or train into another --out.")


def reset_metrics(path: Path) -> None:
    """An empty ``metrics.jsonl`` for a run that starts at step 0 (atomically, as every rewrite)."""
    atomic_write(None, str(path), b"")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint we resume from (the run died past it); the file is
    replaced atomically, so a kill during the rewrite leaves the old lines."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # a line cut short by the kill
    atomic_write(None, str(path), "".join(line + "\n" for line in keep).encode())


def resume(accelerator, cfg: TrainConfig, identity: dict | None = None) -> Position:
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
    state = json.loads((ckpt / STATE_NAME).read_text())
    check_resume(json.loads((ckpt / CONFIG_NAME).read_text()), cfg, ckpt, state.get("identity"), identity)
    accelerator.load_state(str(ckpt))
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


def _final_state(cfg: TrainConfig, at: Position, world: int, trainable: dict | None, projector: bool,
                 identity: dict | None, alignment: dict | None = None) -> dict:
    return {"step": at.step, "epoch": at.epoch, "samples_seen": at.samples_seen, "world_size": world,
            "train_modules": list(cfg.train_modules), "trainable": trainable,
            "hidden_projector": PROJECTOR_DIR if projector else None, "identity": identity or {},
            "alignment": alignment}


def _write_final(folder: Path, unwrapped, parts: dict, processor, cfg: TrainConfig, at: Position,
                 teacher: str | None, adapter=None) -> None:
    """The model (a LoRA run: the adapter, and the merged model with ``--merge``), processor, hidden
    projector (if any) and config into an empty ``folder``."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    if adapter is None:
        unwrapped.student.save_pretrained(folder, state_dict=parts["student"])
    else:
        adapter.save_pretrained(folder, state_dict=adapter_state_dict(parts["student"]))
    processor.save_pretrained(folder)
    if adapter is not None and cfg.merge:
        # Merged from the saved adapter on a fresh copy of the --student: what a user's own
        # PeftModel.from_pretrained + merge_and_unload gives (a QLoRA adapter merges into full precision).
        load_merged(folder).save_pretrained(folder / MERGED_DIR)
        processor.save_pretrained(folder / MERGED_DIR)
    projector = unwrapped.hidden_projector
    if projector is not None:
        projector.save_pretrained(
            folder / PROJECTOR_DIR, state_dict=parts["hidden_projector"],
            extra={"hidden_loss": cfg.hidden_loss.value, "hidden_weight": cfg.hidden_weight,
                   "positions": list(cfg.positions), "step": at.step, "teacher": teacher, "cache": cfg.cache})
    write_json(folder / CONFIG_NAME, cfg.to_dict())


def _move_into(tmp: Path, out: Path) -> None:
    """Every entry of ``tmp`` renamed into ``out`` (same filesystem: no copy), replacing what is there."""
    for entry in sorted(tmp.iterdir()):
        target = out / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(entry, target)
    tmp.rmdir()


def save_final(accelerator, wrapper, processor, cfg: TrainConfig, at: Position, teacher: str | None,
               trainable: dict | None = None, identity: dict | None = None, adapter=None,
               alignment: dict | None = None) -> None:
    """The final model, as its own class, + processor in OUT, the hidden projector (if any) beside it;
    ``trainable`` (per part: parameters and trainable parameters) goes into trainer_state.json.
    ``adapter``: the ``PeftModel`` of a LoRA run, which saves the adapter instead of the model.

    Written into ``OUT/.final-tmp`` and moved into OUT, ``trainer_state.json`` last. If the disk refuses
    it, the model is saved into a rescue folder under the system's temporary directory and
    ``OutputError`` names it (and the last checkpoint, if any)."""
    out = Path(cfg.out)
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(wrapper)  # every process takes part (FSDP gathers)
    error = None
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(wrapper)
        parts = split_state_dict(state_dict)
        has_projector = unwrapped.hidden_projector is not None
        state = _final_state(cfg, at, accelerator.num_processes, trainable, has_projector, identity, alignment)
        try:
            _write_final(out / FINAL_TMP, unwrapped, parts, processor, cfg, at, teacher, adapter)
            if not has_projector and (out / PROJECTOR_DIR).exists():
                shutil.rmtree(out / PROJECTOR_DIR)  # an earlier run's, not trained with this model
            _move_into(out / FINAL_TMP, out)
            write_json(out / STATE_NAME, state)  # last: OUT holds a finished run
        except Exception as e:
            if not _is_write_error(e):
                raise
            shutil.rmtree(out / FINAL_TMP, ignore_errors=True)
            error = OutputError(f"--out {out}: the final model could not be saved there ({e}); "
                                + _rescue(unwrapped, parts, processor, cfg, at, teacher, state, out, adapter))
            error.__cause__ = e
    accelerator.wait_for_everyone()
    if error is not None:
        raise error


def _rescue(unwrapped, parts, processor, cfg: TrainConfig, at: Position, teacher, state: dict, out: Path,
            adapter=None) -> str:
    """Save the final model somewhere else after OUT refused it; the sentence that says where (or what is left)."""
    ckpts = checkpoint_dirs(out)
    left = f"the last checkpoint is {ckpts[-1]}" if ckpts else "no checkpoint was written (--save-every 0)"
    try:
        rescue = Path(tempfile.mkdtemp(prefix=f"kd-train-rescue-step{at.step}-"))
        _write_final(rescue, unwrapped, parts, processor, cfg, at, teacher, adapter)
        write_json(rescue / STATE_NAME, state)
    except Exception as e:
        if not _is_write_error(e):
            raise
        return f"saving it to the temporary directory failed too ({e}); {left}"
    return (f"the trained model was saved to {rescue} instead (a complete final save: move it into place once "
            f"there is room); {left}")


# ------------------------------------------------------------------------------------- protecting OUT


def existing_run(out: Path) -> str | None:
    """What an earlier run left in ``out`` that a new run would replace (None: nothing worth keeping)."""
    ckpts = checkpoint_dirs(out)
    if ckpts:
        return f"checkpoints of an earlier run ({ckpts[-1].name})"
    if (out / STATE_NAME).is_file():
        return "a finished run"
    found = [name for name in MODEL_FILES if (out / name).exists()]
    if found:
        return f"a saved model ({', '.join(found)})"
    return None


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing parent (where OUT will be created)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_target(cfg: TrainConfig) -> None:
    """Refuse ``--resume`` with ``--overwrite``, and an OUT that is (or holds) the ``--student``: from the
    flags alone, before OUT's lock is written there."""
    out = Path(cfg.out)
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume continues the run in --out, --overwrite replaces it: pass one of them")
    student = Path(cfg.student)
    if student.exists():
        s, o = student.resolve(), out.resolve()
        if s == o or o in s.parents:
            raise ValueError(f"--out {cfg.out} is (or holds) the --student {cfg.student}: the run would overwrite "
                             "the model it starts from; choose another --out")


def lock_output(out: Path, world: int = 1, *, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S) -> FolderLock:
    """Take ``OUT/train.lock`` (creating OUT): one run at a time trains into OUT. A live holder's lock is
    refused with ``FolderLocked`` naming it (host, pid, start time), a stale one taken over with a
    message; an OUT that cannot be written raises ``OutputError``."""
    lock = FolderLock(fsspec.filesystem("file"), str(Path(out).absolute()), name=LOCK_NAME, holder="training run",
                      guarded="to this --out", world=world, heartbeat_s=heartbeat_s, stale_s=stale_s)
    try:
        return lock.acquire()
    except OSError as e:
        cause = e.__cause__ if isinstance(e, StorageError) and isinstance(e.__cause__, OSError) else e
        raise OutputError(f"--out {out}: cannot write there ({cause.strerror or cause})") from e


def check_output(cfg: TrainConfig) -> None:
    """Refuse an OUT that would lose work or cannot be written, before anything is loaded or written
    there; the caller holds OUT's lock (``lock_output``), so no other run changes what is checked."""
    out = Path(cfg.out)
    kept = existing_run(out)
    if cfg.resume:
        if not checkpoint_dirs(out) and kept is not None:
            raise ValueError(f"--resume: --out {out} holds {kept} but no checkpoint to continue from; pass "
                             "--overwrite to train a new run there, or choose another --out")
    elif kept is not None and not cfg.overwrite:
        raise ValueError(f"--out {out} already holds {kept}: pass --resume to continue it, --overwrite to "
                         "replace it, or choose another --out")
    where = _existing(out)
    try:
        if not where.is_dir():
            raise NotADirectoryError(f"{where} is not a directory")
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=where)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise OutputError(f"--out {out}: cannot write there ({e.strerror or e})") from e


def clear_run(out: Path) -> None:
    """Delete an earlier run's files from ``out`` (``--overwrite``), model first: the folder never holds
    the old model beside the new run's config."""
    for name in (STATE_NAME, *MODEL_FILES, "generation_config.json"):
        (out / name).unlink(missing_ok=True)
    for p in out.glob("model-*.safetensors"):
        p.unlink()
    for name in ("checkpoints", PROJECTOR_DIR, FINAL_TMP, MERGED_DIR):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in (CONFIG_NAME, METRICS_NAME):
        (out / name).unlink(missing_ok=True)


def save_sizes(model: torch.nn.Module) -> tuple[int, int]:
    """Estimated bytes of (the final save, one checkpoint) of ``model``: its parameters and buffers, and
    for a checkpoint also AdamW's two moments of every trainable parameter."""
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    moments = sum(2 * p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return weights, weights + moments


def check_free_space(out: Path, model: torch.nn.Module, cfg: TrainConfig, at: Position, total_steps: int) -> None:
    """Refuse to start when ``out``'s filesystem cannot hold the final model and the checkpoints still to come."""
    final, ckpt = save_sizes(model)
    n_ckpt = (total_steps // cfg.save_every - at.step // cfg.save_every) if cfg.save_every else 0
    need = int((final + n_ckpt * ckpt) * SPACE_MARGIN)
    free = shutil.disk_usage(_existing(out)).free
    if free < need:
        mib = 1 << 20
        raise OutputError(
            f"--out {out}: {free / mib:.1f} MiB free, the run needs about {need / mib:.1f} MiB (the final model "
            f"{final / mib:.1f} MiB" + (f" + {n_ckpt} checkpoints of {ckpt / mib:.1f} MiB" if n_ckpt else "")
            + "): free some space or choose another --out")
