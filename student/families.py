"""The student side of the family registry (``kd_cache.families``): a model's family, its parameter parts
and the inputs of one blank image.

A student is any ``AutoModelForImageTextToText`` model of a family in ``kd_cache.families.FAMILIES``
(keyed by ``config.model_type``), loaded and saved as its own class. ``parameter_parts`` assigns every
parameter to the vision tower, the projector or the language model by the entry's name prefixes (the
longest matching prefix wins).

``blank_image_inputs`` gives, per kind of vision input (the entry's ``blank_image``), the
``get_image_features`` inputs of one blank image: the probe that finds vision parameters the image
features never reach, and the zero-weighted image pass that a micro-batch without images runs so every
trainable parameter gets a gradient.
"""

from __future__ import annotations

import torch

from kd_cache.families import FAMILIES, BlankImage, Family, supported

PARTS = ("vision", "projector", "llm")


class UnsupportedModelError(ValueError):
    """A student (or a saved model) of a family this project does not support."""


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
                                    f"vision/projector/llm in the {family.name} name table (kd_cache/families.py): "
                                    f"{shown}")
    return parts


def _side(size) -> int:
    return int(size if isinstance(size, int) else size[0])


def blank_image_inputs(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The ``model.model.get_image_features`` inputs of one blank image (every pixel 1: Idefics3 drops
    all-zero tiles as padding), on the model's device and in its dtype: a small image each family's
    vision tower accepts, shaped as its registry entry's ``blank_image`` says."""
    cfg, vcfg = model.config, model.config.vision_config
    dev, dt = model.device, model.dtype
    probe = family_of(cfg).blank_image

    def blank(*shape):
        return torch.ones(*shape, device=dev, dtype=dt)

    if probe is BlankImage.qwen_patches:  # flattened patches of one 2x2-merged grid, one temporal step
        m, p, t = vcfg.spatial_merge_size, vcfg.patch_size, vcfg.temporal_patch_size
        return {"pixel_values": blank(m * m, vcfg.in_channels * t * p * p),
                "image_grid_thw": torch.tensor([[1, m, m]], device=dev)}
    channels = getattr(vcfg, "num_channels", 3)
    if probe is BlankImage.mistral_merged:  # any multiple of patch x merge; two merged tokens a side (one alone fails)
        side = 2 * vcfg.patch_size * cfg.spatial_merge_size
        return {"pixel_values": blank(1, channels, side, side), "image_sizes": torch.tensor([[side, side]], device=dev)}
    side = _side(vcfg.image_size)
    if probe is BlankImage.idefics_tile:  # one sample of one tile
        return {"pixel_values": blank(1, 1, channels, side, side),
                "pixel_attention_mask": torch.ones(1, 1, side, side, dtype=torch.bool, device=dev)}
    if probe is BlankImage.anyres_tiles:  # base tile + the anyres tiles of a square image
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        tiles = image_size_to_num_patches((side, side), cfg.image_grid_pinpoints, side)
        return {"pixel_values": blank(1, tiles, channels, side, side),
                "image_sizes": torch.tensor([[side, side]], device=dev)}
    return {"pixel_values": blank(1, channels, side, side)}  # BlankImage.single_image


def image_feature_tensors(out) -> list[torch.Tensor]:
    """Every tensor of projected image features in a ``get_image_features`` output: ``pooler_output`` (a
    tensor or one per image/sample) and Qwen3-VL's ``deepstack_features`` (per deepstack merger)."""

    def flat(x) -> list[torch.Tensor]:
        return [t for item in x for t in flat(item)] if isinstance(x, (list, tuple)) else [x]

    return flat(out.pooler_output) + flat(getattr(out, "deepstack_features", None) or [])
