"""``EvalConfig``: every setting of a ``kd-eval`` run, written once.

Each field carries its ``--flag`` help in ``metadata["help"]`` (``cli.options`` builds the command
from it); ``__post_init__`` refuses a run with nothing to evaluate. What the settings drive is
``student.evaluate`` (``evaluate_qa`` for ``--data``, ``evaluate_cache`` for ``--cache``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kd_cache.schema import DType


@dataclass
class EvalConfig:
    """The settings of one ``kd-eval`` run (each field's help is its flag's)."""

    model: str = field(metadata={"help": "Saved image-text-to-text model of a supported family + its processor (e.g. a kd-train OUT)."})
    data: str | None = field(default=None, metadata={"help": (
        "LLaVA-format QA data (JSON/JSONL, parquet or a datasets dir); every assistant turn is one question.")})
    image_folder: str | None = field(default=None, metadata={"help": "Folder the records' image paths are relative to."})
    cache: str | None = field(default=None, metadata={"help": (
        "Teacher cache (directory or fsspec URL) for KL to the teacher and top-1 agreement.")})
    cache_image_folder: str | None = field(default=None, metadata={"help": (
        "Where the cache's images resolve (default: the folder recorded in the cache).")})
    batch_size: int = field(default=16, metadata={"help": "Sequences per forward pass."})
    max_new_tokens: int = field(default=32, metadata={"help": "Longest generated answer."})
    limit: int | None = field(default=None, metadata={"help": "Use only the first N records of --data."})
    max_length: int = field(default=2048, metadata={"help": "Truncate prompts to this many tokens."})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cpu, cuda, cuda:1 ..."})
    dtype: str = field(default=DType.auto.value, metadata={
        "help": "Model dtype; auto = bf16 on GPU, fp32 on CPU.", "choices": DType})
    predictions: str | None = field(default=None, metadata={"help": (
        "Write one JSON line per question (answer, prediction, correct) to this file.")})
    strict: bool = field(default=False, metadata={"help": "Stop at the first bad record instead of skipping it."})
    as_json: bool = field(default=False, metadata={"help": "Print the results as one JSON object.", "flag": "--json"})

    def __post_init__(self):
        if self.data is None and self.cache is None:
            raise ValueError("nothing to evaluate: pass --data (with --image-folder) and/or --cache")
