"""Tiny *real* models, tokenizers, processors and datasets, built offline.

Tests, the built-in demo and the CPU benchmarks need a teacher and a student that are the same
classes a user loads from the hub (``LlavaForConditionalGeneration`` with a SigLIP vision tower and a
Qwen2 language model, a ``LlavaProcessor`` with a chat template), only small. Nothing here downloads:
the tokenizer is trained on the spot with ``tokenizers`` and every model is built from a config and
saved with ``save_pretrained`` so that callers exercise the real ``from_pretrained`` path.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from kd_cache.encoding import CHATML_TEMPLATE

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN, "<|pad|>"]

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 200),
    "orange": (240, 140, 30),
}
SHAPES = ["circle", "square", "triangle"]
POSITIONS = ["left", "right", "top", "bottom", "center"]
NUMBERS = ["zero", "one", "two", "three", "four"]


def _corpus() -> list[str]:
    words = list(COLOURS) + SHAPES + POSITIONS + NUMBERS
    lines = [
        "What colour is the shape? How many shapes are there? Where is the shape?",
        "The image shows a shape. Describe the image. Answer with one word.",
        "There is a small picture with objects of different colours in different places.",
        "You are a helpful assistant. The answer is yes. The answer is no.",
        "user assistant system",
    ]
    rng = random.Random(0)
    for _ in range(400):
        lines.append(" ".join(rng.choice(words) for _ in range(8)) + ".")
    return lines


def build_tokenizer(vocab_size: int = 400):
    """Train a byte-level BPE tokenizer (offsets mapping works, like Qwen's) and wrap it for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        bos_token=None,
        unk_token=None,
        additional_special_tokens=["<|endoftext|>", "<|im_start|>", IMAGE_TOKEN],
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


# A Gemma-style chat template: other turn markers than ChatML, ``model`` for the assistant's role, a BOS
# at the start, prefix-stable (each turn renders on its own, so the labelled spans are found by prefixes).
# No newline follows a block tag: chat templates are rendered with trim_blocks, which would drop it.
TURN_TEMPLATE = (
    "<bos>{% for message in messages %}<start_of_turn>"
    "{% if message['role'] == 'assistant' %}model\n{% else %}{{ message['role'] }}\n{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
TURN_SPECIAL_TOKENS = ["<bos>", "<start_of_turn>", "<end_of_turn>", IMAGE_TOKEN, "<pad>"]


def build_sentencepiece_tokenizer(vocab_size: int = 400):
    """Another tokenizer for the same text: a SentencePiece-style BPE (Llama / Gemma convention: ``▁`` for
    spaces, ``<0xNN>`` byte fallback for characters it has no piece for, e.g. the newline), trained on the
    same corpus as ``build_tokenizer``, with Gemma-style turn tokens and ``TURN_TEMPLATE``. Its ids,
    pieces and special tokens all differ from the byte-level BPE's."""
    import re

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token=None))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=TURN_SPECIAL_TOKENS + byte_pieces,
                                  show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    # The byte pieces are ordinary vocabulary entries (as in Llama's tokenizer), not added special tokens:
    # the trainer only put them in the vocabulary through its special-token list.
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if not re.fullmatch(r"<0x[0-9A-F]{2}>", t["content"])]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token="<bos>",
        eos_token="<end_of_turn>",
        pad_token="<pad>",
        unk_token=None,
        additional_special_tokens=["<start_of_turn>", IMAGE_TOKEN],
    )
    fast.chat_template = TURN_TEMPLATE
    return fast


def vision_tower_at(llava_dir: str | Path, out_dir: str | Path, image_size: int) -> Path:
    """The vision tower of a saved SigLIP LLaVA at another input size: same patch size and weights, its
    position embeddings resized (bilinear, as ``interpolate_pos_encoding`` does) to the new patch grid.
    Saved as a ``SiglipVisionModel`` with a SigLIP image processor of that size, which
    ``compose_student`` takes as ``--vision``: the student sees another grid of visual tokens."""
    import torch.nn.functional as F
    from transformers import LlavaForConditionalGeneration, SiglipVisionConfig, SiglipVisionModel

    try:
        from transformers import SiglipImageProcessorPil as ImageProcessor
    except ImportError:  # older transformers
        from transformers import SiglipImageProcessor as ImageProcessor

    source = LlavaForConditionalGeneration.from_pretrained(llava_dir, dtype=torch.float32)
    vcfg = source.config.vision_config.to_dict()
    patch, old = vcfg["patch_size"], vcfg["image_size"] // vcfg["patch_size"]
    if image_size % patch:
        raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch}")
    new = image_size // patch
    state = source.model.vision_tower.state_dict()
    key = next(k for k in state if k.endswith("embeddings.position_embedding.weight"))
    grid = state[key].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(new, new), mode="bilinear", align_corners=False, antialias=old > new)
    state[key] = resized.permute(0, 2, 3, 1).reshape(new * new, -1).contiguous()
    tower = SiglipVisionModel(SiglipVisionConfig(**{**vcfg, "image_size": image_size}))
    own = tower.state_dict()
    missing = tower.load_state_dict({k: v for k, v in state.items() if k in own and not k.endswith("position_ids")},
                                    strict=False).missing_keys
    if [k for k in missing if not k.endswith("position_ids")]:
        raise ValueError(f"vision tower of {llava_dir}: weights not carried over: {missing}")
    out = Path(out_dir)
    tower.save_pretrained(out)
    ImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(out)
    return out


def build_processor(tokenizer=None, image_size: int = 32, patch_size: int = 8):
    """A ``LlavaProcessor`` (SigLIP-style image processor, no CLS token) with the ChatML template."""
    from transformers import LlavaProcessor

    try:
        from transformers import SiglipImageProcessorPil as ImageProcessor
    except ImportError:  # older transformers
        from transformers import SiglipImageProcessor as ImageProcessor

    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    image_processor = ImageProcessor(size={"height": image_size, "width": image_size})
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="full",
        chat_template=CHATML_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=0,
    )


@dataclass
class TinySizes:
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 128
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    vision_intermediate: int = 64
    image_size: int = 32
    patch_size: int = 8


def llava_config(vocab_size: int, image_token_id: int, pad_token_id: int, sizes: TinySizes | None = None):
    from transformers import LlavaConfig, Qwen2Config, SiglipVisionConfig

    s = sizes or TinySizes()
    vision = SiglipVisionConfig(
        hidden_size=s.vision_hidden,
        num_hidden_layers=s.vision_layers,
        num_attention_heads=s.vision_heads,
        intermediate_size=s.vision_intermediate,
        image_size=s.image_size,
        patch_size=s.patch_size,
    )
    text = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=s.text_hidden,
        num_hidden_layers=s.text_layers,
        num_attention_heads=s.text_heads,
        num_key_value_heads=s.text_kv_heads,
        intermediate_size=s.text_intermediate,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        pad_token_id=pad_token_id,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_seq_length=(s.image_size // s.patch_size) ** 2,
    )


def build_llava(out_dir: str | Path, processor=None, sizes: TinySizes | None = None, seed: int = 0) -> Path:
    """Build a randomly initialised tiny SigLIP + Qwen2 LLaVA, save it with its processor, return the path."""
    from transformers import LlavaForConditionalGeneration

    s = sizes or TinySizes()
    processor = processor if processor is not None else build_processor(image_size=s.image_size, patch_size=s.patch_size)
    tok = processor.tokenizer
    config = llava_config(len(tok), tok.convert_tokens_to_ids(IMAGE_TOKEN), tok.pad_token_id, s)
    return _init_and_save(LlavaForConditionalGeneration, config, seed, out_dir, processor)


def _init_and_save(cls, config, seed: int, out_dir, processor) -> Path:
    torch.manual_seed(seed)
    model = cls(config)
    # Larger-than-default logit scale so the tiny models' distributions are not almost uniform.
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    out = Path(out_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build_causal_lm(out_dir: str | Path, tokenizer=None, seed: int = 0) -> Path:
    """A tiny Qwen2 causal LM with the same tokenizer (a text-only teacher)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = tokenizer if tokenizer is not None else build_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
    )
    return _init_and_save(Qwen2ForCausalLM, config, seed, out_dir, tok)


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple[int, ...]) -> None:
    """A circle, square or triangle of half-size ``r`` centred at (``cx``, ``cy``)."""
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)


def draw_shapes(path: Path, shapes: list[tuple[str, str, str]], size: int = 64) -> None:
    """Draw ``(shape, colour, position)`` triples on a white canvas with Pillow."""
    img = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(img)
    r = size // 6
    centres = {
        "left": (size // 5, size // 2), "right": (4 * size // 5, size // 2),
        "top": (size // 2, size // 5), "bottom": (size // 2, 4 * size // 5),
        "center": (size // 2, size // 2),
    }
    for shape, colour, pos in shapes:
        draw_shape(d, shape, *centres[pos], r, COLOURS[colour])
    img.save(path)


def make_llava_dataset(root: str | Path, n: int = 12, seed: int = 0, text_only_every: int = 0,
                       caption: bool = False, fmt: str = "json") -> tuple[Path, Path]:
    """Write ``n`` LLaVA-format records and their Pillow images; returns (data file, image folder).

    ``caption=True`` writes caption records (``<image>`` + one caption answer) for the pretrain template;
    otherwise a two-turn question/answer conversation. Every ``text_only_every``-th record has no image.
    """
    root = Path(root)
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records = []
    for i in range(n):
        shape, colour, pos = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(POSITIONS)
        rid = f"s{seed}-{i:04d}"
        if text_only_every and i % text_only_every == text_only_every - 1:
            records.append({"id": rid, "conversations": [
                {"from": "human", "value": f"Is {colour} a colour?"},
                {"from": "gpt", "value": "yes"},
            ]})
            continue
        name = f"{rid}.png"
        draw_shapes(img_dir / name, [(shape, colour, pos)])
        if caption:
            conv = [{"from": "human", "value": "<image>"},
                    {"from": "gpt", "value": f"a {colour} {shape} on the {pos}."}]
        else:
            conv = [{"from": "human", "value": "<image>\nWhat colour is the shape?"},
                    {"from": "gpt", "value": colour},
                    {"from": "human", "value": "Where is the shape?"},
                    {"from": "gpt", "value": f"the {shape} is on the {pos}."}]
        records.append({"id": rid, "image": name, "conversations": conv})
    data = root / ("data.jsonl" if fmt == "jsonl" else "data.json")
    if fmt == "jsonl":
        data.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        data.write_text(json.dumps(records, indent=1))
    return data, img_dir
