"""Relation distillation (RDist, LLaVA-KD): the student's ``Z Z^T`` over one image's visual positions
against the teacher's stored relation matrix, compared by cosine."""

from __future__ import annotations

import torch
from torch import Tensor

from student.losses.divergences import up
from student.losses.head import head_gram


def relation_from_hidden(hidden: Tensor, head_weight: Tensor | None, *, gram: Tensor | None = None) -> Tensor:
    """Relation matrix ``R = Z Z^T`` with ``Z = hidden @ head_weight.T``, without forming Z.

    Uses ``R = H (W^T W) H^T``: hidden [..., N, d], head_weight [V, d] -> [..., N, N] (fp32). Pass a
    precomputed ``gram = head_gram(head_weight)`` [d, d] to share it across images in a step (then
    ``head_weight`` may be None). Gradients flow to ``hidden`` and, through the Gram matrix, to the
    head.
    """
    if gram is None:
        if head_weight is None:
            raise ValueError("relation_from_hidden needs head_weight [V, d] or a precomputed gram [d, d]")
        gram = head_gram(head_weight)
    h = hidden.to(torch.promote_types(hidden.dtype, gram.dtype))
    if h.shape[-1] != gram.shape[0]:
        raise ValueError(f"hidden size {h.shape[-1]} does not match the head's {gram.shape[0]}")
    return h @ gram.to(h.dtype) @ h.transpose(-1, -2)


def relation_from_logits(logits: Tensor) -> Tensor:
    """Dense reference: logits [..., N, V] -> ``Z Z^T`` [..., N, N] in fp32."""
    z = up(logits)
    return z @ z.transpose(-1, -2)


def rdist(student_relation: Tensor, teacher_relation: Tensor, eps: float = 1e-12) -> Tensor:
    """Relation distillation: ``1 - cos(vec R_s, vec R_t)``.

    student_relation, teacher_relation: [..., N, N] (any scale: the result is scale invariant).
    Returns [...] (a scalar for [N, N] inputs), in [0, 2]. Each side is normalised by its Frobenius
    norm (guarded by ``eps``) before the dot product, so large logit products cannot overflow; a
    zero matrix gives 1.
    """
    if student_relation.shape != teacher_relation.shape:
        raise ValueError(
            f"student relation {tuple(student_relation.shape)} and teacher relation "
            f"{tuple(teacher_relation.shape)} must have the same shape [..., N, N]"
        )
    s = up(student_relation).flatten(-2)
    t = up(teacher_relation).flatten(-2).to(s.dtype)
    s = s / s.norm(dim=-1, keepdim=True).clamp_min(eps)
    t = t / t.norm(dim=-1, keepdim=True).clamp_min(eps)
    return 1.0 - (s * t).sum(-1)
