"""The demo's verdict: is the distilled student more accurate than the baseline and closer to the
teacher, by more than the test set's noise?

Both students answer the same questions, so the comparison is paired: for accuracy the per-question
difference ``d_i = correct_distilled_i - correct_baseline_i`` with standard error ``std(d) / sqrt(n)``;
for KL to the teacher (a mean over response *positions*, as ``kd-eval`` reports it) the ratio
estimate ``D = sum_i (a_i - b_i) / sum_i n_i`` of per-question KL sums ``a_i``, ``b_i`` over ``n_i``
positions, with standard error ``sqrt(n / (n - 1) * sum_i (a_i - b_i - D n_i)^2) / sum_i n_i``. A
margin counts when it exceeds ``Z = 2`` standard errors. The per-question KL sums are kd-eval's own
(``student.evaluate.cache_agreement``, one sample of the question set's cache per question), so
``sum_i a_i / sum_i n_i`` is kd-eval's ``kl_to_teacher``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

Z = 2.0  # standard errors a margin must exceed


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
