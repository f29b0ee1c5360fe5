"""Requests a cache costs on object storage, and what survives S3's failure modes.

Everything runs on this machine: moto's S3 server on 127.0.0.1 behind ``benchmarks.s3_local.FaultProxy``,
which counts every request by method and can inject faults. A tiny teacher (``kd_demo.tiny``) builds caches
of ``SHARDSxSIZE`` (shards x samples per shard) into ``s3://``; the figures are requests per shard and per
object written, then the reads of every sample (requests per chunk object read) and ``verify``.

    python -m benchmarks.bench_s3                          # request counts, no fault
    python -m benchmarks.bench_s3 --faults slowdown=0.05,reset-after=0.02 --seed 1
    python -m benchmarks.bench_s3 --faults slowdown=0.3,503=0.1,reset-before=0.05,reset-after=0.1 --seed 2

With ``--faults`` each build / verify / read runs through the faulty proxy and is compared with a
fault-free local build of the same data (byte-identical files, identical samples).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _tiny(root: Path, n: int):
    from kd_demo import tiny

    processor = tiny.build_processor()
    teacher = tiny.build_llava(root / "teacher", processor=processor, seed=0)
    data = tiny.make_llava_dataset(root / "data", n=n, seed=3)
    return teacher, data


def _config(teacher, data, out, size, **kw):
    from kd_cache.build_config import BuildConfig

    return BuildConfig(teacher=str(teacher), data=str(data[0]), image_folder=str(data[1]), out=str(out), device="cpu",
                       progress=False, top_k=8, shard_size=size, batch_size=2, **kw)


def _files(fs, root: str) -> dict[str, bytes]:
    prefix = root.rstrip("/") + "/"
    return {str(p)[len(prefix):]: fs.cat_file(p) for p in fs.find(root)}


def _parse_faults(text: str | None) -> dict[str, float]:
    if not text:
        return {}
    return {k: float(v) for k, v in (item.split("=") for item in text.split(","))}


def run(layouts: list[tuple[int, int]], faults: dict[str, float], seed: int, tmp: Path) -> list[dict]:
    import numpy as np

    from benchmarks.s3_local import FaultProxy, local_s3, random_faults
    from kd_cache import open_cache, storage
    from kd_cache.build import build_cache, verify_cache

    rows = []
    n_max = max(s * k for s, k in layouts)
    teacher, data = _tiny(tmp, n_max)
    with local_s3() as s3:
        s3.make_bucket("bench")
        with FaultProxy(s3.url) as proxy:
            options = s3.storage_options(proxy.url)
            for i, (shards, size) in enumerate(layouts):
                n = shards * size
                sub = tiny_subset(data, n, tmp / f"data-{i}")
                url = f"s3://bench/cache-{i}-{seed}"
                local = tmp / f"local-{i}"
                build_cache(_config(teacher, sub, local, size))
                proxy.rule = random_faults(seed, faults) if faults else proxy.rule
                proxy.reset_counts()
                t0 = time.time()
                build_cache(_config(teacher, sub, url, size, storage_options=options))
                build_s = time.time() - t0
                built = Counter(proxy.counts)
                proxy.rule = lambda m, p, k: "pass"
                fs, root = storage.open_fs(url, options)
                remote = _files(fs, root)
                lfs, lroot = storage.open_fs(str(local))
                ref = _files(lfs, lroot)
                same = sorted(remote) == sorted(ref) and all(
                    remote[k] == ref[k] for k in ref if k not in ("manifest.json", "build.json"))
                objects = len(remote)
                chunk_objects = sum(1 for k in remote if "/c/" in k)
                # reads: every sample, through the proxy (faults again when asked)
                proxy.rule = random_faults(seed + 1, faults) if faults else proxy.rule
                proxy.reset_counts()
                cache = open_cache(url, options)
                opened = Counter(proxy.counts)
                proxy.reset_counts()
                got = [cache[j] for j in range(len(cache))]
                reads = Counter(proxy.counts)
                chunk_gets = sum(1 for m, p, st in proxy.log if m == "GET" and "/c/" in p)
                want = list(open_cache(str(local)))
                equal = all(set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a) for a, b in zip(got, want))
                proxy.reset_counts()
                ok = verify_cache(url, storage_options=options).ok
                verified = Counter(proxy.counts)
                proxy.rule = lambda m, p, k: "pass"
                rows.append({
                    "layout": f"{shards}x{size}", "faults": faults, "seed": seed, "build_s": round(build_s, 1),
                    "objects_written": objects, "chunk_objects": chunk_objects,
                    "build_requests": sum(v for k, v in built.items() if " " not in k),
                    "build_by_method": dict(built),
                    "requests_per_shard": round(sum(v for k, v in built.items() if " " not in k) / shards, 1),
                    "requests_per_object": round(sum(v for k, v in built.items() if " " not in k) / objects, 2),
                    "open_requests": dict(opened), "read_requests": dict(reads), "chunk_gets": chunk_gets,
                    "verify_requests": dict(verified), "verify_ok": ok,
                    "identical_to_local": same, "samples_equal": equal and len(got) == len(want),
                })
                print(json.dumps(rows[-1]), flush=True)
    return rows


def tiny_subset(data, n: int, root: Path):
    """The first ``n`` records of ``data`` (a JSON list) as a data file of their own."""
    path, images = data
    records = json.loads(Path(path).read_text())[:n]
    root.mkdir(parents=True, exist_ok=True)
    (root / "data.json").write_text(json.dumps(records))
    return root / "data.json", images


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", default="3x2,6x1,2x8", help="SHARDSxSIZE,... (shards x samples per shard)")
    ap.add_argument("--faults", default=None, help="fault=rate,... (slowdown, 503, reset-before, reset-after)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)
    layouts = [tuple(int(x) for x in item.split("x")) for item in args.layouts.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(layouts, _parse_faults(args.faults), args.seed, Path(tmp))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if all(r["verify_ok"] and r["identical_to_local"] and r["samples_equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
