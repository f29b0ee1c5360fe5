"""Cost of a build's teacher identity (``kd_cache.fingerprint.teacher_identity``): the first run hashes every
file (sha256, streamed), later runs reuse the hashes of files whose size and mtime did not change.

    python benchmarks/bench_identity.py [--gib 2]

Writes a teacher-like folder of ``--gib`` GiB of random weights in a temporary directory and prints the
seconds of a first (hashing) and a second (cached) identity, and the throughput.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from kd_cache.fingerprint import teacher_identity


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=2.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        block = os.urandom(1 << 24)
        n = int(args.gib * (1 << 30)) // len(block)
        with open(os.path.join(d, "model.safetensors"), "wb") as f:
            for _ in range(n):
                f.write(block)
        with open(os.path.join(d, "config.json"), "w") as f:
            f.write("{}")
        size = n * len(block)
        t = time.perf_counter()
        first = teacher_identity(d)
        cold = time.perf_counter() - t
        t = time.perf_counter()
        teacher_identity(d, first)
        warm = time.perf_counter() - t
    print(f"{size / 2**30:.2f} GiB: first identity {cold:.2f} s ({size / cold / 1e9:.2f} GB/s, page cache warm), "
          f"cached {warm * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
