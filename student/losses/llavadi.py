"""LLaVADI's feature terms: hidden-state alignment (student states through a projector against the
teacher's stored final-layer states) and affinity (visual x response similarity matrices)."""

from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor

from student.losses.divergences import up


class HiddenLoss(str, Enum):
    """How projected student hidden states are compared with the teacher's (``hidden_alignment``)."""

    mse = "mse"  # mean over features of the squared difference
    cosine = "cosine"  # 1 - cosine similarity


def hidden_alignment(student: Tensor, teacher: Tensor, loss: str | HiddenLoss = "mse", eps: float = 1e-8) -> Tensor:
    """Per-position distance between projected student and teacher hidden states.

    student: [P, d_t] (the student's final hidden states after the projector MLP), teacher: [P, d_t]
    (stored teacher final-layer states, any float dtype). ``mse``: mean over the d_t features of the
    squared difference; ``cosine``: ``1 - cos(student, teacher)`` (in [0, 2]; a zero vector counts as
    orthogonal). Returns [P] in fp32 (fp64 stays fp64); P = 0 gives an empty tensor.
    """
    try:
        loss = HiddenLoss(loss)
    except ValueError:
        raise ValueError(f"hidden loss {loss!r} not understood: expected 'mse' or 'cosine'") from None
    if student.shape != teacher.shape or student.ndim != 2:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} hidden states must both "
                         "be [P, d_t] (project the student to the teacher's width first)")
    s = up(student)
    t = up(teacher).to(s.dtype)
    if loss is HiddenLoss.mse:
        return (s - t).pow(2).mean(-1)
    return 1.0 - F.cosine_similarity(s, t, dim=-1, eps=eps)


def affinity_matrix(rows: Tensor, cols: Tensor, row_mask: Tensor, col_mask: Tensor, eps: float = 1e-12) -> Tensor:
    """Cosine-similarity block of L2-normalised hidden states, per sample.

    rows: [A, N, d] (e.g. visual positions), cols: [A, M, d] (e.g. response positions), masks
    [A, N] / [A, M] bool (False = padding). Returns [A, N, M] fp32 ``<r_i/|r_i|, c_j/|c_j|>``, 0 where
    either side is padding.
    """
    r = F.normalize(up(rows), dim=-1, eps=eps)
    c = F.normalize(up(cols), dim=-1, eps=eps).to(r.dtype)
    sim = r @ c.transpose(-1, -2)
    return torch.where(row_mask[..., :, None] & col_mask[..., None, :], sim, 0.0)


def affinity_loss(student_rows: Tensor, student_cols: Tensor, teacher_rows: Tensor, teacher_cols: Tensor,
                  row_mask: Tensor, col_mask: Tensor) -> Tensor:
    """LLaVADI affinity distillation: MSE between student and teacher similarity matrices.

    student_rows [A, N, d_s], student_cols [A, M, d_s], teacher_rows [A, N, d_t], teacher_cols
    [A, M, d_t] (the widths may differ: similarities are width free), masks [A, N] / [A, M]. Per sample
    ``a``: the mean over its ``n_a x m_a`` valid entries of ``(S_s - S_t)^2`` with ``S = affinity_matrix``.
    Returns [A] fp32; a sample with no valid entry gives 0.
    """
    s = affinity_matrix(student_rows, student_cols, row_mask, col_mask)
    t = affinity_matrix(teacher_rows, teacher_cols, row_mask, col_mask).to(s.dtype)
    mask = row_mask[..., :, None] & col_mask[..., None, :]
    n = mask.sum((-1, -2)).clamp_min(1).to(s.dtype)
    return torch.where(mask, (s - t).pow(2), 0.0).sum((-1, -2)) / n
