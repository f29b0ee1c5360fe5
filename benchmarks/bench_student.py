"""Student step cost and peak memory: SFT vs DFT from the cache vs online KD (teacher in the process).

One optimizer step is what ``student.train.train`` runs per step, with the trainer's own pieces:
``accumulate_gradients`` over ``DistillStudent`` (same losses, same normalisation), gradient clipping,
``AdamW.step`` and ``zero_grad``, under an ``accelerate.Accelerator`` (bf16 autocast on a GPU).

* SFT: CE only, batches collated without the teacher arrays (``with_teacher=False``, as SFT reads them).
* DFT: CE + MDist (response and visual positions) + RDist, the teacher arrays streamed from a cache
  that ``build_cache`` wrote with the same teacher that the online step runs.
* DFT across tokenizers (timed only): the same DFT step on the batch a student of another tokenizer
  gets (``benchmarks.bench_cross.cross_batch``: GOLD's loss per aligned group over a vocabulary
  projection), the same student and micro-batches.
* online KD: the same DFT step, but the teacher runs in the same process on every step: its HF
  forward returns full logits [B, T, V]; top-64 + exact tail at the distilled positions and the
  relation matrices come from those logits, then the identical DFT step follows. (A dense
  full-vocabulary KL would cost the online step more, never less: this is the cheapest online step
  with the same losses.)

Timing runs the three interleaved step by step in one process, on the same micro-batches (already
collated: loading is measured by the loader benchmark). Peak memory runs each mode in a fresh
subprocess: on CPU the resident-set high-water mark above the interpreter + libraries baseline
(measured after imports, before any model exists); on a GPU ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from itertools import islice
from pathlib import Path

import torch

from benchmarks.bench_cross import COVERAGE, GROUP_SHARES, cross_batch, synthetic_projection
from benchmarks.common import Clock, median, reset_rss_peak, rss_hwm_bytes, rss_now_bytes, sync
from benchmarks.models import (
    Profile,
    build_model,
    build_with_teacher,
    lm_params,
    make_records,
    n_params,
    processor_for,
    save_teacher_stub,
    teacher_object,
)

MODES = ("sft", "dft", "online")
DIAGNOSTIC_MODES = ("dft_response_mdist", "dft_no_visual_mdist")  # timed only, to split DFT's cost
CROSS_MODE = "dft_cross"  # timed only: DFT for a student of another tokenizer (benchmarks.bench_cross)
TOP_K = 64


def _online_lm(profile: Profile):
    return profile.online_teacher or profile.teacher


def prepare(profile: Profile, device: torch.device, workdir: Path, log=print) -> dict:
    """Records + a cache written by ``build_cache`` with the online teacher (run once, in the parent)."""
    n = profile.st_batch * profile.st_batches
    data, img_dir = make_records(workdir / "st-data", n, profile.vision.image_size, profile.question_words,
                                 profile.answer_words, seed=2)
    processor = processor_for(profile.vision, profile.vocab)
    teacher = _teacher(profile, processor, device)
    stub = save_teacher_stub(workdir / "st-teacher", teacher, processor)
    out = workdir / "st-cache"
    build_with_teacher(teacher_object(teacher, processor, device), stub, data, img_dir, out,
                       batch_size=profile.st_batch, shard_size=max(n, 1), device=device, sparse="topk",
                       top_k=TOP_K, relation="full")
    info = {"teacher_params": n_params(teacher), "teacher_lm_params": lm_params(teacher)}
    del teacher
    return {"cache": str(out), **info}


def _teacher(profile: Profile, processor, device: torch.device):
    m = build_model(processor, profile.vocab, _online_lm(profile), profile.vision, device,
                    getattr(torch, profile.dtype), seed=0).eval()
    m.requires_grad_(False)
    return m


class Steps:
    """Student, optimizer, accelerator and (optionally) the online teacher, built in this process."""

    def __init__(self, profile: Profile, device: torch.device, cache: str, modes: tuple[str, ...]):
        from accelerate import Accelerator

        from student.distill import DistillStudent, LossSettings
        from student.stages import RECIPES, Stage, set_trainable
        from student.stream import StreamingKDDataset

        self.device = device
        processor = processor_for(profile.vision, profile.vocab)
        # fp32 master weights as kd-train keeps them; bf16 autocast on a GPU (accelerate "bf16").
        self.student = build_model(processor, profile.vocab, profile.student, profile.vision, device, torch.float32,
                                   seed=1)
        self.student.config.use_cache = False
        set_trainable(self.student, RECIPES[Stage.DFT].train_modules)
        self.accelerator = Accelerator(cpu=device.type == "cpu",
                                       mixed_precision="bf16" if device.type == "cuda" else "no",
                                       step_scheduler_with_optimizer=False)
        sft = DistillStudent(self.student, LossSettings(distill=False)).train()
        dft = DistillStudent(self.student, LossSettings(distill=True)).train()
        cross = DistillStudent(self.student, LossSettings(distill=True),
                               projection=synthetic_projection(profile.vocab)).train()
        params = [p for p in self.student.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=RECIPES[Stage.DFT].lr)
        sft, dft, cross, self.optimizer = self.accelerator.prepare(sft, dft, cross, optimizer)
        self.wrappers = {"sft": sft, "dft": dft, "online": dft, CROSS_MODE: cross}
        self.params = params
        self.teacher = _teacher(profile, processor, device) if "online" in modes else None

        n = profile.st_batches
        self.batches = {}
        for mode, with_teacher in (("sft", False), ("dft", True)):
            ds = StreamingKDDataset(cache, processor, image_folder=None, batch_size=profile.st_batch, shuffle=False,
                                    with_teacher=with_teacher)
            self.batches[mode] = list(islice(iter(ds), n))
        # Online: the DFT batches without the cached teacher arrays (the teacher recomputes them).
        self.batches["online"] = [{k: v for k, v in b.items() if not _is_teacher_key(k)} for b in self.batches["dft"]]
        # Diagnostics, to split DFT's extra cost: CE + MDist(response) only, then + RDist without visual
        # MDist (which takes the W^T W Gram path: the Gram matrix of the student's head and its gradient on
        # every micro-batch; full DFT takes Z Z^T from the visual MDist's logits instead).
        no_vis = [{k: v for k, v in b.items() if not k.startswith("visual_")} | {"visual_index": b["visual_index"]}
                  for b in self.batches["dft"]]
        self.batches["dft_response_mdist"] = [{k: v for k, v in b.items() if not k.startswith("relation_")}
                                              for b in no_vis]
        self.batches["dft_no_visual_mdist"] = no_vis
        self.wrappers["dft_response_mdist"] = self.wrappers["dft_no_visual_mdist"] = dft
        self.batches[CROSS_MODE] = [cross_batch(b, seed=i) for i, b in enumerate(self.batches["dft"])]

    @torch.no_grad()
    def online_teacher_arrays(self, batch: dict) -> dict:
        """Teacher forward (full logits) + top-k/tail at the distilled positions + relation matrices."""
        dev = self.device
        px = batch.get("pixel_values")
        logits = self.teacher(input_ids=batch["model_inputs"]["input_ids"].to(dev), attention_mask=batch["model_inputs"]["attention_mask"].to(dev),
                              pixel_values=None if px is None else px.to(dev, self.teacher.dtype),
                              use_cache=False).logits  # [B, T, V]: what an online recipe gets
        flat = logits.reshape(-1, logits.shape[-1])
        out = {}
        for kind in ("response", "visual"):
            logp = flat[batch[f"{kind}_index"].to(dev)].float().log_softmax(-1)
            lp, ids = logp.topk(TOP_K, dim=-1)
            tail = logp.scatter(1, ids, float("-inf")).logsumexp(-1)
            out.update({f"{kind}_ids": ids, f"{kind}_logprobs": lp, f"{kind}_tail": tail})
        if "relation_index" in batch:
            z = flat[batch["relation_index"].to(dev)].float()  # [I, N, V]
            r = z @ z.transpose(-1, -2)
            out["relation_target"] = r / r.flatten(1).norm(dim=-1)[:, None, None].clamp_min(1e-30)
        return out

    def step(self, mode: str, i: int) -> dict:
        from student.terms import LossWeights
        from student.train import accumulate_gradients

        batch = self.batches[mode][i % len(self.batches[mode])]
        if mode == "online":
            batch = {**batch, **self.online_teacher_arrays(batch)}
        m = accumulate_gradients(self.accelerator, self.wrappers[mode], [batch], weights=LossWeights())
        self.accelerator.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return m


_TEACHER_FIELDS = ("ids", "logprobs", "tail", "counts")


def _is_teacher_key(k: str) -> bool:
    return k == "relation_target" or any(k == f"{kind}_{f}" for kind in ("response", "visual") for f in _TEACHER_FIELDS)


# ----------------------------------------------------------------------------------------- subprocesses


def _child(args) -> dict:
    profile = Profile.from_dict(json.loads(args.profile_json))
    device = torch.device(args.device)
    # Import everything a step uses before the baseline, so that the baseline holds the libraries.
    import accelerate  # noqa: F401
    import PIL.Image  # noqa: F401
    import transformers  # noqa: F401
    import zarr  # noqa: F401
    from transformers import LlavaForConditionalGeneration  # noqa: F401

    import student.distill  # noqa: F401
    import student.stream  # noqa: F401
    import student.train  # noqa: F401

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base_rss = rss_now_bytes()
    if args.task == "time":
        st = Steps(profile, device, args.cache, MODES)
        clock = Clock(device)
        metrics = {}
        for m in MODES:  # warm-up step of each mode
            st.step(m, 0)
        timed = (*MODES, *DIAGNOSTIC_MODES, CROSS_MODE)
        for m in (*DIAGNOSTIC_MODES, CROSS_MODE):
            st.step(m, 0)
        for r in range(profile.st_reps):
            for m in timed if r % 2 == 0 else timed[::-1]:
                with clock(m):
                    metrics[m] = st.step(m, r)
        mem = {}
        if not profile.st_mem_subprocess:  # smoke: one process, peaks reset between modes
            for m in MODES:  # absolute high-water marks (the models of all modes are already resident)
                reset_rss_peak()
                st.step(m, 0)
                mem[m] = {"mode": m, "rss_baseline": 0, "rss_peak": rss_hwm_bytes()}
        return {"clock": clock.report(), "mem": mem, "student_params": n_params(st.student), "student_lm_params": lm_params(st.student),
                "losses": {m: metrics[m]["loss"] for m in MODES},
                "positions": metrics["dft"]["positions"],
                "cross": {"positions": metrics[CROSS_MODE]["positions"], "aligned_share": metrics[CROSS_MODE]["aligned_share"],
                          "groups": [int(b["cross_groups"].shape[0]) for b in st.batches[CROSS_MODE]],
                          "teacher_rows": [int(b["cross_response_ids"].shape[0]) for b in st.batches[CROSS_MODE]],
                          "student_rows": [int(b["response_index"].shape[0]) for b in st.batches[CROSS_MODE]]},
                "tokens_per_batch": int(st.batches["dft"][0]["model_inputs"]["attention_mask"].sum())}
    # memory: one mode in this fresh process
    st = Steps(profile, device, args.cache, (args.mode,))
    for i in range(profile.st_mem_steps):
        st.step(args.mode, i)
    sync(device)
    out = {"mode": args.mode, "rss_baseline": base_rss, "rss_peak": rss_hwm_bytes()}
    if device.type == "cuda":
        out["cuda_peak"] = int(torch.cuda.max_memory_allocated())
    return out


def _spawn(profile: Profile, device: torch.device, cache: str, task: str, mode: str | None = None) -> dict:
    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "benchmarks.bench_student", "--profile-json", json.dumps(profile.to_dict()),
           "--device", device.type, "--cache", cache, "--task", task] + (["--mode", mode] if mode else [])
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(profile: Profile, device: torch.device, workdir: Path, log=print) -> dict:
    prep = prepare(profile, device, workdir, log)
    t = _spawn(profile, device, prep["cache"], "time")
    clock = t["clock"]
    costs = clock["wall_s"] if clock["basis"] == "wall" else clock["cpu_s"]
    sft, dft, onl = (median(costs[m]) for m in MODES)
    cross = median(costs[CROSS_MODE])
    wall = {m: median(clock["wall_s"][m]) for m in MODES}
    log(f"  step cost ({clock['basis']} s): SFT {sft:.2f}, DFT {dft:.2f}, online KD {onl:.2f} "
        f"(wall medians {wall['sft']:.2f}, {wall['dft']:.2f}, {wall['online']:.2f}; teacher "
        f"{prep['teacher_lm_params'] / 1e6:.1f}M LM params, student {t['student_lm_params'] / 1e6:.1f}M)")
    mem = {m: _spawn(profile, device, prep["cache"], "mem", m) for m in MODES} if profile.st_mem_subprocess else t["mem"]
    if device.type == "cuda":
        peak = {m: mem[m]["cuda_peak"] for m in MODES}
        mem_def = "torch.cuda.max_memory_allocated() of a fresh process running the mode's steps"
    else:
        peak = {m: mem[m]["rss_peak"] - mem[m]["rss_baseline"] for m in MODES}
        mem_def = ("resident-set high-water mark (VmHWM) of a fresh process running the mode's steps, minus its "
                   "resident set after imports (interpreter + torch + transformers, before any model)")
    log(f"  DFT across tokenizers {cross:.2f} ({clock['basis']} s; {cross / dft:.3f}x DFT; aligned share "
        f"{t['cross']['aligned_share']:.2f}, projection coverage {COVERAGE:.0%})")
    log("  peak memory: " + ", ".join(f"{m} {peak[m] / 2**20:.0f} MiB" for m in MODES))
    return {
        "dft_step_over_sft_step": dft / sft,
        "online_kd_step_over_dft_step": onl / dft,
        "peak_mem_dft_over_sft": peak["dft"] / peak["sft"],
        "peak_mem_online_over_dft": peak["online"] / peak["dft"],
        "cross_dft_step_over_dft_step": cross / dft,
        "details": {
            "cross": {**t["cross"], "median_step_cost": cross, "wall_ratio": median(clock["wall_s"][CROSS_MODE]) / wall["dft"],
                      "per_rep_ratio_median": median([c / d for c, d in zip(costs[CROSS_MODE], costs["dft"])]),
                      "projection_coverage": COVERAGE, "group_shares": {f"{a}:{b}": v for (a, b), v in GROUP_SHARES.items()}},
            "clock": clock, "median_step_cost": {"sft": sft, "dft": dft, "online": onl},
            "wall_ratios": {"dft_over_sft": wall["dft"] / wall["sft"], "online_over_dft": wall["online"] / wall["dft"]},
            "dft_parts_over_sft": {"ce+mdist_response": median(costs["dft_response_mdist"]) / sft,
                                   # no visual MDist, so R_s = H (W^T W) H^T (Gram of the head per micro-batch);
                                   # DFT itself takes R_s = Z Z^T from its visual logits (cheaper here)
                                   "ce+mdist_response+rdist(gram)": median(costs["dft_no_visual_mdist"]) / sft,
                                   "ce+mdist_response+rdist+mdist_visual (dft)": dft / sft},
            "teacher_params": prep["teacher_params"], "teacher_lm_params": prep["teacher_lm_params"],
            "student_params": t["student_params"], "student_lm_params": t["student_lm_params"],
            "teacher_over_student_lm_params": prep["teacher_lm_params"] / t["student_lm_params"],
            "batch_size": profile.st_batch, "tokens_per_batch": t["tokens_per_batch"], "positions": t["positions"],
            "losses_last_step": t["losses"], "peak_memory_bytes": peak, "memory_raw": mem,
            "memory_definition": mem_def, "top_k": TOP_K,
        },
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description="student step benchmark (child process)")
    ap.add_argument("--profile-json", required=True, help="benchmarks.models.Profile.to_dict() as JSON")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache", required=True)
    ap.add_argument("--task", required=True, choices=("time", "mem"))
    ap.add_argument("--mode", choices=MODES)
    args = ap.parse_args(argv)
    print(json.dumps(_child(args)))


if __name__ == "__main__":
    main()
