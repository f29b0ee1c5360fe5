"""What the demo reports: loss curves of every stage, accuracy per question type, the printed table."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kd_demo.task import QUESTIONS

COLUMNS = [("accuracy", "accuracy", ".3f"), ("mc_accuracy", "mc_accuracy", ".3f"),
           ("kl_to_teacher", "kl_to_teacher", ".4f"), ("top1_agreement", "top1_agreement", ".3f"),
           ("kl_visual", "kl_visual", ".3f"), ("llm_params", "llm_params", ",d")]


def llm_params(model) -> int:
    """Parameters of the language model and its output head (the vision tower and projector excluded)."""
    lm = model.model.language_model if hasattr(model, "model") and hasattr(model.model, "language_model") else model
    head = model.get_output_embeddings()
    return sum(p.numel() for p in lm.parameters()) + sum(p.numel() for p in head.parameters())


def accuracy_by_question(predictions: list[dict], test_file: Path) -> dict[str, float]:
    """Share of correct predictions per ``question_type`` of the test records."""
    kinds = {r["id"]: r.get("question_type", "?") for r in json.loads(Path(test_file).read_text())}
    hits: dict[str, list[bool]] = {}
    for p in predictions:
        hits.setdefault(kinds.get(p["id"], "?"), []).append(p["correct"])
    return {k: sum(v) / len(v) for k, v in sorted(hits.items())}


def _metrics(run: Path) -> list[dict]:
    p = run / "metrics.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.is_file() else []


def plot_curves(runs: dict[str, Path], path: Path) -> bool:
    """Training losses of every stage; returns False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    m = {k: _metrics(v) for k, v in runs.items()}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))

    def curve(ax, rows, key, label, offset=0, **kw):
        pts = [(r["step"] + offset, r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), label=label, **kw)

    ax = axes[0]
    n_tpt = len(m.get("teacher-pt", []))
    curve(ax, m.get("teacher-pt", []), "loss", "teacher PT on captions (CE)")
    curve(ax, m["teacher"], "loss", "teacher SFT (CE)", offset=n_tpt)
    ax.set_title("teacher")
    ax = axes[1]
    curve(ax, m["baseline-pt"], "ce", "baseline PT: CE")
    curve(ax, m["distilled-dpt"], "ce", "distilled DPT: CE")
    curve(ax, m["distilled-dpt"], "loss", "distilled DPT: total", linestyle="--")
    curve(ax, m["distilled-dpt"], "mdist_visual", "DPT: MDist visual", linestyle=":")
    curve(ax, m["distilled-dpt"], "rdist", "DPT: RDist", linestyle=":")
    ax.set_title("pre-training (captions)")
    ax = axes[2]
    n_sft = len(m["distilled-sft"])
    curve(ax, m["baseline-sft"] + [dict(r, step=r["step"] + n_sft) for r in m["baseline-sft2"]], "ce",
          "baseline SFT: CE")
    curve(ax, m["distilled-sft"], "ce", "distilled SFT: CE")
    curve(ax, m["distilled-dft"], "ce", "distilled DFT: CE", offset=n_sft)
    curve(ax, m["distilled-dft"], "loss", "distilled DFT: total", offset=n_sft, linestyle="--")
    curve(ax, m["distilled-dft"], "mdist_response", "DFT: MDist response", offset=n_sft, linestyle=":")
    ax.set_title("fine-tuning (instructions)")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def log_summary(results: dict[str, Any], out: Path, plotted: bool, log: Callable[[str], None]) -> None:
    """The table of every evaluated model (overall and per-question accuracy, KL, size) and where the
    files are."""
    from student.evaluate import format_table

    log("")
    shown = {k: results[k] for k in ("teacher", "baseline", "distilled", "llavadi", "response-only") if k in results}
    kinds = [("acc_" + q, q, ".3f") for q in QUESTIONS]
    log(format_table({k: {**v, **{"acc_" + q: a for q, a in v["accuracy_by_question"].items()}}
                      for k, v in shown.items()}, COLUMNS[:2] + kinds + COLUMNS[2:]
                     + ([("aligned_share", "aligned_share", ".3f")] if "cross" in results else [])))
    ratio = results["teacher"]["llm_params"] / results["baseline"]["llm_params"]
    log(f"\nteacher LLM / student LLM parameters: {ratio:.1f}x; {results['teacher']['questions']} test questions; "
        f"total {results['total_s']:.0f}s")
    cross = results.get("cross")
    if cross:
        t, s = cross["pair"]["teacher"], cross["pair"]["student"]
        log(f"cross pair: teacher tokenizer {t['tokenizer_hash'][:12]} (V={t['vocab_size']}, {t['turn_marker']} turns, "
            f"{t['visual_tokens']} visual tokens per image) vs student {s['tokenizer_hash'][:12]} (V={s['vocab_size']}, "
            f"{s['turn_marker']} turns, {s['visual_tokens']} visual tokens); KL to the teacher is kd-train's aligned "
            "KL (mapped ids + else bin, per aligned answer group)")
        for leg, got in cross["legs"].items():
            a = got["alignment"] or {}
            share = got["aligned_share"]
            log(f"  {leg}: response {a.get('text')}, {a.get('teacher_ids_mapped', 0):.1%} of teacher ids mapped; "
                + (f"visual {a.get('visual')}" if "visual" in got["positions"] else "visual not distilled")
                + "; mean aligned share of answer positions "
                + ("-" if share is None else f"{share:.3f}"))
    v = results["verdict"]
    won = "yes" if v["verdict"] else "NO"
    log(f"distilled - baseline on the test set (paired, {results['teacher']['questions']} questions): accuracy "
        f"{v['accuracy_gain']:+.3f} +- {v['accuracy_gain_se']:.3f} ({v['accuracy_gain_z']:+.1f} SE), KL to the teacher "
        f"{-v['kl_reduction']:+.4f} +- {v['kl_reduction_se']:.4f} ({v['kl_reduction_z']:+.1f} SE); "
        f"more accurate and closer by more than 2 SE: {won}")
    if cross:
        r = cross["verdict_response_only"]
        log(f"distilled (response + visual MDist + RDist) - response-only on the test set: accuracy "
            f"{r['accuracy_gain']:+.3f} +- {r['accuracy_gain_se']:.3f} ({r['accuracy_gain_z']:+.1f} SE), KL to the "
            f"teacher {-r['kl_reduction']:+.4f} +- {r['kl_reduction_se']:.4f} ({r['kl_reduction_z']:+.1f} SE); "
            f"more accurate and closer by more than 2 SE: {'yes' if r['verdict'] else 'NO'}")
    log(f"results: {out / 'results.json'}" + (f"; curves: {out / 'curves.png'}" if plotted else
                                               " (pip install matplotlib for curves.png)"))
