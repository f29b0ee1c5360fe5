"""Refusals of training options the cache was not built for, before any work.

Each message says which flag asks for what, what the cache holds, and which ``kd-cache build``
option (or which change of the flag) makes them fit. The student-side checks (vocabulary,
tokenizer, image token, template) are ``student.model.check_compatibility``.
"""

from __future__ import annotations

import warnings

from kd_cache.schema import Manifest
from student.config import TrainConfig
from student.losses import Divergence, TailMode


class TopKBiasWarning(UserWarning):
    """A divergence other than forward KL on a top-k cache: biased against the dense divergence."""


def topk_bias_warning(divergence: Divergence, k: int, vocab_size: int) -> str:
    return (f"--divergence {divergence.value} on a top-{k} cache (vocabulary {vocab_size}): the K + 1-bin "
            "estimate of any divergence other than forward KL is biased against the full-vocabulary one "
            "(kd-demo's teacher and students, V = 400: reverse KL 4-14% below the dense value on top-64 and "
            "12-34% on top-8, forward KL within 0.6% on top-64; per divergence and k in benchmarks/RESULTS.md, "
            "'Divergence bias on top-k caches'); use --divergence fkl, or a larger kd-cache build --top-k")


def check_cache_options(cfg: TrainConfig, manifest: Manifest, pairing=None) -> int | None:
    """Refuse the distillation options the cache cannot serve; returns the teacher's hidden size when
    hidden states are used.

    Reads ``manifest.sparse.mode`` (topk or sample), ``manifest.positions`` (the cached position
    kinds) and ``manifest.hidden`` (whether teacher hidden states were stored, ``--hidden``); with a
    ``pairing`` across tokenizers or image layouts (``student.alignment``), the options it cannot serve.
    """
    if pairing is not None and pairing.cross:
        _check_cross_options(cfg)
    sparse = manifest.sparse.mode
    if sparse == "sample" and cfg.divergence is not Divergence.fkl:
        raise ValueError(f"--divergence {cfg.divergence.value}: the cache holds sampled teacher tokens "
                         "(sparse mode 'sample'), for which only forward KL is unbiased; use --divergence fkl")
    if sparse == "topk" and cfg.divergence is not Divergence.fkl and manifest.sparse.k < manifest.vocab_size:
        warnings.warn(topk_bias_warning(cfg.divergence, manifest.sparse.k, manifest.vocab_size), TopKBiasWarning,
                      stacklevel=2)
    cached = list(manifest.positions)
    missing = [k for k in cfg.positions if k not in cached]
    if missing:
        want = ",".join(k for k in ("response", "visual", "prompt") if k in cached or k in missing)
        raise ValueError(f"--positions {','.join(cfg.positions)}: the cache {cfg.cache} holds teacher distributions "
                         f"at {','.join(cached)} positions only, not {','.join(missing)}; rebuild it with "
                         f"`kd-cache build --positions {want}` or leave {','.join(missing)} out of --positions")
    if cfg.zscore and sparse == "sample":
        raise ValueError("--zscore: the cache holds sampled teacher tokens (sparse mode 'sample'); standardising "
                         "needs the teacher's log-probs on a fixed set of ids: rebuild with kd-cache build --sparse topk")
    needs = [(f, v) for f, v in (("--hidden-weight", cfg.hidden_weight), ("--affinity-weight", cfg.affinity_weight))
             if v > 0]
    if not needs:
        return None
    flag, value = needs[0]
    if not manifest.hidden.stored:
        raise ValueError(f"{flag} {value}: needs the teacher's final hidden states, but the cache {cfg.cache} was "
                         "built without them: rebuild the cache with kd-cache build --hidden")
    if cfg.affinity_weight > 0 and not {"response", "visual"} <= set(cached):
        raise ValueError(f"--affinity-weight {cfg.affinity_weight}: needs the teacher's hidden states at response "
                         f"and visual positions, the cache {cfg.cache} holds {','.join(cached)}: rebuild it with "
                         "kd-cache build --hidden --positions response,visual")
    return int(manifest.hidden.size)


def _check_cross_options(cfg: TrainConfig) -> None:
    """Options a student aligned to another tokenizer or image layout cannot take (each named)."""
    refused = []
    if "prompt" in cfg.positions:
        refused.append("--positions with prompt (prompt tokens of two templates differ; distil response,visual)")
    if cfg.hidden_weight > 0 or cfg.affinity_weight > 0:
        refused.append("--hidden-weight / --affinity-weight (teacher hidden states sit at the teacher's positions)")
    if cfg.zscore:
        refused.append("--zscore (the aligned loss compares the mapped ids plus an 'everything else' bin)")
    if cfg.tail_mode is not TailMode.tail:
        refused.append(f"--tail-mode {cfg.tail_mode.value} (the aligned loss needs the tail bin)")
    if refused:
        raise ValueError("the student's tokens differ from the cache's (another tokenizer, chat template or image "
                         "expansion), so kd-train aligns them to the teacher's; that alignment cannot take:\n  "
                         + "\n  ".join(refused))
