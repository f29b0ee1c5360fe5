#!/usr/bin/env python
"""Padding and teacher-pass time, fixed ``--batch-size`` in data order against ``--max-batch-tokens``.

    python benchmarks/bench_batching.py --out benchmarks/results/batching.json
    python benchmarks/bench_batching.py --smoke --out /tmp/batching.json      # plumbing (< 1 min)

Two parts, each on two length distributions, side by side in one run:

* **padding** (``kd_cache.batching.plan_batches`` on full-scale lengths, 20,000 samples, no model):
  the share of the forwards' tokens that are padding, forwards, and the largest forward's padded
  tokens (what peak activation memory follows) for ``--batch-size 8`` against ``--max-batch-tokens``
  at the same mean tokens per forward.
  - ``llava_mix``: a synthetic mixture shaped after LLaVA-1.5's 665k instruction mix (assumed shares
    and lengths, not read from the data): 576 visual tokens + short academic-VQA text (55%), 576 +
    LLaVA-Instruct conversations (25%), 576 + long conversations and OCR (10%), text-only ShareGPT
    (10%); cut at 2,048 tokens. Lengths 100 to 2,048.
  - ``qwen2vl``: Qwen2-VL's dynamic resolution, visual tokens from transformers' own ``smart_resize``
    (28-pixel merged patches, 1280 x 28 x 28 max pixels, the usual serving cap) for image sizes drawn
    from photos (640 x 480-like, both orientations), phone photos, documents and screenshots, +
    30-600 text tokens.
* **time**: ``build_cache`` end to end on a small random LLaVA (fixed 64 visual tokens, answers of
  varied length, a text-only sample in six) and a Qwen2-VL (images of eight sizes) on this machine,
  both groupings alternated, the cost measured as in ``bench_teacher`` (process CPU seconds on a CPU
  host, wall on a GPU).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from benchmarks.environment import set_environment  # noqa: E402

set_environment(passive_omp=not any("cuda" in a for a in sys.argv[1:]))

import torch  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.common import Clock, median  # noqa: E402
from kd_cache.batching import padding_of, plan_batches  # noqa: E402

MAX_LENGTH = 2048


def llava_mix_lengths(n: int, seed: int = 0) -> list[int]:
    """Tokens per sample of the synthetic LLaVA-mix shape (module doc; assumed, not measured)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        u = rng.random()
        if u < 0.55:  # VQAv2 / GQA / OKVQA / RefCOCO: several short QA turns on one image
            t = 576 + rng.lognormvariate(4.6, 0.6)  # median ~100 text tokens
        elif u < 0.80:  # LLaVA-Instruct conversations / detailed descriptions
            t = 576 + rng.lognormvariate(5.9, 0.5)  # median ~365
        elif u < 0.90:  # long conversations, OCR-VQA / TextCaps merged turns
            t = 576 + rng.lognormvariate(6.6, 0.5)  # median ~735
        else:  # ShareGPT text-only
            t = rng.lognormvariate(6.4, 0.9)  # median ~600, long tail
        out.append(int(min(max(t, 100), MAX_LENGTH)))
    return out


def qwen2vl_lengths(n: int, seed: int = 0) -> list[int]:
    """Tokens per sample of a Qwen2-VL set: visual tokens by the model's own resize rule (module doc)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        u = rng.random()
        if u < 0.5:  # photos (COCO-like)
            w, h = 640, rng.choice([480, 427, 424, 360, 512])
        elif u < 0.7:  # phone photos
            w, h = rng.choice([(1008, 756), (1280, 960), (1600, 1200)])
        elif u < 0.85:  # documents
            w, h = rng.choice([(850, 1100), (1240, 1754), (612, 792)])
        else:  # screenshots and charts
            w, h = rng.choice([(1920, 1080), (1280, 720), (800, 600), (1024, 768)])
        if rng.random() < 0.5:
            w, h = h, w
        w, h = int(w * rng.uniform(0.8, 1.2)), int(h * rng.uniform(0.8, 1.2))
        rh, rw = smart_resize(h, w, factor=28, min_pixels=56 * 56, max_pixels=1280 * 28 * 28)
        visual = (rh // 28) * (rw // 28)
        out.append(min(visual + int(rng.lognormvariate(4.8, 0.8)) + 30, 4 * MAX_LENGTH))
    return out


def padding_table(lengths: list[int], batch_size: int, windows=(32, 128, 512)) -> dict:
    """Padding of fixed batches against token budgets of the same mean tokens per forward."""
    budget = batch_size * int(sum(lengths) / len(lengths))
    fixed = padding_of(lengths, plan_batches(lengths, batch_size=batch_size))
    rows = {"fixed": {"batch_size": batch_size, **_row(fixed)}}
    for w in windows:
        p = padding_of(lengths, plan_batches(lengths, batch_size=batch_size, max_batch_tokens=budget, window=w))
        rows[f"budget_window{w}"] = {"max_batch_tokens": budget, "sort_window": w, **_row(p)}
    return {"samples": len(lengths), "tokens_min_median_max": [min(lengths), median(lengths), max(lengths)],
            "rows": rows}


def _row(p) -> dict:
    return {"padding_fraction": p.fraction, "forwards": p.forwards, "largest_forward_tokens": p.largest,
            "padded_tokens": p.padded, "real_tokens": p.real}


# ------------------------------------------------------------------------------------------ time


def _records(root: Path, n: int, sizes: list[tuple[int, int]], seed: int) -> tuple[Path, Path]:
    from benchmarks.models import WORDS, write_jpeg

    rng = random.Random(seed)
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    recs = []
    for i in range(n):
        words = int(min(rng.lognormvariate(3.3, 0.9), 240)) + 2  # answers of ~5 to 240 words
        a = " ".join(rng.choice(WORDS) for _ in range(words))
        q = " ".join(rng.choice(WORDS) for _ in range(6))
        rec = {"id": f"b{i:04d}", "conversations": [{"from": "human", "value": f"{q}?"}, {"from": "gpt", "value": a}]}
        if i % 6 != 5:
            name = f"img-{i:04d}.jpg"
            write_jpeg(img_dir / name, sizes[i % len(sizes)], seed * 1000 + i)
            rec["image"] = name
            rec["conversations"][0]["value"] = "<image>\n" + rec["conversations"][0]["value"]
        recs.append(rec)
    data = root / "data.json"
    data.write_text(json.dumps(recs))
    return data, img_dir


def time_builds(name: str, model, processor, teacher, device, workdir: Path, n: int, sizes, batch_size: int,
                rounds: int, log) -> dict:
    from benchmarks.models import build_with_teacher, save_teacher_stub
    from kd_cache.encoding import Encoder
    from kd_cache.records import load_records

    teacher_dir = save_teacher_stub(workdir / f"{name}-teacher", model, processor)
    data, img_dir = _records(workdir / f"{name}-data", n, sizes, seed=3)
    enc = Encoder(processor, "chat", 4096, str(img_dir), teacher.image_token_id)
    lengths = [len(enc.encode(r).input_ids) for r in load_records(str(data))]
    budget = batch_size * int(sum(lengths) / len(lengths))
    settings = {"fixed": {"batch_size": batch_size}, "budget": {"max_batch_tokens": budget, "sort_window": 128}}
    clock = Clock(device)
    out = {"samples": n, "tokens_min_median_max": [min(lengths), median(lengths), max(lengths)],
           "tokens": sum(lengths), "max_batch_tokens": budget}
    for key, kw in settings.items():
        plan = plan_batches(lengths, batch_size=batch_size, max_batch_tokens=kw.get("max_batch_tokens"),
                            window=kw.get("sort_window", 128))
        out[key] = _row(padding_of(lengths, plan))

    def build(key: str, tag: str) -> None:
        dest = workdir / f"{name}-cache-{tag}"
        shutil.rmtree(dest, ignore_errors=True)
        with clock(tag):
            build_with_teacher(teacher, teacher_dir, data, img_dir, dest, shard_size=n, device=device,
                               sparse="topk", top_k=64, relation="full", **{"batch_size": batch_size, **settings[key]})
        shutil.rmtree(dest, ignore_errors=True)

    build("fixed", "warmup")
    for r in range(rounds):
        order = ["fixed", "budget"] if r % 2 == 0 else ["budget", "fixed"]
        for key in order:
            build(key, f"{key}{r}")
    for key in settings:
        costs = [sum(clock.wall[f"{key}{r}"] if clock.basis == "wall" else clock.cpu[f"{key}{r}"]) for r in range(rounds)]
        out[key]["build_s_median"] = median(costs)
        out[key]["tokens_per_s"] = out["tokens"] / median(costs)
    out["budget_time_over_fixed"] = out["budget"]["build_s_median"] / out["fixed"]["build_s_median"]
    out["basis"] = clock.basis
    log(f"  {name}: padding {out['fixed']['padding_fraction']:.1%} -> {out['budget']['padding_fraction']:.1%}, "
        f"build {out['fixed']['build_s_median']:.2f} -> {out['budget']['build_s_median']:.2f} s ({clock.basis})")
    return out


def run_time(device: torch.device, workdir: Path, smoke: bool, log=print) -> dict:
    from benchmarks.bench_teacher import build_qwen2vl
    from benchmarks.models import (
        PROFILES,
        LMSize,
        VisionSize,
        build_model,
        processor_for,
        teacher_object,
    )
    from kd_cache.processing import config_image_token_id
    from kd_cache.teacher import Teacher

    base = PROFILES["smoke"]
    if device.type == "cuda":
        lm, vision, vocab, dtype = PROFILES["cuda"].teacher, PROFILES["cuda"].vision, PROFILES["cuda"].vocab, torch.bfloat16
        n, rounds = 256, 3
    else:
        lm = base.teacher if smoke else LMSize(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=768)
        vision = base.vision if smoke else VisionSize(hidden=64, layers=2, heads=2, intermediate=128, image_size=64,
                                                      patch_size=8)
        vocab, dtype = (base.vocab, torch.float32) if smoke else (8192, torch.float32)
        n, rounds = (12, 1) if smoke else (96, 3)
    out = {}
    processor = processor_for(vision, vocab)
    model = build_model(processor, vocab, lm, vision, device, dtype, seed=0).eval().requires_grad_(False)
    out["llava"] = time_builds("llava", model, processor, teacher_object(model, processor, device), device, workdir,
                               n, [vision.image_size], 8, rounds, log)
    del model
    common.free_memory()
    from dataclasses import replace

    profile = replace(base, teacher=lm, vision=vision, vocab=vocab, dtype=str(dtype).split(".")[-1])
    model, processor = build_qwen2vl(profile, device, dtype)
    teacher = Teacher(model, processor, processor.tokenizer, config_image_token_id(model.config), True, device)
    unit = 2 * vision.patch_size
    sizes = [(unit * a, unit * b) for a, b in ((2, 2), (4, 3), (3, 4), (6, 4), (4, 8), (8, 6), (2, 6), (10, 8))]
    out["qwen2vl"] = time_builds("qwen2vl", model, processor, teacher, device, workdir, n, sizes, 8, rounds, log)
    out["qwen2vl"]["image_sizes_wh"] = sizes
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny models and counts: checks the plumbing")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    t0 = time.perf_counter()
    n = 2000 if args.smoke else 20000
    doc = {"padding": {"llava_mix": padding_table(llava_mix_lengths(n), 8),
                       "qwen2vl": padding_table(qwen2vl_lengths(n), 8)}}
    for name, table in doc["padding"].items():
        rows = table["rows"]
        print(f"padding, {name} ({table['samples']} samples, tokens min/median/max {table['tokens_min_median_max']}):")
        for key, row in rows.items():
            print(f"  {key:18s} padding {row['padding_fraction']:6.1%}  forwards {row['forwards']:6d}  "
                  f"largest forward {row['largest_forward_tokens']} tokens")
    with tempfile.TemporaryDirectory(prefix="mllm-kd-batching-") as tmp:
        print("teacher-pass time:")
        doc["time"] = run_time(device, Path(tmp), args.smoke)
    doc.update({"machine": common.machine_info(args.device), "date": common.now_iso(), "versions": common.versions(),
                "smoke": args.smoke, "wall_s": time.perf_counter() - t0})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out} ({doc['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
