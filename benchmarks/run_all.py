#!/usr/bin/env python
"""Run every benchmark of issue 5, print a table and write one JSON object.

    python benchmarks/run_all.py --quick --out results-quick.json        # CPU, < 15 min on 2 cores
    python benchmarks/run_all.py --out results-full.json                 # CPU, fuller counts
    python benchmarks/run_all.py --device cuda --out results-gpu.json    # GPU: bf16, flash-attn or sdpa,
                                                                         # ~1.8B teacher, 0.5B/4B KD pair
    python benchmarks/run_all.py --smoke --out /tmp/smoke.json           # plumbing check (< 60 s)

The JSON holds exactly the keys of the issue's table (``RESULT_KEYS``), plus metadata: ``goals``,
``machine``, ``date``, ``versions``, ``settings``, ``details`` (everything measured on the way),
``errors`` (a benchmark that failed leaves its keys null and its traceback here) and ``wall_s``.
See benchmarks/RESULTS.md for the recorded results and what each figure means.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from benchmarks.environment import set_environment  # noqa: E402

set_environment(passive_omp=not any("cuda" in a for a in sys.argv[1:]))  # before torch is imported

# key -> (comparison, goal); "report" = no goal, report the value.
GOALS: dict[str, tuple[str, float | None]] = {
    "teacher_pass_over_forward_only": (">=", 0.90),
    "teacher_pass_over_forward_only_qwen2vl": ("report", None),
    "dft_step_over_sft_step": ("<=", 1.15),
    "online_kd_step_over_dft_step": (">=", 1.7),
    "peak_mem_dft_over_sft": ("report", None),
    "peak_mem_online_over_dft": ("report", None),
    "bytes_per_position_topk64": ("<=", 200.0),
    "bytes_per_position_sample64": ("<=", 60.0),
    "relation_lowrank32_over_full_bytes": ("<=", 0.125),
    "relation_lowrank32_min_cos": (">=", 0.999),
    "grad_cos_topk16": ("report", None),
    "grad_cos_topk64": ("report", None),
    "grad_cos_topk256": ("report", None),
    "grad_cos_topk64_renorm": ("report", None),
    "grad_cos_sample64": (">=", 0.99),
    "loader_samples_per_s_per_worker": (">=", 60.0),
    "cross_dft_step_over_dft_step": ("<=", 1.3),
    "cross_loader_over_same_loader": (">=", 0.8),
    "alignment_bytes_per_sample": ("report", None),
    "alignment_bytes_share": ("report", None),
    "teacher_tokenizer_bytes_per_cache": ("report", None),
}
RESULT_KEYS = tuple(GOALS)
GROUPS = {
    "real": ("bytes_per_position_topk64", "bytes_per_position_sample64", "relation_lowrank32_over_full_bytes",
             "relation_lowrank32_min_cos", "grad_cos_topk16", "grad_cos_topk64", "grad_cos_topk256",
             "grad_cos_topk64_renorm", "grad_cos_sample64"),
    "teacher": ("teacher_pass_over_forward_only", "teacher_pass_over_forward_only_qwen2vl"),
    "student": ("dft_step_over_sft_step", "online_kd_step_over_dft_step", "peak_mem_dft_over_sft",
                "peak_mem_online_over_dft", "cross_dft_step_over_dft_step"),
    "loader": ("loader_samples_per_s_per_worker",),
    "cross": ("cross_loader_over_same_loader", "alignment_bytes_per_sample", "alignment_bytes_share",
              "teacher_tokenizer_bytes_per_cache"),
}


def met(key: str, value, ran: bool = True) -> str:
    op, goal = GOALS[key]
    if not ran:
        return "not run"
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "FAILED"
    if op == "report":
        return "report"
    ok = value >= goal if op == ">=" else value <= goal
    return "yes" if ok else "NO"


def table(results: dict, ran: set[str] | None = None) -> str:
    rows = [("key", "value", "goal", "met")]
    for k in RESULT_KEYS:
        v = results.get(k)
        op, goal = GOALS[k]
        rows.append((k, "-" if v is None else f"{v:.4g}", "report" if op == "report" else f"{op} {goal:g}",
                     met(k, v, ran is None or k in ran)))
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [" | ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in rows]
    lines.insert(1, "-+-".join("-" * x for x in w))
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="smaller counts: < 15 minutes on 2 CPU cores")
    mode.add_argument("--smoke", action="store_true", help="tiny models, no SmolLM2: checks the plumbing (< 60 s)")
    mode.add_argument("--gpu-check", action="store_true",
                      help="with --device cuda: the gpu_check profile (7B layer shapes, 8 layers; benchmarks/gpu_check.sh)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cuda: bf16 GPU variant of the teacher-pass and student-step benchmarks (larger models)")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--only", default="real,teacher,student,loader,cross",
                    help="comma-separated subset of: real, teacher, student, loader, cross (a student of another "
                         "tokenizer: loader and bytes; its step is in student)")
    ap.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one, deleted)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="GPU dense bf16 peak in TFLOP/s (default: looked up from the device name)")
    args = ap.parse_args(argv)
    only = [g.strip() for g in args.only.split(",") if g.strip()]
    unknown = sorted(set(only) - set(GROUPS))
    if unknown:
        ap.error(f"--only: unknown benchmark(s) {', '.join(unknown)}; expected a subset of {', '.join(GROUPS)}")
    args.only = only
    return args


def select_profile(args):
    from benchmarks.models import PROFILES

    if args.gpu_check:
        if args.device != "cuda":
            raise SystemExit("--gpu-check runs with --device cuda only (its CPU stand-in is --smoke)")
        return PROFILES["gpu_check"]
    if args.device == "cuda":
        p = PROFILES["cuda"]
        if args.smoke:
            raise SystemExit("--smoke runs on CPU only")
        if args.quick:  # fewer rounds and samples, same models
            p = replace(p, name="cuda", tp_samples=128, tp_rounds=2, st_reps=4, real_tokens=4096,
                        real_relation_windows=4, ld_samples=256, ld_shard_size=256, ld_epochs=1)
        return p
    return PROFILES["smoke" if args.smoke else "quick" if args.quick else "full"]


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from benchmarks import common

    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is visible to torch (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    profile = select_profile(args)
    device = torch.device(args.device)
    t_start = time.perf_counter()
    tmp = None
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="mllm-kd-bench-")
        workdir = Path(tmp.name)

    def log(msg: str) -> None:
        print(msg, flush=True)

    results: dict = {k: None for k in RESULT_KEYS}
    details: dict = {}
    errors: dict = {}
    timings: dict = {}
    log(f"mllm-kd benchmarks: profile {profile.name}, device {device}, torch threads {torch.get_num_threads()}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    for group in GROUPS:
        if group not in args.only:
            continue
        log(f"[{group}]")
        t0 = time.perf_counter()
        try:
            if group == "real":
                from benchmarks import bench_real

                out = bench_real.run(profile, device, workdir, log=log)
            elif group == "teacher":
                from benchmarks import bench_teacher

                out = bench_teacher.run(profile, device, workdir, peak_tflops=args.peak_tflops, log=log)
            elif group == "student":
                from benchmarks import bench_student

                out = bench_student.run(profile, device, workdir, log=log)
            elif group == "loader":
                from benchmarks import bench_loader

                out = bench_loader.run(profile, workdir, profile.vocab, basis_cpu=device.type == "cpu", log=log)
            else:
                from benchmarks import bench_cross

                out = bench_cross.run(profile, device, workdir, log=log)
            details[group] = out.pop("details")
            for k in GROUPS[group]:
                results[k] = float(out[k])
        except Exception as e:  # noqa: BLE001 - one failed benchmark must not lose the others' results
            errors[group] = "".join(traceback.format_exception(e))
            log(f"  FAILED: {type(e).__name__}: {e}")
        timings[group] = time.perf_counter() - t0
        log(f"  ({timings[group]:.0f} s)")
        common.free_memory()

    wall = time.perf_counter() - t_start
    doc = {k: results[k] for k in RESULT_KEYS}
    doc.update({
        "goals": {k: {"op": op, "goal": g} for k, (op, g) in GOALS.items()},
        "machine": common.machine_info(args.device),
        "date": common.now_iso(),
        "versions": common.versions(),
        "settings": {"mode": "smoke" if args.smoke else "quick" if args.quick else
                              "gpu-check" if args.gpu_check else "full", "device": args.device,
                     "only": args.only, "profile": profile.to_dict(),
                     "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                     "cost_basis": "wall-clock" if device.type == "cuda" else
                     "process CPU seconds (shared CPU host; wall-clock figures in details)"},
        "details": details,
        "errors": errors,
        "wall_s": wall,
        "group_wall_s": timings,
    })
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(doc, indent=1, default=_jsonable) + "\n")
    log("")
    log(table(results, {k for g in args.only for k in GROUPS[g]}))
    log(f"\nwrote {out_path} ({wall:.0f} s)")
    if tmp is not None:
        tmp.cleanup()
    return 1 if errors else 0


def _jsonable(o):
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


if __name__ == "__main__":
    sys.exit(main())
