"""``kd-demo``: the whole LLaVA-KD method on a small built-in visual task, on CPU, in minutes.

Steps (each one is the real tool, called in-process):

1. The synthetic visual task (``kd_demo.task``): caption records for pre-training, three-question
   conversations for fine-tuning (with a caption turn too, the teacher's and the students'), held-out
   test and validation sets with one question per image.
2. A tokenizer and processor trained on the spot (``kd_demo.tiny``), a teacher whose language model
   has 8x the student's parameters (as 4B vs 0.5B in the paper), and a student composed with
   ``compose_student`` (= ``kd-train init-student``) from the *trained* teacher's vision tower and a
   fresh small Qwen2 LM, so both share the vision tower as in the paper.
3. The teacher is trained as LLaVA teachers are, on its own 20x larger image set: caption
   pre-training (bare image + caption), then instructions that keep a caption turn (LLaVA-1.5's mix keeps brief
   descriptions), both with ``kd-train --stage sft`` (vision + projector + LLM from scratch).
   ``kd-train`` reads caches, so these are first built with the *untrained* teacher (``--top-k 1
   --relation none``): its SFT only uses their tokens and labels.
4. ``kd-cache build`` with the trained teacher: the captions, the student's instruction data, and
   the test and validation sets (``top_k`` = vocabulary, so their KL is exact). The students'
   captions are a brief-description request and its answer in the chat template, not the bare
   ``pretrain`` template the teacher pre-trained on: see ``CAPTION_TEMPLATE``.
5. One student checkpoint is trained twice. Distilled: DPT -> SFT -> DFT with the paper's losses and
   weights (alpha = beta = gamma = 1). Baseline: PT (DPT's recipe with CE only) -> SFT -> SFT, the
   second SFT leg as long as DFT, with the same learning rates and per-leg schedules: the teacher
   signal is the only difference. The demo's student LLM starts from random weights, so PT and DPT
   train projector + LLM (see ``DemoConfig.pretrain_modules``). Legs run two at a time, one process
   each; ``--ablation`` adds the arms of ``ABLATION_ARMS`` (``kd_demo.ablation``).
6. ``kd-eval`` metrics for every model on the test and validation sets, and the verdict
   (``kd_demo.verdict``): the distilled student's margins over the baseline in standard errors.

``--cross-tokenizer``: the student has another tokenizer (``tiny.build_sentencepiece_tokenizer``), chat
template (Gemma-style turns) and image grid (the teacher's tower at ``student_image_size``:
``tiny.vision_tower_at``); every kd-train leg detects and aligns the pair on its own; its KL to the
teacher goes through the same alignment (``student.evaluate.aligned_cache_agreement``); a third student distils response tokens
only (``response-only``), and ``results["cross"]`` holds the pair, each leg's alignment and mean
``aligned_share``, and the full method's verdict against the response-only student.

Writes ``OUT/results.json`` (``{"teacher": {...}, "baseline": {...}, "distilled": {...}}`` on the test
set with ``accuracy`` (exact match of greedy answers), ``mc_accuracy``, ``accuracy_by_question``,
``kl_to_teacher`` and ``top1_agreement`` (response positions of the test cache), ``kl_visual``; the
same under ``"val"``; ``verdict`` and ``verdict_val``), ``OUT/predictions-<split>-<model>.jsonl``
(per question: the answer, whether it is right, its KL sum), ``OUT/curves.png`` (training losses of
every stage, when matplotlib is installed) and prints a table. Measured times and seeds 0-4 are in
benchmarks/RESULTS.md.
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

# The template of the students' caption caches (PT and DPT). The teacher pre-trains on bare image +
# caption (``--template pretrain``), as LLaVA teachers do, and the paper's DPT reads that format; but a
# tiny teacher fine-tuned on instructions forgets it, so the students' captions are the chat turn
# ("Describe the image briefly.") that the teacher's instruction mix keeps. Measured on seed 1 (README,
# "kd-demo"): the finished teacher's caption CE on bare captions is 16.0 after instructions alone and
# 4.07 with the caption turn in its mix; on the caption turn it is 0.03.
CAPTION_TEMPLATE = "chat"

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
    """The teacher's tokenizer, the untrained teacher and the student's fresh LLM: (tokenizer, teacher, LLM).
    The student's LLM has the teacher's tokenizer, or with ``--cross-tokenizer`` another one
    (``tiny.build_sentencepiece_tokenizer``: other ids and pieces, a Gemma-style chat template)."""
    processor = tiny.build_processor(image_size=32, patch_size=8)
    teacher_init = tiny.build_llava(models / "teacher-init", processor=processor, sizes=_teacher_sizes(cfg),
                                    seed=cfg.seed)
    student_tok = tiny.build_sentencepiece_tokenizer() if cfg.cross_tokenizer else processor.tokenizer
    student_llm = _build_student_llm(models / "student-llm", student_tok, cfg)
    return processor.tokenizer, teacher_init, student_llm


def make_student(cfg: DemoConfig, teacher: Path, student_llm: Path, models: Path) -> Path:
    """``compose_student`` (= ``kd-train init-student``): the trained teacher's vision tower, a fresh
    projector and the small LLM. With ``--cross-tokenizer`` the tower is the teacher's at the student's
    own input size (``tiny.vision_tower_at``: another grid of visual tokens), feeding the projector from
    the same layer as the teacher's."""
    from student.model import compose_student

    if not cfg.cross_tokenizer:
        return compose_student(teacher, student_llm, models / "student-init", seed=cfg.seed)
    from transformers import PreTrainedTokenizerFast

    vision = tiny.vision_tower_at(teacher, models / "student-vision", cfg.student_image_size)
    student = compose_student(vision, student_llm, models / "student-init", seed=cfg.seed, vision_feature_layer=-1)
    # compose_student reads the LLM's tokenizer with AutoTokenizer, which (transformers 5) loads a tokenizer
    # saved beside a Qwen2 LM as Qwen2Tokenizer and rebuilds its normaliser, pre-tokenizer and decoder
    # (NFC, Qwen's split regex, byte-level) over the saved vocabulary: the SentencePiece-style pipeline
    # would be lost. The tokenizer is saved again as it was trained (same vocabulary, so same ids).
    PreTrainedTokenizerFast.from_pretrained(student_llm).save_pretrained(student)
    return student


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
                                out=str(caches / "teacher-captions"), template="pretrain", top_k=1,
                                relation="none", **build))
        train(TrainConfig(**_leg("sft", teacher_init, caches / "teacher-captions", runs / "teacher-pt",
                                 max_steps=cfg.teacher_pt_steps, any_template=True, **legs)))
        start = runs / "teacher-pt"
    build_cache(BuildConfig(teacher=str(teacher_init), data=str(data["teacher"]), out=str(caches / "teacher-qa"),
                            top_k=1, relation="none", **build))
    train(TrainConfig(**_leg("sft", start, caches / "teacher-qa", runs / "teacher", max_steps=cfg.teacher_steps,
                             **legs)))
    return runs / "teacher"


def build_student_caches(cfg: DemoConfig, teacher: Path, data: dict[str, Path], caches: Path, vocab_size: int) -> None:
    """The trained teacher's caches: captions, instructions and the test and validation
    sets (chat, the whole vocabulary so their KL is exact); with ``--method llavadi`` also the instructions at every
    position with hidden states."""
    from kd_cache.build import BuildConfig, build_cache

    build = _build_options(cfg, data)
    build_cache(BuildConfig(teacher=str(teacher), data=str(data["captions"]), out=str(caches / "captions"),
                            template=CAPTION_TEMPLATE, top_k=cfg.top_k, **build))
    build_cache(BuildConfig(teacher=str(teacher), data=str(data["train"]), out=str(caches / "instruct"),
                            top_k=cfg.top_k, **build))
    for split in ("test", "val"):
        build_cache(BuildConfig(teacher=str(teacher), data=str(data[split]), out=str(caches / split),
                                top_k=vocab_size, relation="none", **build))
    if cfg.method is DemoMethod.llavadi:
        build_cache(BuildConfig(teacher=str(teacher), data=str(data["train"]), out=str(caches / "instruct-all"),
                                top_k=cfg.top_k, positions="response,visual,prompt", hidden=True, **build))


# Arms of the ablation beyond the demo's two students: (name, pre-training, third leg, DFT weights
# switched off). Every arm is three legs of the same lengths from the same student checkpoint, so all
# take pt_steps + sft_steps + dft_steps optimizer steps; an arm without DFT runs SFT again for DFT's
# steps (its own warmup and cosine, as each leg has). Legs two arms share are trained once.
TERM_OF_WEIGHT = {"alpha": "response", "beta": "visual", "gamma": "rdist"}
ABLATION_ARMS = (
    ("dpt-sft", "dpt", "sft", ()),
    ("pt-sft-dft", "pt", "dft", ()),
    ("dft-no-response", "dpt", "dft", ("alpha",)),
    ("dft-no-visual", "dpt", "dft", ("beta",)),
    ("dft-no-rdist", "dpt", "dft", ("gamma",)),
)


def student_arms(cfg: DemoConfig, student: Path, caches: Path, runs: Path) -> dict[str, list[dict[str, Any]]]:
    """The legs of every student, by arm name (``baseline``, ``distilled``; ``llavadi`` with
    ``--method llavadi``; the ``ABLATION_ARMS`` and ``lora`` with ``--ablation``).

    The baseline mirrors the distilled schedule leg by leg (PT = DPT's steps, SFT = SFT's steps, then
    SFT again for DFT's steps, same learning rates and warmup/cosine per leg): the teacher signal is
    the only difference between the two students.
    """
    kd = dict(alpha=cfg.alpha, beta=cfg.beta, gamma=cfg.gamma)
    if cfg.cross_tokenizer:
        kd["visual_alignment"] = cfg.visual_alignment
    pre = dict(max_steps=cfg.pt_steps, lr=cfg.pt_lr, train_modules=cfg.pretrain_modules, any_template=True,
               **_train_options(cfg))
    fine = dict(lr=cfg.lr, **_train_options(cfg))
    captions, instruct = caches / "captions", caches / "instruct"
    first = {"pt": _leg("sft", student, captions, runs / "baseline-pt", **pre),
             "dpt": _leg("dpt", student, captions, runs / "distilled-dpt", **kd, **pre)}
    prefix = {"pt": "baseline", "dpt": "distilled"}

    def arm(pre_stage: str, third: str, off: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        p = prefix[pre_stage]
        sft = _leg("sft", runs / f"{p}-{pre_stage}", instruct, runs / f"{p}-sft", max_steps=cfg.sft_steps, **fine)
        if third == "sft":
            last = _leg("sft", runs / f"{p}-sft", instruct, runs / f"{p}-sft2", max_steps=cfg.dft_steps, **fine)
        else:
            weights = {**kd, **dict.fromkeys(off, 0.0)}
            name = f"{p}-dft" + "".join(f"-no-{TERM_OF_WEIGHT[w]}" for w in off)
            last = _leg("dft", runs / f"{p}-sft", instruct, runs / name, max_steps=cfg.dft_steps, **weights, **fine)
        return [first[pre_stage], sft, last]

    arms = {"baseline": arm("pt", "sft"), "distilled": arm("dpt", "dft")}
    if cfg.cross_tokenizer:
        # LLaVA-KD's schedule with response MDist alone in DPT and DFT (no visual MDist, no RDist): what the
        # alignment of visual tokens across the two image grids adds to the aligned answer tokens.
        only = dict(alpha=cfg.alpha, beta=0.0, gamma=0.0, positions="response")
        arms["response-only"] = [
            _leg("dpt", student, captions, runs / "response-only-dpt", **only, **pre),
            _leg("sft", runs / "response-only-dpt", instruct, runs / "response-only-sft", max_steps=cfg.sft_steps,
                 **fine),
            _leg("dft", runs / "response-only-sft", instruct, runs / "response-only-dft", max_steps=cfg.dft_steps,
                 **only, **fine)]
    if cfg.ablation:
        arms.update({name: arm(pre_stage, third, off) for name, pre_stage, third, off in ABLATION_ARMS})
        # LLaVA-KD's recipe with a LoRA student: the same DPT leg, then SFT and DFT through adapters.
        lora = dict(lora_r=cfg.lora_r, **fine)
        arms["lora"] = [
            first["dpt"],
            _leg("sft", runs / "distilled-dpt", instruct, runs / "lora-sft", max_steps=cfg.sft_steps, **lora),
            _leg("dft", runs / "lora-sft", instruct, runs / "lora-dft", max_steps=cfg.dft_steps, **kd, **lora)]
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


def _train_leg(leg: dict, threads: int) -> None:
    """One ``kd-train`` run (also the entry point of a worker process)."""
    _quiet()
    import torch

    from student.config import TrainConfig
    from student.train import train

    torch.set_num_threads(threads)
    train(TrainConfig(**leg))


def train_students(cfg: DemoConfig, arms: dict[str, list[dict]], steps: _Steps) -> None:
    """Train every leg of every arm once (a leg two arms share, once), each after the leg it starts
    from; with ``parallel``, two at a time in worker processes (one core each)."""
    legs = list({leg["out"]: leg for legs in arms.values() for leg in legs}.values())  # a topological order
    with steps(f"students: {len(legs)} kd-train legs of {', '.join(arms)}" + (", two at a time" if cfg.parallel
                                                                              else "")):
        if not cfg.parallel:
            for leg in legs:
                _train_leg(leg, cfg.threads)
            return
        import multiprocessing as mp
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        outs = {leg["out"] for leg in legs}
        done: set[str] = set()
        running: dict[Any, str] = {}
        with ProcessPoolExecutor(max_workers=2, mp_context=mp.get_context("spawn")) as pool:
            while legs or running:
                for leg in [x for x in legs if x["student"] not in outs or x["student"] in done][:2 - len(running)]:
                    legs.remove(leg)
                    running[pool.submit(_train_leg, leg, cfg.threads)] = leg["out"]
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for f in finished:
                    f.result()
                    done.add(running.pop(f))


# ------------------------------------------------------------------------------------------ evaluation


def evaluate_model(path: Path, data: Path, images: Path, cache: Path, threads: int = 1,
                   batch_size: int = 64, cross: bool = False) -> tuple[dict[str, Any], list[dict]]:
    """``kd-eval`` of one model on a question file (answers) and its full-vocabulary cache (KL):
    (metrics, predictions with each question's KL sum ``kl`` over its ``kl_positions``). ``cross``: the
    model may have another tokenizer, template or image grid than the cache's teacher; the KL is then
    measured through kd-train's alignment (``student.evaluate.aligned_cache_agreement``), per aligned answer group, and
    the metrics add ``aligned_share`` (the model's answer positions in one-to-one groups)."""
    _quiet()
    import torch

    from student.evaluate import cache_agreement, evaluate_qa, load_model

    torch.set_num_threads(threads)
    model, proc = load_model(path, "cpu")
    qa = evaluate_qa(path, str(data), str(images), batch_size=batch_size, max_new_tokens=6, model=model,
                     processor=proc)
    if cross:
        from student.evaluate import aligned_cache_agreement as agreement

        got = agreement(model, proc, cache, batch_size=batch_size)
    else:
        got = cache_agreement(model, proc, cache, batch_size=batch_size)  # per question: its sample in the cache
    at = {rid: i for i, rid in enumerate(got.ids)}
    predictions = [{**p, "kl": float(got.kl["response"][at[p["id"]]]),
                    "kl_positions": int(got.positions["response"][at[p["id"]]])} for p in qa["predictions"]]
    n_resp, n_vis = got.positions["response"].sum(), got.positions["visual"].sum()
    metrics = {"accuracy": qa["accuracy"], "mc_accuracy": qa["mc_accuracy"],
               "kl_to_teacher": float(got.kl["response"].sum() / n_resp),
               "top1_agreement": float(got.agree["response"].sum() / n_resp),
               "kl_visual": float(got.kl["visual"].sum() / n_vis) if n_vis else None,
               "questions": qa["questions"], "llm_params": llm_params(model),
               "accuracy_by_question": accuracy_by_question(qa["predictions"], data)}
    if cross:
        metrics["aligned_share"] = float(got.one_to_one.sum() / max(int(got.answer_positions.sum()), 1))
    return metrics, predictions


def evaluate_all(cfg: DemoConfig, models: dict[str, Path], data: dict[str, Path], caches: Path,
                 out: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """Every model on the test and validation sets: ``{"test": {name: metrics}, "val": {...}}``;
    writes ``OUT/predictions-<split>-<name>.jsonl``. Two worker processes with ``parallel``."""
    jobs = [(split, name, path) for split in ("test", "val") for name, path in models.items()]

    def args(split, path):
        return (path, data[split], data["images"], caches / split, cfg.threads, cfg.eval_batch_size,
                cfg.cross_tokenizer)

    if cfg.parallel:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=2, mp_context=mp.get_context("spawn")) as pool:
            got = list(pool.map(evaluate_model, *zip(*[args(split, path) for split, _, path in jobs])))
    else:
        got = [evaluate_model(*args(split, path)) for split, _, path in jobs]
    results: dict[str, dict[str, dict[str, Any]]] = {"test": {}, "val": {}}
    for (split, name, _), (metrics, predictions) in zip(jobs, got):
        results[split][name] = metrics
        with open(out / f"predictions-{split}-{name}.jsonl", "w") as f:
            f.writelines(json.dumps(p) + "\n" for p in predictions)
    return results


def read_predictions(out: Path, split: str, name: str) -> list[dict]:
    return [json.loads(x) for x in (out / f"predictions-{split}-{name}.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------ the demo


def run_demo(cfg: DemoConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every step; returns the results dict (also written to ``OUT/results.json``)."""
    _quiet()
    import torch

    from student.evaluate import evaluate_cache

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
    with steps("student: kd-train init-student (teacher's vision tower + fresh projector + small LLM)"
               + (", another tokenizer, template and image grid" if cfg.cross_tokenizer else "")):
        student = make_student(cfg, teacher, student_llm, models)
    with steps("kd-cache build: captions, instructions, test and val (full vocabulary)"):
        build_student_caches(cfg, teacher, data, caches, len(tok))
    arms = student_arms(cfg, student, caches, runs)
    train_students(cfg, arms, steps)

    with steps(f"kd-eval: teacher and {len(arms)} students on the test and validation sets"):
        finals = {"teacher": teacher, **{name: Path(legs[-1]["out"]) for name, legs in arms.items()}}
        evaluated = evaluate_all(cfg, finals, data, caches, out)
        # What the teacher's outputs at caption (and image) positions are worth: its caption CE.
        captions = evaluate_cache(teacher, str(caches / "captions"), batch_size=cfg.eval_batch_size)
    results: dict[str, Any] = dict(evaluated["test"])
    results["val"] = evaluated["val"]
    results["teacher"]["caption_ce"] = captions["ce"]
    results.update(verdicts(out))
    if cfg.cross_tokenizer:
        results["cross"] = cross_summary(out, runs, arms)
    plotted = plot_curves({k: runs / k for k in STAGE_RUNS}, out / "curves.png")
    results["config"] = asdict(cfg)
    results["teacher_to_student_llm_params"] = round(results["teacher"]["llm_params"]
                                                     / results["baseline"]["llm_params"], 2)
    results["timings_s"] = steps.timings
    results["total_s"] = round(steps.elapsed(), 1)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    log_summary(results, out, plotted, log)
    return results


def verdicts(out: Path) -> dict[str, dict[str, Any]]:
    """``verdict`` (test set) and ``verdict_val``: the distilled student against the baseline, from the
    predictions a demo wrote in ``out`` (``kd_demo.verdict.compare``)."""
    from kd_demo.verdict import compare

    found = {}
    for split, key in (("test", "verdict"), ("val", "verdict_val")):
        per = {name: _per_question(read_predictions(out, split, name)) for name in ("distilled", "baseline")}
        found[key] = compare(per["distilled"], per["baseline"])
    return found


def cross_summary(out: Path, runs: Path, arms: dict[str, list[dict]]) -> dict[str, Any]:
    """What ``--cross-tokenizer`` adds: the pair (both tokenizers' hashes, templates and visual tokens per
    image), how kd-train aligned each distilling leg (``trainer_state.json``'s ``alignment``) and the mean
    of its per-step ``aligned_share`` (``metrics.jsonl``), and ``verdict_response_only``: the full
    method against the response-only student on the test set (``verdict.compare``)."""
    from kd_demo.verdict import compare

    legs: dict[str, Any] = {}
    for leg in (x for name in ("distilled", "response-only") for x in arms[name] if x["stage"] != "sft"):
        run = Path(leg["out"])
        shares = [m["aligned_share"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                  if m.get("aligned_share") is not None]
        legs[run.name] = {"alignment": json.loads((run / "trainer_state.json").read_text()).get("alignment"),
                          "positions": leg.get("positions", "response,visual"),
                          "aligned_share": sum(shares) / len(shares) if shares else None}
    per = {name: _per_question(read_predictions(out, "test", name)) for name in ("distilled", "response-only")}
    return {"pair": pair_facts(runs / "teacher", Path(arms["baseline"][0]["student"])), "legs": legs,
            "verdict_response_only": compare(per["distilled"], per["response-only"])}


def pair_facts(teacher: Path, student: Path) -> dict[str, dict[str, Any]]:
    """Per model: its tokenizer hash, vocabulary size, chat template's first turn marker, and visual tokens
    per image (its processor on one image)."""
    from PIL import Image
    from transformers import AutoProcessor

    from kd_cache.fingerprint import tokenizer_hash
    from kd_cache.processing import encode

    facts = {}
    for name, path in (("teacher", teacher), ("student", student)):
        proc = AutoProcessor.from_pretrained(path)
        tok = proc.tokenizer
        conv = [{"role": "user", "content": "<image>\nWhat shape is it?"}, {"role": "assistant", "content": "a"}]
        enc = encode(proc, tok.convert_tokens_to_ids(tiny.IMAGE_TOKEN), conv, [Image.new("RGB", (32, 32), "white")])
        facts[name] = {"tokenizer_hash": tokenizer_hash(tok), "vocab_size": len(tok),
                       "turn_marker": tok.convert_ids_to_tokens(int(enc.input_ids[0 if tok.bos_token is None else 1])),
                       "visual_tokens": int(enc.image_token_counts[0]), "chat_template": proc.chat_template}
    return facts


def _per_question(predictions: list[dict]) -> dict[str, Any]:
    """``verdict.compare``'s view of one model's predictions on a split."""
    return {"ids": [p["id"] for p in predictions], "correct": [p["correct"] for p in predictions],
            "response_kl": [p["kl"] for p in predictions], "response_n": [p["kl_positions"] for p in predictions]}


if __name__ == "__main__":  # pragma: no cover
    run_demo(DemoConfig(out=sys.argv[1] if len(sys.argv) > 1 else "kd-demo-out", quick="--quick" in sys.argv))
