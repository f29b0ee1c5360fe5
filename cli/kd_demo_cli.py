"""``kd-demo``: the whole distillation pipeline on a built-in visual task, offline, on CPU.

    kd-demo --out DIR [--seed N] [--quick]
    kd-demo --out DIR --ablation --seeds 0 1 2
    kd-demo --out DIR --cross-tokenizer [--seed N]

Draws the task, trains a teacher, caches it with kd-cache build, trains a baseline (PT -> SFT) and a
distilled student (DPT -> SFT -> DFT) from the same start, evaluates all three, prints a table and
writes DIR/results.json and DIR/curves.png. ``--ablation`` runs the paper's ablation for each seed
(``kd_demo.ablation``). A thin front end over ``kd_demo.run.run_demo`` and ``run_ablation``.
"""

from __future__ import annotations

import os
import sys

import typer

from cli.options import command_app, config_command
from kd_demo.config import DemoConfig

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = command_app(
    "kd-demo",
    "Show LLaVA-KD end to end on a small synthetic visual task (no downloads, no GPU, minutes on a CPU): "
    "teacher -> kd-cache build -> baseline PT->SFT vs distilled DPT->SFT->DFT -> kd-eval.",
    no_args_is_help=False,
)


@app.command()
@config_command(DemoConfig, prog="kd-demo")
def demo(cfg: DemoConfig) -> None:
    """Run the demo and print teacher / baseline / distilled metrics (or the ablation's table)."""
    if cfg.ablation:
        from kd_demo.ablation import run_ablation

        run_ablation(cfg, log=typer.echo)
        return
    from kd_demo.run import run_demo

    run_demo(cfg, log=typer.echo)


def join_seeds(argv: list[str]) -> list[str]:
    """``--seeds 0 1 2`` -> ``--seeds "0 1 2"``: the values after ``--seeds`` up to the next option, as
    the one value the option takes."""
    out, i = [], 0
    while i < len(argv):
        out.append(argv[i])
        if argv[i] == "--seeds":
            j = i + 1
            while j < len(argv) and not argv[j].startswith("--"):
                j += 1
            out.append(" ".join(argv[i + 1:j]))
            i = j
            continue
        i += 1
    return out


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``kd-demo``)."""
    app(args=join_seeds(list(sys.argv[1:] if argv is None else argv)), prog_name="kd-demo")


if __name__ == "__main__":
    main()
