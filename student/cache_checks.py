"""Refusals of training options the cache was not built for, before any work.

Each message says which flag asks for what, what the cache holds, and which ``kd-cache build``
option (or which change of the flag) makes them fit. The student-side checks (vocabulary,
tokenizer, image token, template) are ``student.model.check_compatibility``.
"""

from __future__ import annotations

from kd_cache.schema import Manifest
from student.config import TrainConfig
from student.losses import Divergence


def check_cache_options(cfg: TrainConfig, manifest: Manifest) -> int | None:
    """Refuse the distillation options the cache cannot serve; returns the teacher's hidden size when
    hidden states are used.

    Reads ``manifest.sparse.mode`` (topk or sample), ``manifest.positions`` (the cached position
    kinds) and ``manifest.hidden`` (whether teacher hidden states were stored, ``--hidden``).
    """
    sparse = manifest.sparse.mode
    if sparse == "sample" and cfg.divergence is not Divergence.fkl:
        raise ValueError(f"--divergence {cfg.divergence.value}: the cache holds sampled teacher tokens "
                         "(sparse mode 'sample'), for which only forward KL is unbiased; use --divergence fkl")
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
