"""``kd-demo``: the whole LLaVA-KD method on a small built-in visual task, on CPU, in minutes.

Steps (each one is the real tool, called in-process):

1. The synthetic visual task (``kd_demo.task``): caption records for pre-training, three-question
   conversations for fine-tuning, a held-out test set with one question per image.
2. A tokenizer and processor trained on the spot (``kd_demo.tiny``), a teacher whose language model
   has 8x the student's parameters (as 4B vs 0.5B in the paper), and a student composed with
   ``compose_student`` (= ``kd-train init-student``) from the *trained* teacher's vision tower and a
   fresh small Qwen2 LM, so both share the vision tower as in the paper.
3. The teacher is trained on its own, 10x larger QA set with ``kd-train --stage sft`` (vision +
   projector + LLM from scratch). ``kd-train`` reads a cache, so that QA set is first cached with
   the *untrained* teacher (``--top-k 1 --relation none``): SFT only uses its tokens and labels.
4. ``kd-cache build`` with the trained teacher: the captions (``--template pretrain``), the
   student's instruction data, and the test set (``top_k`` = vocabulary, so its KL is exact).
5. One student checkpoint is trained twice. Distilled: DPT -> SFT -> DFT (paper losses; the demo
   turns the visual-position MDist off, ``DemoConfig.beta``, see there).
   Baseline: PT (DPT's recipe with CE only) -> SFT -> SFT, the second SFT leg as long as DFT, with
   the same learning rates and per-leg schedules: the teacher signal is the only difference. The
   demo's student LLM starts from random weights, so PT and DPT train projector + LLM (see
   ``DemoConfig.pretrain_modules``). The two students train side by side, one process each.
6. ``kd-eval`` metrics for teacher, baseline and distilled on the test set.

Writes ``OUT/results.json`` (``{"teacher": {...}, "baseline": {...}, "distilled": {...}}`` with
``accuracy`` (exact match of greedy answers), ``mc_accuracy``, ``accuracy_by_question``,
``kl_to_teacher`` and ``top1_agreement`` (response positions of the test cache), ``kl_visual`` ...),
``OUT/curves.png`` (training losses of every stage, when matplotlib is installed) and prints a table.
Measured on 2 CPU cores: about 6 minutes; seeds 0, 1 and 2 are in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kd_demo import tiny
from kd_demo.config import DemoConfig, DemoMethod
from kd_demo.report import accuracy_by_question, llm_params, log_summary, plot_curves
from kd_demo.task import make_task

# The training runs whose losses curves.png shows (``teacher-pt`` only when the teacher pre-trains).
STAGE_RUNS = ("teacher-pt", "teacher", "baseline-pt", "baseline-sft", "baseline-sft2", "distilled-dpt",
              "distilled-sft", "distilled-dft")


def _quiet() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import warnings

    import transformers

    warnings.filterwarnings("ignore")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:
        pass


class _Steps:
    """Logs each step as it starts (seconds since the demo began) and keeps its duration in ``timings``."""

    def __init__(self, log: Callable[[str], None]):
        self.log = log
        self.start = time.perf_counter()
        self.timings: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        self.log(f"[{t - self.start:6.1f}s] {name} ...")
        try:
            yield
        finally:
            self.timings[name] = round(time.perf_counter() - t, 2)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


# ------------------------------------------------------------------------------------------- models


def _teacher_sizes(cfg: DemoConfig) -> tiny.TinySizes:
    return tiny.TinySizes(text_hidden=cfg.teacher_hidden, text_layers=cfg.teacher_layers,
                          text_heads=max(1, cfg.teacher_hidden // 24), text_kv_heads=max(1, cfg.teacher_hidden // 48),
                          text_intermediate=cfg.teacher_intermediate, vision_hidden=cfg.vision_hidden,
                          vision_layers=cfg.vision_layers, vision_heads=max(1, cfg.vision_hidden // 32),
                          vision_intermediate=2 * cfg.vision_hidden)


def _build_student_llm(path: Path, tokenizer, cfg: DemoConfig) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    heads = max(1, cfg.student_hidden // 16)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=cfg.student_hidden,
                         num_hidden_layers=cfg.student_layers, num_attention_heads=heads,
                         num_key_value_heads=max(1, heads // 2), intermediate_size=cfg.student_intermediate,
                         max_position_embeddings=2048, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(cfg.seed + 1)
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_models(cfg: DemoConfig, models: Path) -> tuple[Any, Path, Path]:
    """The shared tokenizer, the untrained teacher and the student's fresh LLM: (tokenizer, teacher, LLM)."""
    processor = tiny.build_processor(image_size=32, patch_size=8)
    teacher_init = tiny.build_llava(models / "teacher-init", processor=processor, sizes=_teacher_sizes(cfg),
                                    seed=cfg.seed)
    student_llm = _build_student_llm(models / "student-llm", processor.tokenizer, cfg)
    return processor.tokenizer, teacher_init, student_llm


# ---------------------------------------------------------------------------- caches and training legs


def _build_options(cfg: DemoConfig, data: dict[str, Path]) -> dict[str, Any]:
    """``BuildConfig`` settings every cache of the demo shares."""
    return dict(image_folder=str(data["images"]), device="cpu", progress=False, batch_size=32, shard_size=512,
                seed=cfg.seed)


def _train_options(cfg: DemoConfig) -> dict[str, Any]:
    """``TrainConfig`` settings every training leg of the demo shares."""
    return dict(batch_size=cfg.batch_size, seed=cfg.seed, progress=False, warmup_ratio=0.05, mixed_precision="no")


def _leg(stage: str, start: str | Path, cache: Path, out: Path, **settings) -> dict[str, Any]:
    """The ``TrainConfig`` fields of one ``kd-train`` run."""
    return dict(stage=stage, student=str(start), cache=str(cache), out=str(out), **settings)


def train_teacher(cfg: DemoConfig, data: dict[str, Path], teacher_init: Path, caches: Path, runs: Path) -> Path:
    """Train the teacher like a real LLaVA teacher: optionally pre-trained on captions, then fine-tuned on
    instructions (both legs train vision tower, projector and LLM from scratch). kd-train reads caches;
    these legs only need tokens and labels, so the untrained teacher writes them with --top-k 1
    --relation none. Returns the trained teacher's directory."""
    from kd_cache.build import BuildConfig, build_cache
    from student.config import TrainConfig
    from student.train import train

    build = _build_options(cfg, data)
    legs = dict(lr=cfg.teacher_lr, train_modules="vision,projector,llm", **_train_options(cfg))
    start = teacher_init
    if cfg.teacher_pt_steps:
        build_cache(BuildConfig(teacher=str(teacher_init), data=str(data["teacher_captions"]),
                                out=str(caches / "teacher-captions"), template="pretrain", top_k=1, relation="none",
                                **build))
        train(TrainConfig(**_leg("sft", teacher_init, caches / "teacher-captions", runs / "teacher-pt",
                                 max_steps=cfg.teacher_pt_steps, any_template=True, **legs)))
        start = runs / "teacher-pt"
    build_cache(BuildConfig(teacher=str(teacher_init), data=str(data["teacher"]), out=str(caches / "teacher-qa"),
                            top_k=1, relation="none", **build))
    train(TrainConfig(**_leg("sft", start, caches / "teacher-qa", runs / "teacher", max_steps=cfg.teacher_steps,
                             **legs)))
    return runs / "teacher"


def build_student_caches(cfg: DemoConfig, teacher: Path, data: dict[str, Path], caches: Path, vocab_size: int) -> None:
    """The trained teacher's caches: captions (pretrain), instructions (chat) and the test set (chat, the
    whole vocabulary so its KL is exact); with ``--method llavadi`` also the instructions at every
    position with hidden states."""
    from kd_cache.build import BuildConfig, build_cache

    build = _build_options(cfg, data)
    build_cache(BuildConfig(teacher=str(teacher), data=str(data["captions"]), out=str(caches / "captions"),
                            template="pretrain", top_k=cfg.top_k, **build))
    build_cache(BuildConfig(teacher=str(teacher), data=str(data["train"]), out=str(caches / "instruct"),
                            top_k=cfg.top_k, **build))
    build_cache(BuildConfig(teacher=str(teacher), data=str(data["test"]), out=str(caches / "test"),
                            top_k=vocab_size, relation="none", **build))
    if cfg.method is DemoMethod.llavadi:
        build_cache(BuildConfig(teacher=str(teacher), data=str(data["train"]), out=str(caches / "instruct-all"),
                                top_k=cfg.top_k, positions="response,visual,prompt", hidden=True, **build))


def student_arms(cfg: DemoConfig, student: Path, caches: Path, runs: Path) -> dict[str, list[dict[str, Any]]]:
    """The legs of every student, by arm name (``baseline``, ``distilled``, ``llavadi``).

    The baseline mirrors the distilled schedule leg by leg (PT = DPT's steps, SFT = SFT's steps, then
    SFT again for DFT's steps, same learning rates and warmup/cosine per leg): the teacher signal is
    the only difference between the two students.
    """
    kd = dict(alpha=cfg.alpha, beta=cfg.beta, gamma=cfg.gamma)
    pre = dict(max_steps=cfg.pt_steps, lr=cfg.pt_lr, train_modules=cfg.pretrain_modules, **_train_options(cfg))
    fine = dict(lr=cfg.lr, **_train_options(cfg))
    captions, instruct = caches / "captions", caches / "instruct"
    arms = {
        "baseline": [
            _leg("sft", student, captions, runs / "baseline-pt", any_template=True, **pre),
            _leg("sft", runs / "baseline-pt", instruct, runs / "baseline-sft", max_steps=cfg.sft_steps, **fine),
            _leg("sft", runs / "baseline-sft", instruct, runs / "baseline-sft2", max_steps=cfg.dft_steps, **fine)],
        "distilled": [
            _leg("dpt", student, captions, runs / "distilled-dpt", **kd, **pre),
            _leg("sft", runs / "distilled-dpt", instruct, runs / "distilled-sft", max_steps=cfg.sft_steps, **fine),
            _leg("dft", runs / "distilled-sft", instruct, runs / "distilled-dft", max_steps=cfg.dft_steps, **kd,
                 **fine)],
    }
    if cfg.method is DemoMethod.llavadi:
        # Same schedule as the LLaVA-KD student; the DFT leg distils logits on every token and the final
        # hidden states (LLaVADI's best combination) instead of response/visual logits + RDist.
        llavadi = dict(alpha=cfg.alpha, beta=cfg.beta, gamma=0.0, delta=cfg.alpha,
                       positions="response,visual,prompt", hidden_weight=cfg.hidden_weight, hidden_loss="mse")
        arms["llavadi"] = [
            _leg("dpt", student, captions, runs / "llavadi-dpt", **kd, **pre),
            _leg("sft", runs / "llavadi-dpt", instruct, runs / "llavadi-sft", max_steps=cfg.sft_steps, **fine),
            _leg("dft", runs / "llavadi-sft", caches / "instruct-all", runs / "llavadi-dft", max_steps=cfg.dft_steps,
                 **llavadi, **fine)]
    return arms


def _train_arm(legs: list[dict], threads: int) -> None:
    """Run ``kd-train`` legs one after the other (also the entry point of a worker process)."""
    _quiet()
    import torch

    from student.config import TrainConfig
    from student.train import train

    torch.set_num_threads(threads)
    for leg in legs:
        train(TrainConfig(**leg))


def train_students(cfg: DemoConfig, arms: dict[str, list[dict]], steps: _Steps) -> None:
    if cfg.parallel:
        # The students are independent: train them side by side, one process (and core) each.
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with steps("students: baseline PT -> SFT -> SFT and distilled DPT -> SFT -> DFT, in parallel"):
            with ProcessPoolExecutor(max_workers=2, mp_context=mp.get_context("spawn")) as pool:
                for f in [pool.submit(_train_arm, legs, cfg.threads) for legs in arms.values()]:
                    f.result()
        return
    with steps("baseline: PT (CE only) -> SFT (two legs: the distilled SFT's and DFT's steps)"):
        _train_arm(arms["baseline"], cfg.threads)
    with steps("distilled: DPT -> SFT -> DFT"):
        _train_arm(arms["distilled"], cfg.threads)
    if "llavadi" in arms:
        with steps("llavadi: DPT -> SFT -> DFT (all-token logits + hidden states)"):
            _train_arm(arms["llavadi"], cfg.threads)


# ------------------------------------------------------------------------------------------ evaluation


def evaluate_model(path: Path, data: dict[str, Path], test_cache: Path) -> tuple[dict[str, Any], list[dict]]:
    """``kd-eval`` of one model on the test set (answers) and its cache (KL): (metrics, predictions)."""
    from student.evaluate import evaluate_cache, evaluate_qa, load_model

    model, proc = load_model(path, "cpu")
    qa = evaluate_qa(path, str(data["test"]), str(data["images"]), batch_size=32, max_new_tokens=6, model=model,
                     processor=proc)
    kl = evaluate_cache(path, str(test_cache), batch_size=32, model=model, processor=proc)
    metrics = {"accuracy": qa["accuracy"], "mc_accuracy": qa["mc_accuracy"], "kl_to_teacher": kl["kl_to_teacher"],
               "top1_agreement": kl["top1_agreement"], "kl_visual": kl["kl_visual"],
               "top1_visual": kl["top1_visual"], "ce": kl["ce"], "questions": qa["questions"],
               "llm_params": llm_params(model), "accuracy_by_question": accuracy_by_question(qa["predictions"],
                                                                                             data["test"])}
    return metrics, qa["predictions"]


# ------------------------------------------------------------------------------------------ the demo


def run_demo(cfg: DemoConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every step; returns the results dict (also written to ``OUT/results.json``)."""
    _quiet()
    import torch

    from student.model import compose_student

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("data", "models", "caches", "runs"):
        shutil.rmtree(out / sub, ignore_errors=True)
    models, caches, runs = out / "models", out / "caches", out / "runs"
    steps = _Steps(log)

    with steps("data: drawing the task with Pillow"):
        data = make_task(out / "data", cfg)
    with steps("models: tokenizer, processor, teacher and student LLM"):
        tok, teacher_init, student_llm = make_models(cfg, models)
    with steps("teacher: kd-cache build (labels only) + kd-train (captions, then instructions)"):
        teacher = train_teacher(cfg, data, teacher_init, caches, runs)
    with steps("student: kd-train init-student (teacher's vision tower + fresh projector + small LLM)"):
        student = compose_student(teacher, student_llm, models / "student-init", seed=cfg.seed)
    with steps("kd-cache build: captions (pretrain), instructions (chat), test (chat, full vocabulary)"):
        build_student_caches(cfg, teacher, data, caches, len(tok))
    arms = student_arms(cfg, student, caches, runs)
    train_students(cfg, arms, steps)

    results: dict[str, Any] = {}
    with steps("kd-eval: teacher, baseline, distilled on the held-out test set"):
        finals = {"teacher": teacher, **{name: Path(legs[-1]["out"]) for name, legs in arms.items()}}
        for name, path in finals.items():
            results[name], predictions = evaluate_model(path, data, caches / "test")
            with open(out / f"predictions-{name}.jsonl", "w") as f:
                f.writelines(json.dumps(p) + "\n" for p in predictions)
    plotted = plot_curves({k: runs / k for k in STAGE_RUNS}, out / "curves.png")
    results["config"] = asdict(cfg)
    results["teacher_to_student_llm_params"] = round(results["teacher"]["llm_params"]
                                                     / results["baseline"]["llm_params"], 2)
    results["timings_s"] = steps.timings
    results["total_s"] = round(steps.elapsed(), 1)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    log_summary(results, out, plotted, log)
    return results


if __name__ == "__main__":  # pragma: no cover
    run_demo(DemoConfig(out=sys.argv[1] if len(sys.argv) > 1 else "kd-demo-out", quick="--quick" in sys.argv))
