"""Data records: reading the data as users have it, the reasons a record is skipped, and loading images.

Every input shape becomes a ``Record``: an id, LLaVA-style turns ``[{"from", "value"}]`` (text with
``<image>`` placeholders) and the record's images (``ImageRef``: a path and/or the encoded bytes).
Accepted shapes of a row (auto-detected; ``Columns`` maps other column names):

* LLaVA / ShareGPT: ``conversations`` (or ``messages``) ``[{"from", "value"}]``, ``image``/``images``
  (LLaVA-OneVision-Data: ``id``, ``image`` (a ``datasets.Image``), ``conversations``, ``data_source``);
* role/content, as ``transformers`` chat templates and TRL use: ``messages: [{"role", "content"}]`` with
  content a string (``<image>`` tags) or parts ``[{"type": "image"}, {"type": "text", "text"}]``, plus
  ``images``; a part may carry its own image (``{"type": "image", "image": ...}``);
* TRL prompt/completion: ``prompt`` and ``completion`` (message lists or strings) plus ``images``;
* The Cauldron: ``images`` (a list of ``datasets.Image``) and ``texts: [{"user", "assistant", "source"}]``.

An image is a path (relative to ``--image-folder`` or absolute), encoded bytes, a ``{"bytes", "path"}``
dict (a ``datasets.Image`` column read with ``decode=False``, so the original bytes are kept), or a PIL
image (encoded losslessly as PNG); a record may have one or several, or none.

``--data`` is a JSON/JSONL file, parquet file(s) (a path or a glob), a ``datasets.save_to_disk``
directory, or anything ``datasets.load_dataset`` resolves: a Hub dataset id or a local folder laid out
like one (``--split``, ``--subset``, ``--streaming``).

A row that cannot become a record (not an object, a malformed turn, a ``null`` or non-UTF-8 text, an
unknown role, an unusable image value, a duplicate id) still becomes a ``Record`` carrying the
``BadRecord`` it raises when encoded: one bad record is skipped and listed, never the end of a build.
How a record becomes tokens is ``kd_cache.encoding``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kd_cache import fingerprint
from kd_cache.errors import UserError

# Reasons a record is skipped (the manifest counts them by these names).
MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"
IMAGE_TOO_LARGE = "image_too_large"  # PIL's decompression-bomb limit
BAD_IMAGE_VALUE = "bad_image_value"  # an image column value that is neither a path, bytes, a dict nor a PIL image
EMPTY_CONVERSATION = "empty_conversation"
NO_ASSISTANT_TOKENS = "no_assistant_tokens_after_truncation"
IMAGE_TAG_MISMATCH = "image_tag_count_mismatch"
IMAGE_TRUNCATED = "image_tokens_truncated"
NOT_A_RECORD = "not_a_record"  # the row is not a JSON object / dict
BAD_TURN = "bad_turn"  # a turn that is not an object with a role and a text
NULL_TEXT = "null_text"  # a turn whose text is null (never trained as the string "None")
INVALID_TEXT = "invalid_text"  # text that is not valid Unicode (a lone surrogate)
UNKNOWN_ROLE = "unknown_role"
NO_CONVERSATION = "no_conversation_column"
DUPLICATE_ID = "duplicate_id"
INVALID_JSON = "invalid_json"  # a JSONL line that does not parse
UNSUPPORTED_CONVERSATION = "unsupported_conversation"  # the processor refuses it (PaliGemma: one answer)
RECORD_ERROR = "record_error"  # any other error raised while encoding one record

# Turn sources (LLaVA ``from`` / chat ``role``) and the chat-template role they mean.
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
         "system": "system"}
# Column names tried in order when no ``Columns`` mapping names one.
CONVERSATION_COLUMNS = ("conversations", "messages", "texts", "conversation")
IMAGE_COLUMNS = ("images", "image")
IMAGE_TAG = "<image>"


class BadRecord(UserError):
    """A record that cannot be used; ``reason`` is one of the module's reason names. Bad records are
    skipped and listed, so one reaches the user only with ``--strict``."""

    hint = "--strict stops at the first bad record; drop --strict to skip and list them"

    def __init__(self, record_id: str, reason: str, detail: str = ""):
        self.record_id, self.reason, self.detail = record_id, reason, detail
        super().__init__(f"record {record_id!r}: {reason}" + (f" ({detail})" if detail else ""))


@dataclass(frozen=True)
class ImageRef:
    """One image of a record: its path as given (``""`` when it has none) and/or its encoded bytes."""

    path: str = ""
    data: bytes | None = None

    def __repr__(self) -> str:
        return f"ImageRef({self.path!r}" + (f", {len(self.data)} bytes)" if self.data is not None else ")")

    def digest(self) -> str:
        return hashlib.sha256(self.data).hexdigest()[:16] if self.data is not None else self.path


@dataclass
class Record:
    """One conversation: turns ``[{"from", "value"}]`` with ``<image>`` tags, and its images in tag order.

    ``problem``: why the record cannot be used (raised by ``Encoder.prepare``), for rows that could
    not be read as a record. ``images`` accepts path strings (made ``ImageRef``)."""

    id: str
    conversations: list[dict]
    images: list[ImageRef] = field(default_factory=list)
    problem: BadRecord | None = None

    def __post_init__(self):
        self.images = [ImageRef(x) if isinstance(x, str) else x for x in self.images]


@dataclass
class Columns:
    """Column names of the data, when they differ from the defaults (None: auto-detect)."""

    id: str | None = None
    images: str | None = None
    conversation: str | None = None


# ---------------------------------------------------------------------------------------- rows -> records


def _text(value: Any, rid: str, where: str) -> str:
    if value is None:
        raise BadRecord(rid, NULL_TEXT, f"{where} is null")
    if not isinstance(value, str):
        raise BadRecord(rid, BAD_TURN, f"{where} is a {type(value).__name__}, expected a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRecord(rid, INVALID_TEXT, f"{where}: {e.reason} at character {e.start}") from None
    return value


def _role(src: Any, rid: str, i: int) -> str:
    if not isinstance(src, str) or src.lower() not in ROLES:
        raise BadRecord(rid, UNKNOWN_ROLE, f"turn {i}: role {src!r} (expected one of {', '.join(ROLES)})")
    return src


def normalise_turns(conv: Any, rid: str, inline_images: list | None = None) -> list[dict]:
    """A conversation in any accepted shape -> ``[{"from", "value"}]``; image parts that carry an image
    append it to ``inline_images``. Raises ``BadRecord`` for a malformed turn, a null or non-UTF-8 text,
    an unknown role."""
    inline_images = [] if inline_images is None else inline_images
    if isinstance(conv, dict):  # a single turn pair, e.g. one Cauldron ``texts`` entry given alone
        conv = [conv]
    if not isinstance(conv, (list, tuple)):
        raise BadRecord(rid, BAD_TURN, f"the conversation is a {type(conv).__name__}, expected a list of turns")
    out = []
    for i, t in enumerate(conv):
        if not isinstance(t, dict):
            raise BadRecord(rid, BAD_TURN, f"turn {i} is a {type(t).__name__}, expected an object")
        if "from" in t or "value" in t:  # LLaVA / ShareGPT
            out.append({"from": _role(t.get("from"), rid, i), "value": _text(t.get("value"), rid, f"turn {i} value")})
        elif "role" in t:  # transformers / TRL role-content
            out.append({"from": _role(t["role"], rid, i), "value": _content(t.get("content"), rid, i, inline_images)})
        elif "user" in t or "assistant" in t:  # The Cauldron
            out.append({"from": "user", "value": _text(t.get("user"), rid, f"turn {i} user")})
            out.append({"from": "assistant", "value": _text(t.get("assistant"), rid, f"turn {i} assistant")})
        else:
            raise BadRecord(rid, BAD_TURN, f"turn {i} has keys {sorted(t)}; expected from/value, role/content "
                                           "or user/assistant")
    return out


def _content(content: Any, rid: str, i: int, inline_images: list) -> str:
    """Role/content content (a string, or typed parts) -> text with ``<image>`` tags."""
    if isinstance(content, str) or content is None:
        return _text(content, rid, f"turn {i} content")
    if not isinstance(content, (list, tuple)):
        raise BadRecord(rid, BAD_TURN, f"turn {i} content is a {type(content).__name__}, expected a string or parts")
    text = []
    for part in content:
        if not isinstance(part, dict):
            raise BadRecord(rid, BAD_TURN, f"turn {i}: a content part is a {type(part).__name__}, expected an object")
        kind = part.get("type")
        if kind == "image":
            inline = next((part[k] for k in ("image", "path") if part.get(k) is not None), None)
            if inline is not None:
                inline_images.append(inline)
            text.append(IMAGE_TAG)
        elif kind == "text":
            text.append(_text(part.get("text"), rid, f"turn {i} text part"))
        else:
            raise BadRecord(rid, BAD_TURN, f"turn {i}: content part of type {kind!r} (expected image or text)")
    return "".join(text)


def image_ref(value: Any, rid: str) -> ImageRef:
    """One image value of the data as an ``ImageRef`` (see the module docstring for the accepted kinds)."""
    if isinstance(value, str):
        return ImageRef(path=value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return ImageRef(data=bytes(value))
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        data, path = value.get("bytes"), value.get("path")
        if data is None and not path:
            raise BadRecord(rid, BAD_IMAGE_VALUE, "an image dict with neither bytes nor path")
        return ImageRef(path=str(path or ""), data=bytes(data) if data is not None else None)
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency
        Image = None
    if Image is not None and isinstance(value, Image.Image):
        buf = io.BytesIO()
        value.save(buf, format="PNG")  # lossless: the teacher and the student see these exact pixels
        return ImageRef(path=str(getattr(value, "filename", "") or ""), data=buf.getvalue())
    raise BadRecord(rid, BAD_IMAGE_VALUE, f"an image given as {type(value).__name__}; expected a path, bytes, "
                                          "a {bytes, path} dict or a PIL image")


def _images(value: Any, rid: str) -> list[ImageRef]:
    if value is None or (isinstance(value, str) and value == ""):
        return []
    if isinstance(value, (list, tuple)):
        return [image_ref(v, rid) for v in value if v is not None]
    return [image_ref(value, rid)]


def content_id(conversations: list[dict], images: list[ImageRef]) -> str:
    """A stable id from a record's content (turns and images): the same record always gets the same id."""
    h = hashlib.sha256(json.dumps(conversations, sort_keys=True, ensure_ascii=False).encode("utf-8", "replace"))
    for im in images:
        h.update(b"\0" + im.digest().encode())
    return "sha256:" + h.hexdigest()[:16]


def _pick(row: dict, mapped: str | None, defaults: tuple[str, ...]) -> tuple[str | None, Any]:
    if mapped is not None:
        return mapped, row.get(mapped)
    for name in defaults:
        if name in row:
            return name, row[name]
    return None, None


def to_record(row: Any, where: str, columns: Columns | None = None) -> Record:
    """One row of the data as a ``Record`` (a bad row: a ``Record`` carrying its ``problem``)."""
    cols = columns or Columns()
    if not isinstance(row, dict):
        return Record(where, [], problem=BadRecord(where, NOT_A_RECORD, f"a {type(row).__name__}, expected an object"))
    raw_id = row.get(cols.id or "id")
    rid = str(raw_id) if raw_id is not None else where
    try:
        inline: list = []
        name, conv = _pick(row, cols.conversation, CONVERSATION_COLUMNS)
        if name is None and "prompt" in row and "completion" in row:  # TRL prompt/completion
            prompt, completion = row["prompt"], row["completion"]
            if isinstance(prompt, str):
                prompt = [{"role": "user", "content": prompt}]
            if isinstance(completion, str):
                completion = [{"role": "assistant", "content": completion}]
            conv = list(prompt or []) + list(completion or []) if isinstance(prompt, list) and isinstance(
                completion, list) else None
            name = "prompt/completion"
        if name is None or conv is None:
            raise BadRecord(rid, NO_CONVERSATION, f"no {cols.conversation or '/'.join(CONVERSATION_COLUMNS)} "
                                                  f"column (found {sorted(row)}); map it with --conversation-column")
        turns = normalise_turns(conv, rid, inline)
        _, img = _pick(row, cols.images, IMAGE_COLUMNS)
        images = _images(img, rid) + [image_ref(v, rid) for v in inline]
    except BadRecord as e:
        return Record(rid, [], problem=e)
    if raw_id is None:
        rid = content_id(turns, images)
    return Record(rid, turns, images)


def _dedupe(records: Iterable[Record]) -> Iterator[Record]:
    """Records with an id seen before carry ``DUPLICATE_ID`` (the first one is kept)."""
    seen: set[str] = set()
    for r in records:
        if r.problem is None:
            if r.id in seen:
                r = Record(r.id, [], problem=BadRecord(r.id, DUPLICATE_ID, "an earlier record has this id"))
            else:
                seen.add(r.id)
        yield r


# ----------------------------------------------------------------------------------------------- sources


@dataclass
class DataSource:
    """Where the records come from: ``--data`` and how to read it."""

    data: str
    split: str = "train"
    subset: str | None = None
    streaming: bool = False
    columns: Columns = field(default_factory=Columns)


def _read_text(p: Path) -> str:
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"--data {p}: not UTF-8 text (invalid byte 0x{raw[e.start]:02x} at byte {e.start}); "
                         "re-encode the file as UTF-8") from None
    if not text.strip():
        raise ValueError(f"--data {p}: the file is empty")
    return text


def _json_rows(p: Path) -> tuple[Iterator[tuple[str, Any]], int]:
    """(where, row) of a JSON list or a JSONL file, and their number; a JSONL line that does not parse
    is a bad row."""
    text = _read_text(p)
    if p.suffix.lower() == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--data {p}: not valid JSON ({e})") from None
        if not isinstance(rows, list):
            raise ValueError(f"--data {p}: expected a JSON list of records, found {type(rows).__name__}")
        return ((f"{p.name}:{i}", row) for i, row in enumerate(rows)), len(rows)
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]

    def parse():
        for n, line in lines:
            try:
                yield f"{p.name}:line{n}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{p.name}:line{n}", _Unparsed(str(e))

    return parse(), len(lines)


class _Unparsed:
    def __init__(self, error: str):
        self.error = error


def _undecoded_rows(ds) -> Iterator[dict]:
    """The rows of a dataset with every ``datasets.Image`` left undecoded: ``{"bytes", "path"}``, the
    original file bytes (no decode, no re-encode, no copy of the dataset)."""
    import datasets

    if isinstance(ds, datasets.Dataset):
        for batch in ds.with_format("arrow").iter(batch_size=64):
            yield from batch.to_pylist()
    else:
        yield from ds.decode(False)


def _dataset_rows(src: DataSource) -> tuple[Iterator[tuple[str, Any]], int | None]:
    import datasets

    p = Path(src.data)
    if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()
                       or (p / "state.json").exists()):
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if src.split not in ds:
                raise ValueError(f"--data {src.data}: no split {src.split!r} (found {list(ds)}); pass --split")
            ds = ds[src.split]
        if src.streaming:
            ds = ds.to_iterable_dataset()
    else:
        try:
            if p.suffix.lower() == ".parquet" or "*" in src.data:  # parquet file(s): one "train" split
                ds = datasets.load_dataset("parquet", data_files=src.data, split="train", streaming=src.streaming)
            else:  # a Hub dataset id, or a local folder laid out like one
                ds = datasets.load_dataset(src.data, src.subset, split=src.split, streaming=src.streaming)
        except (OSError, ValueError) as e:  # FileNotFoundError, DatasetNotFoundError, a split that is not there
            raise ValueError(f"--data {src.data}: cannot load it as a dataset (subset {src.subset!r}, "
                             f"split {src.split!r}): {e}") from e
    name = p.name or src.data
    length = len(ds) if isinstance(ds, datasets.Dataset) else None
    return ((f"{name}:{i}", row) for i, row in enumerate(_undecoded_rows(ds))), length


class RecordStream:
    """The records of a source, read lazily, in order; ``length`` is their number when the source knows it
    (None when streaming)."""

    def __init__(self, records: Iterable[Record], length: int | None):
        self._records, self.length = records, length

    def __iter__(self) -> Iterator[Record]:
        return iter(self._records)


def iter_records(src: DataSource | str) -> RecordStream:
    """The records of ``src``, lazily, in order (see the module docstring)."""
    src = DataSource(src) if isinstance(src, str) else src
    p = Path(src.data)
    suffix = p.suffix.lower()
    if suffix in (".json", ".jsonl") and "*" not in src.data:
        if not p.is_file():
            raise FileNotFoundError(f"--data {src.data}: no such file")
        rows, length = _json_rows(p)
    elif p.exists() or "*" in src.data or not p.is_absolute() and not src.data.startswith("."):
        if p.is_file() and suffix != ".parquet":
            raise ValueError(f"--data {src.data}: expected .json, .jsonl, .parquet, a datasets directory or a "
                             "Hub dataset id")
        rows, length = _dataset_rows(src)
    else:
        raise FileNotFoundError(f"--data {src.data}: no such file or directory")

    def records():
        for where, row in rows:
            if isinstance(row, _Unparsed):
                yield Record(where, [], problem=BadRecord(where, INVALID_JSON, row.error))
            else:
                yield to_record(row, where, src.columns)

    return RecordStream(_dedupe(records()), length)


def load_records(data: DataSource | str) -> list[Record]:
    """All records of ``data`` (a path/id string or a ``DataSource``) in a list."""
    return list(iter_records(data))


def dataset_identity(data: str, known: dict | None = None) -> dict:
    """The content identity of ``--data`` (``kd_cache.fingerprint.files_identity``): of the data file, of
    every file of a dataset folder, or of the parquet files a glob matches (named relative to their
    common folder); ``known`` (an earlier result) spares re-reading files whose (size, mtime) is
    unchanged. A Hub dataset is identified by its id (its revision is the Hub's): no files."""
    p = Path(data)
    if "*" in data:
        import glob

        found = sorted(Path(f) for f in glob.glob(data, recursive=True) if os.path.isfile(f))
        base = Path(os.path.commonpath([str(f.parent) for f in found])) if found else p.parent
        files = {str(f.relative_to(base)): str(f) for f in found}
    elif not p.exists():
        return {"digest": hashlib.sha256(data.encode()).hexdigest()[:16], "files": {}}
    else:
        files = fingerprint.list_files(data) if p.is_dir() else {p.name: data}
    return fingerprint.files_identity(files, known)


def resolve_image_folder(image_folder: str | None) -> str | None:
    return os.path.abspath(image_folder) if image_folder else None


# ------------------------------------------------------------------------------------------------ images


def read_image_bytes(ref: ImageRef, image_folder: str | Path | None, record_id: str) -> bytes:
    """The encoded bytes of an image: its own, or its file's (``image_folder`` for a relative path)."""
    if ref.data is not None:
        return ref.data
    full = Path(ref.path)
    if not full.is_absolute() and image_folder is not None:
        full = Path(image_folder) / ref.path
    if not ref.path or not full.is_file():
        raise BadRecord(record_id, MISSING_IMAGE, str(full))
    return full.read_bytes()


def decode_image(data: bytes, record_id: str, where: str = ""):
    """Encoded image bytes -> an RGB PIL image. 16-bit greyscale is scaled to 8 bit (``convert("RGB")``
    would clip it to nearly white); an image over PIL's decompression-bomb limit is ``IMAGE_TOO_LARGE``."""
    from PIL import Image

    label = where or f"{len(data)} embedded bytes"
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
                a = np.asarray(im, dtype=np.float64)
                # 16-bit sources span 0..65535; a 32-bit "I" image is taken as 16-bit when it exceeds 8 bit.
                scale = 257.0 if im.mode != "I" or a.max(initial=0) > 255 else 1.0
                im8 = Image.fromarray(np.clip(np.rint(a / scale), 0, 255).astype(np.uint8), "L")
                return im8.convert("RGB")
            return im.convert("RGB")
    except Image.DecompressionBombError as e:
        raise BadRecord(record_id, IMAGE_TOO_LARGE, f"{label}: {e}") from None
    except (OSError, ValueError, SyntaxError) as e:  # PIL.UnidentifiedImageError is an OSError
        raise BadRecord(record_id, UNREADABLE_IMAGE, f"{label}: {e}") from e


def load_image(image: ImageRef | str, image_folder: str | Path | None, record_id: str):
    """One image as an RGB PIL image: its stored bytes, or its file (a relative path is taken from
    ``image_folder`` when one is given).

    A missing file raises ``BadRecord(MISSING_IMAGE)``, an unreadable one ``BadRecord(UNREADABLE_IMAGE)``."""
    ref = ImageRef(image) if isinstance(image, str) else image
    data = read_image_bytes(ref, image_folder, record_id)
    where = ref.path if ref.data is None else ""
    if where and image_folder is not None and not Path(where).is_absolute():
        where = str(Path(image_folder) / where)
    return decode_image(data, record_id, where)
