"""Distillation losses: small pure functions over flattened positions.

- ``divergences``: teacher-vs-student divergences, dense and over a cache's sparse teacher (its
  conventions: forward/reverse KL, JSD, skew KLs, total variation, tail bin, z-score);
- ``head``: the chunked LM head with CE and MDist and its closed-form logit gradient;
- ``relation``: RDist (relation matrices ``Z Z^T`` and their cosine distance);
- ``llavadi``: hidden-state alignment and affinity.

Notation in every docstring: ``P`` positions (batch x sequence, flattened and already selected by a
mask), ``V`` vocabulary, ``K`` teacher ids stored per position, ``d`` hidden size, ``N`` visual
tokens of one image; ``p`` the teacher distribution, ``q`` the student's. Losses return
per-position values, or sums and counts: the trainer turns them into means once, with the global
count of valid positions (all micro-batches, all ranks); empty inputs give 0, never NaN.
"""

from student.losses.divergences import (
    LOG_PROB_FLOOR,
    Divergence,
    DivergenceOptions,
    SparseTeacher,
    TailMode,
    dense_divergence,
    sparse_divergence,
    teacher_row_mask,
    zscore_logits,
)
from student.losses.head import HeadLosses, ce_reference, chunked_distill, head_gram, keep_head_logits
from student.losses.llavadi import HiddenLoss, affinity_loss, affinity_matrix, hidden_alignment
from student.losses.relation import rdist, relation_from_hidden, relation_from_logits

__all__ = [
    "LOG_PROB_FLOOR",
    "Divergence",
    "DivergenceOptions",
    "HeadLosses",
    "HiddenLoss",
    "SparseTeacher",
    "TailMode",
    "affinity_loss",
    "affinity_matrix",
    "ce_reference",
    "chunked_distill",
    "dense_divergence",
    "head_gram",
    "hidden_alignment",
    "keep_head_logits",
    "rdist",
    "relation_from_hidden",
    "relation_from_logits",
    "sparse_divergence",
    "teacher_row_mask",
    "zscore_logits",
]
