"""Encode a conversation through the model's own processor, and collate encodings into a batch.

Each ``transformers`` processor knows how its family expands an image placeholder (wrapper tokens,
tile rows, per-image counts that depend on the image's size) and which extra inputs its model
takes; ``encode`` renders the conversation with the processor's chat template, calls the processor
once on that text and the images, and keeps everything it returns. On top it derives

* ``labels`` from the assistant spans of the rendered text (``labels[t]`` is the target of the
  logits at ``t - 1``, as in ``transformers``; ``IGNORE_INDEX`` = no loss). A token belongs to a
  span when its characters overlap it, so a token that straddles the start of an answer (a
  generation prompt ending in a space, ``ASSISTANT: ``, followed by `` Paris``) is labelled;
* ``visual_positions``: per image, the positions holding the model config's image token (the
  positions the model fills with that image's features) inside that image's expansion.

Both use the processor's own bookkeeping: ``return_offsets_mapping`` (token -> characters of the
expanded text) and ``return_text_replacement_offsets`` (each placeholder's span before and after
expansion), so nothing here re-implements an expansion. ``input_ids`` are the processor's ids for the
rendered text, bit for bit.

Families and what their processors return (transformers 5.24; the families are ``kd_cache.families``,
their tiny fixtures ``tests/vlm_families.py``, the per-family facts table ``docs/FAMILIES.md``):

=================  ====================================================================
family             model inputs besides input_ids / attention_mask
=================  ====================================================================
LLaVA, VipLLaVA    pixel_values [n_img, 3, H, W]
LLaVA-NeXT         pixel_values [n_img, n_tiles_max, 3, H, W], image_sizes [n_img, 2]
LLaVA-OneVision    as LLaVA-NeXT + batch_num_images [n_samples]
Qwen2/2.5/3-VL     pixel_values [sum_patches, C*T*P*P], image_grid_thw [n_img, 3],
                   mm_token_type_ids [1, L] (M-RoPE: without it the model falls back to 1-D positions)
Idefics3, SmolVLM  pixel_values [n_samples, n_tiles_max, 3, H, W], pixel_attention_mask [.., H, W]
Gemma3             pixel_values [n_img, 3, H, W], token_type_ids [1, L] (bidirectional image blocks)
PaliGemma          pixel_values, token_type_ids [1, L] (prefix-LM: 0 = prefix, 1 = suffix)
InternVL           pixel_values [sum_tiles, 3, H, W] (tiles of all images, in order)
Mistral3/Pixtral   pixel_values [n_img, 3, H_max, W_max] (zero-padded), image_sizes [n_img, 2]
=================  ====================================================================

``collate`` pads the per-token inputs (``TOKEN_INPUTS``) like ``input_ids`` (right; left for generation)
and concatenates every other input along its first axis, zero-padding the other axes to the batch's
largest (tiles per image, tiles per sample, Pixtral's image height/width): each model finds its real
tiles/pixels from ``image_sizes``, ``pixel_attention_mask`` or all-zero padding tiles.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kd_cache.schema import IGNORE_INDEX

IMAGE_TAG = "<image>"  # placeholder in the data's text; becomes an image part of a structured message
# Per-token model inputs and their padding value (None: the tokenizer's pad id).
TOKEN_INPUTS: dict[str, int | None] = {"input_ids": None, "attention_mask": 0, "token_type_ids": 0,
                                       "mm_token_type_ids": 0}
# Processor outputs that are bookkeeping, not model inputs.
NOT_MODEL_INPUTS = ("offset_mapping", "text_replacement_offsets", "labels")


@dataclass
class ProcessedSample:
    """One conversation encoded by a processor."""

    input_ids: np.ndarray  # int64 [L], exactly the processor's ids
    labels: np.ndarray  # int64 [L]; IGNORE_INDEX outside assistant spans and on image expansions
    inputs: dict[str, torch.Tensor]  # every model input the processor returned (per-token ones [1, L])
    visual_positions: list[np.ndarray] = field(default_factory=list)  # int64 [N_i] per image, in order
    image_spans: list[tuple[int, int]] = field(default_factory=list)  # token range [a, b) of each image's expansion
    # What the processor was called with besides the images: {"text": ..., **kwargs} (``add_special_tokens``,
    # PaliGemma's ``suffix``). ``process(processor, id, call, images)`` reproduces the encoding.
    call: dict[str, Any] = field(default_factory=dict)
    # The answers' own text (each assistant turn's content, stripped, concatenated; the caption; the
    # suffix) and, per token, the characters of it the token covers: int64 [L, 2], (-1, -1) for a token
    # that is not labelled or covers no answer character (an end-of-turn marker). The same answer text
    # on both sides of a teacher / student pair whatever their templates: what aligns their tokens.
    answer_text: str = ""
    answer_spans: np.ndarray | None = None

    @property
    def image_token_counts(self) -> list[int]:
        return [len(p) for p in self.visual_positions]

    def truncated(self, max_length: int) -> ProcessedSample | None:
        """The first ``max_length`` tokens (ids, labels, per-token inputs); None when the cut goes through
        an image's expansion (its features would no longer match its tokens)."""
        if len(self.input_ids) <= max_length:
            return self
        if any(b > max_length for _, b in self.image_spans):
            return None
        inputs = {k: v[:, :max_length] if k in TOKEN_INPUTS else v for k, v in self.inputs.items()}
        spans = None if self.answer_spans is None else self.answer_spans[:max_length]
        return ProcessedSample(self.input_ids[:max_length], self.labels[:max_length], inputs,
                               self.visual_positions, self.image_spans, self.call, self.answer_text, spans)


def config_image_token_id(config) -> int:
    """The id of the token the model replaces by image features (Gemma3: the soft token, not the
    ``<start_of_image>`` its processor names ``image_token``)."""
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise ValueError(f"{type(config).__name__} has neither image_token_id nor image_token_index: not an image-text model")


def is_prefix_lm(processor) -> bool:
    """PaliGemma-style processors take a prompt and a ``suffix`` (the answer) and mark the suffix in
    ``token_type_ids``; they have no chat template."""
    return "suffix" in inspect.signature(type(processor).__call__).parameters


def turn_role(src: str) -> str:
    """A record's turn source (human/user, gpt/assistant/model, system) as a chat-template role."""
    src = src.lower()
    if src in ("human", "user"):
        return "user"
    if src in ("gpt", "assistant", "model"):
        return "assistant"
    if src == "system":
        return "system"
    raise ValueError(f"unknown conversation role {src!r} (expected human/user, gpt/assistant or system)")


def _structured(messages: list[dict]) -> list[dict]:
    """``[{"role", "content": str with <image> tags}]`` -> processor messages with image parts."""
    out = []
    for m in messages:
        parts: list[dict] = []
        for j, chunk in enumerate(str(m["content"]).split(IMAGE_TAG)):
            if j:
                parts.append({"type": "image"})
            if chunk:
                parts.append({"type": "text", "text": chunk})
        out.append({"role": turn_role(m["role"]), "content": parts})
    return out


def answer_regions(text: str, spans: list[tuple[int, int]], messages: list[dict]) -> list[tuple[int, int]]:
    """Where each assistant turn's content (stripped) lies in ``text``, inside that turn's span: the
    answer text a template keeps as given. A template that changes it (rewrites, drops) raises."""
    answers = [str(m["content"]).strip() for m in messages if turn_role(m["role"]) == "assistant"]
    out = []
    for (a, b), content in zip(spans, answers):
        at = text.find(content, a, b)
        if at < 0:
            raise ValueError("the chat template does not render an answer's text as given (it is not found "
                             "inside its assistant turn), so its tokens cannot be located in the answer text")
        out.append((at, at + len(content)))
    return out


def render_chat(processor, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The chat-template text of a conversation and the character spans of its assistant turns.

    A span runs from the end of the generation prompt that precedes the turn to the end of the turn
    (its end-of-turn marker included), found by rendering prefixes of the conversation.
    """
    msgs = _structured(messages)

    def render(ms: list[dict], gen: bool) -> str:
        return processor.apply_chat_template(ms, tokenize=False, add_generation_prompt=gen)

    return assistant_spans(render, msgs)


def assistant_spans(render: Callable[[list[dict], bool], str], messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """``render(messages, add_generation_prompt)``'s text of the whole conversation and the character
    spans of its assistant turns, found by rendering prefixes (any prefix-stable chat template)."""
    full = render(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = render(messages[:i], True) if i else ""
        upto = render(messages[: i + 1], False)
        if not (full.startswith(upto) and upto.startswith(prefix)):
            raise ValueError(
                "the chat template is not prefix-stable (rendering the first turns does not give a prefix of "
                "the whole conversation), so assistant spans cannot be located; use a template that renders "
                "turns independently"
            )
        spans.append((len(prefix), len(upto)))
    return full, spans


def image_placeholder(processor) -> str:
    """What the processor's chat template renders for one image (e.g. Qwen's
    ``<|vision_start|><|image_pad|><|vision_end|>``, LLaVA's ``<image>\\n``)."""
    if getattr(processor, "chat_template", None) is None:
        return processor.image_token
    before, after = "\x00before\x00", "\x00after\x00"
    parts = [{"type": "text", "text": before}, {"type": "image"}, {"type": "text", "text": after}]
    text = processor.apply_chat_template([{"role": "user", "content": parts}], tokenize=False)
    return text[text.index(before) + len(before): text.index(after)]


def render_caption(processor, messages: list[dict], n_images: int) -> tuple[str, list[tuple[int, int]]]:
    """LLaVA's pre-training ("plain") text: the images, then the last assistant turn as a caption and
    a newline; the loss is on the caption."""
    caption = next((str(m["content"]) for m in reversed(messages) if turn_role(m["role"]) == "assistant"), "").strip()
    prefix = image_placeholder(processor) * n_images
    text = prefix + caption + "\n"
    return text, [(len(prefix), len(text))] if caption else []


def _shift(x: int, replacements: list[dict]) -> int:
    """A character offset of the text before placeholder expansion -> its offset after."""
    for r in replacements:
        (a, b), (na, nb) = r["span"], r["new_span"]
        if x >= b:
            x += (nb - na) - (b - a)
    return x


def _tokens_in(offsets: np.ndarray, a: int, b: int, candidates: np.ndarray) -> np.ndarray:
    """Mask of tokens whose characters overlap [a, b) (empty tokens never do)."""
    s, e = offsets[:, 0], offsets[:, 1]
    return candidates & (s < b) & (e > a) & (e > s)


def render(processor, messages: list[dict], n_images: int, *, template: str = "chat",
           generation_prompt: bool = False) -> tuple[dict[str, Any], list[tuple[int, int]], list[tuple[int, int]]]:
    """The processor call of a conversation (``{"text": ..., **kwargs}``), the character spans of its
    labelled text (assistant turns, or the caption) and of the answers' own text inside them
    (``answer_regions``; for a ``suffix`` call, characters of the suffix), before placeholder expansion.

    ``generation_prompt``: the prompt a model answers from (the conversation, then the generation
    prompt; no spans): the input of ``--generate``.
    """
    call: dict[str, Any] = {}
    if is_prefix_lm(processor):
        answers = [m for m in messages if turn_role(m["role"]) == "assistant"]
        if len(answers) != (0 if generation_prompt else 1):
            raise ValueError(f"{type(processor).__name__} takes one prompt and one answer; the conversation has "
                             f"{len(answers)} assistant turns")
        prompt = "\n".join(str(m["content"]).replace(IMAGE_TAG, "").strip() for m in messages
                           if turn_role(m["role"]) == "user")
        call["text"] = processor.image_token * n_images + prompt
        if generation_prompt:
            return call, [], []
        call["suffix"] = str(answers[0]["content"]).strip()
        return call, [], [(0, len(call["suffix"]))]
    if template == "chat":
        if getattr(processor, "chat_template", None) is None:
            raise ValueError(f"{type(processor).__name__} has no chat template: use --template pretrain, or a "
                             "processor that has one")
        if generation_prompt:
            text, spans = processor.apply_chat_template(_structured(messages), tokenize=False,
                                                        add_generation_prompt=True), []
        else:
            text, spans = render_chat(processor, messages)
        regions = answer_regions(text, spans, messages) if spans else []
        bos = processor.tokenizer.bos_token
        # As the processor's own apply_chat_template(tokenize=True): a template that writes BOS gets no second one.
        call["add_special_tokens"] = not (bos and text.startswith(bos))
    elif template == "pretrain":
        if generation_prompt:  # the images; the model writes the caption
            text, spans = image_placeholder(processor) * n_images, []
        else:
            text, spans = render_caption(processor, messages, n_images)
        regions = [(a, b - 1) for a, b in spans]  # the caption without its newline (no spans: no caption)
    else:
        raise ValueError(f"template {template!r}: expected chat or pretrain")
    call["text"] = text
    return call, spans, regions


def answer_token_spans(offsets: np.ndarray, labelled: np.ndarray, regions: list[tuple[int, int]],
                       shift: Callable[[int], int] = int) -> np.ndarray:
    """int64 [L, 2]: each labelled token's characters inside the answer regions (``render``'s, before
    expansion; ``shift`` maps them to the tokens' offsets), counted in the answers' concatenated text;
    (-1, -1) for the other tokens."""
    out = np.full((len(offsets), 2), -1, dtype=np.int64)
    base = 0
    for a, b in regions:
        lo, hi = shift(a), shift(b)
        s, e = np.clip(offsets[:, 0], lo, hi), np.clip(offsets[:, 1], lo, hi)
        inside = labelled & (e > s)
        out[inside, 0] = s[inside] - lo + base
        out[inside, 1] = e[inside] - lo + base
        base += b - a
    return out


def answer_text(call: dict[str, Any], regions: list[tuple[int, int]]) -> str:
    text = call["suffix"] if "suffix" in call else call["text"]
    return "".join(text[a:b] for a, b in regions)


def process(processor, image_token_id: int, call: dict[str, Any], images: list[Any] | None = None,
            spans: list[tuple[int, int]] = (), regions: list[tuple[int, int]] = ()) -> ProcessedSample:
    """Run the processor on ``call`` (``render``'s) and the images; ``spans`` (characters of the text before
    expansion) become the labels (PaliGemma: the suffix), ``regions`` (the answers' text inside them) the
    tokens' ``answer_spans``."""
    images = list(images or [])
    kwargs = {k: v for k, v in call.items() if k != "text"}
    out = processor(text=[call["text"]], images=[images] if images else None, return_tensors="pt",
                    return_offsets_mapping=True, return_text_replacement_offsets=True, **kwargs)
    ids = out["input_ids"][0].numpy().astype(np.int64)
    offsets = out["offset_mapping"][0].numpy()
    reported = out.get("text_replacement_offsets")  # a list per text, or an empty tensor (InternVL, no image)
    replacements = list(reported[0]) if reported is not None and len(reported) else []
    if len(replacements) != len(images):
        raise ValueError(f"{type(processor).__name__} reported {len(replacements)} expanded placeholders for "
                         f"{len(images)} images")
    first_seq = np.ones(len(ids), dtype=bool)
    if "suffix" in kwargs:  # offsets of the suffix tokens count from the suffix's own start
        first_seq = out["token_type_ids"][0].numpy() == 0

    visual, image_spans, expansion = [], [], np.zeros(len(ids), dtype=bool)
    for r in replacements:
        inside = _tokens_in(offsets, *r["new_span"], first_seq)
        expansion |= inside
        where = np.nonzero(inside)[0]
        image_spans.append((int(where[0]), int(where[-1]) + 1) if len(where) else (0, 0))
        visual.append(np.nonzero(inside & (ids == image_token_id))[0].astype(np.int64))

    labelled = np.zeros(len(ids), dtype=bool)
    if "suffix" in kwargs:
        labelled = ~first_seq
    for a, b in spans:
        labelled |= _tokens_in(offsets, _shift(a, replacements), _shift(b, replacements), first_seq)
    labels = np.where(labelled & ~expansion, ids, IGNORE_INDEX).astype(np.int64)
    kept = labels != IGNORE_INDEX
    answers = (answer_token_spans(offsets, kept, list(regions)) if "suffix" in kwargs else
               answer_token_spans(offsets, kept, list(regions), lambda x: _shift(x, replacements)))

    inputs = {k: v for k, v in out.items() if k not in NOT_MODEL_INPUTS and torch.is_tensor(v)}
    return ProcessedSample(ids, labels, inputs, visual, image_spans, dict(call), answer_text(call, regions), answers)


def model_inputs(processor, call: dict[str, Any], images: list[Any] | None = None) -> tuple[np.ndarray, dict]:
    """The processor's ids (int64 [L]) and model inputs for ``call`` (``ProcessedSample.call``) and the
    images, without the offset bookkeeping ``process`` asks for (labels and visual positions come from
    elsewhere, e.g. a cache). About 1 ms cheaper per LLaVA sample than ``process``."""
    images = list(images or [])
    kwargs = {k: v for k, v in call.items() if k != "text"}
    out = processor(text=[call["text"]], images=[images] if images else None, return_tensors="pt", **kwargs)
    ids = out["input_ids"][0].numpy().astype(np.int64)
    return ids, {k: v for k, v in out.items() if k not in NOT_MODEL_INPUTS and torch.is_tensor(v)}


def encode(processor, image_token_id: int, messages: list[dict], images: list[Any] | None = None, *,
           template: str = "chat") -> ProcessedSample:
    """Encode one conversation (``[{"role", "content"}]``, ``<image>`` tags in the content, images in
    tag order) with ``processor``; ``image_token_id`` is the model config's (``config_image_token_id``).

    ``template``: ``chat`` renders the processor's chat template, labels on every assistant turn;
    ``pretrain`` is image(s) + caption (the last assistant turn), labels on the caption. A processor
    that takes a ``suffix`` (PaliGemma) gets the user text as its prompt and the single answer as the
    suffix, labels on the suffix, whatever the template.
    """
    images = list(images or [])
    tags = sum(str(m["content"]).count(IMAGE_TAG) for m in messages)
    if template == "chat" and not is_prefix_lm(processor) and tags != len(images):
        raise ValueError(f"{tags} {IMAGE_TAG} tags in the conversation, {len(images)} images")
    call, spans, regions = render(processor, messages, len(images), template=template)
    return process(processor, image_token_id, call, images, spans, regions)


def encode_prompt(processor, image_token_id: int, messages: list[dict], images: list[Any] | None = None, *,
                  template: str = "chat") -> ProcessedSample:
    """The prompt a model answers ``messages`` from (``render(generation_prompt=True)``), processed."""
    images = list(images or [])
    call, _, _ = render(processor, messages, len(images), template=template, generation_prompt=True)
    return process(processor, image_token_id, call, images)


def _pad_to(t: torch.Tensor, shape: tuple[int, ...], value: float = 0) -> torch.Tensor:
    if tuple(t.shape) == shape:
        return t
    out = t.new_full(shape, value)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


def collate(samples: list[ProcessedSample], pad_token_id: int, *, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Model inputs of a batch: per-token inputs padded to the longest sample (``padding_side``; left for
    generation), every other input concatenated along its first axis over the samples that have it, its
    other axes zero-padded to the batch's largest.

    A sample without an image input (text only) adds nothing to it: the models take image inputs for
    the images of the batch, in order. A per-token input a sample lacks is its padding value there.
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side {padding_side!r}: expected right or left")
    names = list(dict.fromkeys(k for s in samples for k in s.inputs))
    length = max(len(s.input_ids) for s in samples)
    batch: dict[str, torch.Tensor] = {}
    for name in names:
        if name in TOKEN_INPUTS:
            value = pad_token_id if TOKEN_INPUTS[name] is None else TOKEN_INPUTS[name]
            out = torch.full((len(samples), length), value, dtype=torch.long)
            for i, s in enumerate(samples):
                t = s.inputs.get(name)
                if t is None:
                    continue
                n = t.shape[1]
                if padding_side == "left":
                    out[i, length - n:] = t[0]
                else:
                    out[i, :n] = t[0]
            batch[name] = out.to(next(s.inputs[name].dtype for s in samples if name in s.inputs))
        else:
            tensors = [s.inputs[name] for s in samples if name in s.inputs]
            rest = tuple(max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim()))
            batch[name] = torch.cat([_pad_to(t, (t.shape[0], *rest)) for t in tensors])
    return batch
