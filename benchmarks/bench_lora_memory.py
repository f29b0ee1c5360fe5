"""Memory of a DFT student trained in full, with LoRA and with QLoRA (``kd-train --lora-r``, ``--load-in-4bit``).

Per student shape and mode: trainable parameters, AdamW optimizer-state bytes, and the static memory of
training (weights + gradients + optimizer state; activations are left out: they are about the same in
every mode at one batch shape).

* ``accounting``: counted on the model built on the meta device (no memory, any size), with the trainer's
  own choices: ``student.lora.add_adapters``'s target layers (the family's attention and MLP projections,
  rank ``r`` adapters: ``r x (in + out)`` each), the projector in full, fp32 master weights (the trainer
  keeps them; bf16 autocast on a GPU), fp32 gradients and two fp32 AdamW moments per trainable parameter.
  QLoRA stores the language model's linear weights (not the embeddings, not the LM head) in NF4 with
  double quantisation: 4 bits + an 8-bit absmax per 64 weights + a fp32 absmax per 256 of those, i.e.
  4.127 bits a weight; the rest stays as loaded (fp32).
* ``measured`` (the demo's shape, which fits anywhere): ``student.train.train`` itself, DFT on a synthetic
  cache, each mode in a fresh subprocess: the optimizer's state bytes read from the optimizer after the
  run, and the resident-set high-water mark above the interpreter + libraries baseline.

    python -m benchmarks.bench_lora_memory --out benchmarks/results/lora-memory.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.models import LMSize, VisionSize, llava_config, processor_for

REPO = Path(__file__).resolve().parents[1]
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # QLoRA's NF4 with double quantisation, bits per weight
MODES = ("full", "lora", "qlora")

# Student shapes: the demo's (kd_demo.config defaults), and LLaVA-OneVision's 0.5B and 7B
# (SigLIP-so400m-patch14-384 + Qwen2-0.5B / Qwen2-7B, untied LM head in both).
SHAPES = {
    "demo": dict(lm=LMSize(hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64),
                 vision=VisionSize(hidden=64, layers=2, heads=2, intermediate=128, image_size=32, patch_size=8),
                 vocab=None),
    "0.5b": dict(lm=LMSize(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864),
                 vision=VisionSize(hidden=1152, layers=27, heads=16, intermediate=4304, image_size=384, patch_size=14),
                 vocab=151936),
    "7b": dict(lm=LMSize(hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944),
               vision=VisionSize(hidden=1152, layers=27, heads=16, intermediate=4304, image_size=384, patch_size=14),
               vocab=152064),
}


def meta_model(shape: str):
    from transformers import LlavaForConditionalGeneration

    s = SHAPES[shape]
    processor = processor_for(s["vision"])
    vocab = s["vocab"] or len(processor.tokenizer)
    with torch.device("meta"):
        return LlavaForConditionalGeneration._from_config(llava_config(processor, vocab, s["lm"], s["vision"]))


def accounting(model, mode: str, r: int = 16) -> dict:
    """Trainable parameters and static training bytes of ``model`` (any device, meta included) in ``mode``."""
    from student.families import parameter_parts
    from student.lora import target_modules

    parts = parameter_parts(model)
    total = sum(p.numel() for p in model.parameters())
    projector = sum(p.numel() for n, p in model.named_parameters() if parts[n] == "projector")
    llm = sum(p.numel() for n, p in model.named_parameters() if parts[n] == "llm")
    modules = dict(model.named_modules())
    adapters = 0
    if mode != "full":
        for name in target_modules(model, ["llm"]):
            m = modules[name]
            adapters += r * (m.in_features + m.out_features)
    trainable = projector + (llm if mode == "full" else adapters)
    weights = 4 * (total + adapters)
    if mode == "qlora":
        quantised = sum(m.weight.numel() for n, m in modules.items() if isinstance(m, torch.nn.Linear)
                        and n.startswith("model.language_model."))
        weights -= int(quantised * (4 - NF4_BITS / 8))
    optimizer = 8 * trainable
    return {"parameters": total, "adapters": adapters, "trainable": trainable, "weights_bytes": weights,
            "gradient_bytes": 4 * trainable, "optimizer_bytes": optimizer,
            "static_bytes": weights + 4 * trainable + optimizer}


# ------------------------------------------------------------------------------------- measured runs


def _measured_child(mode: str, steps: int) -> dict:
    """One DFT run of the demo-shaped student through ``student.train.train`` (in this fresh process)."""
    sys.path.insert(0, str(REPO / "tests"))
    from student_fixtures import write_synthetic_cache

    import student.train as train_mod
    from benchmarks.common import reset_rss_peak, rss_hwm_bytes, rss_now_bytes
    from benchmarks.models import build_model
    from student.config import TrainConfig

    torch.set_num_threads(1)
    s = SHAPES["demo"]
    processor = processor_for(s["vision"])
    root = Path(tempfile.mkdtemp(prefix="lora-memory-"))
    model = build_model(processor, len(processor.tokenizer), s["lm"], s["vision"], torch.device("cpu"), torch.float32)
    model.save_pretrained(root / "student")
    processor.save_pretrained(root / "student")
    del model
    cache = write_synthetic_cache(root / "cache", processor, n=8 * steps, shard_size=64, image_every=1, k=16)
    optimizers = []
    make = train_mod._optimizer
    train_mod._optimizer = lambda *a: optimizers.append(make(*a)) or optimizers[-1]
    baseline = rss_now_bytes()
    reset_rss_peak()
    lora = {"lora_r": 16} if mode == "lora" else {}
    train_mod.train(TrainConfig(stage="dft", student=str(root / "student"), cache=str(cache), out=str(root / "out"),
                                batch_size=8, max_steps=steps, progress=False, mixed_precision="no", **lora))
    peak = rss_hwm_bytes()
    state = sum(t.numel() * t.element_size() for st in optimizers[0].state.values() for t in st.values()
                if torch.is_tensor(t) and t.ndim > 0)
    summary = json.loads((root / "out" / "trainer_state.json").read_text())["trainable"]
    return {"trainable": sum(r["trainable"] for r in summary.values()), "optimizer_bytes": state,
            "peak_rss_above_baseline_bytes": peak - baseline}


def measured(mode: str, steps: int = 3) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_lora_memory", "--child", mode, "--steps", str(steps)],
                         cwd=REPO, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                              "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(shapes=tuple(SHAPES), measure: bool = True, steps: int = 3) -> dict:
    results: dict = {"accounting": {}, "measured": {}}
    for shape in shapes:
        model = meta_model(shape)
        results["accounting"][shape] = {mode: accounting(model, mode) for mode in MODES}
    if measure:
        results["measured"]["demo"] = {mode: measured(mode, steps) for mode in ("full", "lora")}
    return results


def table(results: dict) -> str:
    gib = 1 << 30
    lines = ["| student | mode | parameters | trainable | optimizer state | static memory | how |", "|---" * 7 + "|"]
    for shape, modes in results["accounting"].items():
        for mode, a in modes.items():
            unit, div = ("MiB", 1 << 20) if shape == "demo" else ("GiB", gib)
            lines.append(f"| {shape} | {mode} | {a['parameters']:,} | {a['trainable']:,} | "
                         f"{a['optimizer_bytes'] / div:.2f} {unit} | {a['static_bytes'] / div:.2f} {unit} | "
                         "meta-device accounting |")
    for shape, modes in results["measured"].items():
        for mode, m in modes.items():
            lines.append(f"| {shape} | {mode} | | {m['trainable']:,} | {m['optimizer_bytes'] / (1 << 20):.3f} MiB | "
                         f"peak RSS +{m['peak_rss_above_baseline_bytes'] / (1 << 20):.1f} MiB | measured "
                         "(kd-train DFT, CPU) |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--no-measure", action="store_true")
    ap.add_argument("--child", choices=("full", "lora"))
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_measured_child(args.child, args.steps)))
        return
    results = run(measure=not args.no_measure, steps=args.steps)
    print(table(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
