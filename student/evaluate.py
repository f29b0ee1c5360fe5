"""``kd-eval``: how good is a student, and how close to its teacher.

Two independent measurements of a saved ``LlavaForConditionalGeneration`` (+ processor):

* ``evaluate_qa`` (``--data``): exact-match accuracy of greedy-generated answers on LLaVA-format QA
  data. Every assistant turn is one question: the prompt is the conversation up to that turn (earlier
  answers are the reference ones), tokenised by the *same* ``kd_cache.encoding.Encoder`` that built the
  training caches, so the model sees exactly the token layout it was trained on. A generated answer
  counts as correct when it equals the reference after normalisation (case, surrounding whitespace,
  trailing ``.``). Records with an ``options`` list also get a multiple-choice score for their last
  assistant turn: the option with the highest log-likelihood (its tokens plus the end-of-turn token)
  is the model's choice, the way lm-eval-harness scores multiple choice; the reference answer is an
  option's text or its letter (``A``, ``B``, ...).
* ``evaluate_cache`` (``--cache``): forward KL to the teacher and top-1 agreement at a cache's
  response positions (and visual positions, reported separately), against the teacher's stored
  sparse distributions, with ``student.losses.sparse_divergence``: the coarsened KL over the stored
  k ids plus one tail bin (the KL training minimises), which equals the full-vocabulary KL when k
  covers the vocabulary. For a sampled cache it is the unbiased sampled estimate. Top-1 agreement
  compares the model's argmax with the teacher's most likely stored id.
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kd_cache.encoding import Encoder
from kd_cache.processing import turn_role
from kd_cache.records import BadRecord, Record, load_records, resolve_image_folder
from kd_cache.runtime import resolve_device, resolve_dtype
from kd_cache.schema import DEFAULT_KINDS, IGNORE_INDEX
from student.distill import teacher_arrays
from student.losses import ce_reference, sparse_divergence, teacher_row_mask


def load_model(path: str | Path, device: str | torch.device = "auto", dtype: str = "auto"):
    """``(model, processor)`` from a saved LLaVA checkpoint, in eval mode on ``device``."""
    from student.model import load_student

    device = resolve_device(device)
    model, processor = load_student(path, dtype=resolve_dtype(dtype, device))
    model.to(device).eval()
    model.requires_grad_(False)
    return model, processor


def normalise_answer(text: str) -> str:
    """Exact-match normalisation: lower case, single spaces, no surrounding whitespace or trailing period."""
    text = " ".join(str(text).lower().split())
    return text.rstrip(".").strip()


# ------------------------------------------------------------------------------------------ QA items


@dataclass
class QAItem:
    """One assistant turn to answer: the prompt tokens (up to the assistant header) and the reference."""

    record_id: str
    turn: int
    prompt_ids: np.ndarray  # int64 [L]
    images: list[Any]  # PIL images in placeholder order
    answer: str
    options: list[str] | None = None
    option_ids: list[np.ndarray] = field(default_factory=list)  # tokens of each option's answer block
    correct_option: int | None = None


def _last_block(labels: np.ndarray) -> int:
    """Start index of the last contiguous labelled run (the final assistant turn's tokens)."""
    labelled = labels != IGNORE_INDEX
    idx = np.nonzero(labelled)[0]
    if len(idx) == 0:
        raise ValueError("no labelled tokens")
    j = idx[-1]
    while j > 0 and labelled[j - 1]:
        j -= 1
    return int(j)


def _option_index(answer: str, options: list[str]) -> int | None:
    norm = [normalise_answer(o) for o in options]
    a = normalise_answer(answer)
    if a in norm:
        return norm.index(a)
    letter = a.strip("()").upper()
    if len(letter) == 1 and letter in string.ascii_uppercase and string.ascii_uppercase.index(letter) < len(options):
        return string.ascii_uppercase.index(letter)
    return None


def build_items(records: list[Record], encoder: Encoder, raw_options: dict[str, list[str]] | None = None,
                strict: bool = False) -> tuple[list[QAItem], list[dict]]:
    """Turn records into one ``QAItem`` per assistant turn; returns ``(items, skipped)``.

    A turn's prompt is obtained by encoding the conversation up to and including that turn and cutting
    at the start of its labelled tokens, so prompt and training tokenisation cannot drift apart.
    """
    items, skipped = [], []
    for rec in records:
        turns = [t for t in rec.conversations if str(t.get("value", "")).strip() or turn_role(t.get("from", "")) == "system"]
        answer_turns = [i for i, t in enumerate(turns) if turn_role(t.get("from", "")) == "assistant"]
        options = (raw_options or {}).get(rec.id)
        try:
            for n, i in enumerate(answer_turns):
                sub = Record(rec.id, turns[: i + 1], rec.images)
                enc = encoder.encode(sub)
                start = _last_block(enc.labels)
                item = QAItem(rec.id, n, enc.input_ids[:start].astype(np.int64), enc.pil_images,
                              str(turns[i].get("value", "")))
                if options and i == answer_turns[-1]:
                    item.options = [str(o) for o in options]
                    item.correct_option = _option_index(item.answer, item.options)
                    if item.correct_option is None:
                        raise BadRecord(rec.id, "answer_not_in_options",
                                        f"answer {item.answer!r} is neither an option nor an option letter")
                    for opt in item.options:
                        alt = Record(rec.id, [*turns[:i], {"from": "gpt", "value": opt}], rec.images)
                        e = encoder.encode(alt)
                        s = _last_block(e.labels)
                        if not np.array_equal(e.input_ids[:s], enc.input_ids[:start]):
                            raise ValueError(f"record {rec.id!r}: option {opt!r} changes the prompt tokens")
                        item.option_ids.append(e.input_ids[s:].astype(np.int64))
                items.append(item)
        except BadRecord as e:
            if strict:
                raise
            skipped.append({"id": e.record_id, "reason": e.reason, "detail": e.detail})
    return items, skipped


def _raw_options(data: str) -> dict[str, list[str]]:
    """``id -> options`` for the records of a JSON/JSONL file that carry an ``options`` list."""
    import json

    p = Path(data)
    if p.suffix.lower() == ".json":
        rows = json.loads(p.read_text())
    elif p.suffix.lower() == ".jsonl":
        rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    else:
        import datasets

        ds = datasets.load_from_disk(str(p)) if p.is_dir() else datasets.load_dataset(
            "parquet", data_files=str(p), split="train")
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"]
        rows = list(ds) if "options" in ds.column_names else []
    return {str(r.get("id", i)): list(r["options"]) for i, r in enumerate(rows) if r.get("options")}


# ---------------------------------------------------------------------------------------- generation


def _left_pad(seqs: list[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, T - len(s):] = torch.from_numpy(s)
        mask[b, T - len(s):] = 1
    return ids, mask


def _pixels(processor, images: list, device, dtype) -> dict[str, torch.Tensor]:
    if not images:
        return {}
    px = processor.image_processor(images=images, return_tensors="pt")
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device))
            for k, v in px.items() if torch.is_tensor(v)}


def _batches(items: list[QAItem], batch_size: int):
    """Consecutive items with the same number of images (a batch's images must line up with its rows)."""
    batch: list[QAItem] = []
    for it in items:
        if batch and (len(batch) == batch_size or len(batch[0].images) != len(it.images)):
            yield batch
            batch = []
        batch.append(it)
    if batch:
        yield batch


@torch.no_grad()
def generate_answers(model, processor, items: list[QAItem], *, batch_size: int = 16,
                     max_new_tokens: int = 16) -> list[str]:
    """Greedy answers (decoded, special tokens removed) for each item, batched with left padding."""
    tok = processor.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    device, dtype = model.device, model.dtype
    out: list[str] = []
    for batch in _batches(items, batch_size):
        ids, mask = _left_pad([it.prompt_ids for it in batch], pad)
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             **_pixels(processor, [im for it in batch for im in it.images], device, dtype),
                             max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             eos_token_id=tok.eos_token_id, pad_token_id=pad)
        new = gen[:, ids.shape[1]:]
        out.extend(tok.decode(row, skip_special_tokens=True).strip() for row in new.tolist())
    return out


def _option_tokens(item: QAItem, eos: int | None) -> list[np.ndarray]:
    """Each option's scored tokens: its answer block up to and including the end-of-turn token."""
    out = []
    for opt in item.option_ids:
        hits = np.nonzero(opt == eos)[0] if eos is not None else []
        # The newline after <|im_end|> belongs to the template, not to the answer.
        out.append(opt[: int(hits[0]) + 1] if len(hits) else opt)
    return out


@torch.no_grad()
def option_scores(model, processor, items: list[QAItem], *, batch_size: int = 16,
                  chunk_size: int = 1024) -> dict[int, list[float]]:
    """``item index -> log-likelihood of each option`` for the items that have options.

    All (item, option) sequences are scored in right-padded batches; the LM head is applied only at
    the positions that predict an option token, so no [batch, seq, vocab] logits are formed.
    """
    tok = processor.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    head = model.get_output_embeddings().weight
    entries = []  # (item index, sequence, first scored position, images)
    for k, it in enumerate(items):
        for opt in _option_tokens(it, tok.eos_token_id) if it.options else []:
            entries.append((k, np.concatenate([it.prompt_ids, opt]), len(it.prompt_ids), it.images))
    scores: dict[int, list[float]] = {}
    i = 0
    while i < len(entries):
        n_img = len(entries[i][3])
        batch = [entries[i]]
        while i + len(batch) < len(entries) and len(batch) < batch_size and len(entries[i + len(batch)][3]) == n_img:
            batch.append(entries[i + len(batch)])
        i += len(batch)
        T = max(len(e[1]) for e in batch)
        ids = torch.full((len(batch), T), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        index, targets, rows = [], [], []
        for b, (_, seq, a, _) in enumerate(batch):
            ids[b, : len(seq)], mask[b, : len(seq)] = torch.from_numpy(seq), 1
            pos = np.arange(a - 1, len(seq) - 1)  # logits at t predict token t + 1
            index.append(b * T + pos)
            targets.append(seq[pos + 1])
            rows.append(np.full(len(pos), b))
        out = model.model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                          **_pixels(processor, [im for e in batch for im in e[3]], model.device, model.dtype),
                          use_cache=False)
        flat = out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])
        index_t = torch.from_numpy(np.concatenate(index)).to(model.device)
        target_t = torch.from_numpy(np.concatenate(targets)).to(model.device)
        row_t = torch.from_numpy(np.concatenate(rows)).to(model.device)
        total = torch.zeros(len(batch), dtype=torch.float64, device=model.device)
        for c in range(0, len(index_t), chunk_size):
            sl = slice(c, c + chunk_size)
            logp = (flat[index_t[sl]] @ head.T).float().log_softmax(-1)
            total.index_add_(0, row_t[sl], logp.gather(-1, target_t[sl, None])[:, 0].double())
        for b, e in enumerate(batch):
            scores.setdefault(e[0], []).append(float(total[b]))
    return scores


def evaluate_qa(model_path: str | Path, data: str, image_folder: str | None = None, *, batch_size: int = 16,
                max_new_tokens: int = 16, limit: int | None = None, max_length: int = 2048,
                device: str = "auto", dtype: str = "auto", strict: bool = False, model=None,
                processor=None) -> dict[str, Any]:
    """Exact-match (and multiple-choice) accuracy of ``model_path`` on LLaVA-format QA ``data``.

    Returns ``accuracy`` (over assistant turns), ``correct``, ``questions``, ``records``,
    ``mc_accuracy``/``mc_questions`` (None/0 without ``options``), ``skipped`` and ``predictions``
    (one dict per question: id, turn, answer, prediction, correct[, choice]).
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"--batch-size and --max-new-tokens must be >= 1, got {batch_size} and {max_new_tokens}")
    if model is None:
        model, processor = load_model(model_path, device, dtype)
    records = load_records(data)
    if limit is not None:
        records = records[:limit]
    if not records:
        raise ValueError(f"--data {data}: no records")
    from kd_cache.processing import config_image_token_id

    image_token_id = config_image_token_id(model.config) if getattr(processor, "image_processor", None) else None
    encoder = Encoder(processor, "chat", max_length, resolve_image_folder(image_folder), image_token_id)
    items, skipped = build_items(records, encoder, _raw_options(data), strict=strict)
    if not items:
        raise ValueError(f"--data {data}: no usable question (skipped: {skipped[:3]})")
    answers = generate_answers(model, processor, items, batch_size=batch_size, max_new_tokens=max_new_tokens)
    scores = option_scores(model, processor, items, batch_size=batch_size)
    preds, correct, mc_total, mc_correct = [], 0, 0, 0
    for k, (it, pred) in enumerate(zip(items, answers)):
        ok = normalise_answer(pred) == normalise_answer(it.answer)
        correct += ok
        row = {"id": it.record_id, "turn": it.turn, "answer": it.answer, "prediction": pred, "correct": bool(ok)}
        if it.options:
            choice = int(np.argmax(scores[k]))
            row.update(choice=it.options[choice], choice_correct=choice == it.correct_option)
            mc_total += 1
            mc_correct += choice == it.correct_option
        preds.append(row)
    return {
        "accuracy": correct / len(items),
        "correct": correct,
        "questions": len(items),
        "records": len(records) - len(skipped),
        "mc_accuracy": mc_correct / mc_total if mc_total else None,
        "mc_questions": mc_total,
        "skipped": skipped,
        "predictions": preds,
    }


# ------------------------------------------------------------------------------------- cache metrics


@torch.no_grad()
def evaluate_cache(model_path: str | Path, cache: str, *, image_folder: str | None = None, batch_size: int = 8,
                   chunk_size: int = 1024, device: str = "auto", dtype: str = "auto",
                   storage_options: dict | None = None, model=None, processor=None) -> dict[str, Any]:
    """KL(teacher || model) and top-1 agreement at the cache's response (and visual) positions.

    Returns ``kl_to_teacher`` and ``top1_agreement`` (response positions), ``ce`` (the model's
    cross-entropy on the cached reference tokens), ``positions``, and ``kl_visual``/``top1_visual``/
    ``visual_positions`` (None/0 for a text-only cache), plus ``samples`` and ``sparse`` (the cache's
    sparse mode and k).
    """
    from kd_cache.reader import open_cache
    from student.model import check_compatibility
    from student.stream import StreamingKDDataset

    if model is None:
        model, processor = load_model(model_path, device, dtype)
    kd = open_cache(cache, storage_options)
    manifest = kd.manifest
    check_compatibility(manifest, model, processor)
    if len(kd) == 0:
        raise ValueError(f"--cache {cache}: the cache holds no samples")
    ds = StreamingKDDataset(kd, processor, image_folder=image_folder, batch_size=batch_size, shuffle=False,
                            with_teacher=True)
    head = model.get_output_embeddings().weight
    dev = model.device
    sums = {k: {"kl": 0.0, "agree": 0.0, "n": 0.0} for k in DEFAULT_KINDS}
    ce_sum = ce_n = 0.0
    for batch in ds:
        inputs = {k: v.to(dev, model.dtype) if v.is_floating_point() else v.to(dev)
                  for k, v in batch["model_inputs"].items()}
        out = model.model(**inputs, use_cache=False)
        flat = out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])
        for kind in DEFAULT_KINDS:  # response (the headline numbers) and visual
            if f"{kind}_ids" not in batch:
                continue
            index = batch[f"{kind}_index"].to(dev)
            for a in range(0, len(index), chunk_size):  # never the logits of every position at once
                sl = slice(a, a + chunk_size)
                logits = (flat[index[sl]] @ head.T).float()
                got = teacher_arrays(batch, kind)[sl].to(dev)
                ids, lps = got.ids, got.logprobs
                kl = sparse_divergence(logits, ids, lps, got.tail, mode="tail", counts=got.counts,
                                       logp_mean=got.logp_mean)
                rows = teacher_row_mask(ids)
                # the teacher's most likely stored id (sample mode without log-probs: the most drawn one)
                score = (lps if lps is not None else got.counts).float().masked_fill(ids < 0, -math.inf)
                teacher_top = ids.gather(-1, score.argmax(-1, keepdim=True))[:, 0]
                agree = (logits.argmax(-1) == teacher_top) & rows
                sums[kind]["kl"] += float(kl.sum())
                sums[kind]["agree"] += float(agree.sum())
                sums[kind]["n"] += float(rows.sum())
                if kind == "response":
                    ce, n = ce_reference(logits, batch["response_targets"][sl].to(dev))
                    ce_sum, ce_n = ce_sum + float(ce), ce_n + float(n)

    def mean(kind, key):
        n = sums[kind]["n"]
        return sums[kind][key] / n if n else None

    return {
        "kl_to_teacher": mean("response", "kl"),
        "top1_agreement": mean("response", "agree"),
        "ce": ce_sum / ce_n if ce_n else None,
        "positions": int(sums["response"]["n"]),
        "kl_visual": mean("visual", "kl"),
        "top1_visual": mean("visual", "agree"),
        "visual_positions": int(sums["visual"]["n"]),
        "samples": len(kd),
        "sparse": {"mode": manifest.sparse.mode, "k": manifest.sparse.k},
    }


def format_table(rows: dict[str, dict], columns: list[tuple[str, str, str]]) -> str:
    """A plain-text table: ``rows`` name -> metrics, ``columns`` (key, header, format)."""
    head = ["model", *[h for _, h, _ in columns]]
    body = []
    for name, m in rows.items():
        cells = [name]
        for key, _, fmt in columns:
            v = m.get(key)
            cells.append("-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt))
        body.append(cells)
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(head), sep, *[line(r) for r in body]])

