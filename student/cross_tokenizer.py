"""Response distillation across vocabularies: text alignment, a vocabulary projection, and the loss at
aligned positions, for a cached sparse teacher (top-k ids + log-probs + exact tail). A library: the
trainer does not call it yet.

Method: GOLD (TRL's ``GOLDTrainer`` / ``ULDLoss``, huggingface/trl ``trl/experimental/gold``), which
combines exact-vocabulary matches with ULD (Boizard et al. 2024, "Towards Cross-Tokenizer
Distillation: the Universal Logit Distillation Loss", arXiv 2402.12030) on the rest. Why this one:
it needs nothing but the two tokenizers and the teacher's next-token distribution at aligned
positions, which is what a cache holds; where the vocabularies agree (most of a modern BPE vocabulary:
words, digits, punctuation, bytes) it is an ordinary KL, so on a same-tokenizer pair it *is* today's
loss (tested); ULD only covers what cannot be matched. X-Token's projected KL needs a learned or
heuristic many-to-many projection per pair, and ALM's chunk likelihoods (Minixhofer et al., 2025)
need the teacher's log-likelihood of every chunk of the *student's* tokenisation, i.e. a teacher
forward on student-side text, which an offline cache cannot give for arbitrary students.

1. Alignment (``byte_spans``, ``align_spans``). Both tokenizers encode the same answer text. Row ``i``
   of a side's answer is the distribution that *predicts* answer token ``i`` (the cache's response
   positions: ``t`` where the label of ``t + 1`` is kept), so we align the predicted tokens' spans.
   Spans become UTF-8 byte spans (as GOLD does); consecutive tokens that share one character span
   (byte-level pieces of one multi-byte character, byte-fallback ``<0xNN>`` tokens) are given the
   bytes of that character in order when their byte lengths add up, else they stay one unit; tokens
   that cover no characters (specials, offsets ``(0, 0)``) are moved to the end of the token before
   them. Only the *ends* of spans are used: whitespace that one tokenizer puts inside a token's
   offsets and another trims (leading-space handling) goes to the token that follows it, so
   ``"Ġcat"`` and ``"▁cat"`` over `` cat`` are the same span. Walking both sides, a group closes
   where both reach the same byte boundary (GOLD's ``_align_by_byte_offsets``):
   - one teacher token and one student token (identical spans): a 1:1 position; keeps the whole
     next-token distribution up to the projection;
   - several on either side (a split, a merge, a digit run, a character one side spells in bytes):
     a chunk. GOLD's fallback: the chunk's distribution is the one at its first position times the
     probability of the realised continuation (the chain rule along the realised tokens, GOLD's
     ``_merge_probabilities_with_alignment_groups``). It keeps the joint probability of the realised
     chunk exactly and loses the counterfactual continuations (an alternative first token is scored
     as if the realised rest followed it). Here the merged mass is made a distribution by an
     "everything else" bin that holds ``1 - sum``, so a chunk and a 1:1 position are one formula;
   - tokens on one side only (e.g. an end-of-turn token the other side does not have): no
     counterpart to compare with. Such student positions are counted as not aligned (never dropped
     silently: ``Alignment.orphan_student``), teacher-only positions have nothing to train.

2. Projection (``build_projection``). A teacher id maps to the student id whose token is the same
   byte string, each tokenizer's own conventions undone from its serialised backend: byte-level BPE
   pieces through the ``ByteLevel`` pre-tokenizer's own byte alphabet, SentencePiece's ``▁`` through
   the ``Metaspace`` / ``Replace`` decoder's replacement, byte-fallback ``<0xNN>`` to its byte, others
   through ``convert_tokens_to_string``. Special tokens are excluded (pairs may be given
   explicitly, e.g. the two end-of-turn tokens). GOLD matches raw token strings, so ``Ġcat`` never
   meets ``▁cat``; comparing bytes is the difference. Many teacher ids may map to one student id
   (``A`` and ``<0x41>``); the loss then sums their mass into one bin. Built once per pair and
   cached under ``projection_key`` (both tokenizers' full serialisations hashed).

3. Loss (``cross_vocab_divergence``), per aligned group, on the teacher row at the group's first
   teacher token and the student row at its first student token:
   - matched part: the coarsened divergence (``student.losses.sparse_from_bins``, every divergence
     the sparse path offers) over the mapped top-k ids + one "everything else" bin; the teacher's
     unmapped top-k mass joins its tail, and the student's else bin is its mass off the mapped ids.
     GOLD uses JSD here; ours defaults to forward KL, today's loss;
   - unmatched part (ULD): L1 between the sorted probabilities of the teacher's *unmapped top-k*
     ids and the same number of the student's largest probabilities over its ids that no teacher id
     maps to. Because every id outside the top-k has less mass than any id inside, the teacher's
     unmapped top-k ids are exactly its largest unmapped probabilities, so these ranks are exact;
     the ranks beyond them (inside the teacher's tail) are not compared: their total is already in
     the else bin of the matched part. GOLD compares all ranks of a dense teacher;
   - weights: GOLD's adaptive ones by default, ``coverage`` (mapped teacher ids / teacher vocabulary)
     for the matched part and ``1 - coverage`` for ULD; identity projection gives 1 and 0.
   Sampled (``counts``) teachers are refused: the else bin's teacher mass is not known from draws.

Next step: the cache must store the teacher tokenizer files, the conversation as
turns (so the student's template renders the same answer text), each answer token's character
offsets, and the realised token's log-prob at every response position (``teacher_realised`` here:
it is in the top-k most of the time, not always); the student stream then tokenises the answer,
calls ``align_spans`` once per sample and the head calls ``cross_vocab_divergence``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.utils.checkpoint
from torch import Tensor

from kd_cache.schema import IGNORE_INDEX
from student.losses.divergences import (
    LOG_PROB_FLOOR,
    DivergenceOptions,
    SparseTeacher,
    TailMode,
    sparse_from_bins,
    tail_fill,
    up,
)

# ----------------------------------------------------------------------------------------------
# 1. Alignment by text offsets


def byte_spans(text: str, offsets, piece_bytes: list[int | None] | None = None) -> list[tuple[int, int]]:
    """Character offsets [(start, end)] of answer tokens -> UTF-8 byte spans, tiled by their ends.

    A token with an empty span is moved to the end of the token before it (0 for the first).
    Consecutive tokens with one identical character span get that character's bytes in order when
    ``piece_bytes`` (each token's byte length, ``token_bytes``) says they add up to it; otherwise they
    keep the whole span, and only the last of them ends a unit.

    ``offsets``: a list of pairs or an int [n, 2] array; ``piece_bytes``: one entry per token (None where
    unknown). Vectorised with numpy: the data loader calls it twice per sample.
    """
    off = _pairs(offsets)
    n = off.shape[0]
    if n == 0:
        return []
    if piece_bytes is not None and len(piece_bytes) != n:
        raise ValueError(f"byte_spans: {len(piece_bytes)} piece byte lengths for {n} token offsets; "
                         "pass one length (or None) per token")
    raw = text.encode()
    if len(raw) == len(text):
        cum = np.arange(len(text) + 1, dtype=np.int64)
    else:  # character i starts at the i-th byte that is not a continuation byte (0b10xxxxxx)
        cum = np.empty(len(text) + 1, dtype=np.int64)
        cum[:-1] = np.flatnonzero(np.frombuffer(raw, dtype=np.int8) >= -64)
        cum[-1] = len(raw)
    s, e = off[:, 0], off[:, 1]
    full = e > s  # covers characters
    if full.all():
        start, end = cum[s], cum[e]
    else:  # an empty span sits at the end of the last token before it that covers characters (0 if none)
        start, end = cum[np.where(full, s, 0)], cum[np.where(full, e, 0)]
        last = np.maximum.accumulate(np.where(full, np.arange(n), -1))
        at = np.where(last >= 0, end[last], 0)
        start, end = np.where(full, start, at), np.where(full, end, at)
    if piece_bytes is not None and n > 1:
        # Runs: consecutive tokens with one identical non-empty span. A run of several is given its
        # character's bytes when its tokens' lengths add up to them.
        head = np.ones(n, dtype=bool)
        head[1:] = (s[1:] != s[:-1]) | (e[1:] != e[:-1]) | ~full[1:]
        if not head.all():
            heads = np.flatnonzero(head)
            size = np.empty_like(heads)
            size[:-1] = heads[1:] - heads[:-1]
            size[-1] = n - heads[-1]
            pb = np.array(piece_bytes, dtype=np.float64)  # None -> nan: its run's sum never matches
            split = (size > 1) & (np.add.reduceat(pb, heads) == end[heads] - start[heads])
            if split.any():
                tok = np.repeat(split, size)
                w = np.where(tok, pb, 0).astype(np.int64)
                before = np.cumsum(w) - w  # bytes of the split tokens before this one
                first = np.repeat(start[heads] - before[heads], size) + before
                start, end = np.where(tok, first, start), np.where(tok, first + w, end)
    return list(zip(start.tolist(), end.tolist()))


@dataclass(frozen=True)
class Alignment:
    """Groups of consecutive answer tokens, teacher and student, that end at one text boundary.

    teacher_groups, student_groups: [(start, end)] token index ranges, one per group, both non-empty.
    orphan_teacher, orphan_student: token indices with no counterpart on the other side.
    """

    teacher_groups: list[tuple[int, int]]
    student_groups: list[tuple[int, int]]
    orphan_teacher: list[int]
    orphan_student: list[int]

    @property
    def n_student(self) -> int:
        return sum(e - s for s, e in self.student_groups) + len(self.orphan_student)

    @property
    def one_to_one(self) -> list[bool]:
        return [te - ts == 1 and se - ss == 1 for (ts, te), (ss, se) in zip(self.teacher_groups, self.student_groups)]

    @property
    def aligned_share(self) -> float:
        """Share of student answer positions in 1:1 groups (1.0 for an empty answer)."""
        return sum(self.one_to_one) / self.n_student if self.n_student else 1.0

    def tensors(self, device=None) -> dict[str, Tensor]:
        """[G] long tensors: ``t_first``, ``t_len``, ``s_first``, ``s_len`` (the loss's input)."""
        t = torch.tensor(self.teacher_groups, dtype=torch.long, device=device).reshape(-1, 2)
        s = torch.tensor(self.student_groups, dtype=torch.long, device=device).reshape(-1, 2)
        return {"t_first": t[:, 0], "t_len": t[:, 1] - t[:, 0], "s_first": s[:, 0], "s_len": s[:, 1] - s[:, 0]}


def _cuts(spans) -> tuple[np.ndarray, np.ndarray]:
    """(token index after the cut, byte position) where a group may end on one side, as two int64 arrays:
    after token i unless the next token starts before token i ends (pieces of one unit)."""
    sp = _pairs(spans)
    n = sp.shape[0]
    keep = np.ones(n, dtype=bool)
    keep[:-1] = sp[1:, 0] >= sp[:-1, 1]
    at = np.flatnonzero(keep)
    return at + 1, sp[at, 1]


def _pairs(pairs) -> np.ndarray:
    """A list of (a, b) pairs or an int [n, 2] array -> int64 [n, 2]."""
    if isinstance(pairs, np.ndarray):
        return pairs.astype(np.int64, copy=False).reshape(-1, 2)
    from itertools import chain  # here, so the module's imports stay as they are

    # faster than np.asarray on a list of pairs
    return np.fromiter(chain.from_iterable(pairs), dtype=np.int64, count=2 * len(pairs)).reshape(-1, 2)


def _walk(tc: tuple[np.ndarray, np.ndarray], sc: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Indices into both cut lists of the cuts paired by the walk: step the side at the smaller byte position,
    pair both where they are equal. Cut positions are non-decreasing for any tiling of the text, and then the
    walk pairs the k-th cut at a position on one side with the k-th cut at it on the other (a merge join);
    other inputs take the walk itself."""
    tpos, spos = tc[1], sc[1]
    if (tpos[1:] >= tpos[:-1]).all() and (spos[1:] >= spos[:-1]).all():
        first = np.searchsorted(tpos, tpos, side="left")  # each teacher cut's first equal cut
        j = np.searchsorted(spos, tpos, side="left") + np.arange(len(tpos)) - first
        ok = j < len(spos)
        ok[ok] = spos[j[ok]] == tpos[ok]
        return np.flatnonzero(ok), j[ok]
    ti, sj = [], []
    i = j = 0
    tl, sl = tpos.tolist(), spos.tolist()
    while i < len(tl) and j < len(sl):
        if tl[i] < sl[j]:
            i += 1
        elif tl[i] > sl[j]:
            j += 1
        else:
            ti.append(i)
            sj.append(j)
            i += 1
            j += 1
    return np.asarray(ti, dtype=np.int64), np.asarray(sj, dtype=np.int64)


def align_spans(teacher_spans, student_spans) -> Alignment:
    """Align two tokenisations of one answer by their byte spans (``byte_spans``: a list of pairs, or an int
    [n, 2] array), GOLD's walk: a group closes where both sides reach the same boundary, several cuts at one
    position pair in order. Tokens left over on one side are orphans."""
    tc, sc = _cuts(teacher_spans), _cuts(student_spans)
    i, j = _walk(tc, sc)
    t_end, s_end = tc[0][i].tolist(), sc[0][j].tolist()
    t0, s0 = [0] + t_end[:-1], [0] + s_end[:-1]
    t_last, s_last = (t_end[-1], s_end[-1]) if t_end else (0, 0)
    return Alignment(list(zip(t0, t_end)), list(zip(s0, s_end)), list(range(t_last, len(teacher_spans))),
                     list(range(s_last, len(student_spans))))


# ----------------------------------------------------------------------------------------------
# 2. Vocabulary projection

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
PROJECTION_VERSION = 1


def _byte_level_table() -> dict[str, int]:
    """The byte-level alphabet's char -> byte, read off the ``tokenizers`` ByteLevel pre-tokenizer by
    feeding it text whose UTF-8 covers every byte valid UTF-8 can hold (0xC0, 0xC1, 0xF5-0xFF never
    occur in text, so pieces with them stay unmapped)."""
    from tokenizers import pre_tokenizers

    chars = [chr(c) for c in range(0x800)]
    chars += [chr(((lead & 0x0F) << 12) | (0x800 if lead == 0xE0 else 0)) for lead in range(0xE0, 0xF0)]
    chars += [chr(((lead & 0x07) << 18) | (0x10000 if lead == 0xF0 else 0)) for lead in range(0xF0, 0xF5)]
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    table: dict[str, int] = {}
    for ch in chars:
        (piece, _), = pre.pre_tokenize_str(ch)
        for c, b in zip(piece, ch.encode()):
            table[c] = b
    return table


def _decoders(spec: dict | None) -> list[dict]:
    if not spec:
        return []
    return [d for sub in spec.get("decoders", [spec]) for d in _decoders(sub)] if spec.get("type") == "Sequence" else [spec]


def token_bytes(tokenizer) -> list[bytes | None]:
    """Each id's token as the bytes it stands for in running text (None: special, or not a byte string).

    Reads the conventions from the tokenizer's own serialised backend: a ``ByteLevel`` decoder maps
    pieces through the byte alphabet, a ``Metaspace`` or ``Replace`` decoder names the character that
    stands for a space, ``ByteFallback`` makes ``<0xNN>`` one byte; any other piece goes through
    ``convert_tokens_to_string`` (None if that gives a replacement character).
    """
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    kinds = _decoders(backend.get("decoder"))
    types = {d["type"] for d in kinds}
    spaces = [d["replacement"] for d in kinds if d["type"] == "Metaspace"]
    spaces += [d["pattern"]["String"] for d in kinds if d["type"] == "Replace" and d.get("content") == " "
               and "String" in d.get("pattern", {})]
    byte_fallback = "ByteFallback" in types or bool(backend.get("model", {}).get("byte_fallback"))
    table = _byte_level_table() if "ByteLevel" in types else None
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    out: list[bytes | None] = []
    for i, piece in enumerate(pieces):
        if i in special or piece is None:
            out.append(None)
        elif byte_fallback and (m := _BYTE_PIECE.match(piece)):
            out.append(bytes([int(m.group(1), 16)]))
        elif table is not None:
            out.append(bytes(table[c] for c in piece) if all(c in table for c in piece) else None)
        elif spaces:
            for sp in spaces:
                piece = piece.replace(sp, " ")
            out.append(piece.encode())
        else:
            s = tokenizer.convert_tokens_to_string([piece])
            out.append(None if "\ufffd" in s else s.encode())
    return out


def projection_key(teacher_tokenizer, student_tokenizer, pairs: dict[int, int] | None = None) -> str:
    """Deterministic key of a pair: sha256 over both tokenizers' serialised backends (vocabulary,
    merges, normaliser, pre-tokenizer, decoder) and added tokens, and the explicit ``pairs`` if any."""
    h = hashlib.sha256(f"cross-vocab-projection v{PROJECTION_VERSION}".encode())
    for tok in (teacher_tokenizer, student_tokenizer):
        h.update(tok.backend_tokenizer.to_str().encode())
        h.update(json.dumps(sorted((i, str(t)) for i, t in tok.added_tokens_decoder.items())).encode())
    if pairs:
        h.update(json.dumps(sorted((int(t), int(s)) for t, s in pairs.items())).encode())
    return h.hexdigest()[:32]


@dataclass(frozen=True)
class VocabProjection:
    """teacher id -> student id. to_student: [V_t] long, -1 where unmapped; student_matched: [V_s]
    bool, the student ids some teacher id maps to; key: ``projection_key`` of the pair."""

    to_student: Tensor
    student_matched: Tensor
    key: str

    @property
    def coverage(self) -> float:
        """Mapped teacher ids / teacher vocabulary: GOLD's adaptive weight of the matched part."""
        return float((self.to_student >= 0).double().mean()) if len(self.to_student) else 0.0

    def free_ids(self, vocab: int) -> Tensor:
        """The student ids below ``vocab`` that no teacher id maps to (long [F]), computed once."""
        cached = getattr(self, "_free", None)
        if cached is None or cached[0] != vocab:
            matched = torch.zeros(vocab, dtype=torch.bool)
            n = min(vocab, len(self.student_matched))
            matched[:n] = self.student_matched[:n]
            cached = (vocab, torch.nonzero(~matched).reshape(-1))
            object.__setattr__(self, "_free", cached)
        return cached[1]

    @classmethod
    def identity(cls, vocab: int) -> VocabProjection:
        return cls(torch.arange(vocab), torch.ones(vocab, dtype=torch.bool), "identity")

    def save(self, path: str) -> None:
        """Write to ``path`` (npz) atomically."""
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, suffix=".npz", delete=False) as f:
            np.savez(f, to_student=self.to_student.numpy().astype(np.int64),
                     student_matched=self.student_matched.numpy(), key=np.array(self.key))
        os.replace(f.name, path)

    @classmethod
    def load(cls, path: str, key: str | None = None) -> VocabProjection:
        """Read a saved projection; with ``key``, refuse one built for another pair."""
        with np.load(path) as z:
            found = str(z["key"])
            if key is not None and found != key:
                raise ValueError(f"{path}: projection built for tokenizer pair {found}, expected {key}: "
                                 "delete it or rebuild with build_projection")
            return cls(torch.from_numpy(z["to_student"]), torch.from_numpy(z["student_matched"]), found)


def build_projection(teacher_tokenizer, student_tokenizer, pairs: dict[int, int] | None = None) -> VocabProjection:
    """Map each teacher id to the student id with the same bytes (``token_bytes``); specials excluded
    except ``pairs`` (teacher id -> student id, e.g. the end-of-turn tokens). Among student ids with the
    same bytes the one that is not a ``<0xNN>`` piece wins, then the lowest id."""
    s_bytes = token_bytes(student_tokenizer)
    s_pieces = student_tokenizer.convert_ids_to_tokens(list(range(len(s_bytes))))
    by_bytes: dict[bytes, int] = {}
    for sid in sorted(range(len(s_bytes)), key=lambda i: (bool(_BYTE_PIECE.match(s_pieces[i] or "")), i)):
        if s_bytes[sid] is not None:
            by_bytes.setdefault(s_bytes[sid], sid)
    t_bytes = token_bytes(teacher_tokenizer)
    to_student = torch.tensor([by_bytes.get(b, -1) if b is not None else -1 for b in t_bytes], dtype=torch.long)
    for t, s in (pairs or {}).items():
        to_student[t] = s
    matched = torch.zeros(len(s_bytes), dtype=torch.bool)
    matched[to_student[to_student >= 0]] = True
    return VocabProjection(to_student, matched, projection_key(teacher_tokenizer, student_tokenizer, pairs))


def cached_projection(teacher_tokenizer, student_tokenizer, folder: str, pairs: dict[int, int] | None = None) -> VocabProjection:
    """The pair's projection (with its ``pairs``) from ``folder/<key>.npz``, built and saved there the first
    time. A damaged file is rebuilt; a folder that cannot be written leaves the projection unsaved."""
    key = projection_key(teacher_tokenizer, student_tokenizer, pairs)
    path = os.path.join(folder, f"{key}.npz")
    if os.path.exists(path):
        try:
            return VocabProjection.load(path, key)
        except (ValueError, OSError):
            pass  # damaged: rebuilt below
    proj = build_projection(teacher_tokenizer, student_tokenizer, pairs)
    try:
        proj.save(path)
    except OSError:
        pass  # a read-only home: built again next time
    return proj


# ----------------------------------------------------------------------------------------------
# 3. The loss at aligned positions


@dataclass(frozen=True)
class CrossLoss:
    """Per aligned group [G]: ``loss`` = w_match * ``matched`` + w_uld * ``uld``; ``one_to_one`` [G]
    bool; ``student_positions`` [G] student answer tokens each group covers."""

    loss: Tensor
    matched: Tensor
    uld: Tensor
    one_to_one: Tensor
    student_positions: Tensor


def _realised_sum(realised: Tensor, first: Tensor, length: Tensor) -> Tensor:
    """sum of ``realised`` [P] over rows first+1 .. first+length-1 of each group -> [G] (0 exactly for
    a group of one)."""
    # The groups come from the host (``Alignment.tensors``): reading their widest length is no device sync
    # when they are still on the CPU; the trainer will pass them along with that width.
    width = max(int(length.max()) - 1, 0) if length.numel() else 0
    offs = torch.arange(width, device=first.device)
    idx = first[:, None] + 1 + offs
    inside = offs < (length[:, None] - 1)
    vals = realised[idx.clamp(max=max(realised.shape[0] - 1, 0))] if realised.numel() else idx.to(realised.dtype)
    return torch.where(inside, vals.clamp_min(LOG_PROB_FLOOR), 0.0).sum(-1)


def _scale(lp: Tensor, tail: Tensor, log_s: Tensor) -> tuple[Tensor, Tensor]:
    """Bins ``lp`` [G, B] and else bin ``tail`` [G] of a distribution scaled by ``s`` (log_s [G] <= 0):
    ``s * p_i`` and ``1 - s * (1 - p_else)`` = ``(1 - s) + s * p_else``. Exact identity when log_s = 0."""
    chunk = log_s < 0
    safe = torch.where(chunk, log_s.clamp(max=-1e-12), -1.0)
    log_rest = torch.where(chunk, torch.log(-torch.expm1(safe)), float("-inf"))
    return lp + log_s[:, None], torch.logaddexp(log_rest, tail + log_s)


def _dedupe(mapped: Tensor, t_lp: Tensor, vocab: int) -> tuple[Tensor, Tensor]:
    """Merge teacher ids mapped to one student id. mapped: [G, K] student ids (-1: none); t_lp [G, K].
    Returns bin ids [G, K] (-1 padded) and their summed log-probs [G, K]."""
    key = torch.where(mapped >= 0, mapped, vocab)
    skey, order = key.sort(-1)
    p = torch.where(skey < vocab, t_lp.gather(-1, order).exp(), 0.0)
    new = torch.ones_like(skey, dtype=torch.bool)
    new[:, 1:] = skey[:, 1:] != skey[:, :-1]
    slot = new.long().cumsum(-1) - 1
    ids = torch.full_like(skey, vocab).scatter(-1, slot, skey)
    mass = torch.zeros_like(p).scatter_add(-1, slot, p)
    ids = torch.where(ids < vocab, ids, -1)
    return ids, torch.where(ids >= 0, mass.clamp_min(1e-300).log(), 0.0)


def project_teacher(rows: SparseTeacher, projection: VocabProjection, student_vocab: int,
                    dtype: torch.dtype = torch.float32) -> tuple[SparseTeacher, Tensor]:
    """A top-k teacher [P, K] on the student's vocabulary: its mapped ids (teacher ids sharing a student id
    merged into one bin) + a tail that also holds the unmapped stored ids' mass.

    Returns the projected ``SparseTeacher`` (ids [P, K] student ids padded with -1, log-probs [P, K],
    tail [P]) and the unmapped stored ids [P, K] bool.
    """
    ids = rows.ids.long()
    valid = ids >= 0
    table = projection.to_student.to(ids.device)
    inside = valid & (ids < len(table))
    mapped = torch.where(inside, table[ids.clamp(0, max(len(table) - 1, 0))], -1)
    t_lp = torch.where(valid, up(rows.logprobs).to(dtype), float("-inf"))
    unmapped = valid & (mapped < 0)
    tail = torch.cat([up(rows.tail).to(dtype)[:, None], torch.where(unmapped, t_lp, float("-inf"))], -1).logsumexp(-1)
    bin_ids, bin_lp = _dedupe(mapped, torch.where(valid, t_lp, 0.0), student_vocab)
    return SparseTeacher(bin_ids, bin_lp, tail), unmapped


def cross_vocab_divergence(
    student_logits: Tensor,
    student_targets: Tensor,
    teacher: SparseTeacher,
    teacher_realised: Tensor,
    groups: dict[str, Tensor],
    projection: VocabProjection,
    *,
    options: DivergenceOptions | None = None,
    matched_weight: float | None = None,
) -> CrossLoss:
    """GOLD's hybrid loss (matched ids: coarsened divergence; the rest: ULD) per aligned group.

    Args:
        student_logits: [P_s, V_s], row i predicts student answer token i (any float dtype; fp32 inside).
        student_targets: [P_s] the student's answer token ids (row i's realised token).
        teacher: the cached rows [P_t, K] (top-k ids, log-probs, tail), row i predicts teacher answer
            token i; sampled (``counts``) teachers are refused.
        teacher_realised: [P_t] teacher log-prob of its realised answer token i (read for chunks only).
        groups: ``Alignment.tensors()``: [G] ``t_first``, ``t_len``, ``s_first``, ``s_len``.
        projection: teacher id -> student id (ids beyond it are unmapped).
        options: the matched part's divergence (tail mode, no zscore); default forward KL.
        matched_weight: the matched part's weight (ULD gets ``1 - w``); default ``projection.coverage``.

    Returns:
        ``CrossLoss`` of [G] tensors (float32, or float64 for float64 logits); G = 0 gives empty ones.
    """
    return _cross_from_log_q(up(student_logits).log_softmax(-1), student_targets, teacher, teacher_realised, groups,
                             projection, options=options, matched_weight=matched_weight)


def _cross_from_log_q(log_q_all: Tensor, student_targets: Tensor, teacher: SparseTeacher, teacher_realised: Tensor,
                      groups: dict[str, Tensor], projection: VocabProjection, *,
                      options: DivergenceOptions | None = None, matched_weight: float | None = None,
                      realised_s: Tensor | None = None) -> CrossLoss:
    """``cross_vocab_divergence`` from the student's log-softmax [P_s, V_s] (fp32 or fp64); ``realised_s``:
    its log-probs at ``student_targets`` when already read."""
    opts = options or DivergenceOptions()
    if teacher.sampled:
        raise ValueError("cross-vocabulary distillation needs top-k teacher ids with log-probs and tail: with "
                         "sampled ids the teacher mass of unmapped ids is unknown. Build the cache with --sparse topk.")
    if opts.mode is not TailMode.tail or opts.zscore:
        raise ValueError("cross-vocabulary distillation compares the mapped ids plus one else bin: use tail mode "
                         "without zscore")
    w = projection.coverage if matched_weight is None else float(matched_weight)
    t_first, t_len, s_first, s_len = (groups[k] for k in ("t_first", "t_len", "s_first", "s_len"))
    V_s = log_q_all.shape[-1]

    # Student: the rows at each group's first token, and the log-prob of its realised continuation.
    if realised_s is None:
        realised_s = log_q_all.gather(-1, student_targets.long().clamp_min(0)[:, None])[:, 0]
    log_s_s = _realised_sum(realised_s, s_first, s_len)  # [G]
    # [G, V_s]; every row in order (all groups of one token: the usual chunk) needs no copy
    every_row = bool(groups.get("every_row", False))
    log_q = log_q_all if every_row else log_q_all[s_first]
    dtype = log_q.dtype

    # Teacher: project the stored ids; unmapped stored mass joins the tail.
    rows = teacher[t_first]
    if rows.logprobs is None or rows.tail is None:
        raise ValueError("cross-vocabulary distillation needs the teacher's top-k log-probs and tail")
    binned, unmapped = project_teacher(rows, projection, V_s, dtype)
    ids = rows.ids
    t_lp = torch.where(ids >= 0, up(rows.logprobs).to(dtype), float("-inf"))
    log_s_t = _realised_sum(up(teacher_realised).to(dtype), t_first, t_len)

    # The student's log-probs at the bins and, for ULD below, at its largest ids off the projection's
    # image (chosen without the graph): one read of the row (one sparse backward).
    K = ids.shape[-1]
    free = projection.free_ids(V_s).to(ids.device)
    k = min(K, len(free))
    b_ids = binned.ids.long()
    if k:
        with torch.no_grad():
            top_free = free[log_q[:, free].topk(k, -1).indices]
        read = log_q.gather(-1, torch.cat([b_ids.clamp_min(0), top_free], -1))
        s_lp, q_free = read[:, : b_ids.shape[-1]], read[:, b_ids.shape[-1]:]
    else:
        s_lp, q_free = log_q.gather(-1, b_ids.clamp_min(0)), log_q[:, :0]
    # The else bin: log(1 - sum of the bins) as a logsumexp over the ids off them (``student_bins``).
    stored = torch.zeros_like(log_q, dtype=torch.bool).scatter_(-1, tail_fill(b_ids, b_ids >= 0), True)
    s_tail = log_q.masked_fill(stored, torch.finfo(log_q.dtype).min).logsumexp(-1)

    # Matched part: mapped bins + else bin, both sides scaled along the realised chunk (GOLD's merge).
    # A row with no mapped id compares one bin with itself: 0.
    s_lp, s_tail = _scale(s_lp, s_tail, log_s_s)
    bin_lp, t_tail = _scale(binned.logprobs, binned.tail, log_s_t)
    matched = sparse_from_bins(s_lp, s_tail, SparseTeacher(binned.ids, bin_lp, t_tail), opts)

    # ULD on the unmatched part: the teacher's unmapped top-k probabilities (its largest unmapped
    # ones) against as many of the student's largest probabilities off the projection's image (read at
    # the student ids no teacher id maps to only: the rest of the row takes no part).
    p_un = torch.where(unmapped, (t_lp + log_s_t[:, None]).exp(), -1.0).sort(-1, descending=True).values
    n_un = unmapped.sum(-1, keepdim=True)
    q_top = torch.nn.functional.pad((q_free + log_s_s[:, None]).exp(), (0, K - k))
    ranks = torch.arange(K, device=ids.device)[None, :] < n_un
    uld = torch.where(ranks, (p_un.clamp_min(0) - q_top).abs(), 0.0).sum(-1)

    one = (t_len == 1) & (s_len == 1)
    return CrossLoss(w * matched + (1.0 - w) * uld, matched, uld, one, s_len)


def chunked_cross_divergence(
    hidden: Tensor,
    head_weight: Tensor,
    targets: Tensor,
    teacher: SparseTeacher,
    teacher_realised: Tensor,
    groups: Tensor,
    projection: VocabProjection,
    *,
    options: DivergenceOptions | None = None,
    chunk_size: int = 1024,
    checkpoint: bool = True,
    ce: bool = True,
) -> tuple[Tensor, Tensor]:
    """CE over the student's answer rows and ``cross_vocab_divergence`` summed over the groups, from the
    student's hidden states, chunk by chunk: one head matmul and one log-softmax per row serve both.

    Args:
        hidden: [P_s, d] the student's final hidden states at its answer positions (row i predicts
            ``targets[i]``; IGNORE_INDEX: no CE), the groups' rows in order.
        head_weight: [V_s, d] the student's LM head.
        targets, teacher, teacher_realised, projection: as ``cross_vocab_divergence``'s.
        groups: [G, 4] long (teacher first row, teacher rows, student first row, student rows), sorted by
            student row (``StreamingKDDataset`` collates them so).
        options: the matched part's divergence; its ``temperature`` divides the student's logits (CE's
            never).
        chunk_size: student rows per chunk (a chunk holds whole groups, so a group longer than it is one
            chunk of its own).
        checkpoint: recompute each chunk's [rows, V_s] logits in backward instead of keeping them.
        ce: also the CE sum (False: 0).

    Returns:
        (CE sum, divergence sum), fp32 (zeros connected to both inputs when there are no rows).
    """
    opts = options or DivergenceOptions()
    temperature = opts.temperature
    zero = (up(hidden[:0]).sum() + up(head_weight[:0]).sum()) * 0.0
    host = groups.detach().cpu().numpy()
    P, G = hidden.shape[0], host.shape[0]
    ce_total, div_total = zero, zero
    # Chunks of whole groups that together cover every row once (rows between groups, e.g. a student
    # end-of-turn token without a teacher counterpart, go with the chunk before them).
    bounds, start, r0 = [], 0, 0
    while start < G or r0 < P:
        end = start
        while end < G and (end == start or host[end, 2] + host[end, 3] - r0 <= chunk_size):
            end += 1
        r1 = P if end >= G else int(host[end, 2])
        bounds.append((start, end, r0, r1))
        start, r0 = end, r1
        if end >= G:
            break

    for g0, g1, r0, r1 in bounds:
        sub = {"t_first": groups[g0:g1, 0], "t_len": groups[g0:g1, 1],
               "s_first": groups[g0:g1, 2] - r0, "s_len": groups[g0:g1, 3],
               "every_row": g1 - g0 == r1 - r0 and bool((host[g0:g1, 2] == np.arange(r0, r1)).all())}
        tg = targets[r0:r1]

        def chunk(h: Tensor, w: Tensor, sub=sub, tg=tg) -> tuple[Tensor, Tensor]:
            logits = up(h @ w.T)
            log_q = logits.log_softmax(-1)
            realised = log_q.gather(-1, tg.clamp_min(0)[:, None])[:, 0]
            ce_sum = -torch.where(tg != IGNORE_INDEX, realised, 0.0).sum() if ce else logits.new_zeros(())
            if temperature != 1.0:
                log_q, realised = (logits / temperature).log_softmax(-1), None
            div = _cross_from_log_q(log_q, tg, teacher, teacher_realised, sub, projection, options=opts,
                                    realised_s=realised).loss.sum()
            return ce_sum, div

        h = hidden[r0:r1]
        if checkpoint and torch.is_grad_enabled():
            c, d = torch.utils.checkpoint.checkpoint(chunk, h, head_weight, use_reentrant=False)
        else:
            c, d = chunk(h, head_weight)
        ce_total, div_total = ce_total + c, div_total + d
    return ce_total, div_total
