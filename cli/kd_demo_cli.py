"""``kd-demo``: the whole distillation pipeline on a built-in visual task, offline, on CPU.

    kd-demo --out DIR [--seed N] [--quick]

Draws the task, trains a teacher, caches it with kd-cache build, trains a baseline (PT -> SFT) and a
distilled student (DPT -> SFT -> DFT) from the same start, evaluates all three, prints a table and
writes DIR/results.json and DIR/curves.png. A thin front end over ``kd_demo.run.run_demo``.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(
    name="kd-demo",
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Show LLaVA-KD end to end on a small synthetic visual task (no downloads, no GPU, minutes on a CPU): "
         "teacher -> kd-cache build -> baseline PT->SFT vs distilled DPT->SFT->DFT -> kd-eval.",
)


@app.command()
def demo(
    out: Annotated[str, typer.Option(help="Output directory: results.json, curves.png, and the data, models, "
                                          "caches and runs of every step.")],
    seed: Annotated[int, typer.Option(help="Seed for the task, the models and the training order.")] = 0,
    quick: Annotated[bool, typer.Option(help="A much smaller run (well under 2 minutes) that exercises every "
                                             "step; its numbers mean nothing.")] = False,
    method: Annotated[str, typer.Option(help="llavakd: baseline vs LLaVA-KD (DPT -> SFT -> DFT); llavadi: also a "
                                             "third student with LLaVADI's combination (logits on all tokens + "
                                             "hidden states), reported as 'llavadi'.")] = "llavakd",
) -> None:
    """Run the demo and print teacher / baseline / distilled metrics."""
    from kd_demo.config import DemoConfig
    from kd_demo.run import run_demo

    try:
        cfg = DemoConfig(out=out, seed=seed, quick=quick, method=method)
    except ValueError as e:
        typer.echo(f"kd-demo: error: {e}", err=True)
        raise typer.Exit(code=2) from None
    run_demo(cfg, log=typer.echo)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``kd-demo``)."""
    app(args=list(sys.argv[1:] if argv is None else argv), prog_name="kd-demo")


if __name__ == "__main__":
    main()
