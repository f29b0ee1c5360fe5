"""``kd-train``: train a student from a teacher cache (DPT, SFT, DFT), or compose a new student.

    kd-train --stage dft --student DIR --cache PATH_OR_URL --out DIR [options]   (= kd-train train ...)
    kd-train init-student --vision PATH --llm PATH --out DIR

A thin front end: ``train``'s options are the fields of ``student.config.TrainConfig`` (``cli.options``);
``init-student`` calls ``student.model.compose_student``. User errors are printed as one line (exit
code 2), with no traceback (``cli.options.user_errors``).
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from cli.options import choices, command_app, config_command, user_errors
from kd_cache.schema import DType
from student.config import TrainConfig

app = command_app(
    "kd-train",
    "Train a student of any supported family from a teacher cache (kd-cache build) through DPT, SFT and DFT; "
    "the teacher is never loaded. `kd-train --stage ...` is short for `kd-train train --stage ...`.",
)

COMMANDS = ("train", "init-student")
SAVE_DTYPES = choices(d for d in DType if d is not DType.auto)  # a saved model has one dtype


def _quiet_transformers() -> None:
    """No per-call weight-loading bars from transformers: kd-train shows its own progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


@app.command("train")
@config_command(TrainConfig, prog="kd-train")
def train_cmd(cfg: TrainConfig) -> None:
    """Train one stage (dpt, sft or dft) by streaming a teacher cache."""
    from student.train import train

    _quiet_transformers()
    result = train(cfg)
    if result["main_process"]:
        typer.echo(f"kd-train: {cfg.stage.value} done after {result['step']} steps; model saved to {result['out']}",
                   err=True)


@app.command("init-student")
@user_errors("kd-train")
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
    dtype: Annotated[SAVE_DTYPES, typer.Option(help="dtype of the saved weights.")] = SAVE_DTYPES.float32,
) -> None:
    """Compose a student: vision tower + fresh 2-layer GELU MLP projector + LLM, saved as a LLaVA."""
    from student.model import compose_student

    _quiet_transformers()
    path = compose_student(vision, llm, out, vision_feature_layer=vision_feature_layer,
                           image_token=image_token, seed=seed, dtype=dtype.value)
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
