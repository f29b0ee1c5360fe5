"""Tiny random-weight models of every supported VLM family (``kd_cache.families``), each with its real
processor class.

Each family's builder saves, to a folder, a model built from its ``transformers`` config classes
(2 text layers, hidden 32-64, a 2-layer vision tower on 32-64 pixel images) together with the
family's own processor (image processor + tokenizer + chat template), so that callers exercise
``AutoModelForImageTextToText.from_pretrained`` / ``AutoProcessor.from_pretrained`` exactly as with a
hub checkpoint. Nothing is downloaded: one byte-level BPE is trained on the spot and wrapped per
family with the special tokens its processor expands images into; the config's image token id is
the id the processor fills. ``student=True`` builds a smaller language model of the same family with
the same processor (so the two share the tokenizer and the image-token expansion).

The chat templates are short hand-written versions of each family's own (same turn markers, same
image placeholder); LLaVA-1.5's and LLaVA-NeXT's generation prompt ends in a space on purpose
(``ASSISTANT: ``), the case where an answer's first token straddles the prompt/answer boundary.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from kd_cache.families import FAMILIES as REGISTRY

# -- tokenizer -------------------------------------------------------------------------------------

ROW_COL = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>", "<s>", "</s>", "<bos>", "<eos>", "<pad>",
    "<image>", "<video>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",  # Qwen
    "<fake_token_around_image>", "<global-img>", "<end_of_utterance>", "<|begin_of_text|>",  # Idefics3/SmolVLM
    *ROW_COL,
    "<start_of_image>", "<end_of_image>", "<image_soft_token>", "<start_of_turn>", "<end_of_turn>",  # Gemma3
    "<img>", "</img>", "<IMG_CONTEXT>",  # InternVL
    "[IMG]", "[IMG_BREAK]", "[IMG_END]", "[INST]", "[/INST]",  # Pixtral / Mistral3
]

WORDS = ["red", "green", "blue", "yellow", "circle", "square", "triangle", "left", "right", "top", "bottom",
         "one", "two", "three", "Paris", "cat", "dog", "image", "picture", "shape", "colour"]


def _corpus() -> list[str]:
    rng = random.Random(0)
    lines = ["What colour is the shape? How many shapes are there? Compare the two images.",
             "USER: ASSISTANT: User: Assistant: user model assistant system",
             "The answer is yes. Describe the image in one word. Here is the original image and crops."]
    lines += [" ".join(rng.choice(WORDS) for _ in range(8)) + "." for _ in range(300)]
    return lines


# Which tokenizer the builders wrap: "bpe" (byte-level BPE, GPT-2 / Qwen style) unless a test asks for
# "sentencepiece" (SentencePiece-style BPE: "▁" for spaces, byte fallback, fewer merges: Llama / Gemma
# style), a tokenizer of its own for the cross-tokenizer pairs (``other_tokenizer``).
_VARIANT = ["bpe"]


@functools.lru_cache(maxsize=2)
def _tokenizer_json(variant: str) -> str:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if variant == "sentencepiece":
        tok = Tokenizer(models.BPE(byte_fallback=True, unk_token=None))
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
        bytes_ = [f"<0x{b:02X}>" for b in range(256)]
        trainer = trainers.BpeTrainer(vocab_size=len(SPECIAL) + 256 + 90, special_tokens=SPECIAL + bytes_,
                                      show_progress=False)
        tok.train_from_iterator(_corpus(), trainer=trainer)
        return tok.to_str()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok.to_str()


def _bpe_json() -> str:
    return _tokenizer_json(_VARIANT[0])


class other_tokenizer:
    """``with other_tokenizer(): family.build(...)``: the builders wrap the SentencePiece-style tokenizer
    (other ids, other pieces, byte fallback) instead of the shared byte-level BPE."""

    def __enter__(self):
        _VARIANT[0] = "sentencepiece"

    def __exit__(self, *exc):
        _VARIANT[0] = "bpe"


def make_tokenizer(*, bos: str | None = None, eos: str, pad: str, named: dict[str, str] | None = None,
                   chat_template: str | None = None):
    """The shared BPE wrapped as a ``PreTrainedTokenizerFast`` with a family's special-token names.

    ``named`` become tokenizer attributes (``tokenizer.image_token`` / ``image_token_id``, ...), which
    is how the Qwen, Gemma3 and InternVL processors find their tokens.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_bpe_json()), bos_token=bos, eos_token=eos, pad_token=pad,
        unk_token=None, extra_special_tokens=dict(named or {}),
    )
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


# -- chat templates (the structured-content form processors render) --------------------------------

def _template(*, bos: str = "", user: str, assistant: str, end: str, gen: str, image: str,
              user_end: str | None = None) -> str:
    """A prefix-stable chat template: ``bos``, then per message its role prefix, content and end marker
    (``user_end`` after user and system turns, ``end`` after assistant turns)."""
    user_end = end if user_end is None else user_end
    return (
        bos + "{% for message in messages %}"
        "{% if message['role'] == 'user' %}" + user + "{% elif message['role'] == 'system' %}SYSTEM: "
        "{% else %}" + assistant + "{% endif %}"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for part in message['content'] %}{% if part['type'] == 'image' %}" + image +
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
        "{% if message['role'] == 'assistant' %}" + end + "{% else %}" + user_end + "{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}" + gen + "{% endif %}"
    )


CHATML = dict(user="<|im_start|>user\n", assistant="<|im_start|>assistant\n", end="<|im_end|>\n",
              gen="<|im_start|>assistant\n")
VICUNA = dict(user="USER: ", assistant="ASSISTANT: ", end="</s>", user_end=" ", gen="ASSISTANT: ")  # gen prompt ends in a space
T_LLAVA = _template(**VICUNA, image="<image>\n")
T_CHATML_IMAGE = _template(**CHATML, image="<image>\n")
T_QWEN = _template(**CHATML, image="<|vision_start|><|image_pad|><|vision_end|>")
T_IDEFICS = _template(bos="<|begin_of_text|>", user="User:", assistant="Assistant: ", end="<end_of_utterance>\n",
                      gen="Assistant:", image="<image>")
T_GEMMA = _template(bos="<bos>", user="<start_of_turn>user\n", assistant="<start_of_turn>model\n",
                    end="<end_of_turn>\n", gen="<start_of_turn>model\n", image="<start_of_image>")
T_INTERNVL = _template(**CHATML, image="<IMG_CONTEXT>\n")
T_MISTRAL = _template(bos="<s>", user="[INST]", assistant="", end="</s>", user_end="[/INST]", gen="", image="[IMG]")


# -- model sizes -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sizes:
    hidden: int
    heads: int
    kv_heads: int
    inter: int
    layers: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


TEACHER = Sizes(hidden=64, heads=4, kv_heads=2, inter=128)
STUDENT = Sizes(hidden=32, heads=2, kv_heads=1, inter=64)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
# M-RoPE: sections of head_dim / 2 rotary frequencies for (temporal, height, width)
MROPE = {16: [2, 3, 3]}


def _text(cls, s: Sizes, vocab: int, pad_id: int, **kw):
    return cls(vocab_size=vocab, hidden_size=s.hidden, num_hidden_layers=s.layers, num_attention_heads=s.heads,
               num_key_value_heads=s.kv_heads, intermediate_size=s.inter, max_position_embeddings=1024,
               pad_token_id=pad_id, **kw)


def _save(model_cls, config, processor, out: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _ids(tok, *names: str) -> list[int]:
    return [tok.convert_tokens_to_ids(n) for n in names]


# -- the families ----------------------------------------------------------------------------------

def llava_processor():
    """LLaVA-1.5's processor at the tiny geometry (CLIP 32 px, patch 8: 16 image tokens), also VipLLaVA's."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    tok = make_tokenizer(bos="<s>", eos="</s>", pad="<pad>")
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return LlavaProcessor(ip, tok, patch_size=8, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=T_LLAVA)


def build_llava(out: Path, s: Sizes, seed: int) -> Path:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    proc = llava_processor()
    tok = proc.tokenizer
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**VISION, image_size=32, patch_size=8),
                      text_config=_text(LlamaConfig, s, len(tok), tok.pad_token_id),
                      image_token_id=proc.image_token_id, vision_feature_select_strategy="default",
                      vision_feature_layer=-1, image_seq_length=16)
    return _save(LlavaForConditionalGeneration, cfg, proc, out, seed)


def build_vipllava(out: Path, s: Sizes, seed: int) -> Path:
    """VipLLaVA: LLaVA's processor, a projector with a layernorm over several vision layers."""
    from transformers import CLIPVisionConfig, LlamaConfig, VipLlavaConfig, VipLlavaForConditionalGeneration

    proc = llava_processor()
    tok = proc.tokenizer
    cfg = VipLlavaConfig(vision_config=CLIPVisionConfig(**VISION, image_size=32, patch_size=8),
                         text_config=_text(LlamaConfig, s, len(tok), tok.pad_token_id),
                         image_token_index=proc.image_token_id, vision_feature_layers=[-2, -1], image_seq_length=16)
    return _save(VipLlavaForConditionalGeneration, cfg, proc, out, seed)


PINPOINTS = [[32, 64], [64, 32], [64, 64]]


def build_llava_next(out: Path, s: Sizes, seed: int) -> Path:
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    tok = make_tokenizer(bos="<s>", eos="</s>", pad="<pad>")
    ip = LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                 image_grid_pinpoints=PINPOINTS)
    proc = LlavaNextProcessor(ip, tok, patch_size=8, vision_feature_select_strategy="default",
                              num_additional_image_tokens=1, chat_template=T_LLAVA)
    cfg = LlavaNextConfig(vision_config=CLIPVisionConfig(**VISION, image_size=32, patch_size=8),
                          text_config=_text(LlamaConfig, s, len(tok), tok.pad_token_id),
                          image_token_index=proc.image_token_id, vision_feature_select_strategy="default",
                          vision_feature_layer=-1, image_grid_pinpoints=PINPOINTS, image_seq_length=16)
    return _save(LlavaNextForConditionalGeneration, cfg, proc, out, seed)


def build_llava_onevision(out: Path, s: Sizes, seed: int) -> Path:
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    tok = make_tokenizer(eos="<|im_end|>", pad="<|pad|>", named={"image_token": "<image>", "video_token": "<video>"})
    grid = [[32, 32], [32, 64], [64, 32], [64, 64]]
    ip = LlavaOnevisionImageProcessor(size={"height": 32, "width": 32}, image_grid_pinpoints=grid)
    vp = LlavaOnevisionVideoProcessor(size={"height": 32, "width": 32})
    proc = LlavaOnevisionProcessor(ip, tok, vp, num_image_tokens=16, vision_feature_select_strategy="full",
                                   chat_template=T_CHATML_IMAGE)
    cfg = LlavaOnevisionConfig(vision_config=SiglipVisionConfig(**VISION, image_size=32, patch_size=8),
                               text_config=_text(Qwen2Config, s, len(tok), tok.pad_token_id),
                               image_token_index=proc.image_token_id, video_token_index=proc.video_token_id,
                               vision_feature_select_strategy="full", vision_feature_layer=-1,
                               image_grid_pinpoints=grid, vision_aspect_ratio="anyres_max_9")
    return _save(LlavaOnevisionForConditionalGeneration, cfg, proc, out, seed)


QWEN_NAMED = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
              "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}
# 8-pixel patches merged 2x2: one visual token per 16x16 pixels, images between 16x16 and 64x64.
QWEN_PIXELS = dict(size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64}, patch_size=8, merge_size=2,
                   temporal_patch_size=2)


def _qwen_parts(s: Sizes, *, config_cls, vision, text_cls, processor_cls, video_cls, pixels: dict = QWEN_PIXELS,
                vocab: int | None = None, mrope_section: list[int] | None = None, text_kw: dict | None = None):
    """(config, processor) of a Qwen-VL family model; ``vocab`` pads the tokenizer with never-used added
    tokens to exactly that many tokens (the benchmarks' 32k vocabulary)."""
    from transformers import Qwen2VLImageProcessor

    tok = make_tokenizer(eos="<|im_end|>", pad="<|pad|>", named=QWEN_NAMED)
    if vocab is not None and len(tok) < vocab:
        tok.add_tokens([f"<bench_unused_{i}>" for i in range(vocab - len(tok))])
    proc = processor_cls(Qwen2VLImageProcessor(**pixels), tok, video_cls(**pixels), chat_template=T_QWEN)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section or MROPE[s.head_dim]}
    kw = dict(text_kw or {})
    if text_cls.__name__.startswith("Qwen3"):
        rope["mrope_interleaved"] = True
        kw["head_dim"] = s.head_dim
    text = _text(text_cls, s, vocab or len(tok), tok.pad_token_id, rope_parameters=rope, **kw)
    start, end, img, vid = _ids(tok, "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
    cfg = config_cls(text_config=text.to_dict(), vision_config=vision(s), image_token_id=img, video_token_id=vid,
                     vision_start_token_id=start, vision_end_token_id=end)
    return cfg, proc


def _qwen(out: Path, s: Sizes, seed: int, *, model_cls, **parts) -> Path:
    cfg, proc = _qwen_parts(s, **parts)
    return _save(model_cls, cfg, proc, out, seed)


def qwen2_vl_parts(s: Sizes, *, vision: dict | None = None, **kw):
    """(Qwen2VLConfig, Qwen2VLProcessor) at sizes ``s``: the ``build_qwen2_vl`` model without saving it
    (``benchmarks.bench_teacher`` builds a larger one in memory). ``vision``: Qwen2VLVisionConfig
    fields overriding the tiny tower's; ``kw``: see ``_qwen_parts``."""
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLProcessor,
        Qwen2VLTextConfig,
        Qwen2VLVideoProcessor,
        Qwen2VLVisionConfig,
    )

    def vision_cfg(s: Sizes):
        fields = dict(depth=2, embed_dim=32, hidden_size=s.hidden, num_heads=2, mlp_ratio=2, patch_size=8,
                      spatial_merge_size=2, temporal_patch_size=2)
        return Qwen2VLVisionConfig(**{**fields, **(vision or {})}).to_dict()

    return _qwen_parts(s, config_cls=Qwen2VLConfig, vision=vision_cfg, text_cls=Qwen2VLTextConfig,
                       processor_cls=Qwen2VLProcessor, video_cls=Qwen2VLVideoProcessor, **kw)


def build_qwen2_vl(out: Path, s: Sizes, seed: int) -> Path:
    from transformers import Qwen2VLForConditionalGeneration

    cfg, proc = qwen2_vl_parts(s)
    return _save(Qwen2VLForConditionalGeneration, cfg, proc, out, seed)


def build_qwen2_5_vl(out: Path, s: Sizes, seed: int) -> Path:
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2_5_VLTextConfig,
        Qwen2_5_VLVisionConfig,
        Qwen2VLVideoProcessor,
    )

    def vision(s: Sizes):
        return Qwen2_5_VLVisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8,
                                      spatial_merge_size=2, temporal_patch_size=2, window_size=32,
                                      out_hidden_size=s.hidden, fullatt_block_indexes=[1]).to_dict()

    return _qwen(out, s, seed, model_cls=Qwen2_5_VLForConditionalGeneration, config_cls=Qwen2_5_VLConfig,
                 vision=vision, text_cls=Qwen2_5_VLTextConfig, processor_cls=Qwen2_5_VLProcessor,
                 video_cls=Qwen2VLVideoProcessor)


def build_qwen3_vl(out: Path, s: Sizes, seed: int) -> Path:
    from transformers import (
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLTextConfig,
        Qwen3VLVideoProcessor,
        Qwen3VLVisionConfig,
    )

    def vision(s: Sizes):
        return Qwen3VLVisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8,
                                   spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=s.hidden,
                                   num_position_embeddings=64, deepstack_visual_indexes=[0]).to_dict()

    return _qwen(out, s, seed, model_cls=Qwen3VLForConditionalGeneration, config_cls=Qwen3VLConfig, vision=vision,
                 text_cls=Qwen3VLTextConfig, processor_cls=Qwen3VLProcessor, video_cls=Qwen3VLVideoProcessor)


# Idefics3 / SmolVLM: 32-pixel tiles of 4x4 8-pixel patches, pixel-shuffled by 2: 4 tokens a tile;
# images are resized to a longest edge of 64 and split into up to 2x2 tiles plus a global tile.
IDEFICS_PIXELS = dict(size={"longest_edge": 64}, max_image_size={"longest_edge": 32}, do_image_splitting=True)


def _idefics(out: Path, s: Sizes, seed: int, *, model_cls, config_cls, vision_cls, processor_cls, image_cls,
             video_cls=None) -> Path:
    """An Idefics3-shaped model (Idefics3, SmolVLM: a Llama text model, tiles pixel-shuffled by 2)."""
    from transformers import LlamaConfig

    tok = make_tokenizer(bos="<|begin_of_text|>", eos="<end_of_utterance>", pad="<|pad|>")
    videos = () if video_cls is None else (video_cls(),)
    proc = processor_cls(image_cls(**IDEFICS_PIXELS), tok, *videos, image_seq_len=4, chat_template=T_IDEFICS)
    cfg = config_cls(vision_config=vision_cls(**VISION, image_size=32, patch_size=8).to_dict(),
                     text_config=_text(LlamaConfig, s, len(tok), tok.pad_token_id).to_dict(),
                     image_token_id=proc.image_token_id, scale_factor=2, pad_token_id=tok.pad_token_id)
    return _save(model_cls, cfg, proc, out, seed)


def build_idefics3(out: Path, s: Sizes, seed: int) -> Path:
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
        Idefics3VisionConfig,
    )

    return _idefics(out, s, seed, model_cls=Idefics3ForConditionalGeneration, config_cls=Idefics3Config,
                    vision_cls=Idefics3VisionConfig, processor_cls=Idefics3Processor, image_cls=Idefics3ImageProcessor)


def build_smolvlm(out: Path, s: Sizes, seed: int) -> Path:
    from transformers import (
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMImageProcessor,
        SmolVLMProcessor,
        SmolVLMVideoProcessor,
        SmolVLMVisionConfig,
    )

    return _idefics(out, s, seed, model_cls=SmolVLMForConditionalGeneration, config_cls=SmolVLMConfig,
                    vision_cls=SmolVLMVisionConfig, processor_cls=SmolVLMProcessor, image_cls=SmolVLMImageProcessor,
                    video_cls=SmolVLMVideoProcessor)


def build_gemma3(out: Path, s: Sizes, seed: int) -> Path:
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tok = make_tokenizer(bos="<bos>", eos="<eos>", pad="<pad>", named=named)
    ip = Gemma3ImageProcessor(size={"height": 32, "width": 32}, do_pan_and_scan=False)
    proc = Gemma3Processor(ip, tok, chat_template=T_GEMMA, image_seq_length=4)
    text = _text(Gemma3TextConfig, s, len(tok), tok.pad_token_id, head_dim=s.head_dim, query_pre_attn_scalar=s.head_dim,
                 sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    boi, eoi, soft = _ids(tok, "<start_of_image>", "<end_of_image>", "<image_soft_token>")
    cfg = Gemma3Config(text_config=text.to_dict(),
                       vision_config=SiglipVisionConfig(**VISION, image_size=32, patch_size=8).to_dict(),
                       mm_tokens_per_image=4, boi_token_index=boi, eoi_token_index=eoi, image_token_index=soft)
    return _save(Gemma3ForConditionalGeneration, cfg, proc, out, seed)


def build_paligemma(out: Path, s: Sizes, seed: int) -> Path:
    from transformers import (
        GemmaConfig,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessor,
        SiglipVisionConfig,
    )

    tok = make_tokenizer(bos="<bos>", eos="<eos>", pad="<pad>")
    ip = SiglipImageProcessor(size={"height": 32, "width": 32}, image_seq_length=16)
    proc = PaliGemmaProcessor(ip, tok)  # adds PaliGemma's <loc....>/<seg...> tokens to the tokenizer
    text = _text(GemmaConfig, s, len(tok), tok.pad_token_id, head_dim=s.head_dim)
    cfg = PaliGemmaConfig(text_config=text.to_dict(),
                          vision_config=SiglipVisionConfig(**VISION, image_size=32, patch_size=8,
                                                           projection_dim=s.hidden).to_dict(),
                          image_token_index=proc.image_token_id, projection_dim=s.hidden, hidden_size=s.hidden,
                          vocab_size=len(tok))
    return _save(PaliGemmaForConditionalGeneration, cfg, proc, out, seed)


def build_internvl(out: Path, s: Sizes, seed: int) -> Path:
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
        InternVLVisionConfig,
        Qwen2Config,
    )

    named = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
             "video_token": "<video>"}
    tok = make_tokenizer(eos="<|im_end|>", pad="<|pad|>", named=named)
    ip = GotOcr2ImageProcessor(size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1, max_patches=4)
    proc = InternVLProcessor(ip, tok, InternVLVideoProcessor(size={"height": 32, "width": 32}), image_seq_length=4,
                             chat_template=T_INTERNVL)
    vision = InternVLVisionConfig(**VISION, image_size=[32, 32], patch_size=[8, 8])
    cfg = InternVLConfig(vision_config=vision.to_dict(),
                         text_config=_text(Qwen2Config, s, len(tok), tok.pad_token_id).to_dict(),
                         image_token_id=proc.image_token_id, image_seq_length=4, downsample_ratio=0.5,
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    return _save(InternVLForConditionalGeneration, cfg, proc, out, seed)


def build_mistral3(out: Path, s: Sizes, seed: int) -> Path:
    from transformers import (
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        MistralConfig,
        PixtralImageProcessor,
        PixtralProcessor,
        PixtralVisionConfig,
    )

    tok = make_tokenizer(bos="<s>", eos="</s>", pad="<pad>")
    ip = PixtralImageProcessor(size={"longest_edge": 64}, patch_size=8)
    proc = PixtralProcessor(ip, tok, patch_size=8, spatial_merge_size=2, chat_template=T_MISTRAL)
    vision = PixtralVisionConfig(**VISION, head_dim=16, image_size=64, patch_size=8)
    text = _text(MistralConfig, s, len(tok), tok.pad_token_id, head_dim=s.head_dim)
    cfg = Mistral3Config(vision_config=vision.to_dict(), text_config=text.to_dict(),
                         image_token_index=proc.image_token_id, spatial_merge_size=2, vision_feature_layer=-1)
    return _save(Mistral3ForConditionalGeneration, cfg, proc, out, seed)


# One builder per family of the registry (kd_cache.families), by model_type.
BUILDERS: dict[str, Callable[[Path, Sizes, int], Path]] = {
    "llava": build_llava,
    "vipllava": build_vipllava,
    "llava_next": build_llava_next,
    "llava_onevision": build_llava_onevision,
    "qwen2_vl": build_qwen2_vl,
    "qwen2_5_vl": build_qwen2_5_vl,
    "qwen3_vl": build_qwen3_vl,
    "idefics3": build_idefics3,
    "smolvlm": build_smolvlm,
    "gemma3": build_gemma3,
    "paligemma": build_paligemma,
    "internvl": build_internvl,
    "mistral3": build_mistral3,
}


@dataclass(frozen=True)
class Family:
    name: str  # config.model_type, the registry's key
    builder: Callable[[Path, Sizes, int], Path]

    @property
    def chat(self) -> bool:
        """False: a prefix/suffix model without a chat template (PaliGemma), as the registry says."""
        return REGISTRY[self.name].chat

    def build(self, out: str | Path, *, student: bool = False) -> Path:
        """Save a tiny teacher (or a smaller same-family student, same processor) to ``out``."""
        return self.builder(Path(out), STUDENT if student else TEACHER, 1 if student else 0)


def _families() -> dict[str, Family]:
    """Every registry family with its builder, in the registry's order; a family without a builder, or
    a builder of no family, stops the tests that use them."""
    missing, unknown = set(REGISTRY) - set(BUILDERS), set(BUILDERS) - set(REGISTRY)
    if missing or unknown:
        raise LookupError(f"tests/vlm_families.py BUILDERS and kd_cache/families.py FAMILIES differ: families "
                          f"without a tiny builder {sorted(missing)}, builders of no family {sorted(unknown)}; "
                          "add the builder (or the registry entry)")
    return {t: Family(t, BUILDERS[t]) for t in REGISTRY}


FAMILIES = _families()


def draw_images(folder: Path, sizes: dict[str, tuple[int, int, str]]) -> Path:
    """``name -> (width, height, colour)``: a filled ellipse on white per image, saved in ``folder``."""
    from PIL import Image, ImageDraw

    for name, (w, h, colour) in sizes.items():
        img = Image.new("RGB", (w, h), "white")
        ImageDraw.Draw(img).ellipse([w // 4, h // 4, 3 * w // 4, 3 * h // 4], fill=colour)
        img.save(Path(folder) / name)
    return Path(folder)
