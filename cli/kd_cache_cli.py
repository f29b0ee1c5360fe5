"""``kd-cache``: build a teacher cache, inspect it, verify it. Thin front end over ``kd_cache``.

``build``'s options are the fields of ``kd_cache.build_config.BuildConfig`` (``cli.options``).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated

import typer

from cli.options import command_app, config_command, fail, user_errors
from kd_cache.build_config import BuildConfig
from kd_cache.storage import STORAGE_OPTIONS_HELP, parse_storage_options

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = command_app(
    "kd-cache",
    "Run a teacher VLM once and cache what distillation needs (sparse distributions, relation matrices) in "
    "compressed Zarr shards; inspect and verify caches.",
)


@app.command()
@config_command(BuildConfig, prog="kd-cache")
def build(cfg: BuildConfig):
    """Run the teacher once over the data and write the cache (resumable: rerun the same command)."""
    from accelerate import PartialState

    from kd_cache.build import build_cache, summary

    manifest = build_cache(cfg)
    if PartialState().is_main_process:
        typer.echo(summary(manifest))


@app.command("inspect-shard")
@user_errors("kd-cache")
def inspect_shard(
    cache: Annotated[str, typer.Argument(help="Cache directory or fsspec URL.")],
    shard: Annotated[int | None, typer.Option(help="Only this shard (index).")] = None,
    sample: Annotated[int | None, typer.Option(help="Only this sample (index within --shard, or global).")] = None,
    tokenizer: Annotated[str | None, typer.Option(help="Tokenizer dir for decoding (default: the cache's teacher).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    storage_options: Annotated[str | None, typer.Option(help=STORAGE_OPTIONS_HELP)] = None,
):
    """Show what a cache or one shard holds: sizes, compression, checksums, per-sample statistics."""
    from kd_cache.report import format_report, inspect_cache

    tok = None
    if tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer)
    try:
        info = inspect_cache(cache, shard=shard, sample=sample, tokenizer=tok,
                             storage_options=parse_storage_options(storage_options) if storage_options else None)
    except IndexError as e:  # --shard / --sample out of range
        fail("kd-cache", e)
    typer.echo(json.dumps(info, indent=1, default=str) if as_json else format_report(info))


@app.command()
@user_errors("kd-cache")
def verify(
    cache: Annotated[str, typer.Argument(help="Cache directory or fsspec URL.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the per-shard result as JSON on stdout "
                                                         "(kd_cache.reader.CacheCheck.to_dict).")] = False,
    repair: Annotated[bool, typer.Option(help=(
        "Rebuild the shards that fail (with the settings, data and teacher recorded in the cache's build.json), "
        "keep the good ones, then verify again."))] = False,
    device: Annotated[str, typer.Option(help="With --repair: the teacher's device (as kd-cache build --device).")] = "auto",
    storage_options: Annotated[str | None, typer.Option(help=STORAGE_OPTIONS_HELP)] = None,
):
    """Re-check every shard against the manifest (files, sizes, checksums, sample counts, shards the
    manifest misses); list each problem and exit 1 on any. --repair rebuilds the failing shards."""
    from kd_cache.build import verify_cache

    def problem(line: str) -> None:
        typer.secho(f"FAIL {line}", fg=typer.colors.RED, err=True)

    result = verify_cache(cache, repair=repair, device=device, on_problem=problem,
                          storage_options=parse_storage_options(storage_options) if storage_options else None)
    if result.repaired:
        typer.echo(f"repaired {cache}")
    if result.error is not None:
        fail("kd-cache", result.error)
    if as_json:
        typer.echo(json.dumps(result.check.to_dict(), indent=1))
    if not result.ok:
        for line in result.lines():
            problem(line)
        typer.secho(f"{len(result.check.failing)} failing shard(s): {' '.join(result.check.failing) or '-'}",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    if not as_json:
        typer.echo(f"OK {cache}: {len(result.check.shards)} shards complete, checksums and sample counts match the manifest")


def main():  # console script `kd-cache`
    app()


def inspect_main():  # console script `inspect-shard`
    typer.run(inspect_shard)


if __name__ == "__main__":
    sys.exit(main())
