"""``DemoConfig``: the sizes and schedule of one ``kd-demo`` run, and its ``--quick`` preset."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from kd_cache.schema import choice


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0 1 2"`` or ``"0,1,2"`` -> ``(0, 1, 2)``."""
    try:
        seeds = tuple(int(t) for t in text.replace(",", " ").split())
    except ValueError:
        raise ValueError(f"--seeds {text!r}: expected integers, e.g. --seeds 0 1 2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r}: expected distinct integers, e.g. --seeds 0 1 2")
    return seeds


class DemoMethod(str, Enum):
    llavakd = "llavakd"  # baseline vs LLaVA-KD (DPT -> SFT -> DFT)
    llavadi = "llavadi"  # also a third student with LLaVADI's combination


@dataclass
class DemoConfig:
    """Sizes and schedule of one demo run (``quick`` replaces them with a much smaller preset).

    The fields with ``help`` are ``kd-demo``'s flags (``cli.options``); the others are set by code.
    """

    out: str = field(metadata={"help": "Output directory: results.json, curves.png, and the data, models, caches "
                                       "and runs of every step."})
    seed: int = field(default=0, metadata={"help": "Seed for the task, the models and the training order."})
    quick: bool = field(default=False, metadata={"help": "A much smaller run (well under 2 minutes) that exercises "
                                                         "every step; its numbers mean nothing."})
    # task
    n_teacher: int = 3000  # QA images the teacher is trained on (their captions are its pre-training data)
    n_caption: int = 1000  # caption images (the students' DPT / PT)
    # The students' QA images (instruction data): a tenth of the teacher's twice over, the setting in
    # which a teacher is worth distilling (a student with the teacher's data needs no teacher).
    n_train: int = 150
    n_val: int = 400  # validation questions: every choice of this configuration was read here
    n_test: int = 1200  # held-out test questions (the verdict); one question per image
    place_jitter: float = 1.5  # pixels
    radius: tuple[float, float] = (4.5, 6.5)  # pixels
    # models (language model sizes; both share the teacher's vision tower)
    teacher_hidden: int = 96
    teacher_layers: int = 3
    teacher_intermediate: int = 224
    student_hidden: int = 32
    student_layers: int = 2
    student_intermediate: int = 64
    vision_hidden: int = 64
    vision_layers: int = 2
    # schedule (optimizer steps) and learning rates
    batch_size: int = 16
    # The teacher is trained as LLaVA teachers are: caption pre-training on its own images (the whole
    # model: nothing here is pretrained), then instructions. Its outputs at caption positions are then
    # trained, and the ones at image positions are a trained LLM's, as a real teacher's are.
    teacher_pt_steps: int = 600
    teacher_steps: int = 1200
    # Student legs: PT/DPT on captions, SFT, then DFT (or SFT again for the baseline). Pre-training is
    # long because it is where a student learns where the shape is (measured, PT leg alone, seeds 0 / 1:
    # caption CE 0.44 / 0.39 after 400 steps, colour and shape only; 0.018 / 0.017 after 2,000), and it
    # is cheap (about 20 s per 400 steps). With 400, 'place' was learnt by chance in SFT and the verdict
    # followed it (README, "kd-demo").
    pt_steps: int = 2000
    sft_steps: int = 600
    dft_steps: int = 600
    teacher_lr: float = 2e-3
    pt_lr: float = 1e-3
    lr: float = 1e-3
    top_k: int = 64
    # LLaVA-KD's weights as published: response MDist, visual MDist, RDist.
    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 1.0
    # The demo's student LLM starts from random weights (no pretrained tiny LM exists offline), so its
    # pre-training stage (PT and DPT alike) trains the LLM too; with the projector alone the caption CE
    # does not move from its initial value (measured: 5.87 after 200 steps; README, "kd-demo").
    pretrain_modules: str = "projector,llm"
    method: DemoMethod = field(default=DemoMethod.llavakd, metadata={"help": (
        "llavakd: baseline vs LLaVA-KD (DPT -> SFT -> DFT); llavadi: also a third student with LLaVADI's "
        "combination (logits on all tokens + hidden states), reported as 'llavadi'.")})
    ablation: bool = field(default=False, metadata={"help": (
        "The paper's ablation instead of the two-student demo: PT->SFT, DPT->SFT, PT->SFT->DFT, DPT->SFT->DFT "
        "and DFT without each of its terms, equal optimizer steps from one start, for every seed of --seeds; "
        "writes OUT/ablation.json, OUT/ablation.md and OUT/ablation.png.")})
    seeds: tuple[int, ...] = field(default=(), metadata={"help": (
        "With --ablation: the seeds, e.g. --seeds 0 1 2 (default: --seed alone); each runs in OUT/seed-N."),
        "parse": parse_seeds})
    cross_tokenizer: bool = field(default=False, metadata={"help": (
        "A student of another tokenizer (SentencePiece-style BPE with byte fallback), chat template "
        "(<start_of_turn> turns) and image grid (3x3 visual tokens for the teacher's 4x4), which kd-train "
        "aligns to the teacher's cache by itself; adds a third student distilled on response tokens only "
        "(--positions response, no RDist), and reports the aligned share of answer positions.")})
    visual_alignment: str = field(default="overlap", metadata={"help": (
        "With --cross-tokenizer: how the distilled student's visual tokens meet the teacher's (kd-train "
        "--visual-alignment): overlap (region-overlap weights) or hungarian (a one-to-one IoU matching).")})
    # The cross student's input size: the teacher's tower and patch size, its position embeddings resized
    # to this size's grid (24 px / patch 8: 3x3 tokens against the teacher's 32 px: 4x4, a grid whose
    # cells overlap the teacher's by parts, not by whole cells).
    student_image_size: int = 24
    hidden_weight: float = 1.0
    # The ablation's LoRA arm: DPT as LLaVA-KD's, then SFT and DFT training the LLM through rank-r
    # adapters (kd-train --lora-r), the projector in full, at the same learning rate and steps.
    lora_r: int = 8
    eval_batch_size: int = 64
    # These models are tiny: one intra-op thread per process is as fast as two on an idle 2-core
    # machine and several times faster on a busy one (60 teacher steps: 8.5 s with 1 thread, 13-67 s with
    # 2, measured with other jobs running); the second core trains the other student (``parallel``).
    threads: int = 1
    parallel: bool = True

    def __post_init__(self):
        self.method = choice(DemoMethod, self.method, "--method")
        if self.quick:
            for k, v in QUICK.items():
                setattr(self, k, v)
        self.seeds = tuple(self.seeds)
        if self.seeds and not self.ablation:
            raise ValueError("--seeds is for --ablation; a single demo takes --seed")
        if self.ablation and self.method is not DemoMethod.llavakd:
            raise ValueError("--ablation compares LLaVA-KD's recipes; it does not take --method llavadi")
        if self.visual_alignment not in ("overlap", "hungarian"):
            raise ValueError(f"--visual-alignment {self.visual_alignment!r}: expected overlap or hungarian")
        if self.cross_tokenizer and (self.ablation or self.method is not DemoMethod.llavakd):
            raise ValueError("--cross-tokenizer runs the two-student demo (plus a response-only student); it does "
                             "not take --ablation or --method llavadi")
        for name in ("n_teacher", "n_caption", "n_train", "n_val", "n_test", "batch_size", "teacher_steps", "pt_steps",
                     "sft_steps", "dft_steps", "top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.teacher_pt_steps < 0:
            raise ValueError(f"--teacher-pt-steps must be >= 0, got {self.teacher_pt_steps}")


QUICK = dict(n_teacher=96, n_caption=48, n_train=32, n_val=12, n_test=24, teacher_pt_steps=4, teacher_steps=12, pt_steps=4,
             sft_steps=4, dft_steps=4, batch_size=8)
