"""LoRA and QLoRA students through ``peft`` (``kd-train --lora-r R``).

In SFT and DFT the language model trains through LoRA adapters instead of in full: ``add_adapters``
puts them on the ``nn.Linear`` layers of each adapted part (the language model; the vision tower too
when ``--train-modules`` names it) whose last name component is a target (the family's defaults,
``kd_cache.families.Family.lora_llm`` / ``lora_vision``, or ``--lora-target-modules``). The projector
trains in full, as the stages say: peft keeps a trainable copy of each projector module
(``modules_to_save``), so the adapter folder carries it. A projector parameter that belongs to no
module (LLaVA-NeXT's ``image_newline``) stays frozen, since peft's format has no place for it. Vision
layers the image features never reach get no adapters (``stages.unused_vision_parameters``), so
every trainable parameter gets a gradient under DDP.

peft injects the adapters in place: the student keeps its class and its parameter names keep their
part's prefix (``model.language_model.layers.0.self_attn.q_proj.lora_A.default.weight``), so
``DistillStudent``, the parts table and the loop run unchanged on it.

What a LoRA run writes (``student.checkpoints.save_final``): ``OUT`` holds the adapter in peft's own
format (``adapter_config.json`` + ``adapter_model.safetensors``, its ``base_model_name_or_path`` the
``--student``) beside the processor, so ``PeftModel.from_pretrained(student, OUT)`` loads it; with
``--merge`` also ``OUT/merged/``, the adapters merged into a model of the student's own class that loads
with plain ``transformers``. ``student.model.load_student`` (``--student`` of a next stage, ``kd-eval
--model``) takes either: an adapter folder is loaded on its base and merged (``load_merged``).

QLoRA (``--load-in-4bit``): the language model's frozen weights are loaded in bitsandbytes NF4
(``quantization_config``); it needs a CUDA GPU and is refused before any work on a machine without one
(``check_quantization``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from kd_cache.errors import UserError
from student.families import family_of, part_of

ADAPTER_CONFIG = "adapter_config.json"  # peft's: a folder with it holds an adapter
MERGED_DIR = "merged"  # OUT/merged/: the adapters merged into the student (--merge)
ADAPTED_PARTS = ("vision", "llm")  # parts that train through adapters under --lora-r (the projector: in full)


class LoraError(UserError, ValueError):
    """LoRA settings that do not fit the student (no layer matches a target), or QLoRA where it cannot run."""


def is_adapter_dir(path: str | Path) -> bool:
    """Whether ``path`` is a local folder holding a peft adapter."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def _part_targets(model: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    family = family_of(model.config)
    return {"vision": family.lora_vision, "llm": family.lora_llm}


def target_modules(model: torch.nn.Module, parts: Iterable[str], names: Iterable[str] | None = None,
                   skip: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Full names of the ``nn.Linear`` layers of ``parts`` that get adapters: those whose last name
    component is in ``names`` (default: the family's per part) and whose ``weight`` is not in ``skip``.
    A part where no layer matches is refused, naming the layer names it has."""
    family = family_of(model.config)
    defaults = _part_targets(model)
    found: dict[str, list[str]] = {}
    linear_names: dict[str, set[str]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        part = part_of(family, f"{name}.weight")
        if part not in parts:
            continue
        leaf = name.rsplit(".", 1)[-1]
        linear_names.setdefault(part, set()).add(leaf)
        wanted = defaults[part] if names is None else tuple(names)
        if leaf in wanted and f"{name}.weight" not in skip:
            found.setdefault(part, []).append(name)
    for part in parts:
        if not found.get(part):
            wanted = defaults[part] if names is None else tuple(names)
            raise LoraError(f"--lora-target-modules {','.join(wanted)}: no nn.Linear layer of the {part} part of this "
                            f"{family.name} student has such a name; its layers are named "
                            f"{','.join(sorted(linear_names.get(part, ()))) or '(none)'}")
    return [n for part in parts for n in found[part]]


def projector_modules(model: torch.nn.Module) -> list[str]:
    """The projector's modules by full name, for peft's ``modules_to_save`` (a module list by its items:
    a wrapped list would not be indexable). Bare parameters (``image_newline``) have no module: left out."""
    modules = dict(model.named_modules())
    out = []
    for prefix in family_of(model.config).projector:
        module = modules.get(prefix)
        if module is None:
            continue
        if isinstance(module, (torch.nn.ModuleList, torch.nn.ModuleDict)):
            out += [f"{prefix}.{child}" for child, _ in module.named_children()]
        else:
            out.append(prefix)
    return out


def add_adapters(model: torch.nn.Module, train_modules: Iterable[str], *, r: int, alpha: float, dropout: float,
                 targets: Iterable[str] | None = None, base: str | None = None):
    """Freeze ``model`` and inject LoRA adapters (rank ``r``, scale ``alpha / r``) into the adapted parts of
    ``train_modules``; the projector (when listed) trains in full. Returns the ``PeftModel``; ``model``
    itself is changed in place and stays the one to run. ``base``: recorded as the adapter's
    ``base_model_name_or_path`` (the ``--student``)."""
    from peft import LoraConfig, get_peft_model

    from student.stages import unused_vision_parameters

    train_modules = tuple(train_modules)
    parts = [p for p in ADAPTED_PARTS if p in train_modules]
    skip = unused_vision_parameters(model) if "vision" in parts else set()
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                        target_modules=target_modules(model, parts, targets, skip),
                        modules_to_save=projector_modules(model) if "projector" in train_modules else None)
    model.requires_grad_(False)
    adapter = get_peft_model(model, config)
    if base is not None:  # peft records the loaded model's own path: an adapter folder's base, not the folder
        adapter.peft_config["default"].base_model_name_or_path = base
    return adapter


def adapter_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The injected student's (gathered) state dict as the ``PeftModel``'s keys, for ``save_pretrained``."""
    return {f"base_model.model.{k}": v for k, v in state_dict.items()}


def base_of(path: str | Path) -> str:
    """The base student an adapter folder was trained on (its ``base_model_name_or_path``)."""
    base = json.loads((Path(path) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise LoraError(f"{path}: {ADAPTER_CONFIG} names no base_model_name_or_path; load the adapter with "
                        "PeftModel.from_pretrained on the student it was trained on")
    return base


def load_merged(path: str | Path, dtype: torch.dtype = torch.float32):
    """The student of an adapter folder: its base student (itself possibly an adapter folder) with the
    adapter loaded by ``PeftModel.from_pretrained`` and merged into it; a plain model of its own class."""
    from peft import PeftModel

    from student.model import load_student

    base = base_of(path)
    if not Path(base).exists() and Path(base).is_absolute():
        raise FileNotFoundError(f"{path}: the adapter was trained on the student {base}, which is not there any more; "
                                f"load it with PeftModel.from_pretrained on that student, or set "
                                f"base_model_name_or_path in {Path(path) / ADAPTER_CONFIG} to where it is now")
    model, _ = load_student(base, dtype=dtype)
    return PeftModel.from_pretrained(model, str(path)).merge_and_unload()


def student_path(path: str | Path) -> str:
    """``path`` as an adapter records it: absolute for a local folder, a hub id as it is."""
    return str(Path(path).absolute()) if Path(path).exists() else str(path)


# ------------------------------------------------------------------------------------------------- QLoRA


def check_quantization(load_in_4bit: bool) -> None:
    """Refuse ``--load-in-4bit`` where it cannot run: without a CUDA GPU or without bitsandbytes."""
    if not load_in_4bit:
        return
    if not torch.cuda.is_available():
        raise LoraError("--load-in-4bit (QLoRA) needs a CUDA GPU: bitsandbytes' NF4 weights do not train on CPU; "
                        "drop --load-in-4bit to train LoRA adapters on full-precision weights here")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise LoraError("--load-in-4bit (QLoRA) needs bitsandbytes: pip install -e '.[quant]'") from None


def quantization_config(config) -> Any:
    """bitsandbytes NF4 (double quantisation, bf16 compute) for the language model of a student with
    ``config``; the vision tower, the projector and the LM head stay in full precision."""
    from transformers import BitsAndBytesConfig

    family = family_of(config)
    keep = [*family.vision, *family.projector, "lm_head"]
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=keep)
