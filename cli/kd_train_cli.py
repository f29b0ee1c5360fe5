"""``kd-train``: train a student from a teacher cache (DPT, SFT, DFT), or compose a new student.

    kd-train --stage dft --student DIR --cache PATH_OR_URL --out DIR [options]   (= kd-train train ...)
    kd-train init-student --vision PATH --llm PATH --out DIR

A thin front end: each command builds the typed config of ``student.train`` / ``student.model`` and
calls it; user errors are printed as one message (exit code 2), with no traceback.
"""

from __future__ import annotations

import json
import sys
from enum import Enum
from typing import Annotated

import typer

from student.losses import Divergence, HiddenLoss, TailMode
from student.stages import Stage
from student.train import Precision, ReportTo

app = typer.Typer(
    name="kd-train",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Train a small LLaVA from a teacher cache (kd-cache build) through DPT, SFT and DFT; the teacher is "
         "never loaded. `kd-train --stage ...` is short for `kd-train train --stage ...`.",
)

COMMANDS = ("train", "init-student")


class SaveDtype(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


def _quiet_transformers() -> None:
    """No per-call weight-loading bars from transformers: kd-train shows its own progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _fail(err: Exception) -> None:
    typer.echo(f"kd-train: error: {err}", err=True)
    raise typer.Exit(code=2)


@app.command("train")
def train_cmd(
    stage: Annotated[Stage, typer.Option(help="dpt: projector only, caption cache, CE+MDist+RDist, lr 1e-3; "
                                              "sft: projector+LLM, CE only (teacher arrays ignored), lr 2e-5; "
                                              "dft: projector+LLM, CE+MDist+RDist, lr 2e-5.")],
    student: Annotated[str, typer.Option(help="Saved LlavaForConditionalGeneration + processor to train "
                                              "(kd-train init-student, or the OUT of an earlier stage).")],
    cache: Annotated[str, typer.Option(help="Teacher cache: a directory or fsspec URL written by kd-cache build.")],
    out: Annotated[str, typer.Option(help="Output directory: metrics.jsonl, checkpoints/step-N/, and the final "
                                          "model + processor + train_config.json.")],
    image_folder: Annotated[str | None, typer.Option(help="Where the cache's relative image paths resolve "
                                                             "(default: the folder recorded in the cache).")] = None,
    epochs: Annotated[int, typer.Option(help="Passes over the cache (ignored when --max-steps is given).")] = 1,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many optimizer steps (cycling "
                                                          "epochs as needed); overrides --epochs.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (default: 1e-3 for dpt, 2e-5 for "
                                                     "sft/dft).")] = None,
    batch_size: Annotated[int, typer.Option(help="Samples per device per micro-batch.")] = 1,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step; losses are normalised "
                                                 "over the whole step, so 4 x 2 equals a batch of 8.")] = 1,
    warmup_ratio: Annotated[float, typer.Option(help="Fraction of the steps spent in linear warmup before "
                                                     "cosine decay.")] = 0.03,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay (not applied to biases and norm "
                                                     "scales).")] = 0.0,
    max_grad_norm: Annotated[float, typer.Option(help="Gradient clipping norm (0 disables clipping).")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed for the data order and initialisation.")] = 0,
    alpha: Annotated[float, typer.Option(help="Weight of MDist on response positions.")] = 1.0,
    beta: Annotated[float, typer.Option(help="Weight of MDist on visual positions.")] = 1.0,
    gamma: Annotated[float, typer.Option(help="Weight of RDist (visual-token relation matrices).")] = 1.0,
    positions: Annotated[str, typer.Option(help="Position kinds that get MDist (and --hidden-weight), comma-"
                                                "separated subset of response,visual,prompt. response,visual is "
                                                "LLaVA-KD; response,visual,prompt is LLaVADI's all-token "
                                                "distillation (prompt = every other text position). The cache "
                                                "must hold them (kd-cache build --positions).")] = "response,visual",
    delta: Annotated[float, typer.Option(help="Weight of MDist on prompt positions (with --positions ...,prompt).")]
    = 1.0,
    hidden_weight: Annotated[float, typer.Option(help="LLaVADI hidden-state alignment weight (0: off). A fresh "
                                                      "2-layer MLP (Linear-GELU-Linear) maps the student's final "
                                                      "hidden states at the --positions positions to the teacher's "
                                                      "width; it trains with the student and is saved as "
                                                      "OUT/hidden_projector/, not inside the model. Needs a cache "
                                                      "built with kd-cache build --hidden.")] = 0.0,
    hidden_loss: Annotated[HiddenLoss, typer.Option(help="Hidden-state distance: mse (mean over features) or "
                                                         "cosine (1 - cosine similarity).")] = HiddenLoss.mse,
    affinity_weight: Annotated[float, typer.Option(help="LLaVADI affinity weight (0: off): MSE between the "
                                                        "student's and teacher's cosine-similarity matrices of final "
                                                        "hidden states, visual x response positions, per sample. "
                                                        "Needs kd-cache build --hidden.")] = 0.0,
    zscore: Annotated[bool, typer.Option(help="Z-score logit standardisation before MDist. The cache holds only "
                                              "the teacher's top-k, so both sides are standardised over the k "
                                              "stored ids (teacher log-probs = logits up to a shift) and compared "
                                              "over those ids, without the tail bin: exact for a cache whose k "
                                              "covers the vocabulary, an approximation restricted to the top-k "
                                              "otherwise. Not for sampled caches.")] = False,
    divergence: Annotated[Divergence, typer.Option(help="MDist divergence: forward KL, reverse KL, JSD(beta), "
                                                        "total variation, skew KL KL(p||a p+(1-a) q), skew reverse "
                                                        "KL KL(q||a q+(1-a) p) (a = --skew). Sampled caches "
                                                        "allow fkl only.")] = Divergence.fkl,
    jsd_beta: Annotated[float, typer.Option(help="beta of --divergence jsd (0 = forward KL, 1 = reverse KL, "
                                                 "0.5 = symmetric JSD).")] = 0.5,
    skew: Annotated[float, typer.Option(help="Mixing weight a of --divergence skl/srkl, in [0, 1) (0 = forward / "
                                             "reverse KL).")] = 0.1,
    temperature: Annotated[float, typer.Option(help="Divides the student's logits in MDist (> 0; with --zscore "
                                                    "both standardised sides); the teacher's distribution is "
                                                    "used as cached, CE is never scaled.")] = 1.0,
    sparse_mode: Annotated[TailMode, typer.Option(help="tail: compare the k teacher ids plus one 'everything "
                                                     "else' bin; renorm: renormalise both sides over the "
                                                     "k ids.")] = TailMode.tail,
    chunk_size: Annotated[int, typer.Option(help="Positions per chunk when applying the LM head (bounds the "
                                                 "[chunk, vocab] logits kept in memory).")] = 1024,
    head_memory_mb: Annotated[int, typer.Option(help="Keep the LM-head logits of a micro-batch for backward when "
                                                     "they fit in this many MiB (faster); above it, each chunk's "
                                                     "logits are recomputed in backward. 0: always recompute.")] = 1024,
    num_workers: Annotated[int, typer.Option(help="DataLoader worker processes (read shards, load and "
                                                  "process images, collate).")] = 0,
    shuffle: Annotated[bool, typer.Option(help="Shuffle the samples each epoch (a pure function of seed "
                                               "and epoch).")] = True,
    block_shards: Annotated[int, typer.Option(help="Shards shuffled together (more mixing, more shards "
                                                   "open per worker).")] = 4,
    save_every: Annotated[int, typer.Option(help="Save a checkpoint every N optimizer steps (0: only the "
                                                 "final model).")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue from the newest complete checkpoint in "
                                              "OUT/checkpoints (same next samples, same losses).")] = False,
    report_to: Annotated[ReportTo, typer.Option(help="Experiment tracker (metrics.jsonl is always "
                                                     "written).")] = ReportTo.none,
    train_modules: Annotated[str | None, typer.Option(help="Override the trained parts, comma-separated "
                                                              "subset of vision,projector,llm (default: the "
                                                              "stage's).")] = None,
    gradient_checkpointing: Annotated[bool, typer.Option(help="Recompute LLM activations in backward to "
                                                              "save memory.")] = False,
    mixed_precision: Annotated[Precision, typer.Option(help="auto: bf16 autocast on GPU, fp32 on CPU.")] =
    Precision.auto,
    any_template: Annotated[bool, typer.Option(help="Allow a cache whose template is not the stage's "
                                                    "(pretrain for dpt, chat for sft/dft).")] = False,
    storage_options: Annotated[str | None, typer.Option(help="JSON object of fsspec storage options for "
                                                                "a remote --cache.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Train one stage (dpt, sft or dft) by streaming a teacher cache."""
    from student.model import CompatibilityError
    from student.train import TrainConfig, train

    _quiet_transformers()
    try:
        opts = json.loads(storage_options) if storage_options else {}
        if not isinstance(opts, dict):
            raise TypeError(f"--storage-options must be a JSON object, got {storage_options!r}")
        cfg = TrainConfig(
            stage=stage, student=student, cache=cache, out=out, image_folder=image_folder, epochs=epochs,
            max_steps=max_steps, lr=lr, batch_size=batch_size, grad_accum=grad_accum, warmup_ratio=warmup_ratio,
            weight_decay=weight_decay, max_grad_norm=max_grad_norm, seed=seed, alpha=alpha, beta=beta,
            gamma=gamma, positions=positions, delta=delta, hidden_weight=hidden_weight, hidden_loss=hidden_loss,
            affinity_weight=affinity_weight, zscore=zscore, divergence=divergence, jsd_beta=jsd_beta, skew=skew,
            temperature=temperature, sparse_mode=sparse_mode, chunk_size=chunk_size,
            head_memory_mb=head_memory_mb,
            num_workers=num_workers, shuffle=shuffle, block_shards=block_shards, save_every=save_every,
            resume=resume, report_to=report_to, train_modules=train_modules,
            gradient_checkpointing=gradient_checkpointing, mixed_precision=mixed_precision,
            any_template=any_template, storage_options=opts, progress=progress,
        )
        result = train(cfg)
    except (ValueError, TypeError, FileNotFoundError, CompatibilityError) as e:
        _fail(e)
    if result["main_process"]:
        typer.echo(f"kd-train: {stage.value} done after {result['step']} steps; model saved to {result['out']}",
                   err=True)


@app.command("init-student")
def init_student_cmd(
    vision: Annotated[str, typer.Option(help="Vision tower: a vision-model directory (e.g. SiglipVisionModel) "
                                             "or any LLaVA-style checkpoint whose vision tower and image "
                                             "processor are reused (e.g. the teacher).")],
    llm: Annotated[str, typer.Option(help="Causal LM directory (e.g. Qwen2) with its tokenizer and chat "
                                          "template.")],
    out: Annotated[str, typer.Option(help="Where to save the composed LlavaForConditionalGeneration + "
                                          "processor.")],
    vision_feature_layer: Annotated[int | None, typer.Option(help="Vision hidden layer fed to the projector "
                                                                     "(default: the source LLaVA's, else -2).")]
    = None,
    image_token: Annotated[str, typer.Option(help="Image placeholder token (added to the tokenizer if "
                                                  "missing).")] = "<image>",
    seed: Annotated[int, typer.Option(help="Seed of the fresh projector's initialisation.")] = 0,
    dtype: Annotated[SaveDtype, typer.Option(help="dtype of the saved weights.")] = SaveDtype.float32,
) -> None:
    """Compose a student: vision tower + fresh 2-layer GELU MLP projector + LLM, saved as a LLaVA."""
    from student.model import CompatibilityError, compose_student

    _quiet_transformers()
    try:
        path = compose_student(vision, llm, out, vision_feature_layer=vision_feature_layer,
                               image_token=image_token, seed=seed, dtype=dtype.value)
    except (ValueError, FileNotFoundError, CompatibilityError) as e:
        _fail(e)
    typer.echo(f"kd-train: student saved to {path}", err=True)


def _with_default_command(argv: list[str]) -> list[str]:
    """``kd-train --stage ...`` -> ``kd-train train --stage ...`` (the issue's no-subcommand form)."""
    if argv and argv[0] not in COMMANDS and argv[0] not in ("--help", "-h"):
        return ["train", *argv]
    return argv


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``kd-train``)."""
    args = _with_default_command(list(sys.argv[1:] if argv is None else argv))
    app(args=args, prog_name="kd-train")


if __name__ == "__main__":
    main()
