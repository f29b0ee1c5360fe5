"""The supported VLM families: one table of plain data, keyed by ``config.model_type``.

Every family-specific fact the code needs is an entry of ``FAMILIES``; nothing else lists families.
``kd_cache.teacher`` names them in its messages; ``student.families`` turns an entry into parameter
parts (the prefixes) and blank-image tensors (the probe kind); ``tests/vlm_families.py`` holds one tiny
model builder per entry (and refuses a family without one, or a builder without a family). Adding a
family: an entry here, a builder there, a row in README's table. The facts behind the entries
(classes, processor outputs, submodules) are measured in ``docs/FAMILIES.md``.

What no entry holds, because it is the same for every family:

* the image token id: the model config's ``image_token_id`` (``transformers`` 5 aliases it as
  ``image_token_index`` in the families that named it so), read by ``processing.config_image_token_id``
  and never taken from the processor (Gemma3's processor names ``<start_of_image>``, not the soft token
  the model fills);
* how a record is encoded: through the family's own processor (``kd_cache.processing``), which expands
  images and returns every extra model input itself.

Parameter-name prefixes: ``transformers`` has no common attribute for a VLM's vision tower, projector
and language model (``vision_tower``/``visual``/``vision_model``, ``multi_modal_projector``/
``connector``/``visual.merger``, ``language_model``/``text_model``), so each entry names them by
prefix; the longest matching prefix wins, which is how Qwen's merger (inside ``model.visual``) belongs
to the projector while the rest of ``model.visual`` is the vision tower.

LoRA target modules (``kd-train --lora-r``): the last name component of the ``nn.Linear`` layers that get
adapters by default, per part: the language model's attention and MLP projections (``lora_llm``, the
same in every family's LLM) and the vision tower's (``lora_vision``, with ``--train-modules vision``). A
name only counts inside its part's prefixes, so Qwen3-VL's merger ``linear_fc1`` (projector) is never
taken for its vision blocks' ``linear_fc1``. Measured per family in ``docs/FAMILIES.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class BlankImage(str, Enum):
    """The shape of the ``get_image_features`` inputs of one blank image, per kind of vision input
    (built by ``student.families.blank_image_inputs``)."""

    single_image = "single_image"  # pixel_values [1, C, S, S] at the vision config's image size
    qwen_patches = "qwen_patches"  # flattened patches of one merged grid, one temporal step, + image_grid_thw
    mistral_merged = "mistral_merged"  # [1, C, S, S], S two merged tokens a side (one alone fails), + image_sizes
    idefics_tile = "idefics_tile"  # one sample of one tile [1, 1, C, S, S] + pixel_attention_mask
    anyres_tiles = "anyres_tiles"  # base tile + the anyres tiles of a square image [1, T, C, S, S] + image_sizes


class RegionLayout(str, Enum):
    """How a family's visual tokens lay over the original image (``kd_cache.regions``, one function each)."""

    single_view = "single_view"  # one resized (CLIP: and centre-cropped) view, a row-major token grid
    qwen_grid = "qwen_grid"  # smart_resize'd image, image_grid_thw patches merged merge x merge, row-major
    idefics_tiles = "idefics_tiles"  # rows x cols tiles (<row_i_col_j>), then a global view; pixel shuffle
    internvl_tiles = "internvl_tiles"  # GotOcr2 tiled canvas, then a thumbnail if > 1 tile; pixel shuffle
    pixtral = "pixtral"  # the resized image (image_sizes) in merged patches, row-major
    anyres = "anyres"  # LLaVA-NeXT / OneVision: base tile, then pinpoint tiles unpadded, newline per row


# The attention and MLP projections of a Llama-style block (every family's LLM; Pixtral's vision blocks too).
FULL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Family:
    model_type: str  # config.model_type, the key of FAMILIES
    name: str  # as in README's table and in messages
    model_class: str  # the transformers class a model of this family is loaded and saved as
    vision: tuple[str, ...]  # parameter-name prefixes of the vision tower
    projector: tuple[str, ...]  # ... of the projector / connector (bare parameters by full name)
    llm: tuple[str, ...]  # ... of the language model and the LM head
    blank_image: BlankImage = BlankImage.single_image
    regions: RegionLayout = RegionLayout.single_view
    lora_vision: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")  # SigLIP / CLIP
    lora_llm: tuple[str, ...] = FULL_PROJECTIONS
    # False: a prompt/suffix processor without a chat template (PaliGemma); the code recognises one by
    # its processor (``processing.is_prefix_lm``), the tests pick their records by this.
    chat: bool = True

    def prefixes(self) -> dict[str, tuple[str, ...]]:
        return {"vision": self.vision, "projector": self.projector, "llm": self.llm}


LLM = ("model.language_model", "lm_head")  # lm_head is absent from named_parameters() when tied
LLAVA = dict(vision=("model.vision_tower",), projector=("model.multi_modal_projector",), llm=LLM)
ANYRES = dict(LLAVA, projector=("model.multi_modal_projector", "model.image_newline"),  # a bare parameter of model.model
              blank_image=BlankImage.anyres_tiles, regions=RegionLayout.anyres)
QWEN = dict(vision=("model.visual",), projector=("model.visual.merger",), llm=LLM, blank_image=BlankImage.qwen_patches,
            regions=RegionLayout.qwen_grid,
            lora_vision=("qkv", "proj", "fc1", "fc2"))
IDEFICS = dict(vision=("model.vision_model",), projector=("model.connector",), llm=("model.text_model", "lm_head"),
               blank_image=BlankImage.idefics_tile, regions=RegionLayout.idefics_tiles)

FAMILIES: dict[str, Family] = {f.model_type: f for f in [
    Family("llava", "LLaVA", "LlavaForConditionalGeneration", **LLAVA),
    Family("vipllava", "VipLLaVA", "VipLlavaForConditionalGeneration", **LLAVA),
    Family("llava_next", "LLaVA-NeXT", "LlavaNextForConditionalGeneration", **ANYRES),
    Family("llava_onevision", "LLaVA-OneVision", "LlavaOnevisionForConditionalGeneration", **ANYRES),
    Family("qwen2_vl", "Qwen2-VL", "Qwen2VLForConditionalGeneration", **QWEN),
    Family("qwen2_5_vl", "Qwen2.5-VL", "Qwen2_5_VLForConditionalGeneration",
           **dict(QWEN, lora_vision=("qkv", "proj", "gate_proj", "up_proj", "down_proj"))),
    Family("qwen3_vl", "Qwen3-VL", "Qwen3VLForConditionalGeneration",
           **dict(QWEN, projector=("model.visual.merger", "model.visual.deepstack_merger_list"),
                  lora_vision=("qkv", "proj", "linear_fc1", "linear_fc2"))),
    Family("idefics3", "Idefics3", "Idefics3ForConditionalGeneration", **IDEFICS),
    Family("smolvlm", "SmolVLM", "SmolVLMForConditionalGeneration", **IDEFICS),
    Family("gemma3", "Gemma3", "Gemma3ForConditionalGeneration", **LLAVA),
    Family("paligemma", "PaliGemma", "PaliGemmaForConditionalGeneration", **LLAVA, chat=False),
    Family("internvl", "InternVL", "InternVLForConditionalGeneration", **LLAVA,
           lora_vision=("q_proj", "k_proj", "v_proj", "projection_layer", "fc1", "fc2"), regions=RegionLayout.internvl_tiles),
    Family("mistral3", "Mistral3 (Pixtral)", "Mistral3ForConditionalGeneration", **LLAVA,
           blank_image=BlankImage.mistral_merged, lora_vision=FULL_PROJECTIONS, regions=RegionLayout.pixtral),
]}


def supported() -> str:
    """``"LLaVA (llava), VipLLaVA (vipllava), ..."``: for messages."""
    return ", ".join(f"{f.name} ({t})" for t, f in FAMILIES.items())
