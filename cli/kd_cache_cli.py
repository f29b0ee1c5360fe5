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
    from kd_cache.lock import FolderLocked
    from kd_cache.records import BadRecord
    from kd_cache.storage import StorageError

    try:
        manifest = build_cache(cfg)
    except BadRecord as e:
        _fail(f"{e} (--strict stops at the first bad record; drop --strict to skip and list them)")
    except (ValueError, FileNotFoundError, FolderLocked, StorageError) as e:
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
    as_json: Annotated[bool, typer.Option("--json", help="Print the per-shard result as JSON on stdout "
                                                         "(kd_cache.reader.CacheCheck.to_dict).")] = False,
    repair: Annotated[bool, typer.Option(help=(
        "Rebuild the shards that fail (with the settings, data and teacher recorded in the cache's build.json), "
        "keep the good ones, then verify again."))] = False,
    device: Annotated[str, typer.Option(help="With --repair: the teacher's device (as kd-cache build --device).")] = "auto",
):
    """Re-check every shard against the manifest (files, sizes, checksums, sample counts, shards the
    manifest misses); list each problem and exit 1 on any. --repair rebuilds the failing shards."""
    from kd_cache.reader import open_cache

    def check(trusted=None):
        try:
            return open_cache(cache).verify_shards(trusted), None
        except (ValueError, FileNotFoundError, TypeError) as e:
            return None, str(e)

    result, error = check()
    if repair and (error is not None or not result.ok):
        from kd_cache.build import repair_cache
        from kd_cache.lock import FolderLocked
        from kd_cache.storage import StorageError

        for p in ([error] if error is not None else result.lines()):
            typer.secho(f"FAIL {p}", fg=typer.colors.RED, err=True)
        try:
            repair_cache(cache, check=result, device=device, progress=False)
        except (ValueError, FileNotFoundError, FolderLocked, StorageError) as e:
            _fail(f"repair failed: {e}")
        # The final verify re-hashes only the shards the first check did not pass. A shard it passed was
        # re-hashed moments ago against the entry the new manifest still lists for it (else it is re-hashed
        # again), and the repair writes only the failing shards' folders and the manifest. Its cheap checks
        # still run (marker, file list and sizes, metadata hash, sample counts), so only a same-size
        # rewrite of one of its chunks in those seconds would pass here, and its CRC32C refuses that chunk
        # when it is read.
        result, error = check(trusted=result)
        if error is None and result.ok:
            typer.echo(f"repaired {cache}")
    if error is not None:
        _fail(error)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=1))
    if not result.ok:
        for p in result.lines():
            typer.secho(f"FAIL {p}", fg=typer.colors.RED, err=True)
        typer.secho(f"{len(result.failing)} failing shard(s): {' '.join(result.failing) or '-'}",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    if not as_json:
        typer.echo(f"OK {cache}: {len(result.shards)} shards complete, checksums and sample counts match the manifest")


def main():  # console script `kd-cache`
    app()


def inspect_main():  # console script `inspect-shard`
    typer.run(inspect_shard)


if __name__ == "__main__":
    sys.exit(main())
