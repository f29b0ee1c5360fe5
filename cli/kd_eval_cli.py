"""``kd-eval``: accuracy of a saved student on QA data, and its distance to the teacher on a cache.

    kd-eval --model DIR --data PATH --image-folder DIR [--json]   exact-match (+ multiple-choice) accuracy
    kd-eval --model DIR --cache PATH [--json]                      KL to the teacher, top-1 agreement
    kd-eval --model DIR --data ... --cache ...                     both

A thin front end over ``student.evaluate``; user errors are one message with exit code 2.
"""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from typing import Annotated

import typer

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(
    name="kd-eval",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Evaluate a saved LLaVA checkpoint: exact-match accuracy of greedy answers on LLaVA-format QA data "
         "(--data), multiple-choice accuracy for records with `options`, and forward KL / top-1 agreement "
         "with the teacher on a kd-cache (--cache).",
)


class DType(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


QA_COLUMNS = [("accuracy", ".4f"), ("correct", "d"), ("questions", "d"), ("mc_accuracy", ".4f"), ("mc_questions", "d")]
CACHE_COLUMNS = [("kl_to_teacher", ".6f"), ("top1_agreement", ".4f"), ("ce", ".4f"), ("positions", "d"),
                 ("kl_visual", ".6f"), ("top1_visual", ".4f"), ("visual_positions", "d")]


def _fail(err: Exception) -> None:
    typer.echo(f"kd-eval: error: {err}", err=True)
    raise typer.Exit(code=2)


def _lines(title: str, metrics: dict, columns) -> list[str]:
    out = [title]
    for key, fmt in columns:
        v = metrics.get(key)
        out.append(f"  {key:<16} {'-' if v is None else format(v, fmt)}")
    return out


@app.command()
def evaluate(
    model: Annotated[str, typer.Option(help="Saved LlavaForConditionalGeneration + processor (e.g. a kd-train OUT).")],
    data: Annotated[str | None, typer.Option(help="LLaVA-format QA data (JSON/JSONL, parquet or a datasets "
                                                  "dir); every assistant turn is one question.")] = None,
    image_folder: Annotated[str | None, typer.Option(help="Folder the records' image paths are relative to.")]
    = None,
    cache: Annotated[str | None, typer.Option(help="Teacher cache (directory or fsspec URL) for KL to the "
                                                   "teacher and top-1 agreement.")] = None,
    cache_image_folder: Annotated[str | None, typer.Option(help="Where the cache's images resolve (default: "
                                                                "the folder recorded in the cache).")] = None,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 16,
    max_new_tokens: Annotated[int, typer.Option(help="Longest generated answer.")] = 32,
    limit: Annotated[int | None, typer.Option(help="Use only the first N records of --data.")] = None,
    max_length: Annotated[int, typer.Option(help="Truncate prompts to this many tokens.")] = 2048,
    device: Annotated[str, typer.Option(help="auto (cuda if available), cpu, cuda, cuda:1 ...")] = "auto",
    dtype: Annotated[DType, typer.Option(help="Model dtype; auto = bf16 on GPU, fp32 on CPU.")] = DType.auto,
    predictions: Annotated[str | None, typer.Option(help="Write one JSON line per question (answer, "
                                                         "prediction, correct) to this file.")] = None,
    strict: Annotated[bool, typer.Option(help="Stop at the first bad record instead of skipping it.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as one JSON object.")] = False,
) -> None:
    """Evaluate a checkpoint on QA data (--data) and/or against a teacher cache (--cache)."""
    from kd_cache.records import BadRecord
    from student.evaluate import evaluate_cache, evaluate_qa, load_model
    from student.model import CompatibilityError

    if data is None and cache is None:
        _fail(ValueError("nothing to evaluate: pass --data (with --image-folder) and/or --cache"))
    results: dict = {"model": model}
    try:
        m, proc = load_model(model, device, dtype.value)
        if data is not None:
            qa = evaluate_qa(model, data, image_folder, batch_size=batch_size, max_new_tokens=max_new_tokens,
                             limit=limit, max_length=max_length, strict=strict, model=m, processor=proc)
            if predictions:
                with open(predictions, "w") as f:
                    f.writelines(json.dumps(p) + "\n" for p in qa["predictions"])
            results["qa"] = {k: v for k, v in qa.items() if k != "predictions"}
        if cache is not None:
            results["cache"] = evaluate_cache(model, cache, image_folder=cache_image_folder,
                                              batch_size=batch_size, model=m, processor=proc)
    except BadRecord as e:
        _fail(f"{e} (--strict stops at the first bad record; drop it to skip and count them)")
    except (ValueError, TypeError, FileNotFoundError, CompatibilityError) as e:
        _fail(e)

    if as_json:
        typer.echo(json.dumps(results, indent=2))
        return
    lines = [f"model: {model}"]
    if "qa" in results:
        qa = results["qa"]
        lines += _lines(f"QA: {data} ({qa['records']} records)", qa, QA_COLUMNS)
        if qa["skipped"]:
            lines.append(f"  skipped {len(qa['skipped'])} records: "
                         + ", ".join(f"{s['id']} ({s['reason']})" for s in qa["skipped"][:5]))
    if "cache" in results:
        c = results["cache"]
        lines += _lines(f"cache: {cache} ({c['samples']} samples, {c['sparse']['mode']} k={c['sparse']['k']})",
                        c, CACHE_COLUMNS)
    typer.echo("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``kd-eval``)."""
    app(args=list(sys.argv[1:] if argv is None else argv), prog_name="kd-eval")


if __name__ == "__main__":
    main()
