"""``kd-cache``: build a teacher cache, inspect it, verify it. Thin front end over ``kd_cache``."""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from typing import Annotated

import typer

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(
    help="Run a teacher VLM once and cache what distillation needs (sparse distributions, relation "
    "matrices) in compressed Zarr shards; inspect and verify caches.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class Template(str, Enum):
    chat = "chat"
    pretrain = "pretrain"


class Sparse(str, Enum):
    topk = "topk"
    sample = "sample"


class SampleScheme(str, Enum):
    systematic = "systematic"
    multinomial = "multinomial"


class DType(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


def _fail(msg: str, code: int = 2):
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@app.command()
def build(
    teacher: Annotated[str, typer.Option(help="Teacher model directory or hub id (image-text-to-text or causal LM).")],
    data: Annotated[str, typer.Option(help="LLaVA JSON/JSONL file, parquet file or a `datasets` save_to_disk dir.")],
    out: Annotated[str, typer.Option(help="Cache directory or fsspec URL (e.g. s3://bucket/cache).")],
    image_folder: Annotated[str | None, typer.Option(help="Folder the records' image paths are relative to.")] = None,
    template: Annotated[Template, typer.Option(help="chat: the processor's chat template, loss on assistant turns; "
                                               "pretrain: image + caption, loss on the caption (DPT).")] = Template.chat,
    sparse: Annotated[Sparse, typer.Option(help="topk: k most likely ids + exact tail mass; sample: N draws "
                                           "from the teacher (unbiased random-sampling KD).")] = Sparse.topk,
    top_k: Annotated[int, typer.Option(help="Ids kept per position in topk mode.")] = 64,
    samples: Annotated[int, typer.Option(help="Draws per position in sample mode.")] = 64,
    sample_scheme: Annotated[SampleScheme, typer.Option(
        help="How sample mode draws (both unbiased): systematic = one random offset, N evenly spaced points "
             "through the CDF (much lower variance, fewer distinct ids); multinomial = N independent draws.")
    ] = SampleScheme.systematic,
    sample_logprobs: Annotated[bool, typer.Option(
        help="Sample mode: also store each drawn id's log-prob (fp16). Off by default: the loss needs only "
             "sum_i (c_i/N) log p_i per position, which is always stored (fp32); the per-id log-probs add "
             "~40% to the cache.")] = False,
    relation: Annotated[str, typer.Option(help="Relation matrix encoding per image: full | lowrank:R | none.")] = "full",
    batch_size: Annotated[int, typer.Option(help="Samples per teacher forward (does not change the cache).")] = 8,
    shard_size: Annotated[int, typer.Option(help="Samples per shard (the unit of resumption and of parallelism).")] = 1024,
    max_length: Annotated[int, typer.Option(help="Truncate tokenised samples to this many tokens.")] = 2048,
    dtype: Annotated[DType, typer.Option(help="Teacher dtype; auto = bf16 on GPU, fp32 on CPU.")] = DType.auto,
    device: Annotated[str, typer.Option(help="auto (the accelerate process's device), cpu, cuda, cuda:1 ...")] = "auto",
    strict: Annotated[bool, typer.Option(help="Stop at the first bad record instead of skipping and listing it.")] = False,
    limit: Annotated[int | None, typer.Option(help="Use only the first N records.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for sample mode draws and sampled generation.")] = 0,
    positions: Annotated[str, typer.Option(help="Distilled positions, comma-separated subset of response, visual, "
                                           "prompt (all other text; LLaVADI's all-token KD).")] = "response,visual",
    hidden: Annotated[bool, typer.Option(help="Also store the teacher's final-layer hidden states (fp16) at the "
                                         "distilled positions, for hidden-state alignment.")] = False,
    generate: Annotated[bool, typer.Option(help="Let the teacher answer every user turn first and distil on its "
                                           "own answers (references kept in each sample's meta).")] = False,
    max_new_tokens: Annotated[int, typer.Option(help="Longest teacher answer with --generate.")] = 128,
    generate_temperature: Annotated[float, typer.Option(help="Sampling temperature with --generate; 0 = greedy.")] = 0.0,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
):
    """Run the teacher once over the data and write the cache (resumable: rerun the same command)."""
    from kd_cache.build import BuildConfig, build_cache, summary
    from kd_cache.records import BadRecord

    try:
        cfg = BuildConfig(teacher=teacher, data=data, out=out, image_folder=image_folder, template=template.value,
                          sparse=sparse.value, top_k=top_k, samples=samples, sample_scheme=sample_scheme.value,
                          sample_logprobs=sample_logprobs, relation=relation,
                          batch_size=batch_size, shard_size=shard_size, max_length=max_length, dtype=dtype.value,
                          device=device, strict=strict, limit=limit, seed=seed, positions=positions, hidden=hidden,
                          generate=generate, max_new_tokens=max_new_tokens,
                          generate_temperature=generate_temperature, progress=progress)
        manifest = build_cache(cfg)
    except BadRecord as e:
        _fail(f"{e} (--strict stops at the first bad record; drop --strict to skip and list them)")
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    from accelerate import PartialState

    if PartialState().is_main_process:
        typer.echo(summary(manifest))


@app.command("inspect-shard")
def inspect_shard(
    cache: Annotated[str, typer.Argument(help="Cache directory or fsspec URL.")],
    shard: Annotated[int | None, typer.Option(help="Only this shard (index).")] = None,
    sample: Annotated[int | None, typer.Option(help="Only this sample (index within --shard, or global).")] = None,
    tokenizer: Annotated[str | None, typer.Option(help="Tokenizer dir for decoding (default: the cache's teacher).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
):
    """Show what a cache or one shard holds: sizes, compression, checksums, per-sample statistics."""
    from kd_cache.report import format_report, inspect_cache

    tok = None
    if tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer)
    try:
        info = inspect_cache(cache, shard=shard, sample=sample, tokenizer=tok)
    except (ValueError, FileNotFoundError, IndexError) as e:
        _fail(str(e))
    typer.echo(json.dumps(info, indent=1, default=str) if as_json else format_report(info))


@app.command()
def verify(cache: Annotated[str, typer.Argument(help="Cache directory or fsspec URL.")]):
    """Re-check every shard's checksum and completeness; exit 1 on any problem."""
    from kd_cache.report import verify_cache

    try:
        problems = verify_cache(cache)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    if problems:
        for p in problems:
            typer.secho(f"FAIL {p}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    typer.echo(f"OK {cache}: all shards complete and checksums match")


def main():  # console script `kd-cache`
    app()


def inspect_main():  # console script `inspect-shard`
    typer.run(inspect_shard)


if __name__ == "__main__":
    sys.exit(main())
