"""Streaming the teacher cache into padded training batches.

Order. The sample order of an epoch is a pure function of ``(seed, epoch, shard sizes)``
(``epoch_order``): the shards are permuted, taken ``block_shards`` at a time, and the samples of each
block are shuffled together. Reading stays shard-local (a worker keeps the block's shards open)
while batches still mix samples of several shards. The shuffle is read-friendly: a block's shards
are cut into windows of ``WINDOW`` consecutive samples, the windows are permuted, and the samples of
``MIX_WINDOWS`` windows at a time are interleaved at random, each window read front to back. A batch
thus draws from several random places of the block, and each compressed chunk is decoded about once
by a worker instead of once per sample that touches it (the chunks of the windows being read stay in
one decoded-chunk cache per worker).

Split. An optimizer step of ``W`` ranks x ``A`` micro-batches (``grad_accum``) x ``B`` samples
takes the next ``S = W * A * B`` positions of the epoch order, exactly the samples one process with
batch ``W * A * B`` would take. The step's sample indices are sorted (the global index follows the
shards and, within a shard, the read order of its windows) and cut into ``W * A`` contiguous parts
of ``B``: micro-batch ``a`` of rank ``r`` is part ``r * A + a`` (``rank_stream``). Only who computes
which sample changes; the trainer normalises each loss by the step's global count, so the gradient
is that of the one-process step (up to float summation order). Sorted, a step's samples are the
next run of each window of the mix group being read (``epoch_order``), and the windows keep their
order from step to step (their parts' edges drift as the runs' lengths vary), so a consumer keeps
to a few windows and each chunk is decoded by a few consumers, not by nearly every one (the read
work would grow with the consumers; benchmarks/RESULTS.md, "Scale"). The last, partial step takes
the epoch's remaining samples but the last ``N mod W`` of the epoch (dropped so that every rank runs
the same number of micro-batches: a collective in the backward pass would otherwise hang), sorted
and cut into ``W`` contiguous parts, each read in micro-batches of ``B`` (the last one shorter).

Workers. Micro-batch ``j`` of a rank is built by dataloader worker ``j mod workers``;
``torch.utils.data.DataLoader`` reads its workers round-robin, so the batches arrive in the same
order whatever ``num_workers`` is. With ``A`` a multiple of ``workers``, worker ``w`` builds parts
``w, w + workers, ...`` of every step, which lie in the same windows step after step (one part each
when ``A == workers``); with fewer micro-batches than workers (``A = 1``), each worker builds every
``workers``-th step of its rank, and all of a rank's workers decode the chunks of the rank's windows.
``benchmarks/bench_scale.py --only split`` counts the consumers decoding each chunk.

Resumption. The state is ``(epoch, samples_seen)``: ``samples_seen`` counts the samples of the epoch
order consumed by all ranks together in complete optimizer steps (always a prefix of the order, at a
step boundary). A resumed stream starts right after that prefix; nothing is replayed. A micro-batch
that does not end its step reports the position of the step's start (``position_after``): resuming
from it redoes the whole step.

Batches. In the workers, each sample's images are decoded from the bytes the cache stores (a
self-contained cache) or read from the image folder, and the student's
processor is run on the sample's ``processor_call`` (the text the teacher's processor was given, before
placeholder expansion) and images (``kd_cache.processing.model_inputs``: ids and inputs, without the
offset bookkeeping the teacher pass needs), so the model inputs are exactly the student processor's
(tiles, ``image_sizes``, ``image_grid_thw``, ``mm_token_type_ids``, ...). Its ids must equal the cached
ids (the cache's distributions are at those positions; where the build cut at ``--max-length``, the
cached ids are a prefix that keeps every image token): a sample whose ids differ is refused, naming it
and both counts. ``batch["model_inputs"]`` holds
every input, collated (``processing.collate``: right padding); per-sample positions become flat
indices into the padded ``[B * T]`` hidden states; teacher arrays are concatenated over the batch with
a batch index.

Position kinds. ``response`` (CE and MDist), ``visual`` (MDist, RDist, affinity) and ``prompt`` (all
other text, LLaVADI). Positions come from the cache for the kinds it holds (``manifest.positions``)
and are derived from the tokens otherwise, with the function the teacher pass uses
(``kd_cache.schema.derive_positions``), so CE and RDist work whatever kinds were cached. Teacher
arrays are only collated for requested kinds the cache holds.
"""

from __future__ import annotations

import copy
import ctypes
import math
import platform
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from kd_cache import processing
from kd_cache.format import CHUNK_BYTES
from kd_cache.processing import ProcessedSample
from kd_cache.reader import ChunkCache, open_cache
from kd_cache.records import BadRecord, decode_image, load_image
from kd_cache.schema import DEFAULT_KINDS, IGNORE_INDEX, KINDS, TEACHER_ARRAYS, derive_positions, predicted_tokens

# Read locality of the shuffled order (see ``epoch_order``): windows of WINDOW consecutive samples of a
# shard, MIX_WINDOWS of them interleaved. Chosen by benchmarks/bench_loader.py (see benchmarks/RESULTS.md).
WINDOW = 32
MIX_WINDOWS = 8
# Decoded chunks a window being read keeps cached: about one chunk of each large array (tokens, top-k
# ids and log-probs of two kinds, relation), at the writer's chunk size.
CACHE_BYTES_PER_WINDOW = 8 * CHUNK_BYTES


@dataclass
class DataState:
    """Where the stream stands: ``samples_seen`` samples of epoch ``epoch``'s order are consumed."""

    epoch: int = 0
    samples_seen: int = 0


def epoch_order(shard_sizes: list[int], seed: int, epoch: int, *, shuffle: bool = True,
                block_shards: int = 4, window: int = WINDOW, mix: int = MIX_WINDOWS) -> np.ndarray:
    """Global sample indices of one epoch, in order (a pure function of the arguments).

    ``shuffle=False``: ``0 .. N-1``. Otherwise the shards are permuted and taken ``block_shards`` at
    a time, and each block is consumed before the next starts. Within a block, each shard is cut into
    windows of ``window`` (>= 2) consecutive samples (the cuts move by a random offset per shard and
    epoch, so windows differ between epochs); the block's windows are permuted and taken ``mix`` at a
    time; the samples of those ``mix`` windows are interleaved at random, each window keeping its own
    front-to-back order. Consecutive positions thus come from ``mix`` random places of the block,
    while every window is read front to back, so a reader decodes each compressed chunk about once
    (in a uniformly random order every sample decodes whole chunks of ~1 MiB for its own few rows).

    The windows and their order do not depend on ``mix`` (``window_plan``), only their interleaving.
    ``window`` and ``mix`` are part of the order, like the seed: a run resumes with the ones it ran with.
    """
    sizes = np.asarray(shard_sizes, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    if not shuffle:
        return np.arange(starts[-1], dtype=np.int64)
    deal = np.random.default_rng([int(seed), int(epoch), 1])  # its own stream: ``mix`` leaves the windows alone
    parts = []
    for w_start, w_len in window_plan(shard_sizes, seed, epoch, block_shards=block_shards, window=window):
        for g in range(0, len(w_start), max(1, mix)):
            first, lens = w_start[g:g + mix], w_len[g:g + mix]
            # Window-major list of the group's samples (each window front to back) ...
            flat = np.repeat(first - (np.cumsum(lens) - lens), lens) + np.arange(lens.sum())
            # ... dealt to random slots: the k-th slot labelled w (in slot order) gets window w's k-th sample.
            labels = deal.permutation(np.repeat(np.arange(len(lens)), lens))
            group = np.empty_like(flat)
            group[np.argsort(labels, kind="stable")] = flat
            parts.append(group)
    return np.concatenate(parts or [np.zeros(0, np.int64)]).astype(np.int64)


def window_plan(shard_sizes: list[int], seed: int, epoch: int, *, block_shards: int = 4,
                window: int = WINDOW) -> list[tuple[np.ndarray, np.ndarray]]:
    """The windows of ``epoch_order``: per block, in reading order, the first global
    sample index and the length of each window (consecutive samples of one shard)."""
    if window < 2:
        raise ValueError(f"window must be at least 2 samples, found {window}")
    sizes = np.asarray(shard_sizes, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    rng = np.random.default_rng([int(seed), int(epoch)])
    shard_perm = rng.permutation(len(sizes))
    plan = []
    for b in range(0, len(shard_perm), max(1, block_shards)):
        cuts = []
        for s in shard_perm[b:b + block_shards]:
            lo, hi = starts[s], starts[s + 1]
            shift = int(rng.integers(window))  # the shard's first window holds `shift` samples (0: a full one)
            cuts.append(np.unique(np.concatenate([[lo], np.arange(lo + shift, hi, window), [hi]])))
        w_start = np.concatenate([c[:-1] for c in cuts] or [np.zeros(0, np.int64)])
        w_len = np.concatenate([np.diff(c) for c in cuts] or [np.zeros(0, np.int64)])
        keep = w_len > 0  # an empty shard has no window
        perm = rng.permutation(int(keep.sum()))
        plan.append((w_start[keep][perm], w_len[keep][perm]))
    return plan


def rank_stream(order: np.ndarray, samples_seen: int, rank: int, world_size: int, batch_size: int,
                grad_accum: int = 1) -> np.ndarray:
    """The samples rank ``rank`` still has to read in this epoch (after ``samples_seen`` consumed), its
    micro-batches one after the other (micro-batch ``j`` is ``[j * batch_size, (j + 1) * batch_size)``).

    Each optimizer step's ``world_size * grad_accum * batch_size`` positions of the order, sorted, are
    cut into contiguous parts of ``batch_size``; the rank's micro-batch ``a`` of the step is part
    ``rank * grad_accum + a``. The rest of the epoch (a partial step) loses its last ``len mod
    world_size`` samples and is cut, sorted, into ``world_size`` contiguous parts.
    """
    W, A, B = int(world_size), int(grad_accum), int(batch_size)
    if not 0 <= rank < W or A < 1 or B < 1:
        raise ValueError(f"rank {rank} of {W} processes, grad_accum {A}, batch size {B}: expected "
                         "0 <= rank < world_size and positive grad_accum and batch size")
    rest = np.asarray(order[samples_seen:], dtype=np.int64)
    step = W * A * B
    full = len(rest) // step
    steps = np.sort(rest[:full * step].reshape(full, step), axis=1)
    mine = steps[:, rank * A * B:(rank + 1) * A * B].reshape(-1)
    tail = rest[full * step:]
    tail = np.sort(tail[:len(tail) - len(tail) % W])
    share = len(tail) // W
    return np.concatenate([mine, tail[rank * share:(rank + 1) * share]])


def micro_batches_per_epoch(n_samples: int, world_size: int, batch_size: int) -> int:
    return math.ceil((n_samples // world_size) / batch_size)


def steps_per_epoch(n_samples: int, world_size: int, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps in one epoch; a step never spans two epochs (the last one may be shorter)."""
    return math.ceil(micro_batches_per_epoch(n_samples, world_size, batch_size) / grad_accum)


def _identity(x):
    return x


def _keep_freed_memory() -> bool:
    """Make glibc keep freed memory in this process for reuse (True when it applied).

    A worker allocates and frees several MB per sample (decoded chunks, relation matrices, image
    arrays, batches). With glibc's defaults much of it goes back to the kernel (blocks above a
    moving threshold are mmapped, the heap top is trimmed) and is faulted in again for the next
    sample: ~1900 page faults per LLaVA-sized sample. Measured with benchmarks/bench_loader.py on a
    2-vCPU VM, keeping it cut a worker's CPU per sample by 12% (1 worker) and 7% (2 workers). The
    cost: a worker's resident memory stays near its peak (a few hundred MB at those shapes).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from <malloc.h>
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 256 << 20))


def _worker_init(_):
    torch.set_num_threads(1)  # workers decode and resize images; leave the cores to the main process
    _keep_freed_memory()  # only in the loader's own worker processes, never in the trainer's


class StreamingKDDataset(IterableDataset):
    """Yields collated micro-batches of one rank for the epoch set by ``set_position``.

    Args:
        cache: a cache URL or an opened ``KDCache`` (picklable; each worker reopens the shards).
        processor: the student's processor (image processor + tokenizer for the pad id).
        image_folder: where the relative image paths of the cache resolve (None: the cache's own).
        with_teacher: include the teacher arrays (False for SFT: they are not even collated).
        kinds: position kinds whose sparse teacher arrays are collated (those the cache holds).
        hidden_kinds: position kinds whose stored teacher hidden states are collated as
            ``{kind}_hidden`` (the cache must hold them: ``kd-cache build --hidden``).
        affinity: also collate ``affinity_visual_rows``/``affinity_response_rows`` (adds response and
            visual to ``hidden_kinds``).
        rank, world_size, grad_accum: this rank's share of each optimizer step (``rank_stream``); a
            resumed run must keep ``grad_accum`` and ``batch_size`` (the steps' boundaries).
        window, mix: read locality of the shuffled order (``epoch_order``); part of the order.
        cache_bytes: decoded chunks kept by a worker (all open shards together); the default holds
            the ``mix`` windows being read at once.
    """

    def __init__(self, cache, processor, *, image_folder: str | None, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, grad_accum: int = 1, shuffle: bool = True, block_shards: int = 4,
                 with_teacher: bool = True, storage_options: dict | None = None,
                 kinds: tuple[str, ...] | list[str] = DEFAULT_KINDS, hidden_kinds: tuple[str, ...] | list[str] = (),
                 affinity: bool = False, window: int = WINDOW, mix: int = MIX_WINDOWS, cache_bytes: int | None = None,
                 pairing=None):
        super().__init__()
        # ``student.alignment.Pairing``: with ``cross``, every sample is re-encoded by the student's own
        # processor and the teacher's arrays are aligned to it (``_collate_cross``)
        self.pairing = pairing if pairing is not None and pairing.cross else None
        self.cache = open_cache(cache, storage_options) if isinstance(cache, (str, Path)) else cache
        self.processor = processor
        self.image_processor = getattr(processor, "image_processor", None)
        tok = getattr(processor, "tokenizer", processor)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        # Default: the folder the cache was built from (recorded in its manifest).
        self.image_folder = image_folder or self.cache.manifest.image_folder
        self.batch_size, self.seed, self.shuffle, self.block_shards = batch_size, seed, shuffle, block_shards
        self.window, self.mix = int(window), int(mix)
        self.cache_bytes = int(cache_bytes) if cache_bytes is not None else (max(1, self.mix) + 4) * CACHE_BYTES_PER_WINDOW
        self.rank, self.world_size, self.grad_accum = rank, world_size, int(grad_accum)
        self.with_teacher = with_teacher
        m = self.cache.manifest
        self.image_token_id = m.image_token_id
        unknown = sorted((set(kinds) | set(hidden_kinds)) - set(KINDS))
        if unknown:
            raise ValueError(f"unknown position kind(s) {unknown}: expected a subset of {', '.join(KINDS)}")
        self.cached_kinds = tuple(m.positions)
        self.affinity = bool(affinity and with_teacher)
        hidden_set = set(hidden_kinds) | ({"response", "visual"} if self.affinity else set())
        self.teacher_kinds = tuple(k for k in KINDS if with_teacher and k in kinds and k in self.cached_kinds)
        self.hidden_kinds = tuple(k for k in KINDS if with_teacher and k in hidden_set)
        if self.hidden_kinds:
            uncached = [k for k in self.hidden_kinds if k not in self.cached_kinds]
            if not m.hidden.stored or uncached:
                what = "no teacher hidden states" if not m.hidden.stored else \
                    f"no teacher hidden states at {', '.join(uncached)} positions (cached: {', '.join(self.cached_kinds)})"
                raise ValueError(f"cache {self.cache.url}: {what}; rebuild the "
                                 f"cache with kd-cache build --hidden --positions {','.join(self.hidden_kinds)}")
        self.hidden_size = m.hidden.size
        # Index arrays: response (CE) and visual (relations) always, prompt when it is used.
        used = set(kinds) | hidden_set
        self.index_kinds = tuple(k for k in KINDS if k in DEFAULT_KINDS or k in used)
        self.state = DataState()
        self._stream = np.zeros(0, np.int64)
        self._readers: OrderedDict[int, Any] = OrderedDict()
        self._chunks: ChunkCache | None = None
        self.set_position(0, 0)

    # ------------------------------------------------------------------------------------ position
    def set_position(self, epoch: int, samples_seen: int = 0) -> None:
        order = epoch_order(self.cache.shard_sizes, self.seed, epoch, shuffle=self.shuffle,
                            block_shards=self.block_shards, window=self.window, mix=self.mix)
        if not 0 <= samples_seen <= len(order):
            raise ValueError(f"data position {samples_seen} is outside epoch {epoch} of {len(order)} samples")
        self.state = DataState(epoch, samples_seen)
        self._stream = rank_stream(order, samples_seen, self.rank, self.world_size, self.batch_size, self.grad_accum)

    def __len__(self) -> int:
        """Micro-batches left in the current epoch for this rank."""
        return math.ceil(len(self._stream) / self.batch_size)

    def batch_indices(self, j: int) -> np.ndarray:
        return self._stream[j * self.batch_size:(j + 1) * self.batch_size]

    def position_after(self, j: int) -> int:
        """``samples_seen`` once micro-batch ``j`` (counted from the set position) is consumed: the end
        of its optimizer step if it is the step's last micro-batch (or the epoch's), else the step's start."""
        done = (j + 1) // self.grad_accum if j + 1 < len(self) else math.ceil(len(self) / self.grad_accum)
        consumed = min(done * self.grad_accum * self.batch_size, len(self._stream))
        return self.state.samples_seen + consumed * self.world_size

    # ----------------------------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        for j in range(wid, len(self), nw):
            batch = self.collate([self._read(int(i)) for i in self.batch_indices(j)])
            batch["data_position"] = self.position_after(j)
            batch["epoch"] = self.state.epoch
            yield batch

    def _read(self, i: int) -> dict:
        shard, local = self.cache.locate(i)
        reader = self._readers.get(shard)
        if reader is None:
            # One reader per open shard (a KDCache keeps one shard open): a shuffle block touches
            # ``block_shards`` shards in turn. All share one chunk cache, sized for the windows
            # read at once (see ``epoch_order``).
            if self._chunks is None:
                self._chunks = ChunkCache(self.cache_bytes)
            reader = self._readers[shard] = copy.copy(self.cache)
            reader.chunk_cache = self._chunks
            while len(self._readers) > self.block_shards + 1:
                self._readers.popitem(last=False)
        self._readers.move_to_end(shard)
        return reader.read_sample(shard, local)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_readers"] = OrderedDict()
        state["_chunks"] = None
        return state

    # ------------------------------------------------------------------------------------ collation
    def _load_images(self, sample: dict) -> list:
        return load_sample_images(sample, self.image_folder)

    def _positions(self, s: dict, kind: str, ids: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Positions of one kind: as cached, or derived from the tokens when the cache lacks the kind."""
        if kind in self.cached_kinds:
            return np.asarray(s[f"{kind}_positions"], dtype=np.int64)
        return derive_positions(kind, ids, labels, self.image_token_id).astype(np.int64)

    def _model_inputs(self, s: dict, ids: np.ndarray, labels: np.ndarray) -> ProcessedSample:
        """The student processor's encoding of sample ``s``, checked against its cached ids.

        A sample without a processor call (a text-only teacher's, or one written without it) and a
        student without an image processor use the cached ids as they are; a sample with images then
        has no way to its pixels and is refused."""
        sid, call = s["id"], s.get("processor_call") or {}
        if not (call and self.image_processor is not None):
            if s["images"]:
                raise ValueError(f"sample {sid!r} has images but " + (
                    "the student's processor has no image processor" if self.image_processor is None else
                    "no processor call: rebuild the cache with this version of kd-cache build"))
            t = torch.from_numpy(ids)[None]
            return ProcessedSample(ids, labels, {"input_ids": t, "attention_mask": torch.ones_like(t)})
        try:
            # ids and model inputs only: the labels and visual positions are the cache's
            full, inputs = processing.model_inputs(self.processor, call, self._load_images(s))
        except ValueError as e:
            raise ValueError(f"sample {sid!r}: the student's processor cannot encode the teacher's text and images "
                             f"({e}): teacher and student must share the processor's tokens") from e
        n, counts = len(ids), [int(c) for c in s["image_token_counts"]]
        same = len(full) >= n and np.array_equal(full[:n], ids)
        # the build cut at --max-length: never through an image (its features would lose their tokens)
        if not same or (self.image_token_id is not None and (full[n:] == self.image_token_id).any()):
            # the refusal only: the processor's own per-image counts, for the message
            enc = processing.process(self.processor, self.image_token_id, call, self._load_images(s))
            raise ValueError(
                f"sample {sid!r}: the student's processor gives {len(full)} tokens with "
                f"{enc.image_token_counts} visual tokens per image, the cache holds {n} tokens with {counts}"
                + (" (same length, different ids)" if len(full) == n and not same else "")
                + ": the student's processor must tokenize and expand images exactly as the teacher's did "
                "(same tokenizer, same image processor settings)")
        cut = {k: v[:, :n] if k in processing.TOKEN_INPUTS else v for k, v in inputs.items()}
        return ProcessedSample(ids, labels, cut)

    def collate(self, samples: list[dict]) -> dict:
        """Right-padded batch with flat position indices and concatenated teacher arrays.

        Keys: ``model_inputs``: every input of the student's processor for the batch, collated
        (``input_ids``/``attention_mask`` [B, T], ``pixel_values``, ``image_sizes``, ...);
        ``response_index`` [P] flat ``b * T + t`` indices of response positions with ``response_targets``
        [P] (the labelled token t + 1); ``visual_index`` [Pv]; ``prompt_index`` [Pp] when prompt
        positions are used; ``{kind}_batch`` [P] sample index; with the teacher, for each of
        ``teacher_kinds``: its ``kd_cache.schema.TEACHER_ARRAYS`` that the cache holds, ``{kind}_ids``
        [P, K] (-1 pad), ``{kind}_tail`` [P], ``{kind}_logprobs`` [P, K] (top-k; sample mode only when the
        cache kept them), ``{kind}_counts`` [P, K] and ``{kind}_logp_mean`` [P] (sample mode); for each of
        ``hidden_kinds``: ``{kind}_hidden`` [P, D] float32 (teacher final-layer states);
        ``relation_index`` [R, N] flat indices of each image's visual positions (N = the batch's largest
        image; an image with fewer is padded with -1), ``relation_target`` [R, N, N] (zero padded) and
        ``relation_counts`` [R] (each image's own count); with ``affinity``: ``affinity_visual_rows`` [A, Nv] and
        ``affinity_response_rows`` [A, Nr], rows into the batch's visual/response arrays (-1 pad) of
        the A samples having both kinds. Plus ``ids`` (sample ids) and ``n_samples``.
        """
        if self.pairing is not None:
            return self._collate_cross(samples)
        T = max(len(s["input_ids"]) for s in samples)
        processed, relations = [], []
        per_kind: dict[str, list[dict]] = {k: [] for k in self.index_kinds}
        for b, s in enumerate(samples):
            ids = np.asarray(s["input_ids"], dtype=np.int64)
            labels = np.asarray(s["labels"], dtype=np.int64)
            processed.append(self._model_inputs(s, ids, labels))
            for kind in self.index_kinds:
                per_kind[kind].append(self._kind_entry(s, kind, b, T, ids, labels))
            if self.with_teacher and s.get("relation"):
                relations += _image_relations(s, per_kind["visual"][-1]["index"])

        out: dict[str, Any] = {"model_inputs": processing.collate(processed, self.pad_id),
                               "ids": [str(s["id"]) for s in samples], "n_samples": len(samples)}
        for kind in self.index_kinds:
            out.update(self._kind_batch(kind, per_kind[kind]))
        if relations:
            out.update(_relation_batch(*zip(*relations)))
        if self.affinity:
            out.update(_affinity_rows([len(e["index"]) for e in per_kind["visual"]],
                                      [len(e["index"]) for e in per_kind["response"]]))
        return out

    def _collate_cross(self, samples: list[dict]) -> dict:
        """``collate`` for a student of another tokenizer, template or image layout (``student.alignment``):
        the student's own encoding of each sample, and the teacher's arrays aligned to it.

        Keys as ``collate``'s, at the student's positions (``response_index``/``targets``, ``visual_index``,
        relations at the student's size), except the response teacher: ``cross_response_{ids,logprobs,tail,
        realised}`` [P_t, ...] at the teacher's own response positions and ``cross_groups`` [G, 4] (teacher
        first row, teacher rows, student first row, student rows; rows of the batch's concatenated teacher
        and student response positions), ``cross_one_to_one`` / ``cross_answer_positions`` (student answer
        positions in 1:1 groups / in all). ``visual_*`` teacher arrays are teacher-vocabulary rows mixed
        onto the student's visual positions (a row without any teacher overlap: ids -1)."""
        relation = self.with_teacher
        entries = [self.pairing.sample(s, self._load_images(s), teacher_kinds=self.teacher_kinds,
                                       relation=relation and bool(s.get("relation"))) for s in samples]
        T = max(len(e["processed"].input_ids) for e in entries)
        out: dict[str, Any] = {"model_inputs": processing.collate([e["processed"] for e in entries], self.pad_id),
                               "ids": [str(s["id"]) for s in samples], "n_samples": len(samples),
                               "cross": torch.ones(())}  # a tensor: it reaches the model with the batch
        for kind in ("response", "visual"):
            out[f"{kind}_index"] = torch.from_numpy(np.concatenate([b * T + e[kind] for b, e in enumerate(entries)]))
            out[f"{kind}_batch"] = torch.from_numpy(np.concatenate([np.full(len(e[kind]), b, np.int64)
                                                                    for b, e in enumerate(entries)]))
        out["response_targets"] = torch.from_numpy(np.concatenate([e["targets"] for e in entries]).astype(np.int64))
        if "response" in self.teacher_kinds:
            names = [a.name for a in TEACHER_ARRAYS if a.name in ("ids", "logprobs", "tail")]
            out.update(_cat_teacher("cross_response", [{n: np.asarray(s[f"response_{n}"]) for n in names}
                                                       for s in samples]))
            out["cross_response_realised"] = torch.from_numpy(np.concatenate(
                [np.asarray(s["response_realised"], dtype=np.float32) for s in samples]))
            t0 = np.cumsum([0] + [len(s["response_positions"]) for s in samples])
            s0 = np.cumsum([0] + [len(e["response"]) for e in entries])
            out["cross_groups"] = torch.from_numpy(np.concatenate(
                [e["groups"] + np.array([t0[b], 0, s0[b], 0]) for b, e in enumerate(entries)]).reshape(-1, 4))
            out["cross_one_to_one"] = sum(e["one_to_one"] for e in entries)
            out["cross_answer_positions"] = sum(e["student_answer"] for e in entries)
        if "visual" in self.teacher_kinds:
            out.update(_cat_teacher("visual", [e["visual_teacher"] for e in entries]))
        relations = []
        for b, e in enumerate(entries):
            counts = e["processed"].image_token_counts
            per_image = np.split(b * T + e["visual"], np.cumsum(counts)[:-1]) if counts else []
            relations += list(zip(per_image, e.get("relations", [])))
        if relations:
            out.update(_relation_batch(*zip(*relations)))
        return out

    def _kind_entry(self, s: dict, kind: str, b: int, T: int, ids: np.ndarray, labels: np.ndarray) -> dict:
        """Sample ``s``'s part of a kind, as numpy arrays: flat indices into the padded ``[B * T]`` batch
        (``b``: its row), sample index, response targets, teacher arrays and hidden states."""
        pos = self._positions(s, kind, ids, labels)
        entry = {"index": b * T + pos, "batch": np.full(len(pos), b, np.int64)}
        if kind == "response":
            targets = predicted_tokens(labels, pos)
            if (targets == IGNORE_INDEX).any():
                raise ValueError(f"sample {s['id']!r}: a response position predicts an unlabelled "
                                 "token: the cache is inconsistent")
            entry["targets"] = targets
        if kind in self.teacher_kinds:
            entry["teacher"] = {a.name: np.asarray(s[f"{kind}_{a.name}"]) for a in TEACHER_ARRAYS
                                if f"{kind}_{a.name}" in s}
        if kind in self.hidden_kinds:
            h = s.get(f"{kind}_hidden")
            if h is None or np.asarray(h).shape[0] != len(pos):
                raise ValueError(f"sample {s['id']!r}: no teacher hidden states for its {len(pos)} {kind} "
                                 "positions: rebuild the cache with kd-cache build --hidden")
            h = np.asarray(h, dtype=np.float32)
            entry["hidden"] = h if h.ndim == 2 else h.reshape(len(pos), self.hidden_size or 0)
        return entry

    def _kind_batch(self, kind: str, entries: list[dict]) -> dict[str, torch.Tensor]:
        """A kind's entries concatenated over the batch (``collate``'s ``{kind}_*`` keys)."""
        out = {f"{kind}_index": torch.from_numpy(np.concatenate([e["index"] for e in entries])),
               f"{kind}_batch": torch.from_numpy(np.concatenate([e["batch"] for e in entries]))}
        if kind == "response":
            out["response_targets"] = torch.from_numpy(np.concatenate([e["targets"] for e in entries]))
        if kind in self.teacher_kinds:
            out.update(_cat_teacher(kind, [e["teacher"] for e in entries]))
        if kind in self.hidden_kinds:
            width = self.hidden_size or max(e["hidden"].shape[1] for e in entries)
            out[f"{kind}_hidden"] = torch.from_numpy(np.concatenate([e["hidden"].reshape(-1, width) for e in entries]))
        return out


def load_sample_images(sample: dict, image_folder: str | None) -> list:
    """A cached sample's images: decoded from the bytes the cache stores, or read by path from ``image_folder``."""
    sid = sample["id"]
    stored = sample.get("image_bytes") or [None] * len(sample["images"])
    out = []
    for rel, data in zip(sample["images"], stored):
        try:
            if data is not None:
                out.append(decode_image(data, sid, f"the image stored in the cache ({rel or 'embedded'})"))
                continue
            if image_folder is None and not Path(rel).is_absolute():
                raise FileNotFoundError(
                    f"sample {sid!r}: image {rel!r} is relative and no image folder is known; "
                    "pass --image-folder (the cache records none)")
            out.append(load_image(rel, image_folder, sid))
        except BadRecord as e:
            raise FileNotFoundError(f"sample {sid!r}: cannot read image {e.detail} ({e.reason}); "
                                    + ("the cache's stored bytes are damaged" if data is not None
                                       else "check --image-folder")) from e
    return out


def _image_relations(s: dict, visual_index: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per image of sample ``s``: the flat indices of its visual positions and its cached relation matrix."""
    counts = [int(c) for c in s["image_token_counts"]]
    sizes = [np.asarray(R).shape[0] for R in s["relation"]]
    if sizes != counts or sum(counts) != len(visual_index):
        raise ValueError(f"sample {s['id']!r}: relation matrices of sizes {sizes} for images of "
                         f"{counts} visual tokens at {len(visual_index)} visual positions: the cache is inconsistent")
    return [(v, np.asarray(R, dtype=np.float32))
            for v, R in zip(np.split(visual_index, np.cumsum(counts)[:-1]), s["relation"])]


def _relation_batch(index: list[np.ndarray], target: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """Per-image relation indices and targets of a batch, padded to its largest image: ``relation_index``
    [R, N] (-1 pad), ``relation_target`` [R, N, N] (0 pad), ``relation_counts`` [R]. A student relation
    built from zero rows at the padding (``h[idx.clamp_min(0)] * (idx >= 0)``) is zero there, like the
    target, so the cosine of the padded matrices is the cosine of each image's own block."""
    counts = np.asarray([len(i) for i in index], dtype=np.int64)
    N = int(counts.max())
    idx = np.full((len(index), N), -1, dtype=np.int64)
    tgt = np.zeros((len(index), N, N), dtype=np.float32)
    for r, (i, R) in enumerate(zip(index, target)):
        idx[r, :len(i)] = i
        tgt[r, :len(i), :len(i)] = R
    return {"relation_index": torch.from_numpy(idx), "relation_target": torch.from_numpy(tgt),
            "relation_counts": torch.from_numpy(counts)}


def _affinity_rows(n_visual: list[int], n_response: list[int]) -> dict[str, torch.Tensor]:
    """Per-sample row indices into the batch's concatenated visual/response arrays, padded with -1,
    for the samples that have both kinds: ``affinity_visual_rows`` [A, Nv], ``affinity_response_rows`` [A, Nr]."""
    v0 = np.concatenate([[0], np.cumsum(n_visual)])
    r0 = np.concatenate([[0], np.cumsum(n_response)])
    keep = [b for b in range(len(n_visual)) if n_visual[b] and n_response[b]]
    Nv = max([n_visual[b] for b in keep], default=1)
    Nr = max([n_response[b] for b in keep], default=1)
    vrows = np.full((len(keep), Nv), -1, np.int64)
    rrows = np.full((len(keep), Nr), -1, np.int64)
    for a, b in enumerate(keep):
        vrows[a, :n_visual[b]] = np.arange(v0[b], v0[b + 1])
        rrows[a, :n_response[b]] = np.arange(r0[b], r0[b + 1])
    return {"affinity_visual_rows": torch.from_numpy(vrows), "affinity_response_rows": torch.from_numpy(rrows)}


def _cat_teacher(kind: str, entries: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """One kind's teacher arrays (``TEACHER_ARRAYS``, by name), concatenated over the batch: ``[P, K]``
    arrays padded to the widest sample's K with the array's pad value (ids -1), integers as int64 and
    floats as float32. An array is collated when every sample of the batch holds it."""
    if not entries or "ids" not in entries[0]:
        return {}
    K = max(max(e["ids"].shape[1] if e["ids"].ndim == 2 else 0 for e in entries), 1)

    def pad(a: np.ndarray, fill, dtype) -> np.ndarray:
        a = np.asarray(a).reshape(len(a), -1) if np.asarray(a).size else np.zeros((len(a), 0), dtype)
        out = np.full((a.shape[0], K), fill, dtype=dtype)
        out[:, :a.shape[1]] = a
        return out

    out = {}
    for arr in TEACHER_ARRAYS:
        if not all(arr.name in e for e in entries):
            continue
        dtype = np.int64 if np.dtype(arr.dtype).kind in "iu" else np.float32
        parts = [pad(e[arr.name], arr.pad, dtype) if arr.per_id else np.asarray(e[arr.name], dtype=dtype)
                 for e in entries]
        out[f"{kind}_{arr.name}"] = torch.from_numpy(np.concatenate(parts))
    return out


def make_loader(dataset: StreamingKDDataset, num_workers: int = 0) -> DataLoader:
    """A DataLoader over already-collated micro-batches (order independent of ``num_workers``)."""
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, collate_fn=_identity,
                      worker_init_fn=_worker_init if num_workers else None, pin_memory=torch.cuda.is_available(),
                      prefetch_factor=4 if num_workers else None, persistent_workers=False)
