"""Bias of the top-k (K + 1 bins: the stored ids and one tail bin) divergences against the dense ones.

    python benchmarks/divergence_bias.py [--demo DIR] [--k 8 16 32 64 128 256] [--json OUT.json]

A top-k cache keeps the teacher's k most likely ids, their log-probs and the mass of everything else;
``sparse_divergence(mode="tail")`` compares the K + 1 bins on both sides. Forward KL loses only the
teacher's tail (small when the teacher is peaked); divergences that weigh the *student's* mass
(reverse KL, JSD, skew reverse KL, TV) lose the student's spread over the tail ids, which one bin
cannot see. For each divergence and k this prints ``mean(top-k) / mean(dense) - 1`` over positions.

Distributions (V = 400, the demo's vocabulary):

* ``demo`` (with ``--demo DIR``, a finished ``kd-demo`` output): the teacher's full-vocabulary
  distributions at the response and at the visual positions of DIR's validation cache against the baseline student's
  (``runs/baseline-sft2``) and the distilled student's (``runs/distilled-dft``) logits there: real
  pairs, trained students.
* ``synthetic``: 4096 positions, teacher logits ``3 * N(0, 1)`` with a boosted argmax (top-1 mass
  around 0.5) and a student whose logits are the teacher's plus ``N(0, 1)`` noise: a student that
  roughly agrees on the head and spreads its tail differently.

The dense reference is ``student.losses.dense_divergence`` on the full logits.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from student.losses import Divergence, dense_divergence, sparse_divergence  # noqa: E402

DIVERGENCES = tuple(d.value for d in Divergence)


def topk_arrays(teacher_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a top-k cache stores for these teacher logits: (ids [P, k], log-probs [P, k], log tail [P])."""
    lp = teacher_logits.double().log_softmax(-1)
    top = lp.topk(k, dim=-1)
    tail = torch.log1p(-top.values.exp().sum(-1).clamp(max=1.0)).clamp_min(-100.0)
    return top.indices, top.values.float(), tail.float()


def bias_table(student: torch.Tensor, teacher: torch.Tensor, ks: list[int], skew: float = 0.1,
               jsd_beta: float = 0.5) -> dict[str, dict[str, float]]:
    """``{divergence: {"dense": mean dense value, str(k): relative bias of the top-k value}}``."""
    out = {}
    for name in DIVERGENCES:
        d = Divergence(name)
        dense = dense_divergence(student, teacher, divergence=d, skew=skew, jsd_beta=jsd_beta).double().mean()
        row = {"dense": float(dense)}
        for k in ks:
            ids, lps, tail = topk_arrays(teacher, k)
            sp = sparse_divergence(student, ids, lps, tail, divergence=d, mode="tail", skew=skew,
                                   jsd_beta=jsd_beta).double().mean()
            row[str(k)] = float(sp / dense - 1.0)
        out[name] = row
    return out


def synthetic(n: int = 4096, vocab: int = 400, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    teacher = 3.0 * torch.randn(n, vocab, generator=g)
    teacher[torch.arange(n), teacher.argmax(-1)] += 4.0
    student = teacher + torch.randn(n, vocab, generator=g)
    return student, teacher


@torch.no_grad()
def demo_pairs(demo: Path, run: str, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(student logits, teacher log-probs) at the ``kind`` (response or visual) positions of DEMO's
    validation cache."""
    from kd_cache.reader import open_cache
    from student.distill import teacher_arrays
    from student.evaluate import load_model
    from student.stream import StreamingKDDataset

    model, proc = load_model(demo / "runs" / run, "cpu")
    kd = open_cache(str(demo / "caches" / "val"))
    vocab = kd.manifest.vocab_size
    if kd.manifest.sparse.k < vocab:
        raise ValueError(f"{demo}/caches/val stores top-{kd.manifest.sparse.k} of {vocab}: not a dense reference")
    head = model.get_output_embeddings().weight
    students, teachers = [], []
    for batch in StreamingKDDataset(kd, proc, image_folder=None, batch_size=64, shuffle=False, with_teacher=True):
        h = model.model(**batch["model_inputs"], use_cache=False).last_hidden_state
        idx = batch[f"{kind}_index"]
        students.append((h.reshape(-1, h.shape[-1])[idx] @ head.T).float()[:, :vocab])
        got = teacher_arrays(batch, kind)
        dense = torch.full((len(idx), vocab), -math.inf)
        dense.scatter_(1, got.ids.long().clamp_min(0), got.logprobs.float())
        teachers.append(dense)
    return torch.cat(students), torch.cat(teachers)


def markdown(tables: dict[str, dict[str, dict[str, float]]], ks: list[int]) -> str:
    lines = []
    for source, tab in tables.items():
        lines += [f"**{source}**", "", "| divergence | dense mean | " + " | ".join(f"top-{k}" for k in ks) + " |",
                  "|---" * (len(ks) + 2) + "|"]
        for name, row in tab.items():
            lines.append(f"| {name} | {row['dense']:.4f} | " + " | ".join(f"{100 * row[str(k)]:+.1f}%" for k in ks)
                         + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", type=Path, help="a finished kd-demo output directory (real teacher/student pairs)")
    ap.add_argument("--k", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256])
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    tables = {"synthetic (V = 400)": bias_table(*synthetic(), args.k)}
    if args.demo:
        for kind in ("response", "visual"):
            for run, label in (("baseline-sft2", "baseline"), ("distilled-dft", "distilled")):
                s, t = demo_pairs(args.demo, run, kind)
                tables[f"kd-demo teacher vs {label} student, {len(s)} validation {kind} positions (V = {s.shape[1]})"] \
                    = bias_table(s, t, args.k)
    print(markdown(tables, args.k))
    if args.json:
        args.json.write_text(json.dumps(tables, indent=1))


if __name__ == "__main__":
    main()
