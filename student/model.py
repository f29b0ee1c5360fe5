"""Building, loading and checking the student.

A student is a saved ``transformers`` image-text-to-text model of a supported family (the registry
``kd_cache.families.FAMILIES``) plus its own processor. It is loaded and saved as its own class, so the result of
every stage loads with ``from_pretrained`` and any tool that serves HF models.
``compose_student`` makes a LLaVA-style one from parts as in LLaVA-KD: a vision tower (a SigLIP/CLIP vision model
directory, or the vision tower of an existing LLaVA-style checkpoint), a causal LM, and a fresh
two-layer GELU MLP projector. ``check_compatibility`` compares a cache manifest with a student before
training and names both values of whatever differs.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kd_cache.encoding import CHATML_TEMPLATE
from kd_cache.errors import UserError
from kd_cache.fingerprint import tokenizer_hash
from kd_cache.processing import config_image_token_id, encode
from kd_cache.runtime import attn_implementation, dtype_from_name
from kd_cache.schema import Manifest
from student.families import UnsupportedModelError, family_of, supported

DEFAULT_IMAGE_TOKEN = "<image>"


class CompatibilityError(UserError, ValueError):
    """A cache and a student (or the parts of a student) that cannot be used together."""


def load_student(path: str | Path, dtype: torch.dtype = torch.float32, *, load_in_4bit: bool = False):
    """Load ``(model, processor)`` from a saved student of any family in ``kd_cache.families.FAMILIES``,
    as its own class (``AutoModelForImageTextToText``) with its own processor; fp32 master weights by
    default (autocast on GPU). A family not supported is refused with the list of supported ones.

    A folder holding a peft adapter (the ``OUT`` of a ``kd-train --lora-r`` run) is loaded on its base
    student and merged (``student.lora.load_merged``): the same model class, plain weights.
    ``load_in_4bit``: the language model's weights in NF4 (QLoRA, ``student.lora.quantization_config``)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from student import lora

    if lora.is_adapter_dir(path):
        if load_in_4bit:
            raise lora.LoraError(f"--student {path} is a LoRA adapter: merge it first (kd-train --merge writes "
                                 "OUT/merged/) and quantise the merged student")
        model = lora.load_merged(path, dtype)
        return model, _processor(path, family_of(model.config))
    local = Path(path).exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", str(path))  # else a hub id
    if local and not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"--student {path}: no config.json there; expected a saved image-text-to-text model "
                                f"of a supported family ({supported()}), or make one with `kd-train init-student`")
    config = AutoConfig.from_pretrained(path)
    family = family_of(config, f"--student {path}")
    quant = {"quantization_config": lora.quantization_config(config)} if load_in_4bit else {}
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation(),
                                                        **quant)
    if type(model).__name__ != family.model_class:
        raise UnsupportedModelError(f"--student {path}: loaded as {type(model).__name__}, expected "
                                    f"{family.model_class} for a {family.name} model")
    return model, _processor(path, family)


def _processor(path: str | Path, family):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    if getattr(processor, "image_processor", None) is None or getattr(processor, "tokenizer", None) is None:
        raise CompatibilityError(f"--student {path}: the saved processor is {type(processor).__name__}; expected "
                                 f"the {family.name} processor with an image processor and a tokenizer")
    return processor


# ----------------------------------------------------------------------------------------------- compose


def _safetensors_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"--vision {path}: no *.safetensors weights found")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def _vision_tower_from(path: Path):
    """Return ``(vision_model, vision_config, source_config_or_None)`` from a vision or LLaVA-style dir.

    A LLaVA-style checkpoint (any config with a ``vision_config``) contributes only its vision tower:
    the weights under ``...vision_tower.`` are read from its safetensors files, so a 7B teacher's
    language model is never loaded to take a 400M vision encoder.
    """
    from transformers import AutoConfig, AutoModel

    cfg = AutoConfig.from_pretrained(path)
    if getattr(cfg, "vision_config", None) is None or cfg.model_type.endswith("vision_model"):
        # A vision-model directory (SiglipVisionModel, CLIPVisionModel, ...).
        return AutoModel.from_pretrained(path, dtype=torch.float32), cfg, None

    vcfg = cfg.vision_config
    model = AutoModel.from_config(vcfg)
    own = set(model.state_dict())
    state = {}
    for key, value in _safetensors_state(path).items():
        if "vision_tower." in key:
            key = key.split("vision_tower.", 1)[1]
        elif not (cfg.model_type in ("siglip", "clip") and key.startswith("vision_model.")):
            continue  # a dual-encoder checkpoint keeps its image side under vision_model.
        if key not in own and key.startswith("vision_model.") and key[len("vision_model."):] in own:
            key = key[len("vision_model."):]  # older layouts nest the tower one level deeper
        state[key] = value
    if own - set(state):
        # An unfamiliar key layout: let transformers' own checkpoint conversion load the whole model.
        from transformers import AutoModelForImageTextToText

        full = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
        return full.model.vision_tower, vcfg, cfg
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=True)
    return model, vcfg, cfg


@dataclass
class _Vision:
    """The vision side of a composed student: the tower, its image processor and how its features are read."""

    tower: torch.nn.Module
    config: Any  # the tower's own config (a SiglipVisionConfig, CLIPVisionConfig, ...)
    image_processor: Any
    strategy: str  # vision_feature_select_strategy: "default" drops the CLS feature, "full" keeps every one
    extra_tokens: int  # num_additional_image_tokens (1: CLIP's CLS)
    layer: int  # vision_feature_layer


@dataclass
class _LLM:
    """The language side: the causal LM (embeddings grown to the tokenizer) and its tokenizer with the image token."""

    model: Any
    tokenizer: Any
    image_token_id: int


def compose_student(vision_path: str | Path, llm_path: str | Path, out_dir: str | Path, *,
                    vision_feature_layer: int | None = None, image_token: str = DEFAULT_IMAGE_TOKEN,
                    seed: int = 0, dtype: str = "float32") -> Path:
    """Compose ``vision tower + fresh 2-layer GELU MLP projector + causal LM`` and save it as a LLaVA.

    * ``vision_path``: a vision-model directory (e.g. ``SiglipVisionModel``) or any LLaVA-style
      checkpoint whose vision tower is reused (the teacher's, say); its image processor is reused too.
    * ``llm_path``: a causal LM (e.g. ``Qwen2ForCausalLM``) with its tokenizer and chat template.
    * ``vision_feature_layer``: which vision hidden layer feeds the projector; default: the source
      LLaVA's setting, else -2 (the LLaVA / LLaVA-KD recipe).

    The image token is added to the tokenizer if missing (the embeddings grow only if the new id does
    not fit the LM's existing vocabulary). Returns ``out_dir``.
    """
    torch_dtype = dtype_from_name(dtype)
    vision_path, llm_path, out_dir = Path(vision_path), Path(llm_path), Path(out_dir)
    for flag, p in (("--vision", vision_path), ("--llm", llm_path)):
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"{flag} {p}: no config.json there; expected a saved transformers model")

    # In this order: loading the parts draws from the global RNG (a fresh tower module's init, the grown
    # embedding rows), then the projector is initialised from ``seed``.
    vision = _setup_vision(vision_path, vision_feature_layer)
    llm = _setup_llm(llm_path, image_token)
    config = _llava_config(vision, llm)
    model = _assemble_model(config, vision, llm, seed)
    processor = _llava_processor(vision, llm, image_token)
    _check_image_geometry(model, processor)
    _save_student(model, processor, out_dir, torch_dtype, {
        "vision": str(vision_path), "llm": str(llm_path), "vision_feature_layer": vision.layer,
        "vision_feature_select_strategy": vision.strategy, "image_token": image_token, "seed": seed,
    })
    return out_dir


def _setup_vision(vision_path: Path, vision_feature_layer: int | None) -> _Vision:
    """The vision tower and image processor of ``--vision``, and which of its features feed the projector:
    the source LLaVA's strategy, layer and token count when it is one, else CLIP's or SigLIP's defaults
    (layer -2); ``vision_feature_layer`` overrides the layer."""
    from transformers import AutoImageProcessor, AutoProcessor

    tower, vcfg, source_cfg = _vision_tower_from(vision_path)
    image_processor = AutoImageProcessor.from_pretrained(vision_path)
    has_cls = vcfg.model_type.startswith("clip")  # SigLIP has no CLS token, CLIP has one

    # Prefer the source processor's geometry (a LLaVA dir knows its own strategy and token counts).
    strategy, extra_tokens, layer = ("default" if has_cls else "full"), (1 if has_cls else 0), -2
    if source_cfg is not None:
        strategy = getattr(source_cfg, "vision_feature_select_strategy", strategy)
        layer = getattr(source_cfg, "vision_feature_layer", layer)
        try:
            src_proc = AutoProcessor.from_pretrained(vision_path)
            extra_tokens = getattr(src_proc, "num_additional_image_tokens", extra_tokens)
        except (OSError, ValueError, TypeError):
            pass
    if vision_feature_layer is not None:
        layer = vision_feature_layer
    n_layers = vcfg.num_hidden_layers
    if not -(n_layers + 1) <= layer <= n_layers:
        raise ValueError(f"--vision-feature-layer {layer}: the vision tower has {n_layers} layers "
                         f"(hidden states -{n_layers + 1}..{n_layers})")
    return _Vision(tower, vcfg, image_processor, strategy, extra_tokens, layer)


def load_tokenizer(path: str | Path):
    """The tokenizer saved in ``path`` as it was saved.

    ``AutoTokenizer`` picks a class from the model's type when ``tokenizer_config.json`` names the generic
    backend (``TokenizersBackend``), and that class rebuilds its own normaliser, pre-tokenizer and decoder
    over the saved vocabulary: a SentencePiece-style tokenizer beside a Qwen2 LM came back byte-level
    (other pieces, other offsets, the same vocabulary hash). When the loaded pipeline differs from the
    saved ``tokenizer.json``, the file is loaded as it is (``PreTrainedTokenizerFast``)."""
    import json

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tokenizer = AutoTokenizer.from_pretrained(path)
    saved = Path(path) / "tokenizer.json"
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if saved.is_file() and backend is not None:
        want, got = json.loads(saved.read_text()), json.loads(backend.to_str())
        if any(want.get(k) != got.get(k) for k in ("normalizer", "pre_tokenizer", "decoder")):
            tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    return tokenizer


def _setup_llm(llm_path: Path, image_token: str) -> _LLM:
    """The causal LM of ``--llm`` and its tokenizer, with a pad token (EOS when it has none) and the image
    token (added when missing; the embeddings grow only if its id does not fit the LM's vocabulary)."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(llm_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_tokens([image_token], special_tokens=True)
    image_token_id = tokenizer.convert_tokens_to_ids(image_token)

    lm = AutoModelForCausalLM.from_pretrained(llm_path, dtype=torch.float32)
    if len(tokenizer) > lm.config.vocab_size:
        lm.resize_token_embeddings(len(tokenizer))
    return _LLM(lm, tokenizer, image_token_id)


def _llava_config(vision: _Vision, llm: _LLM):
    """The ``LlavaConfig`` of the two parts: a GELU projector, one image = the tower's patches (plus CLS
    kept by the "full" strategy), the LM's embedding tying."""
    from transformers import LlavaConfig

    vcfg, tcfg = vision.config, llm.model.config
    patches = (vcfg.image_size // vcfg.patch_size) ** 2
    return LlavaConfig(
        vision_config=vcfg.to_dict(),
        text_config=tcfg.to_dict(),
        image_token_id=llm.image_token_id,
        image_seq_length=patches + vision.extra_tokens - (1 if vision.strategy == "default" else 0),
        projector_hidden_act="gelu",
        vision_feature_select_strategy=vision.strategy,
        vision_feature_layer=vision.layer,
        tie_word_embeddings=bool(getattr(tcfg, "tie_word_embeddings", False)),
    )


def _assemble_model(config, vision: _Vision, llm: _LLM, seed: int):
    """A ``LlavaForConditionalGeneration`` with the parts' weights and a projector initialised from ``seed``."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)  # the projector is the only freshly initialised part
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(vision.tower.state_dict(), strict=True)
    lm = llm.model
    model.model.language_model.load_state_dict(getattr(lm, lm.base_model_prefix).state_dict(), strict=True)
    model.lm_head.load_state_dict(lm.get_output_embeddings().state_dict(), strict=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


def _llava_processor(vision: _Vision, llm: _LLM, image_token: str):
    """The ``LlavaProcessor`` of the two parts: the tower's image processor, the LM's tokenizer and chat
    template (ChatML when the LLM has none)."""
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=vision.image_processor,
        tokenizer=llm.tokenizer,
        patch_size=vision.config.patch_size,
        vision_feature_select_strategy=vision.strategy,
        chat_template=llm.tokenizer.chat_template or CHATML_TEMPLATE,
        image_token=image_token,
        num_additional_image_tokens=vision.extra_tokens,
    )


def _save_student(model, processor, out_dir: Path, dtype: torch.dtype, recipe: dict[str, Any]) -> None:
    """Save the model in ``dtype``, its processor, and ``kd_student.json`` (how it was composed) to ``out_dir``."""
    model.to(dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    (out_dir / "kd_student.json").write_text(json.dumps(recipe, indent=2) + "\n")


def _check_image_geometry(model, processor) -> None:
    """The processor must expand an image to exactly as many tokens as the vision tower yields features."""
    from PIL import Image

    conv = [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "a"}]
    enc = encode(processor, config_image_token_id(model.config), conv, [Image.new("RGB", (64, 64), "white")],
                 template="pretrain")
    with torch.no_grad():
        pixels = enc.inputs["pixel_values"].to(model.dtype)
        n_feats = int(model.model.get_image_features(pixel_values=pixels).pooler_output[0].shape[0])
    n_tokens = enc.image_token_counts[0]
    if n_tokens != n_feats:
        raise CompatibilityError(
            f"processor expands one image to {n_tokens} image tokens but the vision tower yields {n_feats} "
            "features: check the image processor size and --vision-feature-layer/strategy")


# ----------------------------------------------------------------------------------------- compatibility


def student_facts(model, processor) -> dict[str, Any]:
    """The values a cache must agree with, read from the student itself."""
    tok = processor.tokenizer
    return {
        # The vocabulary is the tokenizer's: output rows beyond it are padding (checkpoints pad their
        # embeddings to a multiple of 64 or 128), carry no token and are masked out of the teacher cache.
        "vocab_size": len(tok),
        "head_rows": int(model.get_output_embeddings().weight.shape[0]),
        "tokenizer_hash": tokenizer_hash(tok),
        # The token the model fills with image features (Gemma3's processor names another one, <start_of_image>).
        "image_token_id": config_image_token_id(model.config),
        "max_position_embeddings": getattr(model.config.get_text_config(), "max_position_embeddings", None),
    }


def check_compatibility(manifest: Manifest, model, processor, *, template: str | None = None,
                        cross: bool = False) -> None:
    """Raise ``CompatibilityError`` naming both values if the cache and the student disagree.

    Checked: vocab size, tokenizer hash (identical token ids), image token id (the model config's), the
    template the stage expects (``template``; None = any), and that the longest cached sample fits the
    student's position embeddings. How many tokens each image expands to depends on the image (dynamic
    resolution, tiles) and on the processor, so it is checked per sample where the data stream
    re-encodes a sample with the student's processor, not here. ``cross``: the student is aligned to the
    cache (``student.alignment``): its own vocabulary, image token and sample lengths are its business.
    """
    s = student_facts(model, processor)
    problems = []
    if cross:
        manifest = dataclasses.replace(manifest, vocab_size=s["vocab_size"], tokenizer_hash=s["tokenizer_hash"],
                                       image_token_id=None if manifest.image_token_id is None else s["image_token_id"],
                                       shards=[])
    if manifest.vocab_size != s["vocab_size"]:
        problems.append(f"cache vocab_size {manifest.vocab_size} != student vocab_size {s['vocab_size']}: "
                        "logit distillation needs a shared tokenizer and output vocabulary")
    if s["head_rows"] < s["vocab_size"]:
        problems.append(f"student output layer has {s['head_rows']} rows for {s['vocab_size']} tokens: "
                        "resize the token embeddings to the tokenizer")
    if manifest.tokenizer_hash != s["tokenizer_hash"]:
        problems.append(f"cache tokenizer_hash {manifest.tokenizer_hash} != student tokenizer_hash "
                        f"{s['tokenizer_hash']}: teacher and student token ids differ; logit distillation "
                        "needs a shared tokenizer")
    if manifest.image_token_id is not None and manifest.image_token_id != s["image_token_id"]:
        problems.append(f"cache image_token_id {manifest.image_token_id} != student image_token_id "
                        f"{s['image_token_id']}")
    if template is not None and manifest.template != template:
        problems.append(f"cache template {manifest.template!r} != stage template {template!r}: DPT expects "
                        "a 'pretrain' (caption) cache, SFT/DFT a 'chat' cache (pass --any-template to override)")
    longest, max_pos = manifest.longest_sample, s["max_position_embeddings"]
    if max_pos is not None and longest > max_pos:
        problems.append(f"the cache's longest sample has {longest} tokens > student max_position_embeddings "
                        f"{max_pos} (built with --max-length {manifest.max_length})")
    if problems:
        raise CompatibilityError("cache and student are incompatible:\n  " + "\n  ".join(problems))
