#!/usr/bin/env python
"""Bytes per distilled position against gradient cosine to the dense loss, per cache encoding and k.

    python benchmarks/plot_encodings.py BEFORE.json AFTER.json benchmarks/results/encodings.png

BEFORE / AFTER: ``run_all.py --only real`` results of the former layout (rank-order int32 ids, fp16
log-probs, fp32 tail) and of the current one (``kd_cache.format``), on the same host. AFTER also holds the
DistillKit-style comparison (``bench_real.distillkit_style``). See benchmarks/RESULTS.md, "Cache encodings".
"""

from __future__ import annotations

import json
import sys


def points(doc: dict, prefix: str) -> list[tuple[str, float, float]]:
    """(name, bytes per position, gradient cosine) of every variant named ``<prefix>[k]`` in a run's details."""
    real = doc["details"]["real"]
    grads = next(iter(real["gradients"].values()))["variants"]  # the primary student (listed first)
    sizes = {n: v["data"] for n, v in real["bytes_per_position"].items()}
    sizes.update({n: v["bytes_per_position"] for n, v in real.get("distillkit", {}).items()})
    out = [(n, float(sizes[n]), float(g["logit_grad_cos"])) for n, g in grads.items()
           if n in sizes and n.removeprefix(prefix).isdigit() or n == prefix and n in sizes]
    return sorted(out, key=lambda p: p[1])


def main(argv: list[str]) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    before, after = (json.loads(open(p).read()) for p in argv[:2])
    series = [("former layout, top-k", points(before, "topk"), "o", "tab:gray"),
              ("this format, top-k", points(after, "topk"), "o", "tab:blue"),
              ("DistillKit-style, top-k", points(after, "distillkit"), "s", "tab:red"),
              ("former layout, sample-64", points(before, "sample64"), "^", "tab:gray"),
              ("this format, sample-64", points(after, "sample64"), "^", "tab:green")]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for label, pts, marker, colour in series:
        if not pts:
            continue
        ax.plot([p[1] for p in pts], [p[2] for p in pts], marker=marker, color=colour, label=label,
                linestyle="-" if "top-k" in label else "none")
        for name, b, c in pts:
            ax.annotate(name.replace("topk", "k=").replace("distillkit", "k=").replace("sample64", "s64"), (b, c),
                        textcoords="offset points", xytext=(4, -10), fontsize=7, color=colour)
    ax.set_xscale("log")
    ax.set_xlabel("bytes per distilled position (whole shard, log scale)")
    ax.set_ylabel("gradient cosine to the dense forward KL")
    ax.set_title("SmolLM2-135M-Instruct, real English text (run_all --quick --only real)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(argv[2], dpi=130)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
