#!/usr/bin/env python
"""How each cost grows with samples, shards, consumers and cache size, side by side in one run.

    python benchmarks/bench_scale.py --out benchmarks/results/scale.json          # ~10 min on 2 cores
    python benchmarks/bench_scale.py --smoke --out /tmp/scale.json                # plumbing, ~2 min
    python benchmarks/bench_scale.py --only consumers --out /tmp/consumers.json   # one curve, ~4 min

Tiny real models (kd_demo.tiny) on CPU: the *shape* of each curve is the point, not its level (the
levels at real shapes are in benchmarks/RESULTS.md's main table). Curves:

* ``build``: ``kd-cache build`` (the real build: teacher forward, top-k, relation, shard writes,
  manifest) at 1x, 4x, 16x samples: seconds per sample should stay flat.
* ``shards``: a cache of N tiny shards (10 ... 10,000; 2 samples each), local and ``memory://``:
  ``open_cache`` time, manifest bytes, first-batch latency of a fresh ``StreamingKDDataset`` at
  epoch start, resume latency (``set_position`` to the middle of the epoch, then its first batch),
  and the steady read cost per batch. The shards are copies of one real shard set written by the
  build (local: symbolic links to it, so 10,000 shards need no 10,000 writes; ``memory://``: the
  same bytes under every name, up to 1,000 shards to bound the process's memory).
* ``consumers``: R ranks x W loader workers (1 ... 16 consumers) reading one cache at once, each
  rank its own process, with the split of a trainer at ``--grad-accum`` A (one curve per value given):
  samples per worker-CPU-second (CPU of the rank processes and their workers, over one epoch)
  should stay flat: nothing a consumer does grows with the others.
* ``split`` (no I/O, seconds): how many consumers decode each chunk in one epoch of the real
  recipe's shape (shards of 1,024 samples, 13 samples per chunk: a top-64 chunk of LLaVA instruction
  samples), for ranks x workers x ``--grad-accum``, with ``student.stream.rank_stream`` against the
  strided split it replaced (rank r takes positions r, r + W, ...). 1 means each chunk is decoded once.
* ``trainer``: ``kd-train`` (one process, a fixed number of steps) on caches of 1x, 16x, 256x
  samples (32 ... 8192): peak RSS and seconds per step should stay flat (the cache is streamed, never held).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from benchmarks.environment import set_environment  # noqa: E402

set_environment()

SHARD_SAMPLES = 2  # samples per tiny shard in the shard-count curve


def _cpu_s() -> float:
    """CPU seconds of this process and of its waited-for children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


# ------------------------------------------------------------------------------------------ fixtures


def make_models(work: Path) -> dict:
    """A tiny LLaVA teacher, a smaller student sharing its tokenizer, and the processor (saved)."""
    from kd_demo import tiny

    proc = tiny.build_processor()
    teacher = tiny.build_llava(work / "teacher", processor=proc, seed=0)
    sizes = tiny.TinySizes(text_hidden=32, text_heads=2, text_kv_heads=1, text_intermediate=64)
    student = tiny.build_llava(work / "student", processor=proc, sizes=sizes, seed=1)
    return {"teacher": teacher, "student": student}


def build(models: dict, work: Path, n: int, shard_size: int, tag: str) -> tuple[Path, Path, float]:
    """``kd-cache build`` of ``n`` tiny records; (cache, image folder, seconds)."""
    from kd_cache.build import build_cache
    from kd_cache.build_config import BuildConfig
    from kd_demo import tiny

    data, images = tiny.make_llava_dataset(work / f"data-{tag}", n=n, seed=0, text_only_every=4)
    out = work / f"cache-{tag}"
    cfg = BuildConfig(teacher=str(models["teacher"]), data=str(data), image_folder=str(images), out=str(out),
                      device="cpu", progress=False, shard_size=shard_size, top_k=16, batch_size=8)
    t0 = time.perf_counter()
    build_cache(cfg)
    return out, images, time.perf_counter() - t0


def clone_cache(base: Path, url: str, n_shards: int) -> None:
    """A cache at ``url`` whose ``n_shards`` shards repeat ``base``'s shards in turn (same bytes, new names)."""
    import fsspec

    from kd_cache import storage
    from kd_cache.schema import Manifest
    from kd_cache.writer import CacheWriter

    manifest = Manifest.from_dict(json.loads((base / "manifest.json").read_text()))
    src = manifest.shards
    entries, names = [], []
    for i in range(n_shards):
        e = src[i % len(src)]
        names.append((e.name, f"{i:05d}"))
        entries.append(type(e).from_dict({**e.to_dict(), "name": f"{i:05d}"}))
    manifest.shards = entries
    if url.startswith("memory://"):
        fs, root = storage.open_fs(url)
        files = {}
        for e in src:
            for p in (base / "shards" / e.name).rglob("*"):
                if p.is_file():
                    files[(e.name, p.relative_to(base / "shards" / e.name).as_posix())] = p.read_bytes()
            files[(e.name, None)] = (base / "shards" / f"{e.name}.complete.json").read_bytes()
        store = fsspec.filesystem("memory")
        for old, new in names:
            for (name, rel), data in files.items():
                if name != old:
                    continue
                path = f"{root}/shards/{new}.complete.json" if rel is None else f"{root}/shards/{new}/{rel}"
                store.pipe_file(path, data)
    else:
        out = Path(url)
        (out / "shards").mkdir(parents=True)
        for old, new in names:
            os.symlink(base / "shards" / old, out / "shards" / new)
            shutil.copyfile(base / "shards" / f"{old}.complete.json", out / "shards" / f"{new}.complete.json")
    CacheWriter(url).write_manifest(manifest)


# ------------------------------------------------------------------------------------------- curves


def curve_build(models: dict, work: Path, sizes: list[int], log) -> list[dict]:
    rows = []
    for n in sizes:
        _, _, s = build(models, work, n, shard_size=16, tag=f"b{n}")
        rows.append({"samples": n, "seconds": s, "s_per_sample": s / n})
        log(f"  build {n:>5} samples: {s:7.2f} s, {1e3 * s / n:6.1f} ms/sample")
    return rows


def _dataset(url: str, processor, images: Path, rank: int = 0, world: int = 1):
    from student.stream import StreamingKDDataset

    return StreamingKDDataset(url, processor, image_folder=str(images), batch_size=4, seed=0, rank=rank,
                              world_size=world, with_teacher=True)


def curve_shards(base: Path, images: Path, processor, work: Path, counts: list[int], memory_max: int,
                 log) -> list[dict]:
    from kd_cache.reader import open_cache
    from student.stream import make_loader

    rows = []
    for where in ("local", "memory"):
        for n in counts:
            if where == "memory" and n > memory_max:
                continue
            url = f"memory://scale-{n}" if where == "memory" else str(work / f"shards-{n}")
            clone_cache(base, url, n)
            t0 = time.perf_counter()
            cache = open_cache(url)
            t_open = time.perf_counter() - t0
            manifest_bytes = len(json.dumps(cache.manifest.to_dict()).encode()) if where == "memory" else \
                (Path(url) / "manifest.json").stat().st_size
            t0 = time.perf_counter()
            ds = _dataset(url, processor, images)
            ds.set_position(0, 0)
            it = iter(make_loader(ds, 0))
            next(it)
            t_first = time.perf_counter() - t0
            t0 = time.perf_counter()
            steady = min(8, len(ds) - 1)
            for _ in range(steady):
                next(it)
            t_batch = (time.perf_counter() - t0) / steady
            del it
            t0 = time.perf_counter()
            ds = _dataset(url, processor, images)
            ds.set_position(0, (len(cache) // 2) // 4 * 4)
            next(iter(make_loader(ds, 0)))
            t_resume = time.perf_counter() - t0
            rows.append({"where": where, "shards": n, "samples": len(cache), "open_s": t_open,
                         "manifest_bytes": manifest_bytes, "first_batch_s": t_first, "resume_s": t_resume,
                         "batch_s": t_batch})
            log(f"  {where:6} {n:>6} shards: open {1e3 * t_open:8.1f} ms, manifest {manifest_bytes / 1e6:7.2f} MB, "
                f"first batch {1e3 * t_first:7.1f} ms, resume {1e3 * t_resume:7.1f} ms, "
                f"batch {1e3 * t_batch:6.1f} ms")
            if where == "memory":  # fsspec's recursive rm is quadratic in the number of files
                from fsspec.implementations.memory import MemoryFileSystem

                for k in [k for k in MemoryFileSystem.store if k.startswith(f"/scale-{n}/")]:
                    del MemoryFileSystem.store[k]
                MemoryFileSystem.pseudo_dirs[:] = [d for d in MemoryFileSystem.pseudo_dirs
                                                   if not d.startswith(f"/scale-{n}")]
            else:
                shutil.rmtree(url)
    return rows


_CONSUMER = r"""
import json, os, sys, time
sys.path.insert(0, {root!r})
from transformers import AutoProcessor
from student.stream import StreamingKDDataset, make_loader
rank, world, workers = {rank}, {world}, {workers}
proc = AutoProcessor.from_pretrained({student!r})
ds = StreamingKDDataset({url!r}, proc, image_folder={images!r}, batch_size=4, seed=0, rank=rank,
                        world_size=world, grad_accum={grad_accum}, with_teacher=True)
ds.set_position(0, 0)
t = os.times(); c0 = t.user + t.system + t.children_user + t.children_system
n = 0
it = iter(make_loader(ds, workers))
for b in it:
    n += b["n_samples"]
del it
t = os.times(); c1 = t.user + t.system + t.children_user + t.children_system
print(json.dumps({{"samples": n, "cpu_s": c1 - c0}}))
"""


def curve_consumers(cache: Path, images: Path, student: Path, configs: list[tuple[int, int]], log,
                    grad_accum: int = 1) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    rows = []
    for world, workers in configs:
        procs = [subprocess.Popen([sys.executable, "-c", _CONSUMER.format(
            root=str(ROOT), rank=r, world=world, workers=workers, student=str(student), url=str(cache),
            images=str(images), grad_accum=grad_accum)], env=env, stdout=subprocess.PIPE, text=True) for r in range(world)]
        t0 = time.perf_counter()
        outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
        wall = time.perf_counter() - t0
        samples, cpu = sum(o["samples"] for o in outs), sum(o["cpu_s"] for o in outs)
        rows.append({"ranks": world, "workers": workers, "consumers": world * workers, "grad_accum": grad_accum,
                     "samples": samples,
                     "cpu_s": cpu, "samples_per_cpu_s": samples / cpu, "wall_s": wall})
        log(f"  {world} ranks x {workers} workers = {world * workers:>2} consumers, grad-accum {grad_accum}: {samples} samples, "
            f"{samples / cpu:6.1f} samples per worker-CPU-second")
    return rows


def curve_split(configs: list[tuple[int, int, int]], log, batch: int = 4, shards: int = 16,
                shard_samples: int = 1024, chunk_samples: int = 13) -> list[dict]:
    import numpy as np

    from student.stream import epoch_order, rank_stream

    order = epoch_order([shard_samples] * shards, 0, 0)
    chunk = (order // shard_samples) * shard_samples + (order % shard_samples) // chunk_samples
    n_chunks = len(np.unique(chunk))

    def decodes(streams: list[np.ndarray], workers: int) -> float:
        """Distinct chunks per (rank, worker), summed, per chunk of the cache."""
        total = 0
        for st in streams:
            for w in range(workers):  # micro-batch j of a rank goes to worker j mod workers
                mine = np.concatenate([st[j * batch:(j + 1) * batch] for j in range(w, -(-len(st) // batch), workers)])
                total += len(np.unique((mine // shard_samples) * shard_samples + (mine % shard_samples) // chunk_samples))
        return total / n_chunks

    rows = []
    for world, workers, accum in configs:
        usable = order[:len(order) - len(order) % world]
        strided = decodes([usable[r::world] for r in range(world)], workers)
        split = decodes([rank_stream(order, 0, r, world, batch, accum) for r in range(world)], workers)
        rows.append({"ranks": world, "workers": workers, "grad_accum": accum, "batch": batch,
                     "decodes_per_chunk_strided": strided, "decodes_per_chunk": split})
        log(f"  {world} ranks x {workers} workers, grad-accum {accum}: each chunk decoded by {split:4.1f} consumers "
            f"({strided:4.1f} with the strided split)")
    return rows


def curve_trainer(base: Path, images: Path, student: Path, work: Path, shard_counts: list[int], steps: int,
                  log) -> list[dict]:
    rows = []
    for n in shard_counts:
        url = work / f"train-{n}"
        clone_cache(base, str(url), n)
        out = work / f"train-out-{n}"
        cmd = [sys.executable, "-m", "cli.kd_train_cli", "--stage", "dft", "--student", str(student),
               "--cache", str(url), "--image-folder", str(images), "--out", str(out), "--batch-size", "2",
               "--grad-accum", "1", "--max-steps", str(steps), "--no-progress"]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        err = p.stderr.read()
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode != 0:
            raise RuntimeError(f"kd-train on {n} shards failed:\n{err[-3000:]}")
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        step_s = sorted(m["samples"] / m["samples_per_s"] for m in lines[1:])  # the first step warms up
        samples = sum(e["samples"] for e in json.loads((url / "manifest.json").read_text())["shards"])
        rss = usage.ru_maxrss * 1024  # KiB on Linux
        rows.append({"shards": n, "samples": samples, "peak_rss_bytes": rss, "median_step_s": step_s[len(step_s) // 2]})
        log(f"  kd-train on {samples:>7} samples ({n} shards): peak RSS {rss / 2**20:7.1f} MiB, "
            f"median step {1e3 * step_s[len(step_s) // 2]:6.1f} ms")
        shutil.rmtree(url)
        shutil.rmtree(out)
    return rows


# ------------------------------------------------------------------------------------------- driver


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    ap.add_argument("--smoke", action="store_true", help="small counts: checks the plumbing (~2 min)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--only", choices=["consumers", "split"], default=None,
                    help="run one curve only (its cache is built as in the full run)")
    ap.add_argument("--grad-accum", type=int, nargs="+", default=[1, 4],
                    help="consumer curve: the trainer's micro-batches per optimizer step (it sets the split "
                         "of each step over ranks and workers); one curve per value")
    args = ap.parse_args(argv)
    from benchmarks.common import machine_info, now_iso, versions

    log = lambda s: print(s, flush=True)  # noqa: E731
    split_configs = [(w, nw, a) for w, nw in [(1, 4), (4, 4), (8, 4), (8, 8)] for a in (1, 4)]
    if args.only == "split":
        log("split: consumers decoding each chunk (shards of 1,024, 13 samples per chunk, batch 4)")
        doc = {"date": now_iso(), "machine": machine_info("cpu"), "versions": versions(),
               "settings": {"only": "split"}, "split": curve_split(split_configs, log)}
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(doc, indent=1) + "\n")
        return doc
    work = Path(tempfile.mkdtemp(prefix="bench-scale-", dir=args.workdir))
    smoke = args.smoke
    t_all = time.perf_counter()
    try:
        models = make_models(work)
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(models["student"])
        b = 8 if smoke else 32
        build_rows, shard_rows, trainer_rows, split_rows = [], [], [], []
        if args.only is None:
            log("build: seconds per sample against samples")
            build_rows = curve_build(models, work, [b, 4 * b, 16 * b], log)
            base, images, _ = build(models, work, 32, shard_size=SHARD_SAMPLES, tag="tiny-shards")
            log("shards: open, manifest, first batch, resume, per-batch read against the number of shards")
            counts = [10, 100] if smoke else [10, 100, 1000, 10000]
            shard_rows = curve_shards(base, images, processor, work, counts, memory_max=1000, log=log)
        else:
            build(models, work, 16 * b, shard_size=16, tag=f"b{16 * b}")
        log("consumers: samples per worker-CPU-second against ranks x workers on one cache")
        # The consumer and trainer curves read shards of 16 samples (the 16x build's), so a sample's
        # cost is its own and not that of opening a 2-sample shard.
        base16, images16 = work / f"cache-b{16 * b}", work / f"data-b{16 * b}" / "images"
        configs = [(1, 1), (2, 1)] if smoke else [(1, 1), (1, 2), (2, 2), (2, 4), (4, 4)]
        consumer_cache = work / "consumers"
        clone_cache(base16, str(consumer_cache), 8 if smoke else 32)
        consumer_rows = []
        for accum in args.grad_accum:
            consumer_rows += curve_consumers(consumer_cache, images16, models["student"], configs, log, accum)
        if args.only is None:
            log("split: consumers decoding each chunk (shards of 1,024, 13 samples per chunk, batch 4)")
            split_rows = curve_split(split_configs, log)
            log("trainer: peak RSS and step time against cache size")
            trainer_rows = curve_trainer(base16, images16, models["student"], work,
                                         [2, 32] if smoke else [2, 32, 512], 4 if smoke else 8, log)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc = {"date": now_iso(), "machine": machine_info("cpu"), "versions": versions(),
           "settings": {"mode": "smoke" if smoke else "full", "only": args.only, "shard_samples": SHARD_SAMPLES,
                        "grad_accum": args.grad_accum},
           "build": build_rows, "shards": shard_rows, "consumers": consumer_rows, "split": split_rows,
           "trainer": trainer_rows,
           "wall_s": time.perf_counter() - t_all}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
    return doc


if __name__ == "__main__":
    main()
