"""The student model families: which ``transformers`` classes are supported, and where their parts are.

A student is any ``AutoModelForImageTextToText`` model of a family listed in ``FAMILIES`` (keyed by
``config.model_type``), loaded and saved as its own class. ``transformers`` has no common attribute
for a VLM's vision tower, projector and language model (``vision_tower``/``visual``/``vision_model``,
``multi_modal_projector``/``connector``/``visual.merger``, ``language_model``/``text_model``), so each
family names them here by parameter-name prefix; the longest matching prefix wins, which is how
Qwen's merger (inside ``model.visual``) belongs to the projector while the rest of ``model.visual`` is
the vision tower. The facts per family are measured in ``docs/FAMILIES.md``.

``blank_image_inputs`` gives, per family, the ``get_image_features`` inputs of one blank image: the
probe that finds vision parameters the image features never reach, and the zero-weighted image pass
that a micro-batch without images runs so every trainable parameter gets a gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PARTS = ("vision", "projector", "llm")


class UnsupportedModelError(ValueError):
    """A student (or a saved model) of a family this project does not support."""


@dataclass(frozen=True)
class Family:
    name: str  # as in README's table
    model_class: str  # the transformers class a student of this family is loaded and saved as
    vision: tuple[str, ...]  # parameter-name prefixes of the vision tower
    projector: tuple[str, ...]  # ... of the projector / connector (bare parameters by full name)
    llm: tuple[str, ...]  # ... of the language model and the LM head

    def prefixes(self) -> dict[str, tuple[str, ...]]:
        return {"vision": self.vision, "projector": self.projector, "llm": self.llm}


LLM = ("model.language_model", "lm_head")  # lm_head is absent from named_parameters() when tied
LLAVA_VISION, LLAVA_PROJECTOR = ("model.vision_tower",), ("model.multi_modal_projector",)
ANYRES_PROJECTOR = (*LLAVA_PROJECTOR, "model.image_newline")  # a bare parameter of model.model
QWEN_VISION = ("model.visual",)
IDEFICS = dict(vision=("model.vision_model",), projector=("model.connector",), llm=("model.text_model", "lm_head"))

FAMILIES: dict[str, Family] = {t: f for t, f in [
    ("llava", Family("LLaVA", "LlavaForConditionalGeneration", LLAVA_VISION, LLAVA_PROJECTOR, LLM)),
    ("vipllava", Family("VipLLaVA", "VipLlavaForConditionalGeneration", LLAVA_VISION, LLAVA_PROJECTOR, LLM)),
    ("llava_next", Family("LLaVA-NeXT", "LlavaNextForConditionalGeneration", LLAVA_VISION, ANYRES_PROJECTOR, LLM)),
    ("llava_onevision", Family("LLaVA-OneVision", "LlavaOnevisionForConditionalGeneration", LLAVA_VISION,
                               ANYRES_PROJECTOR, LLM)),
    ("qwen2_vl", Family("Qwen2-VL", "Qwen2VLForConditionalGeneration", QWEN_VISION, ("model.visual.merger",), LLM)),
    ("qwen2_5_vl", Family("Qwen2.5-VL", "Qwen2_5_VLForConditionalGeneration", QWEN_VISION,
                          ("model.visual.merger",), LLM)),
    ("qwen3_vl", Family("Qwen3-VL", "Qwen3VLForConditionalGeneration", QWEN_VISION,
                        ("model.visual.merger", "model.visual.deepstack_merger_list"), LLM)),
    ("idefics3", Family("Idefics3", "Idefics3ForConditionalGeneration", **IDEFICS)),
    ("smolvlm", Family("SmolVLM", "SmolVLMForConditionalGeneration", **IDEFICS)),
    ("gemma3", Family("Gemma3", "Gemma3ForConditionalGeneration", LLAVA_VISION, LLAVA_PROJECTOR, LLM)),
    ("paligemma", Family("PaliGemma", "PaliGemmaForConditionalGeneration", LLAVA_VISION, LLAVA_PROJECTOR, LLM)),
    ("internvl", Family("InternVL", "InternVLForConditionalGeneration", LLAVA_VISION, LLAVA_PROJECTOR, LLM)),
    ("mistral3", Family("Mistral3 (Pixtral)", "Mistral3ForConditionalGeneration", LLAVA_VISION, LLAVA_PROJECTOR, LLM)),
]}


def supported() -> str:
    """``"LLaVA (llava), VipLLaVA (vipllava), ..."``: for messages."""
    return ", ".join(f"{f.name} ({t})" for t, f in FAMILIES.items())


def family_of(config, what: str = "the model") -> Family:
    """The family of a model config; ``UnsupportedModelError`` listing the supported ones otherwise."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModelError(f"{what} is a {model_type!r} model ({type(config).__name__}); supported student "
                                    f"families (config.model_type): {supported()}")
    return FAMILIES[model_type]


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def part_of(family: Family, name: str) -> str | None:
    """The part (``vision``/``projector``/``llm``) whose longest prefix matches parameter ``name``; None if none."""
    best, best_len = None, -1
    for part, prefixes in family.prefixes().items():
        for p in prefixes:
            if _matches(name, p) and len(p) > best_len:
                best, best_len = part, len(p)
    return best


def parameter_parts(model: torch.nn.Module) -> dict[str, str]:
    """Parameter name -> part, for every parameter of ``model`` (tied parameters once, under the name
    ``named_parameters`` gives them: the input embeddings, so a tied LM head is in ``llm``).

    Raises ``UnsupportedModelError`` naming the parameters no part claims (a family whose layout
    differs from the table), so nothing trains or freezes by accident.
    """
    family = family_of(model.config)
    parts = {name: part_of(family, name) for name, _ in model.named_parameters()}
    unassigned = [n for n, p in parts.items() if p is None]
    if unassigned:
        shown = ", ".join(unassigned[:8]) + (f" and {len(unassigned) - 8} more" if len(unassigned) > 8 else "")
        raise UnsupportedModelError(f"{type(model).__name__}: {len(unassigned)} parameters belong to none of "
                                    f"vision/projector/llm in the {family.name} name table (student/families.py): "
                                    f"{shown}")
    return parts


def _side(size) -> int:
    return int(size if isinstance(size, int) else size[0])


def blank_image_inputs(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The ``model.model.get_image_features`` inputs of one blank image (every pixel 1: Idefics3 drops
    all-zero tiles as padding), on the model's device and in its dtype: a small image each family's
    vision tower accepts."""
    cfg, vcfg = model.config, model.config.vision_config
    dev, dt = model.device, model.dtype
    model_type = cfg.model_type

    def blank(*shape):
        return torch.ones(*shape, device=dev, dtype=dt)

    if model_type.startswith("qwen"):  # flattened patches of one 2x2-merged grid, one temporal step
        m, p, t = vcfg.spatial_merge_size, vcfg.patch_size, vcfg.temporal_patch_size
        return {"pixel_values": blank(m * m, vcfg.in_channels * t * p * p),
                "image_grid_thw": torch.tensor([[1, m, m]], device=dev)}
    channels = getattr(vcfg, "num_channels", 3)
    if model_type == "mistral3":  # any multiple of patch x merge; two merged tokens a side (one alone fails)
        side = 2 * vcfg.patch_size * cfg.spatial_merge_size
        return {"pixel_values": blank(1, channels, side, side), "image_sizes": torch.tensor([[side, side]], device=dev)}
    side = _side(vcfg.image_size)
    if model_type in ("idefics3", "smolvlm"):  # one sample of one tile
        return {"pixel_values": blank(1, 1, channels, side, side),
                "pixel_attention_mask": torch.ones(1, 1, side, side, dtype=torch.bool, device=dev)}
    if model_type in ("llava_next", "llava_onevision"):  # base tile + the anyres tiles of a square image
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        tiles = image_size_to_num_patches((side, side), cfg.image_grid_pinpoints, side)
        return {"pixel_values": blank(1, tiles, channels, side, side),
                "image_sizes": torch.tensor([[side, side]], device=dev)}
    return {"pixel_values": blank(1, channels, side, side)}


def image_feature_tensors(out) -> list[torch.Tensor]:
    """Every tensor of projected image features in a ``get_image_features`` output: ``pooler_output`` (a
    tensor or one per image/sample) and Qwen3-VL's ``deepstack_features`` (per deepstack merger)."""

    def flat(x) -> list[torch.Tensor]:
        return [t for item in x for t in flat(item)] if isinstance(x, (list, tuple)) else [x]

    return flat(out.pooler_output) + flat(getattr(out, "deepstack_features", None) or [])
