"""``kd-cache``: build a teacher cache, inspect it, verify it. Thin front end over ``kd_cache``.

``build``'s options are the fields of ``kd_cache.build_config.BuildConfig`` (``cli.options``).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated

import typer

from cli.options import config_command
from kd_cache.build_config import BuildConfig

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(
    help="Run a teacher VLM once and cache what distillation needs (sparse distributions, relation "
    "matrices) in compressed Zarr shards; inspect and verify caches.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _fail(msg: str | Exception, code: int = 2):
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@app.command()
@config_command(BuildConfig, on_error=_fail)
def build(cfg: BuildConfig):
    """Run the teacher once over the data and write the cache (resumable: rerun the same command)."""
    from kd_cache.build import build_cache, summary
    from kd_cache.build_lock import BuildLocked
    from kd_cache.records import BadRecord
    from kd_cache.storage import StorageError

    try:
        manifest = build_cache(cfg)
    except BadRecord as e:
        _fail(f"{e} (--strict stops at the first bad record; drop --strict to skip and list them)")
    except (ValueError, FileNotFoundError, BuildLocked, StorageError) as e:
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
def verify(
    cache: Annotated[str, typer.Argument(help="Cache directory or fsspec URL.")],
    repair: Annotated[bool, typer.Option(help=(
        "Rebuild the shards that fail (with the settings, data and teacher recorded in the cache's build.json), "
        "keep the good ones, then verify again."))] = False,
    device: Annotated[str, typer.Option(help="With --repair: the teacher's device (as kd-cache build --device).")] = "auto",
):
    """Re-check every shard's checksum and completeness; exit 1 on any problem."""
    from kd_cache.report import verify_cache

    try:
        problems = verify_cache(cache)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    if problems and repair:
        from kd_cache.build import repair_cache
        from kd_cache.build_lock import BuildLocked
        from kd_cache.storage import StorageError

        for p in problems:
            typer.secho(f"FAIL {p}", fg=typer.colors.RED, err=True)
        try:
            repair_cache(cache, device=device, progress=False)
        except (ValueError, FileNotFoundError, BuildLocked, StorageError) as e:
            _fail(f"repair failed: {e}")
        problems = verify_cache(cache)
        if not problems:
            typer.echo(f"repaired {cache}")
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
