"""``kd-eval``: how good is a student, and how close to its teacher.

Two independent measurements of a saved image-text-to-text model of any supported family
(``kd_cache.families.FAMILIES``; loaded with ``student.model.load_student``) and its processor:

* ``evaluate_qa`` (``--data``): exact-match accuracy of greedy-generated answers on LLaVA-format QA
  data. Every assistant turn is one question: the prompt is the conversation up to that turn (earlier
  answers are the reference ones) plus the generation prompt, encoded through the model's own
  processor (``kd_cache.processing.encode_prompt`` via ``Encoder.prompt``, as ``--generate`` does), so
  the model gets exactly the ids and inputs its processor makes (image wrappers and tiles, Qwen's
  ``image_grid_thw``/``mm_token_type_ids``, Idefics3's ``pixel_attention_mask``, Gemma3/PaliGemma's
  ``token_type_ids``, ``image_sizes``, ...). Prompts are batched with ``processing.collate`` and left
  padding, and every collated input goes to ``model.generate``. Generation stops at the tokenizer's EOS
  or the generation config's EOS ids. A generated answer counts as correct when it equals the
  reference after normalisation (case, surrounding whitespace, trailing ``.``). Records with an
  ``options`` list also get a multiple-choice score for their last assistant turn: each option is
  encoded as that turn's answer (``processing.encode``, as for training), and the option whose tokens
  (the turn's labelled tokens up to and including its first stop token) have the highest summed
  log-likelihood is the model's choice, the way lm-eval-harness scores multiple choice; the reference
  answer is an option's text or its letter (``A``, ``B``, ...).
* ``evaluate_cache`` (``--cache``): forward KL to the teacher and top-1 agreement at a cache's
  response positions (and visual positions, reported separately), against the teacher's stored
  sparse distributions, with ``student.losses.sparse_divergence``: the coarsened KL over the stored
  k ids plus one tail bin (the KL training minimises), which equals the full-vocabulary KL when k
  covers the vocabulary. For a sampled cache it is the unbiased sampled estimate. Top-1 agreement
  compares the model's argmax with the teacher's most likely stored id (in sample mode without
  log-probs, the most drawn one). The model runs on the stream's ``model_inputs`` (its own
  processor's inputs for each cached sample). ``cache_agreement`` measures all this per sample
  (sums and counts), which is also what kd-demo's verdict reads per question.
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kd_cache.encoding import Encoder, Prepared
from kd_cache.processing import IMAGE_TAG, ProcessedSample, collate, config_image_token_id, turn_role
from kd_cache.records import NO_ASSISTANT_TOKENS, BadRecord, Record, load_records, resolve_image_folder
from kd_cache.runtime import resolve_device, resolve_dtype
from kd_cache.schema import DEFAULT_KINDS, IGNORE_INDEX, SparseInfo
from student.distill import teacher_arrays
from student.losses import SparseTeacher, sparse_divergence, teacher_row_mask


def load_model(path: str | Path, device: str | torch.device = "auto", dtype: str = "auto"):
    """``(model, processor)`` of a saved student of any supported family (``student.model.load_student``),
    in eval mode on ``device``."""
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
    """One assistant turn to answer: the processor's encoding of the prompt (the conversation before
    the turn plus the generation prompt, with the images it refers to) and the reference answer."""

    record_id: str
    turn: int
    prompt: ProcessedSample  # ids and every model input, as the processor gives them for this prompt
    answer: str
    options: list[str] | None = None
    # Each option as the answer of the turn, encoded (the conversation up to it, then the option) ...
    option_samples: list[ProcessedSample] = field(default_factory=list)
    # ... and the positions whose tokens are scored (labels[t] is predicted by the logits at t - 1).
    option_positions: list[np.ndarray] = field(default_factory=list)
    correct_option: int | None = None

    @property
    def prompt_ids(self) -> np.ndarray:
        return self.prompt.input_ids


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


def stop_token_ids(model, tokenizer) -> list[int]:
    """The ids that end an answer: the tokenizer's EOS and the model's generation-config EOS ids (a chat
    model may end its turn with a token other than the tokenizer's EOS, e.g. Gemma's ``<end_of_turn>``)."""
    ids = [tokenizer.eos_token_id]
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += list(gen) if isinstance(gen, (list, tuple)) else [gen]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def scored_positions(labels: np.ndarray, stop_ids: list[int]) -> np.ndarray:
    """Positions of an option's scored tokens: the last labelled block (the answer turn) up to and including
    its first stop token; what the template writes after it (ChatML's newline) is not the answer's."""
    start = _last_block(labels)
    end = start
    while end < len(labels) and labels[end] != IGNORE_INDEX:
        end += 1
    block = labels[start:end]
    hits = np.nonzero(np.isin(block, stop_ids))[0]
    return np.arange(start, start + (int(hits[0]) + 1 if len(hits) else len(block)), dtype=np.int64)


def _option_index(answer: str, options: list[str]) -> int | None:
    norm = [normalise_answer(o) for o in options]
    a = normalise_answer(answer)
    if a in norm:
        return norm.index(a)
    letter = a.strip("()").upper()
    if len(letter) == 1 and letter in string.ascii_uppercase and string.ascii_uppercase.index(letter) < len(options):
        return string.ascii_uppercase.index(letter)
    return None


def _upto(prepared: Prepared, conv: list[dict]) -> Prepared:
    """The part of a prepared record with conversation ``conv`` (a prefix of it): the images its tags refer to."""
    rec = prepared.record
    n_img = sum(str(t.get("value", "")).count(IMAGE_TAG) for t in conv)
    return Prepared(Record(rec.id, conv, rec.images[:n_img]), prepared.pil_images[:n_img])


def build_items(records: list[Record], encoder: Encoder, raw_options: dict[str, list[str]] | None = None,
                strict: bool = False, stop_ids: list[int] | None = None) -> tuple[list[QAItem], list[dict]]:
    """Turn records into one ``QAItem`` per assistant turn; returns ``(items, skipped)``.

    A turn's prompt is ``Encoder.prompt`` (``kd_cache.processing.encode_prompt``: the processor's own
    chat template with the generation prompt, the processor's ids and model inputs), the way the
    teacher answers with ``--generate``. The conversation up to and including the turn is encoded too,
    as for training, so a record that ``--max-length`` would cut is skipped with the same reason.
    ``stop_ids`` (default: the tokenizer's EOS) end an option's scored tokens (``scored_positions``).
    """
    if stop_ids is None:
        eos = encoder.tokenizer.eos_token_id
        stop_ids = [] if eos is None else [int(eos)]
    items, skipped = [], []
    for rec in records:
        options = (raw_options or {}).get(rec.id)
        try:
            prepared = encoder.prepare(rec)
            turns = prepared.record.conversations
            answer_turns = [i for i, t in enumerate(turns) if turn_role(t.get("from", "")) == "assistant"]
            for n, i in enumerate(answer_turns):
                encoder.encode_prepared(_upto(prepared, turns[: i + 1]))  # refuses what --max-length cuts
                prompt = encoder.prompt(_upto(prepared, turns[:i]), i)
                if len(prompt.input_ids) > encoder.max_length:
                    raise BadRecord(rec.id, NO_ASSISTANT_TOKENS, f"--max-length {encoder.max_length}: the prompt "
                                    f"of turn {n} has {len(prompt.input_ids)} tokens")
                item = QAItem(rec.id, n, prompt, str(turns[i].get("value", "")))
                if options and i == answer_turns[-1]:
                    item.options = [str(o) for o in options]
                    item.correct_option = _option_index(item.answer, item.options)
                    if item.correct_option is None:
                        raise BadRecord(rec.id, "answer_not_in_options",
                                        f"answer {item.answer!r} is neither an option nor an option letter")
                    for opt in item.options:
                        conv = [*turns[:i], {**turns[i], "value": opt}]
                        sample = encoder.encode_prepared(_upto(prepared, conv)).processed
                        item.option_samples.append(sample)
                        item.option_positions.append(scored_positions(sample.labels, stop_ids))
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


def _pad_id(tok) -> int:
    if tok.pad_token_id is not None:
        return int(tok.pad_token_id)
    return int(tok.eos_token_id) if tok.eos_token_id is not None else 0


def _on(model, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Model inputs on the model's device, floating ones (pixels) in its dtype."""
    return {k: v.to(model.device, model.dtype) if v.is_floating_point() else v.to(model.device)
            for k, v in inputs.items()}


def _chunks(seq: list, size: int):
    for a in range(0, len(seq), size):
        yield seq[a: a + size]


@torch.no_grad()
def generate_ids(model, processor, items: list[QAItem], *, batch_size: int = 16,
                 max_new_tokens: int = 16) -> list[list[int]]:
    """Greedy answer tokens for each item (up to and including the first stop token), in batches of the
    items' prompts collated with left padding (``kd_cache.processing.collate``: every model input the
    processor returned for each prompt, so each family gets its own image and per-token inputs)."""
    pad = _pad_id(processor.tokenizer)
    stop = stop_token_ids(model, processor.tokenizer)
    out: list[list[int]] = []
    for batch in _chunks(items, batch_size):
        inputs = _on(model, collate([it.prompt for it in batch], pad, padding_side="left"))
        gen = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             temperature=None, top_p=None, top_k=None, eos_token_id=stop, pad_token_id=pad)
        for row in gen[:, inputs["input_ids"].shape[1]:].tolist():
            end = next((j + 1 for j, t in enumerate(row) if t in stop), len(row))  # then only padding
            out.append(row[:end])
    return out


def generate_answers(model, processor, items: list[QAItem], *, batch_size: int = 16,
                     max_new_tokens: int = 16) -> list[str]:
    """Greedy answers (``generate_ids``, decoded, special tokens removed, stripped) for each item."""
    tok = processor.tokenizer
    return [tok.decode(row, skip_special_tokens=True).strip()
            for row in generate_ids(model, processor, items, batch_size=batch_size, max_new_tokens=max_new_tokens)]


@torch.no_grad()
def option_scores(model, processor, items: list[QAItem], *, batch_size: int = 16,
                  chunk_size: int = 1024) -> dict[int, list[float]]:
    """``item index -> log-likelihood of each option`` for the items that have options.

    Each (item, option) encoding (every model input its processor returned) is scored in right-padded
    batches (``collate``); the LM head (and the text config's logit softcapping, if any) is applied only
    at the positions that predict a scored token, so no [batch, seq, vocab] logits are formed.
    """
    pad = _pad_id(processor.tokenizer)
    head = model.get_output_embeddings()
    softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    entries = [(k, s, pos) for k, it in enumerate(items) if it.options
               for s, pos in zip(it.option_samples, it.option_positions)]
    scores: dict[int, list[float]] = {}
    for batch in _chunks(entries, batch_size):
        inputs = _on(model, collate([s for _, s, _ in batch], pad))
        T = inputs["input_ids"].shape[1]
        index = np.concatenate([b * T + pos - 1 for b, (_, _, pos) in enumerate(batch)])  # logits at t-1 predict t
        targets = np.concatenate([s.input_ids[pos] for _, s, pos in batch])
        rows = np.concatenate([np.full(len(pos), b) for b, (_, _, pos) in enumerate(batch)])
        out = model.model(**inputs, use_cache=False)
        flat = out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])
        index_t, target_t, row_t = (torch.from_numpy(a).to(model.device) for a in (index, targets, rows))
        total = torch.zeros(len(batch), dtype=torch.float64, device=model.device)
        for c in range(0, len(index_t), chunk_size):
            sl = slice(c, c + chunk_size)
            z = head(flat[index_t[sl]]).float()
            if softcap is not None:
                z = torch.tanh(z / softcap) * softcap
            logp = z.log_softmax(-1)
            total.index_add_(0, row_t[sl], logp.gather(-1, target_t[sl, None])[:, 0].double())
        for b, (k, _, _) in enumerate(batch):
            scores.setdefault(k, []).append(float(total[b]))
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
    image_token_id = config_image_token_id(model.config) if getattr(processor, "image_processor", None) else None
    encoder = Encoder(processor, "chat", max_length, resolve_image_folder(image_folder), image_token_id)
    items, skipped = build_items(records, encoder, _raw_options(data), strict=strict,
                                 stop_ids=stop_token_ids(model, processor.tokenizer))
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


@dataclass
class CacheAgreement:
    """How close a model is to the teacher of a cache, per sample in cache order (``cache_agreement``).

    ``ids`` [n] the sample ids. For each kind of ``DEFAULT_KINDS`` (response, visual), at the sample's
    positions of that kind that store teacher ids: ``kl[kind]`` float64 [n] the sum of KL(teacher || model)
    (``student.losses.sparse_divergence``, tail mode), ``positions[kind]`` int64 [n] how many there are,
    ``agree[kind]`` int64 [n] at how many the model's argmax is the teacher's most likely stored id.
    ``ce`` float64 [n] / ``ce_tokens`` int64 [n]: the sum of the model's cross-entropy on the cached
    reference tokens at the response positions, and how many tokens.
    """

    ids: list[str]
    kl: dict[str, np.ndarray]
    positions: dict[str, np.ndarray]
    agree: dict[str, np.ndarray]
    ce: np.ndarray
    ce_tokens: np.ndarray
    sparse: SparseInfo  # the cache's sparse mode and k
    # ``aligned_cache_agreement``: the model's answer positions in one-to-one groups with the teacher's, and
    # in all (int64 [n]; equal when the model has the cache's own tokens)
    one_to_one: np.ndarray | None = None
    answer_positions: np.ndarray | None = None


def teacher_top1(teacher: SparseTeacher) -> torch.Tensor:
    """[P] the teacher's most likely stored id of each row: the highest stored log-prob, or in sample mode
    without log-probs the most drawn id (-1 where nothing is stored)."""
    ids = teacher.ids
    score = (teacher.logprobs if teacher.logprobs is not None else teacher.counts).float()
    return ids.gather(-1, score.masked_fill(ids < 0, -math.inf).argmax(-1, keepdim=True))[:, 0]


@torch.no_grad()
def cache_agreement(model, processor, cache: str | Path, *, image_folder: str | None = None, batch_size: int = 8,
                    chunk_size: int = 1024, storage_options: dict | None = None) -> CacheAgreement:
    """Run ``model`` over every sample of ``cache`` (any sparse mode) and compare its next-token
    distributions with the cached teacher's at the response and visual positions, per sample.

    The model runs on the stream's ``model_inputs`` (its own processor's inputs for each cached sample,
    images resolved in ``image_folder``, default the cache's); the LM head is applied chunk by chunk
    (``chunk_size`` positions), never to every position at once. Refuses a cache the model cannot be
    compared with (``student.model.check_compatibility``) or one that holds no samples.
    """
    from kd_cache.reader import open_cache
    from student.model import check_compatibility
    from student.stream import StreamingKDDataset

    kd = open_cache(str(cache), storage_options)
    check_compatibility(kd.manifest, model, processor)
    if len(kd) == 0:
        raise ValueError(f"--cache {cache}: the cache holds no samples")
    ds = StreamingKDDataset(kd, processor, image_folder=image_folder, batch_size=batch_size, shuffle=False,
                            with_teacher=True)
    head = model.get_output_embeddings().weight
    dev = model.device
    ids: list[str] = []
    names = [f"{m}/{k}" for m in ("kl", "positions", "agree") for k in DEFAULT_KINDS] + ["ce", "ce_tokens"]
    cols: dict[str, list[torch.Tensor]] = {name: [] for name in names}  # per batch: float64 [b] sums
    for batch in ds:
        ids += list(batch["ids"])
        sums = {name: torch.zeros(len(batch["ids"]), dtype=torch.float64) for name in cols}
        out = model.model(**_on(model, batch["model_inputs"]), use_cache=False)
        flat = out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])
        for kind in DEFAULT_KINDS:
            teacher = teacher_arrays(batch, kind)
            if teacher is None:
                continue
            index, owner = batch[f"{kind}_index"].to(dev), batch[f"{kind}_batch"].long()
            for a in range(0, len(index), chunk_size):  # never the logits of every position at once
                sl = slice(a, a + chunk_size)
                logits = (flat[index[sl]] @ head.T).float()
                t = teacher[sl].to(dev)
                kl = sparse_divergence(logits, t.ids, t.logprobs, t.tail, mode="tail", counts=t.counts,
                                       logp_mean=t.logp_mean)  # 0 where no id is stored
                rows = teacher_row_mask(t.ids)
                agree = (logits.argmax(-1) == teacher_top1(t)) & rows
                for name, values in (("kl", kl), ("positions", rows), ("agree", agree)):
                    sums[f"{name}/{kind}"].index_add_(0, owner[sl], values.double().cpu())
                if kind == "response":
                    targets = batch["response_targets"][sl].to(dev).long()
                    ce = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")
                    sums["ce"].index_add_(0, owner[sl], ce.double().cpu())
                    sums["ce_tokens"].index_add_(0, owner[sl], (targets != IGNORE_INDEX).double().cpu())
        for name, values in sums.items():
            cols[name].append(values)
    total = {name: torch.cat(v).numpy() for name, v in cols.items()}

    def per_kind(name: str, dtype) -> dict[str, np.ndarray]:
        return {k: total[f"{name}/{k}"].astype(dtype) for k in DEFAULT_KINDS}

    return CacheAgreement(ids=ids, kl=per_kind("kl", np.float64), positions=per_kind("positions", np.int64),
                          agree=per_kind("agree", np.int64), ce=total["ce"],
                          ce_tokens=total["ce_tokens"].astype(np.int64), sparse=kd.manifest.sparse)


@torch.no_grad()
def aligned_cache_agreement(model, processor, cache: str | Path, *, image_folder: str | None = None,
                            batch_size: int = 8, chunk_size: int = 1024, storage_options: dict | None = None,
                            alignment: str = "auto") -> CacheAgreement:
    """``cache_agreement`` for a model of any tokenizer, template or image layout: ``cache_agreement``
    itself when the model's processor gives the cached tokens (``alignment`` auto), else the model meets
    the cache the way ``kd-train`` does (``student.alignment.detect_pairing``: the cached conversation
    re-encoded by its own processor, answer tokens aligned by text offsets, the teacher's top-k projected
    onto its vocabulary, visual tokens mixed by image-region overlap), and the KL is the matched part of
    ``student.cross_tokenizer.cross_vocab_divergence``: forward KL(teacher || model) over the ids the
    teacher's stored ids map to plus one "everything else" bin, per aligned group (a sample's
    ``positions`` are its groups). On a pair that shares the tokens, forced through the alignment, this
    is ``cache_agreement``'s KL. Sets ``one_to_one`` / ``answer_positions`` (int64 [n]: the model's answer
    positions in one-to-one groups / in all)."""
    from kd_cache.reader import open_cache
    from student.alignment import detect_pairing
    from student.cross_tokenizer import cross_vocab_divergence
    from student.stream import StreamingKDDataset, load_sample_images

    kd = open_cache(str(cache), storage_options)
    folder = image_folder or kd.manifest.image_folder
    pairing = detect_pairing(kd, processor, model.config, mode=alignment,
                             load_images=lambda s: load_sample_images(s, folder))
    if not pairing.cross:
        got = cache_agreement(model, processor, cache, image_folder=image_folder, batch_size=batch_size,
                              chunk_size=chunk_size, storage_options=storage_options)
        got.one_to_one = got.answer_positions = got.positions["response"]
        return got
    projection = pairing.projection
    ds = StreamingKDDataset(kd, processor, image_folder=image_folder, batch_size=batch_size, shuffle=False,
                            with_teacher=True, pairing=pairing)
    head = model.get_output_embeddings().weight
    dev = model.device
    ids: list[str] = []
    names = [f"{m}/{k}" for m in ("kl", "positions", "agree") for k in DEFAULT_KINDS]
    names += ["ce", "ce_tokens", "one_to_one", "answer_positions"]
    cols: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for batch in ds:
        n = len(batch["ids"])
        ids += list(batch["ids"])
        sums = {name: torch.zeros(n, dtype=torch.float64) for name in cols}
        out = model.model(**_on(model, batch["model_inputs"]), use_cache=False)
        flat = out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])

        logits = (flat[batch["response_index"].to(dev)] @ head.T).float()
        targets = batch["response_targets"].to(dev).long()
        owner = batch["response_batch"].long()
        ce = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")
        sums["ce"].index_add_(0, owner, ce.double().cpu())
        sums["ce_tokens"].index_add_(0, owner, (targets != IGNORE_INDEX).double().cpu())
        sums["answer_positions"].index_add_(0, owner, torch.ones(len(owner), dtype=torch.float64))
        if "cross_groups" in batch:
            teacher = SparseTeacher(**{k: batch[f"cross_response_{k}"].to(dev) for k in ("ids", "logprobs", "tail")})
            g = batch["cross_groups"].to(dev).long()
            groups = {"t_first": g[:, 0], "t_len": g[:, 1], "s_first": g[:, 2], "s_len": g[:, 3]}
            loss = cross_vocab_divergence(logits, targets, teacher, batch["cross_response_realised"].to(dev),
                                          groups, projection)
            first = groups["s_first"].cpu()
            g_owner = owner[first]
            t_top = teacher_top1(teacher[groups["t_first"]])
            mapped = torch.where(t_top >= 0, projection.to_student.to(dev)[t_top.clamp_min(0)], -1)
            agree = logits[groups["s_first"]].argmax(-1) == mapped
            one = (groups["s_len"] == 1) & (groups["t_len"] == 1)
            for name, values in (("kl/response", loss.matched), ("positions/response", torch.ones_like(loss.matched)),
                                 ("agree/response", agree), ("one_to_one", one)):
                sums[name].index_add_(0, g_owner, values.double().cpu())
        visual = teacher_arrays(batch, "visual")
        if visual is not None and len(batch["visual_index"]):
            visual = visual.to(dev)
            rows = torch.nonzero((visual.ids >= 0).any(-1)).reshape(-1)
            ones = torch.ones_like(rows)
            v_logits = (flat[batch["visual_index"].to(dev)] @ head.T).float()
            loss = cross_vocab_divergence(v_logits, torch.zeros(len(v_logits), dtype=torch.long, device=dev), visual,
                                          torch.zeros(visual.ids.shape[0], device=dev),
                                          {"t_first": rows, "t_len": ones, "s_first": rows, "s_len": ones}, projection)
            t_top = teacher_top1(visual[rows])
            mapped = torch.where(t_top >= 0, projection.to_student.to(dev)[t_top.clamp_min(0)], -1)
            v_owner = batch["visual_batch"].long()[rows.cpu()]
            for name, values in (("kl/visual", loss.matched), ("positions/visual", torch.ones_like(loss.matched)),
                                 ("agree/visual", v_logits[rows].argmax(-1) == mapped)):
                sums[name].index_add_(0, v_owner, values.double().cpu())
        for name, values in sums.items():
            cols[name].append(values)
    total = {name: torch.cat(v).numpy() for name, v in cols.items()}

    def per_kind(name: str, dtype) -> dict[str, np.ndarray]:
        return {k: total[f"{name}/{k}"].astype(dtype) for k in DEFAULT_KINDS}

    got = CacheAgreement(ids=ids, kl=per_kind("kl", np.float64), positions=per_kind("positions", np.int64),
                         agree=per_kind("agree", np.int64), ce=total["ce"], ce_tokens=total["ce_tokens"].astype(np.int64),
                         sparse=kd.manifest.sparse)
    got.one_to_one = total["one_to_one"].astype(np.int64)
    got.answer_positions = total["answer_positions"].astype(np.int64)
    return got


def evaluate_cache(model_path: str | Path, cache: str, *, image_folder: str | None = None, batch_size: int = 8,
                   chunk_size: int = 1024, device: str = "auto", dtype: str = "auto",
                   storage_options: dict | None = None, model=None, processor=None) -> dict[str, Any]:
    """KL(teacher || model) and top-1 agreement at the cache's response (and visual) positions: the
    per-sample sums of ``aligned_cache_agreement`` (``cache_agreement`` for a model of the cache's own
    tokens) over the whole cache, as means over positions (over aligned groups for a model of another
    tokenizer, template or image layout, whose ``aligned_share`` says how many are one to one).

    Returns ``kl_to_teacher`` and ``top1_agreement`` (response positions), ``ce`` (the model's
    cross-entropy on the cached reference tokens), ``positions``, and ``kl_visual``/``top1_visual``/
    ``visual_positions`` (None/0 for a text-only cache), plus ``samples`` and ``sparse`` (the cache's
    sparse mode and k).
    """
    if model is None:
        model, processor = load_model(model_path, device, dtype)
    got = aligned_cache_agreement(model, processor, cache, image_folder=image_folder, batch_size=batch_size,
                                  chunk_size=chunk_size, storage_options=storage_options)

    def mean(total: np.ndarray, n: np.ndarray) -> float | None:
        return float(total.sum() / n.sum()) if n.sum() else None

    return {
        "kl_to_teacher": mean(got.kl["response"], got.positions["response"]),
        "top1_agreement": mean(got.agree["response"], got.positions["response"]),
        "ce": mean(got.ce, got.ce_tokens),
        "positions": int(got.positions["response"].sum()),
        "kl_visual": mean(got.kl["visual"], got.positions["visual"]),
        "top1_visual": mean(got.agree["visual"], got.positions["visual"]),
        "visual_positions": int(got.positions["visual"].sum()),
        "samples": len(got.ids),
        "sparse": {"mode": got.sparse.mode, "k": got.sparse.k},
        # the model's answer positions in one-to-one groups with the teacher's (1.0: the cache's own tokens)
        "aligned_share": mean(got.one_to_one, got.answer_positions),
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

