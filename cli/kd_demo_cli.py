"""``kd-demo``: the whole distillation pipeline on a built-in visual task, offline, on CPU.

    kd-demo --out DIR [--seed N] [--quick]

Draws the task, trains a teacher, caches it with kd-cache build, trains a baseline (PT -> SFT) and a
distilled student (DPT -> SFT -> DFT) from the same start, evaluates all three, prints a table and
writes DIR/results.json and DIR/curves.png. A thin front end over ``kd_demo.run.run_demo``.
"""

from __future__ import annotations

import os
import sys

import typer

from cli.options import config_command
from kd_demo.config import DemoConfig

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(
    name="kd-demo",
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Show LLaVA-KD end to end on a small synthetic visual task (no downloads, no GPU, minutes on a CPU): "
         "teacher -> kd-cache build -> baseline PT->SFT vs distilled DPT->SFT->DFT -> kd-eval.",
)


def _fail(err: Exception | str) -> None:
    typer.echo(f"kd-demo: error: {err}", err=True)
    raise typer.Exit(code=2)


@app.command()
@config_command(DemoConfig, on_error=_fail)
def demo(cfg: DemoConfig) -> None:
    """Run the demo and print teacher / baseline / distilled metrics."""
    from kd_demo.run import run_demo

    run_demo(cfg, log=typer.echo)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``kd-demo``)."""
    app(args=list(sys.argv[1:] if argv is None else argv), prog_name="kd-demo")


if __name__ == "__main__":
    main()
