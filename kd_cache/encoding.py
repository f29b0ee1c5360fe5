"""Encoding a data record into the tokens a teacher and a student see: templates and ``Encoder``.

``Encoder.encode`` turns a record into ``input_ids`` and ``labels`` (aligned as in ``transformers``:
``labels[t]`` is the target of the logits at ``t - 1``; ``IGNORE_INDEX`` = no loss). Image placeholders
are expanded to the number of image tokens the processor produces, so the token ids stored in a cache
are exactly what the model sees. Labels cover assistant turns only (chat template) or the caption
only (pretrain template); assistant spans are found on the rendered text, by rendering the
conversation up to each assistant turn, which works for any prefix-stable chat template. The teacher
pass and ``kd-eval`` use the same ``Encoder``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kd_cache.records import (
    EMPTY_CONVERSATION,
    IMAGE_TAG_MISMATCH,
    IMAGE_TRUNCATED,
    NO_ASSISTANT_TOKENS,
    BadRecord,
    Record,
    load_image,
)
from kd_cache.schema import IGNORE_INDEX, Template, choice

# Qwen-style ChatML that understands both plain-string and structured (processor) message content;
# the built-in example's template, and the fallback for an LLM tokenizer without a chat template.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class Prepared:
    record: Record  # image tags normalised, empty turns dropped
    pil_images: list[Any]
    meta: dict = field(default_factory=dict)  # stored with the sample (e.g. replaced reference answers)


@dataclass
class Encoded:
    id: str
    input_ids: np.ndarray  # int32 [L]
    labels: np.ndarray  # int32 [L]
    images: list[str]  # paths as given in the data
    pil_images: list[Any]  # loaded RGB images, in placeholder order
    meta: dict = field(default_factory=dict)


def turn_role(src: str) -> str:
    src = src.lower()
    if src in ("human", "user"):
        return "user"
    if src in ("gpt", "assistant", "model"):
        return "assistant"
    if src == "system":
        return "system"
    raise ValueError(f"unknown conversation role {src!r} (expected human/gpt/system)")


class Encoder:
    """Tokenises records for one (processor or tokenizer, template, max length) combination.

    ``processor`` may be a multimodal processor (with ``image_processor`` and ``image_token``) or
    a plain tokenizer (causal-LM teacher, text-only data).
    """

    def __init__(self, processor, template: str = "chat", max_length: int = 2048,
                 image_folder: str | None = None, image_tokens: int | None = None):
        choice(Template, template, "--template")
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.template = template
        self.max_length = max_length
        self.image_folder = Path(image_folder) if image_folder else None
        self.image_token = getattr(processor, "image_token", None)
        self.image_token_id = getattr(processor, "image_token_id", None)
        self.image_tokens = image_tokens
        self.multimodal = getattr(processor, "image_processor", None) is not None and self.image_token is not None
        self.placeholder = self.image_token or "<image>"

    # -- rendering ---------------------------------------------------------------------------------
    def _messages(self, conv: list[dict], structured: bool) -> list[dict]:
        msgs = []
        for turn in conv:
            role, text = turn_role(turn.get("from", "")), str(turn.get("value", ""))
            if not structured:
                msgs.append({"role": role, "content": text})
                continue
            parts: list[dict] = []
            for j, chunk in enumerate(text.split("<image>")):
                if j > 0:
                    parts.append({"type": "image"})
                if chunk:
                    parts.append({"type": "text", "text": chunk})
            msgs.append({"role": role, "content": parts})
        return msgs

    def _render(self, msgs: list[dict], add_generation_prompt: bool, structured: bool) -> str:
        owner = self.processor if structured else self.tokenizer
        return owner.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _chat_text(self, conv: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        structured = self.multimodal and getattr(self.processor, "chat_template", None) is not None
        msgs = self._messages(conv, structured)
        full = self._render(msgs, False, structured)
        spans = []
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            prefix = self._render(msgs[:i], True, structured) if i else ""
            upto = self._render(msgs[: i + 1], False, structured)
            if not (full.startswith(upto) and upto.startswith(prefix)):
                raise ValueError(
                    "the chat template is not prefix-stable (rendering the first turns does not give a "
                    "prefix of the whole conversation), so assistant spans cannot be located; "
                    "use a template that renders turns independently"
                )
            spans.append((len(prefix), len(upto)))
        return full, spans

    def _pretrain_text(self, conv: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        # LLaVA's "plain" template: image tokens, then the caption, then a newline; loss on the caption.
        caption = next((str(t.get("value", "")) for t in reversed(conv) if turn_role(t.get("from", "")) == "assistant"), "")
        bos = self.tokenizer.bos_token or ""
        prefix = bos + self.placeholder
        text = prefix + caption.strip() + "\n"
        return text, [(len(prefix), len(text))] if caption.strip() else []

    # -- encoding ----------------------------------------------------------------------------------
    def encode(self, record: Record) -> Encoded:
        return self.encode_prepared(self.prepare(record))

    def prepare(self, record: Record) -> Prepared:
        """Validate a record, normalise its image tags and load its images (no tokenisation yet)."""
        rid = record.id
        conv = [t for t in record.conversations if str(t.get("value", "")).strip() or turn_role(t.get("from", "")) == "system"]
        if not any(turn_role(t.get("from", "")) == "assistant" for t in conv):
            raise BadRecord(rid, EMPTY_CONVERSATION, "no assistant turn with text")
        n_tags = sum(str(t.get("value", "")).count("<image>") for t in conv)
        if record.images and not self.multimodal:
            raise BadRecord(rid, IMAGE_TAG_MISMATCH, "record has an image but the teacher has no image processor")
        if record.images and n_tags == 0 and self.template == "chat":
            # LLaVA convention: an image without a placeholder goes before the first user text.
            conv = [dict(t) for t in conv]
            first = next(i for i, t in enumerate(conv) if turn_role(t.get("from", "")) == "user")
            conv[first]["value"] = "<image>\n" + conv[first]["value"]
            n_tags = 1
        if self.template == "pretrain":
            n_tags = 1 if record.images else 0
        if n_tags != len(record.images):
            raise BadRecord(rid, IMAGE_TAG_MISMATCH, f"{n_tags} <image> tags, {len(record.images)} images")

        pil = [load_image(rel, self.image_folder, rid) for rel in record.images]
        return Prepared(Record(rid, conv, list(record.images)), pil)

    def encode_prepared(self, prepared: Prepared) -> Encoded:
        """Tokenise a prepared record: input ids with expanded image tokens, and the label mask."""
        rid, conv, pil = prepared.record.id, prepared.record.conversations, prepared.pil_images
        record = prepared.record
        if self.template == "pretrain":
            text, spans = self._pretrain_text(conv)
            if not record.images:
                text = text.replace(self.placeholder, "", 1)
                spans = [(a - len(self.placeholder), b - len(self.placeholder)) for a, b in spans]
        else:
            text, spans = self._chat_text(conv)
        text, spans = self._expand_images(text, spans, len(pil))

        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], dtype=np.int32)
        starts = np.asarray([a for a, _ in enc["offset_mapping"]], dtype=np.int64)
        in_span = np.zeros(len(ids), dtype=bool)
        for a, b in spans:
            in_span |= (starts >= a) & (starts < b)
        labels = np.where(in_span, ids, IGNORE_INDEX).astype(np.int32)
        if self.image_token_id is not None:
            labels[ids == self.image_token_id] = IGNORE_INDEX
            n_img = int((ids == self.image_token_id).sum())
            expected = len(pil) * (self.image_tokens or 0)
            if n_img != expected:
                raise ValueError(
                    f"record {rid!r}: tokenised text holds {n_img} image tokens, expected {expected}; "
                    "the tokenizer must treat the image token as one special token"
                )
        if len(ids) > self.max_length:
            ids, labels = ids[: self.max_length], labels[: self.max_length]
            if self.image_token_id is not None and int((ids == self.image_token_id).sum()) != len(pil) * (self.image_tokens or 0):
                raise BadRecord(rid, IMAGE_TRUNCATED, f"--max-length {self.max_length} cuts through an image")
        if not (labels[1:] != IGNORE_INDEX).any():
            raise BadRecord(rid, NO_ASSISTANT_TOKENS, f"--max-length {self.max_length}")
        return Encoded(rid, ids, labels, list(record.images), pil, dict(prepared.meta))

    def assistant_turns(self, prepared: Prepared) -> list[int]:
        """Indices of the turns a teacher answers when it generates the training targets."""
        conv = prepared.record.conversations
        idx = [i for i, t in enumerate(conv) if turn_role(t.get("from", "")) == "assistant"]
        return idx[-1:] if self.template == "pretrain" else idx

    def prompt_ids(self, prepared: Prepared, turn: int) -> tuple[np.ndarray, list[Any]]:
        """Token ids of everything before assistant turn ``turn`` plus the generation prompt, and the
        images that prompt refers to (the ones whose tags occur in it)."""
        conv = prepared.record.conversations[:turn]
        if self.template == "pretrain":
            text = (self.tokenizer.bos_token or "") + (self.placeholder if prepared.pil_images else "")
            n_img = len(prepared.pil_images)
        else:
            structured = self.multimodal and getattr(self.processor, "chat_template", None) is not None
            text = self._render(self._messages(conv, structured), True, structured)
            n_img = sum(str(t.get("value", "")).count("<image>") for t in conv)
        text, _ = self._expand_images(text, [], n_img)
        ids = np.asarray(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int32)
        return ids, prepared.pil_images[:n_img]

    def _expand_images(self, text: str, spans, n_images: int):
        if n_images == 0:
            return text, spans
        tok = self.placeholder
        pieces = text.split(tok)
        if len(pieces) - 1 != n_images:
            raise ValueError(f"rendered text holds {len(pieces) - 1} image placeholders, expected {n_images}")
        extra = len(tok) * ((self.image_tokens or 1) - 1)
        # Map an original char offset to its offset after expansion.
        occ = []
        pos = 0
        for piece in pieces[:-1]:
            pos += len(piece)
            occ.append(pos)
            pos += len(tok)

        def shift(x: int) -> int:
            return x + extra * sum(1 for o in occ if o < x)

        expanded = (tok * (self.image_tokens or 1)).join(pieces)
        return expanded, [(shift(a), shift(b)) for a, b in spans]
