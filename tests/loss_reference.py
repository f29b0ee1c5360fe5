"""The divergences written from their definitions, in float64: the one reference that
``test_losses.py`` and ``test_head.py`` check ``student.losses`` against (its conventions are in
``student/losses/divergences.py``)."""

from __future__ import annotations

import torch

from student.losses import Divergence

DIVERGENCES = [d.value for d in Divergence]  # every divergence the losses offer


def ref_div(p: torch.Tensor, q: torch.Tensor, name: str, beta: float = 0.5, skew: float = 0.1) -> torch.Tensor:
    """Divergence ``name`` between teacher and student probability vectors ``p``, ``q`` [..., B] -> [...].

    A KL's bins where its first argument is 0 give 0; logs are floored at 1e-300 so a bin with no mass
    on the other side stays finite, and so do its gradients through autograd. JSD at ``beta`` 0 / 1 is
    forward / reverse KL (TRL's convention).
    """
    p, q = p.double(), q.double()

    def kl(a, b):
        return torch.where(a > 0, a * (a.clamp_min(1e-300).log() - b.clamp_min(1e-300).log()), 0.0).sum(-1)

    if name == "fkl":
        return kl(p, q)
    if name == "rkl":
        return kl(q, p)
    if name == "jsd":
        if beta in (0.0, 1.0):
            return kl(p, q) if beta == 0.0 else kl(q, p)
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "skl":
        return kl(p, skew * p + (1 - skew) * q)
    if name == "srkl":
        return kl(q, skew * q + (1 - skew) * p)
    raise AssertionError(f"no reference for divergence {name!r}")
