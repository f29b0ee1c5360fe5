"""Run the full ``kd-demo`` for several seeds and tabulate teacher / baseline / distilled with the verdict.

    python benchmarks/demo_seeds.py --seeds 0 1 2 3 4 --out demo-seeds [--jobs 1]
    python benchmarks/demo_seeds.py --collect DIR/seed-0 DIR/seed-1 ...   # tabulate finished runs

Each seed is one ``kd-demo --out OUT/seed-N --seed N`` in its own process (the real CLI); its wall
time and its CPU time (user + system of the demo and every worker process it waited for, from
``os.wait4``) are recorded. Writes ``OUT/seeds.json`` (every seed's ``results.json`` plus its times)
and prints a Markdown table for ``benchmarks/RESULTS.md``: accuracy and KL to the teacher per model
and seed, the distilled student's margins over the baseline in standard errors of the test set
(paired, ``kd_demo.verdict``), and on how many seeds both margins exceed two standard errors.
``--jobs N`` runs N seeds at a time (wall times are then not those of a machine to itself; CPU times
still are each seed's own). ``--collect`` reads ``results.json`` of finished demo directories (e.g.
the ``seed-N`` directories of ``kd-demo --ablation``, whose baseline and distilled students are the
default demo's) instead of running anything.
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


def run_seed(seed: int, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    log = out.parent / f"seed-{seed}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "cli.kd_demo_cli", "--out", str(out), "--seed", str(seed)],
                                cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"kd-demo --seed {seed} failed (exit {code}); see {log}")
    return {"seed": seed, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
            "results": json.loads((out / "results.json").read_text())}


def collect(path: Path) -> dict:
    res = json.loads((path / "results.json").read_text())
    return {"seed": res["config"]["seed"], "wall_s": res["total_s"], "cpu_s": None, "results": res}


def table(runs: list[dict]) -> str:
    head = ["seed", "teacher acc", "baseline acc", "distilled acc", "acc gain ± SE (z)", "baseline KL",
            "distilled KL", "KL reduction ± SE (z)", "verdict", "wall", "CPU"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in runs:
        res, v = r["results"], r["results"]["verdict"]
        cpu = f"{r['cpu_s'] / 60:.1f} min" if r.get("cpu_s") is not None else "-"
        lines.append(
            f"| {r['seed']} | {res['teacher']['accuracy']:.3f} | {res['baseline']['accuracy']:.3f} | "
            f"{res['distilled']['accuracy']:.3f} | {v['accuracy_gain']:+.3f} ± {v['accuracy_gain_se']:.3f} "
            f"({v['accuracy_gain_z']:+.1f}) | {res['baseline']['kl_to_teacher']:.4f} | "
            f"{res['distilled']['kl_to_teacher']:.4f} | {v['kl_reduction']:+.4f} ± {v['kl_reduction_se']:.4f} "
            f"({v['kl_reduction_z']:+.1f}) | {'yes' if v['verdict'] else 'NO'} | {r['wall_s'] / 60:.1f} min | {cpu} |")
    mean = {m: sum(r["results"][m]["accuracy"] for r in runs) / len(runs) for m in MODELS}
    kl = {m: sum(r["results"][m]["kl_to_teacher"] for r in runs) / len(runs) for m in MODELS}
    lines.append(f"| mean | {mean['teacher']:.3f} | {mean['baseline']:.3f} | {mean['distilled']:.3f} | | "
                 f"{kl['baseline']:.4f} | {kl['distilled']:.4f} | | | | |")
    won = sum(r["results"]["verdict"]["verdict"] for r in runs)
    n_test = runs[0]["results"]["teacher"]["questions"]
    lines += ["", f"distilled more accurate AND closer to the teacher by more than 2 standard errors of the "
                  f"{n_test}-question test set on {won} of {len(runs)} seeds"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--out", help="directory for every seed's demo output and seeds.json")
    ap.add_argument("--jobs", type=int, default=1, help="seeds run at a time")
    ap.add_argument("--collect", type=Path, nargs="+", help="finished demo directories to tabulate (runs nothing)")
    args = ap.parse_args(argv)
    if args.collect:
        print(table(sorted((collect(p) for p in args.collect), key=lambda r: r["seed"])))
        return
    if not args.out:
        ap.error("--out is required unless --collect is given")
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        runs = list(pool.map(lambda s: run_seed(s, root / f"seed-{s}"), args.seeds))
    (root / "seeds.json").write_text(json.dumps({"jobs": args.jobs, "runs": runs}, indent=1))
    print(table(runs))


if __name__ == "__main__":
    main()
