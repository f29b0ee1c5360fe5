"""``kd-eval``: accuracy of a saved student on QA data, and its distance to the teacher on a cache.

    kd-eval --model DIR --data PATH --image-folder DIR [--json]   exact-match (+ multiple-choice) accuracy
    kd-eval --model DIR --cache PATH [--json]                      KL to the teacher, top-1 agreement
    kd-eval --model DIR --data ... --cache ...                     both

A thin front end over ``student.evaluate``, its options generated from ``student.eval_config.EvalConfig``;
user errors are one line with exit code 2 (``cli.options.config_command``).
"""

from __future__ import annotations

import json
import os
import sys

import typer

from cli.options import command_app, config_command
from student.eval_config import EvalConfig

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = command_app(
    "kd-eval",
    "Evaluate a saved image-text-to-text model of a supported family (LLaVA, Qwen-VL, Idefics3, Gemma3, ...): "
    "exact-match accuracy of greedy answers on LLaVA-format QA data (--data), multiple-choice accuracy for "
    "records with `options`, and forward KL / top-1 agreement with the teacher on a kd-cache (--cache).",
)


QA_COLUMNS = [("accuracy", ".4f"), ("correct", "d"), ("questions", "d"), ("mc_accuracy", ".4f"), ("mc_questions", "d")]
CACHE_COLUMNS = [("kl_to_teacher", ".6f"), ("top1_agreement", ".4f"), ("ce", ".4f"), ("positions", "d"),
                 ("kl_visual", ".6f"), ("top1_visual", ".4f"), ("visual_positions", "d")]


def _lines(title: str, metrics: dict, columns) -> list[str]:
    out = [title]
    for key, fmt in columns:
        v = metrics.get(key)
        out.append(f"  {key:<16} {'-' if v is None else format(v, fmt)}")
    return out


@app.command()
@config_command(EvalConfig, prog="kd-eval")
def evaluate(cfg: EvalConfig) -> None:
    """Evaluate a checkpoint on QA data (--data) and/or against a teacher cache (--cache)."""
    from student.evaluate import evaluate_cache, evaluate_qa, load_model

    results: dict = {"model": cfg.model}
    m, proc = load_model(cfg.model, cfg.device, cfg.dtype)
    if cfg.data is not None:
        qa = evaluate_qa(cfg.model, cfg.data, cfg.image_folder, batch_size=cfg.batch_size,
                         max_new_tokens=cfg.max_new_tokens, limit=cfg.limit, max_length=cfg.max_length,
                         strict=cfg.strict, model=m, processor=proc)
        if cfg.predictions:
            with open(cfg.predictions, "w") as f:
                f.writelines(json.dumps(p) + "\n" for p in qa["predictions"])
        results["qa"] = {k: v for k, v in qa.items() if k != "predictions"}
    if cfg.cache is not None:
        results["cache"] = evaluate_cache(cfg.model, cfg.cache, image_folder=cfg.cache_image_folder,
                                          batch_size=cfg.batch_size, model=m, processor=proc)
    typer.echo(json.dumps(results, indent=2) if cfg.as_json else _report(cfg, results))


def _report(cfg: EvalConfig, results: dict) -> str:
    """The results as a table per part (QA, cache)."""
    lines = [f"model: {cfg.model}"]
    if "qa" in results:
        qa = results["qa"]
        lines += _lines(f"QA: {cfg.data} ({qa['records']} records)", qa, QA_COLUMNS)
        if qa["skipped"]:
            lines.append(f"  skipped {len(qa['skipped'])} records: "
                         + ", ".join(f"{s['id']} ({s['reason']})" for s in qa["skipped"][:5]))
    if "cache" in results:
        c = results["cache"]
        lines += _lines(f"cache: {cfg.cache} ({c['samples']} samples, {c['sparse']['mode']} k={c['sparse']['k']})",
                        c, CACHE_COLUMNS)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``kd-eval``)."""
    app(args=list(sys.argv[1:] if argv is None else argv), prog_name="kd-eval")


if __name__ == "__main__":
    main()
