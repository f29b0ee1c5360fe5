"""Benchmark profiles, models built from configs, and synthetic LLaVA data at chosen shapes.

Teacher and student are real ``LlavaForConditionalGeneration`` models (SigLIP vision tower + Qwen2
language model), built from configs with random weights: timing and memory do not depend on the
weights. They share the small tokenizer trained by ``kd_demo.tiny`` while their output vocabulary
is ``vocab`` (>= 32k): token ids only need to be below the vocabulary size, and every cost that
scales with V (LM head, log-softmax, top-k) is paid in full.
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from kd_demo import tiny


@dataclass(frozen=True)
class LMSize:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int


@dataclass(frozen=True)
class VisionSize:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    image_size: int
    patch_size: int

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class Profile:
    """Every size and count one run of ``run_all`` uses (written into the JSON as ``settings``)."""

    name: str
    vocab: int
    vision: VisionSize
    teacher: LMSize  # teacher-pass benchmark teacher (and the online-KD teacher unless online_teacher)
    student: LMSize
    online_teacher: LMSize | None = None  # teacher of the online-KD step when it differs from ``teacher``
    answer_words: int = 60  # words in the assistant answer of a synthetic record (~1.3 tokens each)
    question_words: int = 12
    # teacher pass
    tp_samples: int = 32
    tp_batch: int = 8
    tp_shard: int = 16
    tp_rounds: int = 2
    # student steps
    st_batch: int = 2
    st_batches: int = 2
    st_reps: int = 4
    st_mem_steps: int = 2
    st_mem_subprocess: bool = True  # False (smoke only): memory from the timing process, not comparable
    # real distributions (SmolLM2)
    real_tokens: int = 1536  # >= 1000 positions for the gradient cosine, and two 729-position windows
    real_segment: int = 768
    real_relation_windows: int = 2
    real_generated_tokens: int = 0  # extra: positions of the model's own greedy continuation
    real_source: str = "smollm2"  # "smollm2" | "tiny-random" (smoke test: no package needed)
    # loader
    ld_samples: int = 48
    ld_image_size: int = 384
    ld_patch: int = 14
    ld_text_tokens: int = 600
    ld_response_tokens: int = 450
    ld_batch: int = 4
    ld_workers: tuple[int, ...] = (1, 2)
    ld_epochs: int = 1
    ld_shard_size: int = 0  # samples per shard (0: ld_samples // 4)
    # storage grid
    grid: bool = True
    dtype: str = "float32"
    extras: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Profile:
        d = dict(d)
        d["vision"] = VisionSize(**d["vision"])
        for key in ("teacher", "student", "online_teacher"):
            if d.get(key) is not None:
                d[key] = LMSize(**d[key])
        d["ld_workers"] = tuple(d["ld_workers"])
        return cls(**d)


CPU_VISION = VisionSize(hidden=128, layers=2, heads=2, intermediate=256, image_size=64, patch_size=8)
# ~111M parameters with a 32768-token vocabulary (untied head): the >= 100M / >= 32k teacher.
CPU_TEACHER = LMSize(hidden=768, layers=10, heads=12, kv_heads=4, intermediate=2048)
# Student-step models: a ~51M student whose LM head / transformer body cost ratio (~0.5) is that of
# Qwen1.5-0.5B at V=151936 (a thinner student would be all head and exaggerate every loss cost), and
# a ~407M online teacher, ~7.9x the student's parameters.
CPU_STUDENT = LMSize(hidden=384, layers=12, heads=6, kv_heads=2, intermediate=1536)
CPU_ONLINE_TEACHER = LMSize(hidden=1024, layers=30, heads=16, kv_heads=4, intermediate=2816)

PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        name="smoke", vocab=2048,
        vision=VisionSize(hidden=32, layers=1, heads=2, intermediate=64, image_size=32, patch_size=8),
        teacher=LMSize(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128),
        student=LMSize(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64),
        answer_words=12, question_words=4, tp_samples=8, tp_batch=4, tp_shard=4, tp_rounds=1,
        st_batch=2, st_batches=1, st_reps=1, st_mem_steps=1, st_mem_subprocess=False,
        real_tokens=256, real_segment=128, real_relation_windows=1, real_source="tiny-random",
        ld_samples=4, ld_image_size=64, ld_patch=8, ld_text_tokens=60, ld_response_tokens=40, ld_batch=2,
        ld_workers=(1,), grid=False,
        extras={"relation_n": 64},
    ),
    "quick": Profile(
        name="quick", vocab=32768, vision=CPU_VISION, teacher=CPU_TEACHER, student=CPU_STUDENT,
        online_teacher=CPU_ONLINE_TEACHER,
        tp_samples=24, tp_batch=8, tp_shard=16, tp_rounds=5,
        st_batch=2, st_batches=2, st_reps=5, st_mem_steps=2,
        real_tokens=1536, real_segment=768, real_relation_windows=2, real_generated_tokens=0,
        ld_samples=256, ld_shard_size=256, ld_workers=(1, 2), ld_epochs=1,
    ),
    "full": Profile(
        name="full", vocab=32768, vision=CPU_VISION, teacher=CPU_TEACHER, student=CPU_STUDENT,
        online_teacher=CPU_ONLINE_TEACHER,
        tp_samples=48, tp_batch=8, tp_shard=32, tp_rounds=9,
        st_batch=2, st_batches=3, st_reps=8, st_mem_steps=3,
        real_tokens=4096, real_segment=1024, real_relation_windows=4, real_generated_tokens=256,
        ld_samples=512, ld_shard_size=512, ld_workers=(1, 2), ld_epochs=2,
    ),
    # GPU: a ~1.8B teacher (Qwen1.5-1.8B-like LM + SigLIP-so400m-like tower, 729 tokens per 384px image)
    # for the teacher pass; a Qwen1.5-0.5B-like student and a Qwen1.5-4B-like online teacher (~8.6x),
    # the pair of the LLaVA-KD paper. Vocabulary 151936 (Qwen). bf16 weights, flash-attn when installed.
    "cuda": Profile(
        name="cuda", vocab=151936,
        vision=VisionSize(hidden=1152, layers=27, heads=16, intermediate=4304, image_size=384, patch_size=14),
        teacher=LMSize(hidden=2048, layers=24, heads=16, kv_heads=16, intermediate=5504),
        student=LMSize(hidden=1024, layers=24, heads=16, kv_heads=16, intermediate=2816),
        online_teacher=LMSize(hidden=2560, layers=40, heads=20, kv_heads=20, intermediate=6912),
        answer_words=420, question_words=40,
        tp_samples=256, tp_batch=16, tp_shard=64, tp_rounds=3,
        st_batch=4, st_batches=3, st_reps=8, st_mem_steps=3,
        real_tokens=8192, real_segment=1024, real_relation_windows=8, real_generated_tokens=512,
        ld_samples=512, ld_shard_size=512, ld_workers=(1, 2, 4), ld_epochs=2,
        dtype="bfloat16",
    ),
}
# benchmarks/gpu_check.sh: one H100 in under 8 minutes, nothing downloaded. The teacher has LLaVA-1.5-7B's
# layer shapes (Vicuna-7B: d 4096, MLP 11008, 32 heads; V 32000; a CLIP ViT-L/336-like tower, 576
# visual tokens per image) with 8 of its 32 layers, so per-layer kernels and the forward's share of the
# bf16 peak are those of the 7B; the student pair is the cuda profile's (0.5B-like, 4B-like online).
PROFILES["gpu_check"] = replace(
    PROFILES["cuda"], name="gpu_check", vocab=32000,
    vision=VisionSize(hidden=1024, layers=24, heads=16, intermediate=4096, image_size=336, patch_size=14),
    teacher=LMSize(hidden=4096, layers=8, heads=32, kv_heads=32, intermediate=11008),
    tp_samples=128, tp_batch=8, tp_shard=64, tp_rounds=2, st_reps=4, st_batches=2, st_mem_steps=2,
)


# ------------------------------------------------------------------------------------------ models


@functools.lru_cache(maxsize=4)
def processor_for(vision: VisionSize, vocab: int | None = None):
    """The shared LlavaProcessor (tiny BPE tokenizer + SigLIP image processor at the vision geometry).

    With ``vocab``, the tokenizer is padded with never-used added tokens to exactly ``vocab`` tokens:
    the teacher pass distils over the *tokenizer's* vocabulary (head rows past it are padding and
    masked), so a 400-token tokenizer would make top-k, log-softmax and tail run over 400 columns
    instead of V. (Cached: padding 32k tokens takes a few seconds.)
    """
    proc = tiny.build_processor(image_size=vision.image_size, patch_size=vision.patch_size)
    tok = proc.tokenizer
    if vocab is not None and len(tok) < vocab:
        tok.add_tokens([f"<bench_unused_{i}>" for i in range(vocab - len(tok))])
    return proc


def llava_config(processor, vocab: int, lm: LMSize, vision: VisionSize):
    from transformers import LlavaConfig, Qwen2Config, SiglipVisionConfig

    tok = processor.tokenizer
    if len(tok) > vocab:
        raise ValueError(f"tokenizer has {len(tok)} tokens but the benchmark vocabulary is {vocab}")
    vcfg = SiglipVisionConfig(hidden_size=vision.hidden, num_hidden_layers=vision.layers,
                              num_attention_heads=vision.heads, intermediate_size=vision.intermediate,
                              image_size=vision.image_size, patch_size=vision.patch_size)
    tcfg = Qwen2Config(vocab_size=vocab, hidden_size=lm.hidden, num_hidden_layers=lm.layers,
                       num_attention_heads=lm.heads, num_key_value_heads=lm.kv_heads,
                       intermediate_size=lm.intermediate, max_position_embeddings=4096,
                       tie_word_embeddings=False, pad_token_id=tok.pad_token_id)
    return LlavaConfig(vision_config=vcfg, text_config=tcfg, image_token_id=tok.convert_tokens_to_ids(tiny.IMAGE_TOKEN),
                       projector_hidden_act="gelu", vision_feature_select_strategy="full",
                       vision_feature_layer=-1, image_seq_length=vision.tokens)


def attn_impl(device: torch.device) -> str:
    from kd_cache.runtime import attn_implementation

    return attn_implementation(device)


def build_model(processor, vocab: int, lm: LMSize, vision: VisionSize, device: torch.device,
                dtype: torch.dtype, seed: int = 0, logit_scale: float = 20.0):
    """A randomly initialised LLaVA, created directly on ``device`` in ``dtype`` (no disk round trip)."""
    from transformers import LlavaForConditionalGeneration

    cfg = llava_config(processor, vocab, lm, vision)
    torch.manual_seed(seed)
    with torch.device(device):  # initialised in place, in ``dtype`` (a 4B model never exists in fp32)
        model = LlavaForConditionalGeneration._from_config(cfg, dtype=dtype, attn_implementation=attn_impl(device))
    with torch.no_grad():  # peakier distributions than the default init (as in kd_demo.tiny)
        model.lm_head.weight.mul_(logit_scale)
    return model


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def lm_params(model) -> int:
    """Parameters of the language model and head (what 'teacher ~8x student' refers to)."""
    return sum(p.numel() for n, p in model.named_parameters()
               if ".vision_tower." not in f".{n}" and ".visual." not in f".{n}")  # LLaVA's / Qwen-VL's tower


# ------------------------------------------------------------------------------------------ data

WORDS = list(tiny.COLOURS) + tiny.SHAPES + tiny.POSITIONS + tiny.NUMBERS + [
    "the", "a", "is", "on", "of", "and", "there", "shape", "image", "picture", "small", "large", "left",
    "colour", "answer", "with", "near", "under", "above", "between", "objects", "one", "two", "three"]


def write_jpeg(path: Path, size: int | tuple[int, int], seed: int, quality: int = 90) -> None:
    """A Pillow-drawn picture at ``size`` x ``size`` (or ``(width, height)``) with some texture (not a
    flat colour), saved as JPEG."""
    from PIL import Image, ImageDraw, ImageFilter

    w, h = (size, size) if isinstance(size, int) else size
    rng = random.Random(seed)
    img = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
    d = ImageDraw.Draw(img)
    for _ in range(24):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        x1, y1 = x0 + rng.randrange(w // 8, w // 2), y0 + rng.randrange(h // 8, h // 2)
        fill = tuple(rng.randrange(256) for _ in range(3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)([x0, y0, x1, y1], fill=fill)
    img = img.filter(ImageFilter.GaussianBlur(1))
    img.save(path, format="JPEG", quality=quality)


def make_records(root: Path, n: int, image_size: int | list[tuple[int, int]], question_words: int,
                 answer_words: int, seed: int = 0) -> tuple[Path, Path]:
    """``n`` LLaVA chat records (one JPEG image each) with answers of ``answer_words`` words.

    ``image_size``: the side of every (square) image, or a list of ``(width, height)`` sizes used in
    turn (record i gets size i mod len), for dynamic-resolution teachers."""
    root = Path(root)
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records = []
    for i in range(n):
        name = f"img-{i:05d}.jpg"
        size = image_size if isinstance(image_size, int) else tuple(image_size[i % len(image_size)])
        write_jpeg(img_dir / name, size, seed * 100003 + i)
        q = " ".join(rng.choice(WORDS) for _ in range(question_words))
        a = " ".join(rng.choice(WORDS) for _ in range(answer_words))
        records.append({"id": f"bench-{i:05d}", "image": name,
                        "conversations": [{"from": "human", "value": f"<image>\n{q}?"},
                                          {"from": "gpt", "value": a + "."}]})
    data = root / "data.json"
    data.write_text(json.dumps(records))
    return data, img_dir


def save_teacher_stub(path: Path, model, processor) -> Path:
    """Config + processor only (no weights): ``build_cache`` gets the loaded teacher handed in."""
    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def teacher_object(model, processor, device: torch.device):
    from kd_cache.teacher import Teacher

    return Teacher(model, processor, processor.tokenizer, processor.tokenizer.convert_tokens_to_ids(tiny.IMAGE_TOKEN),
                   True, device)


def build_with_teacher(teacher, teacher_dir: Path, data: Path, img_dir: Path, out: Path, *, batch_size: int,
                       shard_size: int, device: torch.device, **overrides) -> dict:
    """``kd_cache.build.build_cache`` with an already loaded teacher (weights are not read from disk)."""
    from unittest import mock

    from kd_cache import build as build_mod
    from kd_cache.build import BuildConfig, build_cache

    cfg = BuildConfig(teacher=str(teacher_dir), data=str(data), out=str(out), image_folder=str(img_dir),
                      batch_size=batch_size, shard_size=shard_size, max_length=4096, device=device.type,
                      progress=False, **overrides)
    with mock.patch.object(build_mod, "load_teacher", lambda *a, **k: teacher):
        return build_cache(cfg)
