"""Stage recipes (LLaVA-KD): which parts of the student train, at which learning rate, with which losses.

| stage | trains            | template | losses            | lr   |
|-------|-------------------|----------|-------------------|------|
| dpt   | projector         | pretrain | CE + MDist + RDist| 1e-3 |
| sft   | projector + llm   | chat     | CE                | 2e-5 |
| dft   | projector + llm   | chat     | CE + MDist + RDist| 2e-5 |

The vision tower is frozen in all three; ``--train-modules`` overrides the trained parts (for example
``vision,projector,llm`` to train a small demo teacher from scratch).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import Enum

import torch

from student.families import PARTS, blank_image_inputs, image_feature_tensors, parameter_parts


class Stage(str, Enum):
    DPT = "dpt"  # distilled pre-training (projector only, caption data)
    SFT = "sft"  # supervised fine-tuning (no teacher)
    DFT = "dft"  # distilled fine-tuning


MODULES = PARTS  # what --train-modules names


@dataclass(frozen=True)
class Recipe:
    train_modules: tuple[str, ...]
    lr: float
    distill: bool  # MDist + RDist on top of CE
    template: str  # the cache template the stage is meant for


RECIPES: dict[Stage, Recipe] = {
    Stage.DPT: Recipe(("projector",), 1e-3, True, "pretrain"),
    Stage.SFT: Recipe(("projector", "llm"), 2e-5, False, "chat"),
    Stage.DFT: Recipe(("projector", "llm"), 2e-5, True, "chat"),
}


def parse_modules(spec: str | Iterable[str]) -> tuple[str, ...]:
    """``"projector,llm"`` (or an iterable) -> ``("projector", "llm")`` in canonical order; validated."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec)]
    items = [s for s in items if s]
    unknown = sorted(set(items) - set(MODULES))
    if unknown or not items:
        raise ValueError(f"--train-modules {spec!r}: expected a comma-separated subset of {','.join(MODULES)}"
                         + (f" (unknown: {', '.join(unknown)})" if unknown else " (empty)"))
    return tuple(m for m in MODULES if m in items)


def named_module_parameters(model: torch.nn.Module, module: str) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """The parameters of one part (``vision``/``projector``/``llm``) of a student, by the family's name table."""
    parts = parameter_parts(model)
    for name, p in model.named_parameters():
        if parts[name] == module:
            yield name, p


def unused_vision_parameters(model: torch.nn.Module) -> set[str]:
    """Vision-tower parameters that the image features never reach.

    LLaVA reads a hidden layer of the vision tower, so the layers after ``vision_feature_layer``,
    the post-layernorm and SigLIP's pooling head get no gradient. Found by one probe backward on a
    blank image (``families.blank_image_inputs``) rather than by name, so it holds for any vision tower.
    """
    tower = dict(named_module_parameters(model, "vision"))
    saved = {n: p.requires_grad for n, p in tower.items()}
    for p in tower.values():
        p.requires_grad_(True)
        p.grad = None
    feats = image_feature_tensors(model.model.get_image_features(**blank_image_inputs(model)))
    sum(f.float().sum() for f in feats).backward()
    unused = {n for n, p in tower.items() if p.grad is None}
    for n, p in tower.items():
        p.grad = None
        p.requires_grad_(saved[n])
    model.zero_grad(set_to_none=True)
    return unused


def set_trainable(model: torch.nn.Module, modules: Iterable[str]) -> list[str]:
    """Freeze everything except ``modules``; returns the names of the trainable parameters.

    Every parameter belongs to exactly one part (``families.parameter_parts``; a parameter no part
    claims is refused by name). Frozen parameters never reach the optimizer, so neither AdamW nor
    weight decay can move them. Vision-tower parameters that the image features do not depend on stay
    frozen even when the vision tower trains (DDP requires every trainable parameter to receive a gradient).
    """
    modules = set(modules)
    parts = parameter_parts(model)
    unused = unused_vision_parameters(model) if "vision" in modules else set()
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(parts[name] in modules and name not in unused)
        if p.requires_grad:
            trainable.append(name)
    if not trainable:
        raise ValueError(f"--train-modules {','.join(sorted(modules))}: selects no parameters of the student")
    return trainable


def _is_adapter(name: str) -> bool:
    """A peft adapter parameter (``...q_proj.lora_A.default.weight``), not a weight of the student."""
    return ".lora_" in name


def trainable_summary(model: torch.nn.Module) -> dict[str, dict[str, int]]:
    """Per part, in elements: ``parameters`` (the student's own), ``adapters`` (LoRA adapter parameters, all
    trainable), ``full`` (own parameters that train), ``frozen`` (own parameters that do not),
    ``trainable`` (adapters + full) and ``tensors`` (own parameter tensors).

    Under peft a fully trained projector module has a frozen original beside its trainable copy
    (``modules_to_save``): the copy is counted, the original (``.original_module.``) is not."""
    parts = parameter_parts(model)
    keys = ("parameters", "adapters", "full", "frozen", "trainable", "tensors")
    out = {m: dict.fromkeys(keys, 0) for m in MODULES}
    for name, p in model.named_parameters():
        if ".original_module." in name:
            continue
        row, n = out[parts[name]], p.numel()
        if _is_adapter(name):
            row["adapters"] += n
        else:
            row["parameters"] += n
            row["tensors"] += 1
            row["full" if p.requires_grad else "frozen"] += n
        row["trainable"] += n if p.requires_grad else 0
    return out


def describe_trainable(summary: dict[str, dict[str, int]]) -> str:
    """One line per part (``projector   trains   12,345 of 12,345 parameters``; a part with adapters:
    ``llm   adapters   8,192 adapter parameters, 0 of 1,234,567 parameters in full``) and the total."""
    lines = []
    for part, row in summary.items():
        if row.get("adapters"):
            lines.append(f"  {part:<10} adapters  {row['adapters']:>14,} adapter parameters, "
                         f"{row['full']:,} of {row['parameters']:,} parameters in full")
        else:
            state = "trains" if row["trainable"] else "frozen"
            lines.append(f"  {part:<10} {state}  {row['trainable']:>14,} of {row['parameters']:>14,} parameters")
    total = {k: sum(r.get(k, 0) for r in summary.values()) for k in ("adapters", "full", "frozen", "parameters")}
    share = (total["adapters"] + total["full"]) / max(total["parameters"], 1)
    lines.append(f"  {'total':<10} {total['adapters']:,} adapter + {total['full']:,} full parameters train "
                 f"({share:.2%} of the student's {total['parameters']:,}), {total['frozen']:,} frozen")
    return "\n".join(lines)
