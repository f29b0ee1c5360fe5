"""The environment a benchmark script sets before it imports torch: offline, quiet, and OpenMP threads
that sleep when idle. On a shared CPU host spinning idle threads of a descheduled peer both waste cycles
and count as CPU time (see ``common.Clock``); a GPU run keeps OpenMP's default."""

from __future__ import annotations

import os


def set_environment(passive_omp: bool = True) -> None:
    """Set (unless already set) what every benchmark runs under; call it before torch is imported."""
    if passive_omp:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
