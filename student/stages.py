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


class Stage(str, Enum):
    DPT = "dpt"  # distilled pre-training (projector only, caption data)
    SFT = "sft"  # supervised fine-tuning (no teacher)
    DFT = "dft"  # distilled fine-tuning


MODULES = ("vision", "projector", "llm")


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


def module_of(param_name: str) -> str:
    """Which of vision/projector/llm a ``LlavaForConditionalGeneration`` parameter belongs to."""
    if ".vision_tower." in f".{param_name}":
        return "vision"
    if ".multi_modal_projector." in f".{param_name}":
        return "projector"
    return "llm"  # language model and lm_head


def named_module_parameters(model: torch.nn.Module, module: str) -> Iterator[tuple[str, torch.nn.Parameter]]:
    for name, p in model.named_parameters():
        if module_of(name) == module:
            yield name, p


def _unused_vision_parameters(model: torch.nn.Module) -> set[str]:
    """Vision-tower parameters that LLaVA's image features never reach.

    LLaVA reads a hidden layer of the vision tower, so the layers after ``vision_feature_layer``,
    the post-layernorm and SigLIP's pooling head get no gradient. Found by one probe backward on a
    blank image rather than by name, so it holds for any vision tower.
    """
    vcfg = model.config.vision_config
    size = vcfg.image_size if isinstance(vcfg.image_size, int) else vcfg.image_size[0]
    px = torch.zeros(1, vcfg.num_channels, size, size, dtype=model.dtype, device=model.device)
    tower = dict(named_module_parameters(model, "vision"))
    saved = {n: p.requires_grad for n, p in tower.items()}
    for p in tower.values():
        p.requires_grad_(True)
        p.grad = None
    feats = model.model.get_image_features(pixel_values=px).pooler_output
    sum(f.float().sum() for f in feats).backward()
    unused = {n for n, p in tower.items() if p.grad is None}
    for n, p in tower.items():
        p.grad = None
        p.requires_grad_(saved[n])
    model.zero_grad(set_to_none=True)
    return unused


def set_trainable(model: torch.nn.Module, modules: Iterable[str]) -> list[str]:
    """Freeze everything except ``modules``; returns the names of the trainable parameters.

    Frozen parameters never reach the optimizer, so neither AdamW nor weight decay can move them.
    Vision-tower parameters that the image features do not depend on stay frozen even when the
    vision tower trains (DDP requires every trainable parameter to receive a gradient).
    """
    modules = set(modules)
    unused = _unused_vision_parameters(model) if "vision" in modules else set()
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(module_of(name) in modules and name not in unused)
        if p.requires_grad:
            trainable.append(name)
    if not trainable:
        raise ValueError(f"--train-modules {','.join(sorted(modules))}: selects no parameters of the student")
    return trainable
