"""``kd-demo --ablation``: the paper's ablation (LLaVA-KD, Table 4/5 style) at small scale.

For every seed, one demo with all of ``run.ABLATION_ARMS`` and the LoRA student (``OUT/seed-N``, the same files as a plain
``kd-demo --seed N`` plus the extra arms: its baseline and distilled students are the same runs), then
per arm the mean and spread over seeds of accuracy (overall and per question type), KL to the teacher
and top-1 agreement, on the test and the validation sets. Writes ``OUT/ablation.json``,
``OUT/ablation.md`` (the table) and ``OUT/ablation.png`` (when matplotlib is installed).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from kd_demo.config import DemoConfig
from kd_demo.task import QUESTIONS

# Arm -> the paper's name for its recipe, in the table's order.
LABELS = {
    "baseline": "PT -> SFT",
    "dpt-sft": "DPT -> SFT",
    "pt-sft-dft": "PT -> SFT -> DFT",
    "distilled": "DPT -> SFT -> DFT (LLaVA-KD)",
    "dft-no-response": "  DFT without response MDist",
    "dft-no-visual": "  DFT without visual MDist",
    "dft-no-rdist": "  DFT without RDist",
    "lora": "DPT -> SFT -> DFT, LoRA student",
}
SHORT = {"baseline": "PT\nSFT", "dpt-sft": "DPT\nSFT", "pt-sft-dft": "PT\nSFT\nDFT",
         "distilled": "DPT\nSFT\nDFT\n(LLaVA-KD)", "dft-no-response": "DFT w/o\nresponse\nMDist",
         "dft-no-visual": "DFT w/o\nvisual\nMDist", "dft-no-rdist": "DFT w/o\nRDist", "lora": "LLaVA-KD\nLoRA"}
# The paper's rows (average over its benchmarks, LLaVA-KD-1B): DPT-SFT-DFT 57.9 vs PT-SFT 54.7.
PAPER = {"baseline": 54.7, "distilled": 57.9}
METRICS = ("accuracy", *(f"acc_{q}" for q in QUESTIONS), "kl_to_teacher", "top1_agreement")


def _row(metrics: dict[str, Any]) -> dict[str, float]:
    return {"accuracy": metrics["accuracy"], "kl_to_teacher": metrics["kl_to_teacher"],
            "top1_agreement": metrics["top1_agreement"],
            **{f"acc_{q}": metrics["accuracy_by_question"].get(q, float("nan")) for q in QUESTIONS}}


def summarise(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """``{split: {arm: {metric: {"mean", "std", "values"}}}}`` over seeds (``std``: sample standard
    deviation over seeds, 0 for one seed) from every seed's ``results.json``."""
    out: dict[str, Any] = {}
    for split in ("test", "val"):
        out[split] = {}
        for arm in ("teacher", *LABELS):
            rows = [_row((r if split == "test" else r["val"])[arm]) for r in per_seed.values()]
            out[split][arm] = {m: {"values": [x[m] for x in rows], "mean": statistics.fmean(x[m] for x in rows),
                                   "std": statistics.stdev(x[m] for x in rows) if len(rows) > 1 else 0.0}
                               for m in METRICS}
    return out


def table(summary: dict[str, Any], split: str, seeds: list[int]) -> str:
    """The Markdown table of one split: mean +- standard deviation over seeds per arm."""
    cols = [("accuracy", "accuracy", 3), *((f"acc_{q}", q, 3) for q in QUESTIONS), ("kl_to_teacher", "KL to teacher", 4),
            ("top1_agreement", "top-1 agreement", 3)]
    lines = ["| recipe | " + " | ".join(c[1] for c in cols) + " | paper (avg of its benchmarks) |",
             "|---" * (len(cols) + 2) + "|"]
    for arm in ("teacher", *LABELS):
        m = summary[split][arm]
        cells = [f"{m[k]['mean']:.{d}f} ± {m[k]['std']:.{d}f}" for k, _, d in cols]
        label = LABELS.get(arm, "teacher").replace("  ", "&nbsp;&nbsp;")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {PAPER.get(arm, '')} |")
    lines.append(f"\n{split} set, seeds {', '.join(map(str, seeds))}: mean ± standard deviation over seeds.")
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> bool:
    """Accuracy and KL to the teacher per arm (mean, standard deviation over seeds, every seed as a
    dot) on the test set; returns False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    arms = list(LABELS)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, key, title in ((axes[0], "accuracy", "test accuracy (higher is better)"),
                           (axes[1], "kl_to_teacher", "KL to the teacher (lower is better)")):
        for i, arm in enumerate(arms):
            m = summary["test"][arm][key]
            ax.bar(i, m["mean"], yerr=m["std"], capsize=3,
                   color="tab:orange" if arm == "distilled" else "tab:blue" if arm == "baseline" else "0.7")
            ax.scatter([i] * len(m["values"]), m["values"], color="k", s=8, zorder=3)
        if key == "accuracy":
            t = summary["test"]["teacher"][key]["mean"]
            ax.axhline(t, color="tab:green", linestyle="--", label=f"teacher {t:.3f}")
            lo = min(v for arm in arms for v in summary["test"][arm][key]["values"])
            ax.set_ylim(max(0.0, lo - 0.05), 1.0)
            ax.legend(fontsize=8)
        ax.set_xticks(range(len(arms)), [SHORT[a] for a in arms], fontsize=7)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def finished(cfg: DemoConfig) -> dict[str, Any] | None:
    """The ``results.json`` of a finished run of ``cfg`` in ``cfg.out`` (any ``out``), with its verdicts
    recomputed from the predictions written beside it; None when there is none."""
    from kd_demo.run import verdicts

    path = Path(cfg.out) / "results.json"
    if not path.is_file():
        return None
    results = json.loads(path.read_text())
    want = json.loads(json.dumps(asdict(cfg)))
    if {k: v for k, v in results["config"].items() if k != "out"} != {k: v for k, v in want.items() if k != "out"}:
        return None
    results.update(verdicts(Path(cfg.out)))
    return results


def run_ablation(cfg: DemoConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every seed's demo with the ablation arms, then the summary, table and plot."""
    from kd_demo.run import run_demo

    out = Path(cfg.out)
    seeds = list(cfg.seeds or (cfg.seed,))
    per_seed = {}
    for seed in seeds:
        seed_cfg = replace(cfg, seed=seed, seeds=(), out=str(out / f"seed-{seed}"))
        per_seed[seed] = finished(seed_cfg)
        if per_seed[seed] is not None:
            log(f"=== seed {seed}: finished with this configuration in {seed_cfg.out}, reused ===")
            continue
        log(f"=== seed {seed} ===")
        per_seed[seed] = run_demo(seed_cfg, log)
    summary = summarise(per_seed)
    md = "\n\n".join(table(summary, split, seeds) for split in ("test", "val"))
    verdicts = {seed: r["verdict"] for seed, r in per_seed.items()}
    result = {"seeds": seeds, "summary": summary, "verdicts": verdicts,
              "total_s": {seed: r["total_s"] for seed, r in per_seed.items()}}
    (out / "ablation.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "ablation.md").write_text(md + "\n")
    plotted = plot(summary, out / "ablation.png")
    log("\n" + md)
    log(f"\nwrote {out / 'ablation.json'}, {out / 'ablation.md'}" + (f", {out / 'ablation.png'}" if plotted else ""))
    return result
