"""Where and how a model runs: device and dtype names, the attention implementation, and a teacher
spread over several devices (``teacher_placement``: ``accelerate``'s big-model dispatch) or quantized.

The one definition of these for the teacher pass (``kd_cache.teacher``) and the student side
(``student.model``, ``student.evaluate``), so ``--dtype``/``--device`` mean the same everywhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum

import torch

from kd_cache.errors import UserError

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


class Quantize(str, Enum):
    """``--quantize``: the teacher's linear layers as loaded (bitsandbytes, CUDA only)."""

    none = "none"
    bits8 = "8bit"
    bits4 = "4bit"


def parse_max_memory(text: str) -> dict[str, int | str]:
    """``--max-memory``: a JSON object, device -> budget (see ``check_max_memory``)."""
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"--max-memory must be a JSON object such as '{{\"0\": \"70GiB\", \"cpu\": \"100GiB\"}}', "
                         f"got {text!r}")
    return check_max_memory(value)


def check_max_memory(value: dict | None) -> dict[str, int | str] | None:
    """A ``--max-memory`` mapping with its keys as strings: GPU indices within the replica (``"0"``,
    ``"1"``, ...) or ``"cpu"``, each to a byte count or a size such as ``"70GiB"``; a ValueError names what
    is wrong."""
    if value is None:
        return None
    from accelerate.utils import convert_file_size_to_int

    out = {}
    for key, budget in value.items():
        key = str(key)
        if key != "cpu" and not key.isdigit():
            raise ValueError(f"--max-memory key {key!r}: expected a GPU index within this teacher replica "
                             "(0 .. --gpus-per-teacher - 1) or \"cpu\" (layers past every budget go to disk)")
        try:
            size = convert_file_size_to_int(budget) if isinstance(budget, str) else int(budget)
        except (ValueError, TypeError) as e:
            raise ValueError(f"--max-memory {key!r}: {budget!r} is not a size (bytes, or e.g. \"70GiB\", "
                             "\"500MB\")") from e
        if size < 0:
            raise ValueError(f"--max-memory {key!r}: {budget!r} is negative")
        out[key] = budget
    return out


@dataclass
class Placement:
    """Where a teacher's layers go (``accelerate``'s big-model dispatch): ``max_memory`` in accelerate's
    form (absolute GPU indices, ``"cpu"``), balanced over its GPUs by ``from_pretrained(device_map="auto")``;
    what fits nowhere is offloaded to disk."""

    max_memory: dict[int | str, int | str]

    @property
    def gpus(self) -> list[int]:
        return sorted(k for k in self.max_memory if isinstance(k, int))


def teacher_placement(device: torch.device, gpus_per_teacher: int = 1, max_memory: dict | None = None,
                      local_rank: int = 0) -> Placement | None:
    """The dispatch of this process's teacher replica, or None for the whole teacher on ``device``.

    With ``gpus_per_teacher`` N > 1, process ``local_rank`` of its node takes GPUs ``local_rank * N``
    .. ``local_rank * N + N - 1``, each budgeted its free memory unless ``max_memory`` says otherwise
    (its GPU keys count from the replica's first GPU). ``max_memory`` alone (one GPU, or the CPU) spreads
    the teacher over that device, the CPU and disk, which is also how a CPU test forces a split.
    """
    if gpus_per_teacher == 1 and max_memory is None:
        return None
    if device.type != "cuda" and gpus_per_teacher > 1:
        raise UserError(f"--gpus-per-teacher {gpus_per_teacher} spreads the teacher over CUDA GPUs, and this build "
                        f"runs on {device.type} (no CUDA device visible): drop --gpus-per-teacher, or use "
                        "--max-memory to spread it over the CPU and disk")
    first = local_rank * gpus_per_teacher
    if device.type == "cuda":
        if gpus_per_teacher == 1:
            first = device.index if device.index is not None else torch.cuda.current_device()
        have = torch.cuda.device_count()
        if first + gpus_per_teacher > have:
            raise UserError(f"--gpus-per-teacher {gpus_per_teacher}: process {local_rank} of this node needs GPUs "
                            f"{first}..{first + gpus_per_teacher - 1}, and {have} are visible: launch "
                            f"{have // gpus_per_teacher or 1} process(es) per node (accelerate launch --num_processes)")
    budget: dict[int | str, int | str] = {}
    if device.type == "cuda":
        from accelerate.utils import get_max_memory

        free = get_max_memory()
        budget.update({first + j: free[first + j] for j in range(gpus_per_teacher)})
    for key, size in (max_memory or {}).items():
        if key == "cpu":
            budget["cpu"] = size
        elif device.type != "cuda":
            raise UserError(f"--max-memory names GPU {key}, and this build runs on {device.type}: name only \"cpu\"")
        elif int(key) >= gpus_per_teacher:
            raise UserError(f"--max-memory GPU {key}: this teacher replica has {gpus_per_teacher} GPU(s) "
                            f"(keys 0..{gpus_per_teacher - 1})")
        else:
            budget[first + int(key)] = size
    if device.type != "cuda" and "cpu" not in budget:
        from accelerate.utils import get_max_memory

        budget["cpu"] = get_max_memory()["cpu"]
    return Placement(budget)
