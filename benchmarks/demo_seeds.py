"""Run the full ``kd-demo`` for several seeds and tabulate teacher / baseline / distilled.

    python benchmarks/demo_seeds.py --seeds 0 1 2 --out demo-seeds [--jobs 1]

Each seed is one ``kd-demo --out OUT/seed-N --seed N`` in its own process (the real CLI). Writes
``OUT/seeds.json`` (every seed's ``results.json`` plus its wall time) and prints a Markdown table
for ``benchmarks/RESULTS.md``: accuracy, KL to the teacher and top-1 agreement per model and seed,
their means, and on how many seeds the distilled student beats the baseline. ``--jobs N`` runs N
seeds at a time (the per-seed wall times are then not those of a machine to itself).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = ("teacher", "baseline", "distilled")
METRICS = ("accuracy", "kl_to_teacher", "top1_agreement")


def run_seed(seed: int, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cli.kd_demo_cli", "--out", str(out), "--seed", str(seed)],
                          cwd=REPO, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    (out.parent / f"seed-{seed}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"kd-demo --seed {seed} failed (exit {proc.returncode}); see {out.parent}/seed-{seed}.log")
    return {"seed": seed, "wall_s": wall, "results": json.loads((out / "results.json").read_text())}


def table(runs: list[dict]) -> str:
    lines = ["| seed | " + " | ".join(f"{m} {k}" for k in METRICS for m in MODELS) + " | wall |",
             "|---" * (1 + len(METRICS) * len(MODELS) + 1) + "|"]
    for r in runs:
        res = r["results"]
        cells = [f"{res[m][k]:.3f}" if k != "kl_to_teacher" else f"{res[m][k]:.4f}" for k in METRICS for m in MODELS]
        lines.append(f"| {r['seed']} | " + " | ".join(cells) + f" | {r['wall_s'] / 60:.1f} min |")
    means = []
    for k in METRICS:
        for m in MODELS:
            v = sum(r["results"][m][k] for r in runs) / len(runs)
            means.append(f"{v:.3f}" if k != "kl_to_teacher" else f"{v:.4f}")
    lines.append("| mean | " + " | ".join(means) + " | |")
    acc = sum(r["results"]["distilled"]["accuracy"] > r["results"]["baseline"]["accuracy"] for r in runs)
    kl = sum(r["results"]["distilled"]["kl_to_teacher"] < r["results"]["baseline"]["kl_to_teacher"] for r in runs)
    lines.append("")
    lines.append(f"distilled > baseline on accuracy for {acc} of {len(runs)} seeds; "
                 f"lower KL to the teacher for {kl} of {len(runs)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", required=True, help="directory for every seed's demo output and seeds.json")
    ap.add_argument("--jobs", type=int, default=1, help="seeds run at a time")
    args = ap.parse_args(argv)
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        runs = list(pool.map(lambda s: run_seed(s, root / f"seed-{s}"), args.seeds))
    (root / "seeds.json").write_text(json.dumps({"jobs": args.jobs, "runs": runs}, indent=1))
    print(table(runs))


if __name__ == "__main__":
    main()
