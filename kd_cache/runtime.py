"""Where and how a model runs: device and dtype names, and the attention implementation.

The one definition of these for the teacher pass (``kd_cache.teacher``) and the student side
(``student.model``, ``student.evaluate``), so ``--dtype``/``--device`` mean the same everywhere.
"""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto``: the GPU when there is one, else the CPU; any other name as torch reads it."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def dtype_from_name(name: str) -> torch.dtype:
    """``float32``/``bfloat16``/``float16`` (or ``fp32``/``bf16``/``fp16``) as a torch dtype."""
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r}: expected float32, bfloat16 or float16")
    return DTYPES[name]


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on a GPU, fp32 on the CPU; otherwise ``dtype_from_name``."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r}: expected auto, float32, bfloat16 or float16")
    return DTYPES[name]


def attn_implementation(device: torch.device | None = None) -> str:
    """``flash_attention_2`` on a GPU when flash-attn is importable, else ``sdpa``.

    ``device``: where the model runs (None: whether this process has a GPU at all).
    """
    on_gpu = device.type == "cuda" if device is not None else torch.cuda.is_available()
    if on_gpu:
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"
