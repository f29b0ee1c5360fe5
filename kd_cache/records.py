"""Data records: reading LLaVA-format data, the reasons a record is skipped, and loading its images.

A record is LLaVA-format: ``{"id", "image" (optional, str or list), "conversations": [{"from", "value"}]}``
with ``<image>`` placeholders. Records come from a JSON/JSONL file or a Hugging Face ``datasets``
dataset (a ``save_to_disk`` directory, or parquet/json/jsonl files) with a string image-path column.
How a record becomes tokens is ``kd_cache.encoding``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

# Reasons a record is skipped (the manifest counts them by these names).
MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"
EMPTY_CONVERSATION = "empty_conversation"
NO_ASSISTANT_TOKENS = "no_assistant_tokens_after_truncation"
IMAGE_TAG_MISMATCH = "image_tag_count_mismatch"
IMAGE_TRUNCATED = "image_tokens_truncated"


class BadRecord(Exception):
    """A record that cannot be used; ``reason`` is one of the module's reason names."""

    def __init__(self, record_id: str, reason: str, detail: str = ""):
        self.record_id, self.reason, self.detail = record_id, reason, detail
        super().__init__(f"record {record_id!r}: {reason}" + (f" ({detail})" if detail else ""))


@dataclass
class Record:
    id: str
    conversations: list[dict]
    images: list[str] = field(default_factory=list)


def _as_record(row: dict, index: int) -> Record:
    rid = row.get("id")
    rid = str(rid) if rid is not None else str(index)
    image = row.get("image", row.get("images"))
    if image is None or image == "":
        images = []
    elif isinstance(image, str):
        images = [image]
    elif isinstance(image, (list, tuple)):
        images = [str(x) for x in image]
    else:
        raise ValueError(
            f"record {rid!r}: the image column holds {type(image).__name__}, expected a path string "
            "(or a list of them); save embedded images to files and store their relative paths"
        )
    conv = row.get("conversations") or []
    return Record(id=rid, conversations=list(conv), images=images)


def load_records(data: str) -> list[Record]:
    """Read LLaVA-format records from a JSON/JSONL file, a ``save_to_disk`` dir or parquet/json files."""
    p = Path(data)
    if p.is_dir():
        import datasets

        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise ValueError(f"{data}: a DatasetDict without a 'train' split (found {list(ds)})")
            ds = ds["train"]
        return [_as_record(row, i) for i, row in enumerate(ds)]
    if not p.exists():
        raise FileNotFoundError(f"--data {data}: no such file or directory")
    suffix = p.suffix.lower()
    if suffix == ".json":
        rows = json.loads(p.read_text())
        if not isinstance(rows, list):
            raise ValueError(f"{data}: expected a JSON list of records, found {type(rows).__name__}")
    elif suffix == ".jsonl":
        rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    elif suffix == ".parquet":
        import datasets

        rows = list(datasets.load_dataset("parquet", data_files=str(p), split="train"))
    else:
        raise ValueError(f"--data {data}: expected .json, .jsonl, .parquet or a datasets directory")
    return [_as_record(row, i) for i, row in enumerate(rows)]


def dataset_fingerprint(data: str) -> str:
    """SHA-256 (16 hex) of the data file bytes, or of every file of a dataset directory."""
    h = hashlib.sha256()
    p = Path(data)
    files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def resolve_image_folder(image_folder: str | None) -> str | None:
    return os.path.abspath(image_folder) if image_folder else None


def load_image(path: str, image_folder: str | Path | None, record_id: str):
    """One image as an RGB PIL image; a relative ``path`` is taken from ``image_folder`` when one is given.

    A missing file raises ``BadRecord(MISSING_IMAGE)``, an unreadable one ``BadRecord(UNREADABLE_IMAGE)``.
    """
    from PIL import Image, UnidentifiedImageError

    full = Path(path)
    if not full.is_absolute() and image_folder is not None:
        full = Path(image_folder) / path
    if not full.is_file():
        raise BadRecord(record_id, MISSING_IMAGE, str(full))
    try:
        with Image.open(full) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise BadRecord(record_id, UNREADABLE_IMAGE, f"{full}: {e}") from e
