"""A teacher cache for a student of another tokenizer, chat template or image layout.

``detect_pairing`` decides, before step 1, how the student meets the cache (``Pairing``), and the stream
calls ``Pairing.sample`` on every sample when the two differ:

* **Same ids** (today's path): the student's processor, run on a sample's stored processor call and
  images, gives exactly the cached ids. Nothing below is used.
* **Otherwise** (another tokenizer, another chat template, another image expansion, or any of them
  together), the student encodes the sample's stored conversation (role/content turns) with its *own*
  processor and template (``kd_cache.processing.encode``), and:

  - **response positions** are aligned by the characters of the answer text each predicted token covers
    (the teacher's are in the cache, ``response_spans``; the student's come from its own encoding; the
    answer text is the same on both sides, each template only wraps it). ``student.cross_tokenizer``
    turns them into byte spans and groups (GOLD's alignment), projects the teacher's top-k onto the
    student's vocabulary (identity when the vocabularies are equal) and gives GOLD's loss per group;
    the share of student answer positions in one-to-one groups is logged per step;
  - **visual positions**: each visual token covers a box of its original image (the teacher's are in the
    cache, ``visual_boxes``; the student's from ``kd_cache.regions`` on its own encoding). ``A`` holds the
    overlap weights of each student token over the teacher's (``student.visual_map``); RDist compares the
    student's relation with ``A R Aᵀ``, and visual MDist compares each student token with the mixture of
    the teacher rows it overlaps, projected onto the student's vocabulary. ``--visual-alignment
    hungarian`` uses a one-to-one matching instead (EM-KD's). Equal layouts give the identity ``A``:
    the cached relation and rows exactly.

Pairs that cannot work are refused before step 1, naming what differs: a sampled (``--sparse sample``)
cache (the teacher mass of the ids a projection cannot map is unknown from draws), a cache without the
alignment arrays, a student whose processor cannot render the cached conversations (e.g. no chat
template for a chat cache), a visual layout without boxes on either side.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from kd_cache import processing, regions
from kd_cache.errors import UserError
from kd_cache.processing import ProcessedSample
from kd_cache.schema import SparseMode, choice, derive_positions, predicted_tokens
from student.cross_tokenizer import VocabProjection, align_spans, byte_spans, cached_projection, token_bytes
from student.visual_map import hungarian_weights, map_relation, mix_sparse_rows, overlap_weights


class AlignmentMode(str, Enum):
    """``--alignment``: how kd-train meets a cache (``auto`` detects it)."""

    auto = "auto"
    same = "same"  # the student's processor must give the cached ids (refuses any other sample)
    cross = "cross"  # re-encode every sample with the student's own processor and align (even when equal)


class VisualAlignment(str, Enum):
    """``--visual-alignment``: how teacher visual tokens map onto a student's of another layout."""

    overlap = "overlap"  # weights = the share of each student token's box that each teacher token covers
    hungarian = "hungarian"  # one-to-one matching by maximal IoU (EM-KD)


PROBE_SAMPLES = 4  # samples whose ids decide auto detection
MAPS_KEPT = 256  # visual-token maps a process keeps (one per image shape and layout seen)


class PairingError(UserError, ValueError):
    """A teacher cache and a student that cannot be paired (named in the message)."""


def projection_folder() -> str:
    """Where vocabulary projections are kept, one file per tokenizer pair (``KD_HOME``, else ~/.cache)."""
    base = os.environ.get("KD_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "mllm-kd")
    return os.path.join(base, "projections")


def _probe_indices(cache) -> list[int]:
    """The first samples of the cache (one shard, read once more by the stream)."""
    return list(range(min(PROBE_SAMPLES, len(cache))))


def _same_ids(cache, processor, load_images) -> bool:
    """Whether the student's processor, on the stored calls of a few samples, gives the cached ids. A
    sample whose images cannot be read says nothing: today's path then reports it as it always did."""
    for i in _probe_indices(cache):
        s = cache[i]
        call = s.get("processor_call") or {}
        if not call or getattr(processor, "image_processor", None) is None:
            return False
        try:
            images = load_images(s)
        except FileNotFoundError:
            return True
        try:
            ids, _ = processing.model_inputs(processor, call, images)
        except (ValueError, TypeError, KeyError):
            return False
        n = len(s["input_ids"])
        if len(ids) < n or not np.array_equal(ids[:n], np.asarray(s["input_ids"], dtype=np.int64)):
            return False
    return True


def _end_of_turn_pairs(probes: list[tuple[dict, dict]]) -> dict[int, int]:
    """Teacher id -> student id of the labelled tokens outside the answer text (end-of-turn markers), read
    in order off probe samples (each cached sample with ``Pairing.sample``'s result for it): special tokens a
    byte comparison cannot pair."""
    pairs: dict[int, int] = {}
    for s, got in probes:
        t_ids = predicted_tokens(s["labels"], s.get("response_positions", []))
        t_spans = np.asarray(s.get("response_spans", np.zeros((0, 2)))).reshape(-1, 2)
        t_marks = [int(t) for t, (a, b) in zip(t_ids, t_spans) if b <= a]
        enc, resp = got["processed"], got["response"]
        s_marks = [int(t) for t, (a, b) in zip(got["targets"], enc.answer_spans[resp + 1]) if b <= a]
        for t, u in zip(t_marks, s_marks):
            pairs.setdefault(t, u)
    return pairs


@dataclass
class Pairing:
    """How a student meets a teacher cache; ``cross`` False: today's path (same ids)."""

    cross: bool
    text: str  # "same ids" | "byte spans, same vocabulary" | "byte spans, projected vocabulary (GOLD)"
    visual: str  # "same positions" | VisualAlignment value
    template: str = "chat"
    max_length: int = 2048
    k: int = 1  # ids per cached position
    student_image_token_id: int | None = None
    student_config: Any = None  # the student model's config (its family's image layout)
    processor: Any = None
    projection: VocabProjection | None = None
    teacher_piece_bytes: np.ndarray | None = None  # byte length of each teacher id's token (-1: none)
    student_piece_bytes: np.ndarray | None = None
    _maps: dict = field(default_factory=dict, repr=False)  # image shapes and layouts -> overlap maps (per process)

    def describe(self) -> str:
        if not self.cross:
            return "same ids: the student's processor gives the cached tokens (no alignment)"
        cov = f"; {self.projection.coverage:.1%} of teacher ids mapped" if self.projection is not None else ""
        return f"response: {self.text}{cov}; visual: {self.visual}"

    def record(self) -> dict:
        """What ``trainer_state.json`` records."""
        out = {"cross": self.cross, "text": self.text, "visual": self.visual}
        if self.projection is not None:
            out.update(projection=self.projection.key, teacher_ids_mapped=round(self.projection.coverage, 6))
        return out

    # -- per sample (dataloader workers) ---------------------------------------------------------
    def encode(self, s: dict, images: list) -> ProcessedSample:
        """The student's own encoding of a cached sample's conversation (its template, its image expansion)."""
        conv = s.get("conversation") or []
        if not conv:
            raise PairingError(f"sample {s['id']!r}: the cache holds no conversation for it; rebuild the cache "
                               "with this version of kd-cache build")
        try:
            if getattr(self.processor, "image_processor", None) is None:
                raise PairingError("the student's processor has no image processor")
            enc = processing.encode(self.processor, self.student_image_token_id, conv, images, template=self.template)
        except ValueError as e:
            raise PairingError(f"sample {s['id']!r}: the student's processor cannot encode the cached "
                               f"conversation ({e})") from e
        cut = enc.truncated(self.max_length)
        if cut is None:
            raise PairingError(f"sample {s['id']!r}: the student's encoding ({len(enc.input_ids)} tokens) is cut "
                               f"through an image by the cache's --max-length {self.max_length}")
        return cut

    def sample(self, s: dict, images: list, *, teacher_kinds: tuple[str, ...], relation: bool) -> dict:
        """The student's encoding of cached sample ``s`` and the teacher's arrays aligned to it (numpy):
        ``processed``, ``response`` / ``visual`` student positions, ``targets``; with ``teacher_kinds``
        holding response: ``groups`` [G, 4] (teacher first row, teacher rows, student first row, student
        rows; local), ``one_to_one`` (student positions in 1:1 groups); with visual: ``visual_teacher``
        (teacher-vocabulary rows at the student's visual positions); ``relations`` (student-sized
        targets per image) when ``relation``."""
        enc = self.encode(s, images)
        ids, labels = enc.input_ids, enc.labels
        resp = derive_positions("response", ids, labels, self.student_image_token_id).astype(np.int64)
        vis = [np.asarray(p, dtype=np.int64) for p in enc.visual_positions]
        out: dict[str, Any] = {"processed": enc, "response": resp, "targets": predicted_tokens(labels, resp),
                               "visual": np.concatenate(vis) if vis else np.zeros(0, np.int64)}
        if "response" in teacher_kinds:
            out.update(self._text_groups(s, enc, resp))
        if "visual" in teacher_kinds or relation:
            out.update(self._visual(s, enc, images, vis, "visual" in teacher_kinds, relation))
        return out

    def _text_groups(self, s: dict, enc: ProcessedSample, resp: np.ndarray) -> dict:
        t_pos = np.asarray(s["response_positions"], dtype=np.int64)
        t_spans = s.get("response_spans")
        if t_spans is None or "response_realised" not in s:
            raise PairingError(f"sample {s['id']!r}: the cache has no answer spans or realised log-probs at its "
                               "response positions; rebuild it with this version of kd-cache build")
        text = enc.answer_text
        t_ids = predicted_tokens(s["labels"], t_pos)
        s_ids = predicted_tokens(enc.labels, resp)
        t_bytes = byte_spans(text, np.asarray(t_spans, dtype=np.int64).reshape(-1, 2),
                             _lengths(self.teacher_piece_bytes, t_ids))
        s_bytes = byte_spans(text, enc.answer_spans[resp + 1].reshape(-1, 2), _lengths(self.student_piece_bytes, s_ids))
        al = align_spans(t_bytes, s_bytes)
        g = np.asarray([(t0, t1 - t0, s0, s1 - s0) for (t0, t1), (s0, s1) in zip(al.teacher_groups, al.student_groups)],
                       dtype=np.int64).reshape(-1, 4)
        return {"groups": g, "one_to_one": int(sum(al.one_to_one)), "student_answer": len(resp)}

    def _visual(self, s: dict, enc: ProcessedSample, images: list, vis: list[np.ndarray], rows: bool,
                relation: bool) -> dict:
        counts = [int(c) for c in s["image_token_counts"]]
        out: dict[str, Any] = {}
        if not counts:
            return {"visual_teacher": _empty_rows(0, self.k), "relations": []} if rows else {"relations": []}
        boxes = s.get("visual_boxes")
        if boxes is None or len(boxes) != sum(counts):
            raise PairingError(f"sample {s['id']!r}: the cache holds no image boxes for its visual positions "
                               "(the teacher's image layout has none, or the cache was built without the visual "
                               "kind): a student of another image layout cannot be aligned to it")
        t_boxes = np.asarray(boxes, dtype=np.float16)
        # The maps depend on the images' sizes and both layouts only: kept for the next sample of that shape.
        key = (tuple(im.size for im in images), tuple(enc.image_token_counts), t_boxes.tobytes())
        weights = self._maps.get(key)
        if weights is None:
            try:
                # at the cache's precision, so that equal layouts compare equal
                s_boxes = [b.astype(np.float16).astype(np.float64) for b in
                           regions.image_regions(self.processor, self.student_config, enc, [im.size for im in images])]
            except (NotImplementedError, regions.RegionLayoutError) as e:
                raise PairingError(f"sample {s['id']!r}: the student's image layout has no boxes ({e})") from e
            per_image = np.split(t_boxes.astype(np.float64), np.cumsum(counts)[:-1])
            weights = [self._weights(sb, tb) for sb, tb in zip(s_boxes, per_image)]
            if len(self._maps) >= MAPS_KEPT:
                self._maps.pop(next(iter(self._maps)))
            self._maps[key] = weights
        if relation:
            rel = s.get("relation") or []
            out["relations"] = [map_relation(a, np.asarray(r, dtype=np.float32)) for a, r in zip(weights, rel)]
        if rows:
            out["visual_teacher"] = _mixed_rows(s, weights, counts)
        return out

    def _weights(self, student_boxes: np.ndarray, teacher_boxes: np.ndarray) -> np.ndarray:
        if len(student_boxes) == len(teacher_boxes) and np.array_equal(student_boxes, teacher_boxes, equal_nan=True):
            return np.eye(len(student_boxes))  # the same layout: the identity, exactly
        if self.visual == VisualAlignment.hungarian.value:
            return hungarian_weights(student_boxes, teacher_boxes)
        return overlap_weights(student_boxes, teacher_boxes)


def _lengths(table: np.ndarray | None, ids: np.ndarray) -> np.ndarray | None:
    """Each token's byte length (float64, NaN where unknown: a special or an id outside the table)."""
    if table is None:
        return None
    ids = np.asarray(ids, dtype=np.int64)
    got = table[np.clip(ids, 0, len(table) - 1)].astype(np.float64)
    return np.where((ids >= 0) & (ids < len(table)) & (got >= 0), got, np.nan)


def _empty_rows(n: int, k: int) -> dict:
    return {"ids": np.full((n, k), -1, np.int64), "logprobs": np.zeros((n, k), np.float32),
            "tail": np.zeros(n, np.float32)}


def _mixed_rows(s: dict, weights: list[np.ndarray], counts: list[int]) -> dict:
    """The teacher's visual rows mixed onto the student's visual positions, image by image."""
    ids, lp, tail = (np.asarray(s[f"visual_{n}"]) for n in ("ids", "logprobs", "tail"))
    K = ids.shape[1] if ids.ndim == 2 else 1
    bounds = np.concatenate([[0], np.cumsum(counts)])
    parts = []
    for a, lo, hi in zip(weights, bounds[:-1], bounds[1:]):
        m = mix_sparse_rows(a, ids[lo:hi], lp[lo:hi], tail[lo:hi], K)
        width = m.ids.shape[1]
        pad = K - width
        parts.append({"ids": np.pad(m.ids.astype(np.int64), ((0, 0), (0, pad)), constant_values=-1),
                      "logprobs": np.pad(m.logprobs.astype(np.float32), ((0, 0), (0, pad))),
                      "tail": m.tail.astype(np.float32)})
    return {k: np.concatenate([p[k] for p in parts]) for k in ("ids", "logprobs", "tail")}


def _piece_lengths(tokenizer) -> np.ndarray:
    return np.asarray([len(b) if b is not None else -1 for b in token_bytes(tokenizer)], dtype=np.int64)


def detect_pairing(cache, processor, student_config, *, mode: str = "auto", visual: str = "overlap",
                   load_images=None, projection_dir: str | None = None) -> Pairing:
    """How ``processor`` (the student's) meets ``cache``: today's path when it gives the cached ids on a
    few probe samples (``auto``), else the alignment of the module docstring, checked on those samples;
    a pair that cannot work raises ``PairingError`` naming what differs."""
    mode, visual = choice(AlignmentMode, mode, "--alignment").value, choice(VisualAlignment, visual,
                                                                             "--visual-alignment").value
    m = cache.manifest
    load_images = load_images or (lambda s: [])
    if mode == AlignmentMode.same.value or (mode == AlignmentMode.auto.value and _same_ids(cache, processor, load_images)):
        return Pairing(False, "same ids", "same positions")
    if m.sparse.mode != SparseMode.topk.value:
        raise PairingError(f"the student's processor does not give the cache's tokens (another tokenizer, chat "
                           f"template or image expansion), and the cache holds sampled teacher tokens (--sparse "
                           f"{m.sparse.mode}): aligning across vocabularies needs each position's top-k log-probs "
                           "and tail. Rebuild the cache with --sparse topk")
    tok = getattr(processor, "tokenizer", processor)
    image_token_id = processing.config_image_token_id(student_config) if m.image_token_id is not None else None
    pairing = Pairing(True, "", visual, template=m.template, max_length=m.max_length, k=m.sparse.k,
                      student_image_token_id=image_token_id, student_config=student_config, processor=processor)
    if not m.teacher.tokenizer_files:
        raise PairingError("the student's processor does not give the cache's tokens, and the cache holds no teacher "
                           "tokenizer files to align with: rebuild it with this version of kd-cache build")
    teacher_tok = cache.teacher_tokenizer()
    from kd_cache.fingerprint import tokenizer_hash

    same_vocab = tokenizer_hash(tok) == m.tokenizer_hash
    pairing.text = "byte spans, same vocabulary" if same_vocab else "byte spans, projected vocabulary (GOLD)"
    pairing.teacher_piece_bytes = _piece_lengths(teacher_tok)
    pairing.student_piece_bytes = (pairing.teacher_piece_bytes if same_vocab else _piece_lengths(tok))
    # Every refusal before step 1: encode and align a few samples (the projection takes no part in it).
    kinds = tuple(k for k in ("response", "visual") if k in m.positions)
    probes = []
    for i in _probe_indices(cache):
        s = cache[i]
        probes.append((s, pairing.sample(s, load_images(s), teacher_kinds=kinds, relation=bool(s.get("relation")))))
    if same_vocab:
        pairing.projection = VocabProjection.identity(m.vocab_size)
    else:
        pairs = {int(t): int(t2) for t, t2 in _special_pairs(teacher_tok, tok).items()}
        pairs.update(_end_of_turn_pairs(probes))
        pairing.projection = cached_projection(teacher_tok, tok, projection_dir or projection_folder(), pairs)
    return pairing


def _special_pairs(teacher_tok, student_tok) -> dict[int, int]:
    """Special tokens both tokenizers spell the same (``<|im_end|>`` in both): teacher id -> student id."""
    student = {str(t): i for i, t in student_tok.added_tokens_decoder.items()}
    return {i: student[str(t)] for i, t in teacher_tok.added_tokens_decoder.items() if str(t) in student}
