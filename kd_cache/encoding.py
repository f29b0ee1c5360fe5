"""Encoding a data record into the tokens and model inputs a teacher and a student see: ``Encoder``.

``Encoder.encode`` turns a record into a ``kd_cache.processing.ProcessedSample``: the model's own
processor renders the conversation (chat template, or LLaVA's caption template for pre-training),
expands each image placeholder as its family does (wrapper tokens, tiles, per-image counts) and
returns every model input; ``input_ids`` and ``labels`` are aligned as in ``transformers``
(``labels[t]`` is the target of the logits at ``t - 1``; ``IGNORE_INDEX`` = no loss), labels cover
assistant turns only (chat) or the caption (pretrain). A text-only causal-LM teacher has a tokenizer
instead of a processor: its chat template is rendered and tokenized the same way, without images.
Truncation to ``max_length`` never cuts through an image's expansion (the record is skipped). The
teacher pass, ``--generate`` (``Encoder.prompt``) and ``kd-eval`` use the same ``Encoder``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kd_cache import processing
from kd_cache.processing import ProcessedSample, turn_role
from kd_cache.records import (
    EMPTY_CONVERSATION,
    IMAGE_TAG_MISMATCH,
    IMAGE_TRUNCATED,
    NO_ASSISTANT_TOKENS,
    UNSUPPORTED_CONVERSATION,
    BadRecord,
    ImageRef,
    Record,
    decode_image,
    normalise_turns,
    read_image_bytes,
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
    record: Record  # image tags normalised, empty turns dropped; images carry the bytes to store
    pil_images: list[Any]
    meta: dict = field(default_factory=dict)  # stored with the sample (e.g. replaced reference answers)


@dataclass
class Encoded:
    id: str
    processed: ProcessedSample  # ids, labels, every model input, visual positions per image, the processor call
    images: list[ImageRef]  # paths as given in the data; ``data``: the encoded bytes the cache stores
    pil_images: list[Any]  # loaded RGB images, in placeholder order
    meta: dict = field(default_factory=dict)
    full_length: int | None = None  # tokens before ``--max-length`` cut the sample (None: not cut)
    messages: list[dict] = field(default_factory=list)  # the conversation as role/content turns, as encoded

    @property
    def input_ids(self) -> np.ndarray:
        return self.processed.input_ids

    @property
    def labels(self) -> np.ndarray:
        return self.processed.labels

    @property
    def image_token_counts(self) -> list[int]:
        return self.processed.image_token_counts


def _messages(conv: list[dict]) -> list[dict]:
    return [{"role": turn_role(t.get("from", "")), "content": str(t.get("value", ""))} for t in conv]


class Encoder:
    """Encodes records for one (processor or tokenizer, template, max length) combination.

    ``processor`` is a multimodal processor (with an ``image_processor``; ``image_token_id`` is then
    the model config's, ``processing.config_image_token_id``) or a plain tokenizer (causal-LM
    teacher, text-only data). An image without a file (embedded in the data) keeps its encoded bytes
    for the cache; ``store_images`` keeps the file bytes of path images too (a self-contained cache).
    """

    def __init__(self, processor, template: str = "chat", max_length: int = 2048,
                 image_folder: str | None = None, image_token_id: int | None = None, store_images: bool = False):
        choice(Template, template, "--template")
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.template = template
        self.max_length = max_length
        self.image_folder = Path(image_folder) if image_folder else None
        self.multimodal = getattr(processor, "image_processor", None) is not None
        if self.multimodal and image_token_id is None:
            raise ValueError(f"{type(processor).__name__} processes images: give the model config's image token id")
        self.image_token_id = image_token_id
        self.store_images = store_images

    # -- records -----------------------------------------------------------------------------------
    def encode(self, record: Record) -> Encoded:
        return self.encode_prepared(self.prepare(record))

    def prepare(self, record: Record) -> Prepared:
        """Validate a record, normalise its image tags and load its images (no tokenisation yet)."""
        rid = record.id
        if record.problem is not None:
            raise record.problem
        conv = [t for t in normalise_turns(record.conversations, rid) if str(t.get("value", "")).strip() or turn_role(t.get("from", "")) == "system"]
        if not any(turn_role(t.get("from", "")) == "assistant" for t in conv):
            raise BadRecord(rid, EMPTY_CONVERSATION, "no assistant turn with text")
        n_tags = sum(str(t.get("value", "")).count("<image>") for t in conv)
        if record.images and not self.multimodal:
            raise BadRecord(rid, IMAGE_TAG_MISMATCH, "record has an image but the teacher has no image processor")
        if record.images and n_tags == 0 and self.template == "chat":
            # LLaVA convention: images without placeholders go before the first user text.
            conv = [dict(t) for t in conv]
            first = next((i for i, t in enumerate(conv) if turn_role(t.get("from", "")) == "user"), None)
            if first is None:
                raise BadRecord(rid, IMAGE_TAG_MISMATCH, "images but no user turn to place them in")
            conv[first]["value"] = "<image>\n" * len(record.images) + conv[first]["value"]
            n_tags = len(record.images)
        if self.template == "pretrain":
            n_tags = len(record.images)  # the caption template places the images itself
        if n_tags != len(record.images):
            raise BadRecord(rid, IMAGE_TAG_MISMATCH, f"{n_tags} <image> tags, {len(record.images)} images")

        images, pil = [], []
        for ref in record.images:
            data = read_image_bytes(ref, self.image_folder, rid)
            where = "" if ref.data is not None else str(self.image_folder / ref.path if self.image_folder else ref.path)
            pil.append(decode_image(data, rid, where))
            images.append(ImageRef(ref.path, data if (ref.data is not None or self.store_images) else None))
        return Prepared(Record(rid, conv, images), pil)

    def encode_prepared(self, prepared: Prepared) -> Encoded:
        """Encode a prepared record (ids, labels, model inputs), truncated to ``max_length``."""
        rid, pil = prepared.record.id, prepared.pil_images
        messages = _messages(prepared.record.conversations)
        try:
            if self.multimodal:
                sample = processing.encode(self.processor, self.image_token_id, messages, pil, template=self.template)
            else:
                sample = self._encode_text(messages)
        except ValueError as e:  # the processor refuses this conversation (e.g. PaliGemma: one answer only)
            raise BadRecord(rid, UNSUPPORTED_CONVERSATION, str(e)) from e
        cut = sample.truncated(self.max_length)
        if cut is None:
            raise BadRecord(rid, IMAGE_TRUNCATED, f"--max-length {self.max_length} cuts through an image "
                            f"({len(sample.input_ids)} tokens)")
        if not (cut.labels[1:] != IGNORE_INDEX).any():
            raise BadRecord(rid, NO_ASSISTANT_TOKENS, f"--max-length {self.max_length}")
        full = len(sample.input_ids) if cut is not sample else None
        return Encoded(rid, cut, list(prepared.record.images), pil, dict(prepared.meta), full_length=full,
                       messages=messages)

    # -- a causal LM's tokenizer (no images) -------------------------------------------------------
    def _render_text(self, messages: list[dict], generation_prompt: bool) -> tuple[str, list[tuple[int, int]]]:
        tok = self.tokenizer
        if self.template == "pretrain":  # BOS, the caption, a newline
            bos = tok.bos_token or ""
            if generation_prompt:
                return bos, []
            caption = next((m["content"] for m in reversed(messages) if m["role"] == "assistant"), "").strip()
            text = bos + caption + "\n"
            return text, [(len(bos), len(text))] if caption else []

        def render(ms: list[dict], gen: bool) -> str:
            return tok.apply_chat_template(ms, tokenize=False, add_generation_prompt=gen)

        if generation_prompt:
            return render(messages, True), []
        return processing.assistant_spans(render, messages)

    def _tokenize(self, text: str, spans: list[tuple[int, int]], messages: list[dict] | None = None) -> ProcessedSample:
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        labelled = np.zeros(len(ids), dtype=bool)
        for a, b in spans:  # a token overlapping a span belongs to it (one straddling its start included)
            labelled |= processing._tokens_in(offsets, a, b, np.ones(len(ids), dtype=bool))
        labels = np.where(labelled, ids, IGNORE_INDEX).astype(np.int64)
        t = torch.from_numpy(ids)[None]
        call = {"text": text, "add_special_tokens": False}
        regions = [] if not spans else ([(a, b - 1) for a, b in spans] if self.template == "pretrain"
                                        else processing.answer_regions(text, spans, messages or []))
        answers = processing.answer_token_spans(offsets, labelled, regions)
        return ProcessedSample(ids, labels, {"input_ids": t, "attention_mask": torch.ones_like(t)}, call=call,
                               answer_text=processing.answer_text(call, regions), answer_spans=answers)

    def _encode_text(self, messages: list[dict]) -> ProcessedSample:
        return self._tokenize(*self._render_text(messages, False), messages)

    # -- --generate --------------------------------------------------------------------------------
    def assistant_turns(self, prepared: Prepared) -> list[int]:
        """Indices of the turns a teacher answers when it generates the training targets."""
        conv = prepared.record.conversations
        idx = [i for i, t in enumerate(conv) if turn_role(t.get("from", "")) == "assistant"]
        return idx[-1:] if self.template == "pretrain" else idx

    def prompt(self, prepared: Prepared, turn: int) -> ProcessedSample:
        """The processor's encoding of everything before assistant turn ``turn`` plus the generation
        prompt, with the images that prompt refers to (those whose tags occur in it)."""
        conv = prepared.record.conversations[:turn]
        messages = _messages(conv)
        if not self.multimodal:
            return self._tokenize(*self._render_text(messages, True))
        n_img = (len(prepared.pil_images) if self.template == "pretrain"
                 else sum(str(t.get("value", "")).count("<image>") for t in conv))
        return processing.encode_prompt(self.processor, self.image_token_id, messages,
                                        prepared.pil_images[:n_img], template=self.template)
