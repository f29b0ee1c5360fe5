"""The demo's verdict: is the distilled student more accurate than the baseline and closer to the
teacher, by more than the test set's noise?

Both students answer the same questions, so the comparison is paired: for accuracy the per-question
difference ``d_i = correct_distilled_i - correct_baseline_i`` with standard error ``std(d) / sqrt(n)``;
for KL to the teacher (a mean over response *positions*, as ``kd-eval`` reports it) the ratio
estimate ``D = sum_i (a_i - b_i) / sum_i n_i`` of per-question KL sums ``a_i``, ``b_i`` over ``n_i``
positions, with standard error ``sqrt(n / (n - 1) * sum_i (a_i - b_i - D n_i)^2) / sum_i n_i``. A
margin counts when it exceeds ``Z = 2`` standard errors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

Z = 2.0  # standard errors a margin must exceed


@torch.no_grad()
def per_question_kl(model, processor, cache: str | Path, batch_size: int = 64) -> dict[str, Any]:
    """Per-sample KL(teacher || model) sums at response and visual positions of ``cache``.

    Returns ``{"ids": [sample ids], "response_kl": float64 [n], "response_n": [n], "visual_kl", "visual_n",
    "response_agree": [n]}`` (top-1 agreements at response positions); the tail-bin divergence and the
    row mask are ``kd-eval``'s (``student.evaluate.evaluate_cache``), so ``response_kl.sum() /
    response_n.sum()`` is its ``kl_to_teacher``.
    """
    from kd_cache.reader import open_cache
    from student.distill import teacher_arrays
    from student.losses import sparse_divergence, teacher_row_mask
    from student.stream import StreamingKDDataset

    kd = open_cache(str(cache))
    ds = StreamingKDDataset(kd, processor, image_folder=None, batch_size=batch_size, shuffle=False, with_teacher=True)
    head = model.get_output_embeddings().weight
    ids: list[str] = []
    cols = {k: [] for k in ("response_kl", "response_n", "response_agree", "visual_kl", "visual_n")}
    for batch in ds:
        b = len(batch["ids"])
        ids += list(batch["ids"])
        inputs = {k: v.to(model.device, model.dtype) if v.is_floating_point() else v.to(model.device)
                  for k, v in batch["model_inputs"].items()}
        flat = model.model(**inputs, use_cache=False).last_hidden_state
        flat = flat.reshape(-1, flat.shape[-1])
        for kind in ("response", "visual"):
            kl_sum, n_sum, agree_sum = (torch.zeros(b, dtype=torch.float64) for _ in range(3))
            got = teacher_arrays(batch, kind)
            if got is not None:
                logits = (flat[batch[f"{kind}_index"]] @ head.T).float()
                kl = sparse_divergence(logits, got.ids, got.logprobs, got.tail, mode="tail", counts=got.counts,
                                       logp_mean=got.logp_mean)
                rows = teacher_row_mask(got.ids)
                top = got.ids.gather(-1, got.logprobs.float().masked_fill(got.ids < 0, -math.inf)
                                     .argmax(-1, keepdim=True))[:, 0]
                owner = batch[f"{kind}_batch"].long()
                kl_sum.index_add_(0, owner, (kl * rows).double())
                n_sum.index_add_(0, owner, rows.double())
                agree_sum.index_add_(0, owner, ((logits.argmax(-1) == top) & rows).double())
            cols[f"{kind}_kl"].append(kl_sum)
            cols[f"{kind}_n"].append(n_sum)
            if kind == "response":
                cols["response_agree"].append(agree_sum)
    return {"ids": ids, **{k: torch.cat(v).numpy() for k, v in cols.items()}}


def paired_accuracy(a: Sequence[bool], b: Sequence[bool]) -> tuple[float, float]:
    """(mean of a - b, its standard error) over paired per-question outcomes."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = len(d)
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else math.inf


def paired_ratio(a: np.ndarray, b: np.ndarray, n_pos: np.ndarray) -> tuple[float, float]:
    """(sum(a - b) / sum(n_pos), its standard error): the difference of two position-weighted means
    measured on the same questions (per-question sums ``a``, ``b`` over ``n_pos`` positions)."""
    a, b, n_pos = (np.asarray(x, dtype=np.float64) for x in (a, b, n_pos))
    m, total = len(a), n_pos.sum()
    d = (a - b).sum() / total
    resid = a - b - d * n_pos
    se = math.sqrt(m / (m - 1) * (resid ** 2).sum()) / total if m > 1 else math.inf
    return float(d), float(se)


def _z(margin: float, se: float) -> float:
    """``margin / se``; with no spread at all, +-inf for a margin and 0 for none."""
    if se > 0:
        return margin / se
    return math.copysign(math.inf, margin) if margin else 0.0


def compare(distilled: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """The verdict on one question set from two models' per-question records (``ids``, ``correct``,
    ``response_kl``, ``response_n``; the same questions in the same order).

    ``accuracy_gain`` (distilled - baseline) and ``kl_reduction`` (baseline - distilled), each with its
    standard error and ``*_z``; ``verdict`` is True when both exceed ``Z`` standard errors.
    """
    pd, pb = distilled, baseline
    if pd["ids"] != pb["ids"]:
        raise ValueError("the two students were evaluated on different questions")
    gain, gain_se = paired_accuracy(pd["correct"], pb["correct"])
    red, red_se = paired_ratio(pb["response_kl"], pd["response_kl"], pd["response_n"])
    out = {"accuracy_gain": gain, "accuracy_gain_se": gain_se, "accuracy_gain_z": _z(gain, gain_se),
           "kl_reduction": red, "kl_reduction_se": red_se, "kl_reduction_z": _z(red, red_se)}
    out["verdict"] = bool(out["accuracy_gain_z"] > Z and out["kl_reduction_z"] > Z)
    return out
