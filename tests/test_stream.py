"""The streaming dataset: a pure-function order, resumption without replay, rank/worker splits, collation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from student_fixtures import one_torch_thread, write_synthetic_cache  # noqa: F401

from kd_cache import open_cache
from student.stream import StreamingKDDataset, epoch_order, make_loader, rank_stream, steps_per_epoch, window_plan


@pytest.fixture(scope="module")
def odd_cache(tmp_path_factory, processor):
    """117 text-only samples in shards of 10 (the last one holds 7): an awkward size on purpose."""
    return write_synthetic_cache(tmp_path_factory.mktemp("odd"), processor, n=117, shard_size=10, k=2,
                                 image_every=0, min_len=4, max_len=8, relation="none")


@pytest.fixture(scope="module")
def mixed_cache(tmp_path_factory, processor):
    """Image and text-only samples of different lengths, with relation matrices."""
    return write_synthetic_cache(tmp_path_factory.mktemp("mixed"), processor, n=9, shard_size=4, k=8,
                                 image_every=2)


def _ids(dataset, num_workers, stop_after=None):
    ids, positions = [], []
    for j, batch in enumerate(make_loader(dataset, num_workers)):
        if stop_after is not None and j == stop_after:
            break
        ids.extend(batch["ids"])
        positions.append(batch["data_position"])
    return ids, positions


def test_epoch_order_is_a_pure_function_of_seed_epoch_and_shard_sizes():
    sizes = [10] * 11 + [7]
    a = epoch_order(sizes, seed=3, epoch=1)
    assert np.array_equal(a, epoch_order(sizes, seed=3, epoch=1))
    assert sorted(a.tolist()) == list(range(117))
    assert not np.array_equal(a, epoch_order(sizes, seed=3, epoch=2))
    assert not np.array_equal(a, epoch_order(sizes, seed=4, epoch=1))
    assert np.array_equal(epoch_order(sizes, 3, 1, shuffle=False), np.arange(117))
    # Block shuffling: each run of block_shards shards is consumed before the next block starts.
    b = epoch_order(sizes, seed=0, epoch=0, block_shards=2)
    shard_of = np.minimum(b // 10, 11)
    first_block = set(shard_of[: (20 if 11 not in shard_of[:20] else 17)].tolist())
    assert len(first_block) == 2


@pytest.mark.parametrize(("world", "accum"), [(1, 1), (2, 1), (2, 3), (3, 2)])
def test_each_step_is_the_one_process_step_cut_sorted_into_contiguous_parts(world, accum):
    order = epoch_order([10] * 11 + [7], seed=0, epoch=0)
    B, usable = 4, 117 - 117 % world
    streams = [rank_stream(order, 0, r, world, B, accum) for r in range(world)]
    # Every rank the same count; together the epoch less its last (117 mod W) positions, each once.
    assert len({len(s) for s in streams}) == 1 and len(streams[0]) == usable // world
    assert np.array_equal(np.sort(np.concatenate(streams)), np.sort(order[:usable]))
    step, per_rank = world * accum * B, accum * B
    n_steps = steps_per_epoch(117, world, B, accum)
    assert n_steps == -(-(usable // world) // per_rank)
    one = rank_stream(order, 0, 0, 1, B, world * accum)  # one process: batch B, W * A micro-batches
    for s in range(n_steps):
        parts = [st[s * per_rank:(s + 1) * per_rank] for st in streams]
        # The step's samples are the one-process step's (positions s*S .. of the order), and the
        # consumers (rank r, micro-batch a), taken in the order r * A + a, hold them sorted: each one
        # a contiguous run of the sorted step.
        expected = np.sort(order[s * step:min((s + 1) * step, usable)])
        assert np.array_equal(np.concatenate(parts), expected), s
        assert set(expected.tolist()) == set(one[s * step:(s + 1) * step].tolist()) - set(order[usable:].tolist())
        assert len({len(p) for p in parts}) == 1  # every rank runs the same micro-batches
    # Resumable at every step boundary: each rank continues exactly where it stood.
    for k in range(n_steps):
        for r in range(world):
            assert np.array_equal(rank_stream(order, k * step, r, world, B, accum), streams[r][k * per_rank:])
    assert steps_per_epoch(117, 2, 4, 3) == 5  # 58 per rank -> 15 micro-batches -> 5 steps


def test_consumers_share_far_fewer_windows_than_with_a_strided_split():
    # 4 ranks x grad-accum 4 x 4 loader workers: worker w of a rank builds its micro-batches a = w.
    # Count the (consumer, window) pairs of an epoch: every pair is a window whose chunks that consumer
    # decodes. The strided split (rank r takes positions r, r + W, ...; micro-batch j to worker j mod 4)
    # spreads every window over nearly every consumer.
    sizes, W, A, B, nw = [256] * 16, 4, 4, 4, 4
    order = epoch_order(sizes, 0, 0)
    starts = np.sort(np.concatenate([w_start for w_start, _ in window_plan(sizes, 0, 0)]))

    def pairs(streams):
        n = 0
        for st in streams:
            for w in range(nw):
                mine = np.concatenate([st[j * B:(j + 1) * B] for j in range(w, -(-len(st) // B), nw)])
                n += len(np.unique(np.searchsorted(starts, mine, side="right")))
        return n

    sorted_split = pairs([rank_stream(order, 0, r, W, B, A) for r in range(W)])
    strided = pairs([order[r::W] for r in range(W)])
    assert len(starts) * 3 < strided  # the old split: most windows read by most of the 16 consumers
    assert 2 * sorted_split < strided, (sorted_split, strided, len(starts))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_no_sample_missing_or_repeated(odd_cache, processor, num_workers):
    def dataset(rank=0, world=1, accum=1):
        return StreamingKDDataset(str(odd_cache), processor, image_folder=None, batch_size=4, seed=7,
                                  rank=rank, world_size=world, grad_accum=accum, with_teacher=False)

    full = dataset()
    full.set_position(epoch=2)
    full_ids, full_pos = _ids(full, num_workers)
    cache = open_cache(str(odd_cache))
    order = epoch_order(cache.shard_sizes, 7, 2)
    # The order, each step's (here: each micro-batch's) samples sorted, whatever num_workers is.
    expected = [cache[int(i)]["id"] for s in range(0, 117, 4) for i in np.sort(order[s:s + 4])]
    assert full_ids == expected
    assert len(set(full_ids)) == 117 and full_pos[-1] == 117

    # Stop after 11 micro-batches (mid-epoch, not on a shard boundary), resume from the position.
    first = dataset()
    first.set_position(epoch=2)
    head, pos = _ids(first, num_workers, stop_after=11)
    resumed = dataset()
    resumed.set_position(epoch=2, samples_seen=pos[-1])
    tail, _ = _ids(resumed, num_workers)
    assert head + tail == full_ids
    assert len(set(head) & set(tail)) == 0

    # Two ranks: disjoint, together the epoch minus its last (117 mod 2) sample, and resumable. With
    # grad-accum 3 a step is 2 x 3 x 4 = 24 samples; stopped after 5 micro-batches (mid step 2), a
    # rank resumes from the position of the last complete step and redoes step 2 whole.
    for accum in (1, 3):
        per_rank = []
        for rank in range(2):
            a = dataset(rank, 2, accum)
            a.set_position(epoch=2)
            h, p = _ids(a, num_workers, stop_after=5)
            assert p[-1] == (40 if accum == 1 else 24)
            b = dataset(rank, 2, accum)
            b.set_position(epoch=2, samples_seen=p[-1])
            t, _ = _ids(b, num_workers)
            c = dataset(rank, 2, accum)
            c.set_position(epoch=2)
            whole = _ids(c, num_workers)[0]
            assert whole == [cache[int(i)]["id"] for i in rank_stream(order, 0, rank, 2, 4, accum)]
            assert h[:4 * (5 - 5 % accum)] + t == whole
            per_rank.append(whole)
        assert len(per_rank[0]) == len(per_rank[1]) == 58
        assert set(per_rank[0]).isdisjoint(per_rank[1])
        assert set(per_rank[0]) | set(per_rank[1]) == {cache[int(i)]["id"] for i in order[:116]}


def test_collation_pads_right_and_offsets_positions_into_the_batch(mixed_cache, processor):
    ds = StreamingKDDataset(str(mixed_cache), processor, image_folder=None, batch_size=5, shuffle=False)
    cache = open_cache(str(mixed_cache))
    samples = [cache[i] for i in range(5)]
    batch = ds.collate(samples)
    B, T = batch["model_inputs"]["input_ids"].shape
    assert B == 5 and T == max(len(s["input_ids"]) for s in samples)
    flat = batch["model_inputs"]["input_ids"].reshape(-1)
    image_id = cache.manifest.image_token_id
    for b, s in enumerate(samples):
        L = len(s["input_ids"])
        assert batch["model_inputs"]["attention_mask"][b].tolist() == [1] * L + [0] * (T - L)
        assert batch["model_inputs"]["input_ids"][b, :L].tolist() == s["input_ids"].tolist()
        assert (batch["model_inputs"]["input_ids"][b, L:] == processor.tokenizer.pad_token_id).all()
    # Response index t predicts token t + 1 of the same row; visual indices are image tokens.
    assert torch.equal(flat[batch["response_index"] + 1], batch["response_targets"])
    assert (flat[batch["visual_index"]] == image_id).all()
    assert torch.equal(batch["response_index"] // T, batch["response_batch"])
    n_img = sum(len(s["images"]) for s in samples)
    # Every input of the student's processor, collated.
    mi = batch["model_inputs"]
    assert mi["pixel_values"].shape[0] == n_img == 3
    # Teacher arrays are the samples' arrays, concatenated in order.
    assert torch.equal(batch["response_ids"], torch.from_numpy(
        np.concatenate([s["response_ids"] for s in samples]).astype(np.int64)))
    assert torch.allclose(batch["visual_tail"], torch.from_numpy(
        np.concatenate([s["visual_tail"] for s in samples])))
    # One relation per image, indexing that image's own visual positions.
    assert batch["relation_index"].shape == (3, 16) and batch["relation_target"].shape == (3, 16, 16)
    assert batch["relation_counts"].tolist() == [16, 16, 16]
    assert (flat[batch["relation_index"]] == image_id).all()
    assert torch.equal(batch["relation_index"][1] // T, torch.full((16,), 2))

    sft = StreamingKDDataset(str(mixed_cache), processor, image_folder=None, batch_size=5, with_teacher=False)
    plain = sft.collate(samples)
    teacher_keys = {f"{kind}_{f}" for kind in ("response", "visual") for f in ("ids", "logprobs", "tail")}
    assert teacher_keys <= set(batch) and not (teacher_keys | {"relation_index", "relation_target"}) & set(plain)


def test_sample_mode_batches_carry_counts(tmp_path, processor):
    path = write_synthetic_cache(tmp_path, processor, n=3, shard_size=3, k=8, sparse_mode="sample")
    ds = StreamingKDDataset(str(path), processor, image_folder=None, batch_size=3)
    batch = next(iter(make_loader(ds)))
    assert batch["response_counts"].shape == batch["response_ids"].shape
    assert ((batch["response_counts"] > 0) == (batch["response_ids"] >= 0)).all()


def test_missing_image_names_the_sample_and_the_flag(mixed_cache, processor, tmp_path):
    ds = StreamingKDDataset(str(mixed_cache), processor, image_folder=str(tmp_path), batch_size=2, shuffle=False)
    with pytest.raises(FileNotFoundError, match="syn-0-00000.*--image-folder"):
        next(iter(make_loader(ds)))


def _max_open_shards(order: np.ndarray, sizes: list[int]) -> int:
    """Most shards begun but not finished at any point of the order (what a reader keeps open)."""
    starts = np.concatenate([[0], np.cumsum(sizes)])
    shard = np.searchsorted(starts, order, side="right") - 1
    left = dict(enumerate(sizes))
    open_now, most = set(), 0
    for s in shard.tolist():
        open_now.add(s)
        most = max(most, len(open_now))
        left[s] -= 1
        if left[s] == 0:
            open_now.discard(s)
    return most


@pytest.mark.parametrize("window,mix", [(2, 8), (3, 1), (5, 3), (32, 8), (200, 2)])
def test_windowed_order_is_pure_covers_every_sample_once_and_keeps_blocks(window, mix):
    sizes = [10] * 11 + [7, 0, 23]
    for epoch in range(3):
        a = epoch_order(sizes, 5, epoch, window=window, mix=mix)
        assert np.array_equal(a, epoch_order(sizes, 5, epoch, window=window, mix=mix))
        assert np.array_equal(np.sort(a), np.arange(sum(sizes)))
        assert _max_open_shards(epoch_order(sizes, 5, epoch, block_shards=2, window=window, mix=mix), sizes) <= 2
    assert not np.array_equal(epoch_order(sizes, 5, 0, window=window, mix=mix),
                              epoch_order(sizes, 5, 1, window=window, mix=mix))
    assert epoch_order([], 0, 0, window=window, mix=mix).shape == (0,)


def test_windows_are_short_runs_of_one_shard_read_front_to_back_and_move_between_epochs():
    sizes = [10] * 11 + [7, 0, 23]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    cut_sets = []
    for epoch in range(2):
        plan = window_plan(sizes, 1, epoch, block_shards=3, window=4)
        windows = [np.arange(a, a + n) for w_start, w_len in plan for a, n in zip(w_start, w_len)]
        assert all(1 <= len(w) <= 4 for w in windows)
        assert all(np.searchsorted(starts, w[0], "right") == np.searchsorted(starts, w[-1], "right") for w in windows)
        assert np.array_equal(np.sort(np.concatenate(windows)), np.arange(sum(sizes)))
        # Inside a shard the cuts are 4 apart (only a shard's first and last windows are shorter).
        for lo, hi in zip(starts[:-1], starts[1:]):
            firsts = sorted(int(w[0]) for w in windows if lo <= w[0] < hi)
            assert all(b - a == 4 for a, b in zip(firsts[1:], firsts[2:]))
        cut_sets.append({int(w[0]) for w in windows})
        # mix=1 reads the windows one after the other, each front to back
        assert np.array_equal(epoch_order(sizes, 1, epoch, block_shards=3, window=4, mix=1), np.concatenate(windows))
    assert cut_sets[0] != cut_sets[1]  # the cut points shift per epoch: windows differ between epochs


@pytest.mark.parametrize("mix", [2, 3, 8])
def test_mix_deals_the_planned_windows_in_groups_each_front_to_back(mix):
    sizes = [37, 0, 50, 13, 21]
    order = epoch_order(sizes, 9, 4, block_shards=2, window=6, mix=mix)
    at = 0
    for w_start, w_len in window_plan(sizes, 9, 4, block_shards=2, window=6):
        for g in range(0, len(w_start), mix):
            group = [np.arange(a, a + n) for a, n in zip(w_start[g:g + mix], w_len[g:g + mix])]
            part = order[at:at + sum(len(w) for w in group)]
            assert np.array_equal(np.sort(part), np.sort(np.concatenate(group)))
            for w in group:
                assert np.array_equal(part[np.isin(part, w)], w)
            at += len(part)
    assert at == sum(sizes)
    assert not np.array_equal(order, epoch_order(sizes, 9, 4, block_shards=2, window=6, mix=1))


def _write_text_cache(root, n: int, chunk_bytes: int) -> str:
    """Text-only top-8 samples with tiny chunks (a few samples per chunk), in shards of 40."""
    from cache_fixtures import synthetic_manifest

    from kd_cache.writer import CacheWriter

    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        ids = rng.integers(5, 60, int(rng.integers(20, 40))).astype(np.int32)
        labels = ids.copy()
        labels[:6] = -100
        pos = np.flatnonzero(labels[1:] != -100).astype(np.int32)
        samples.append({"id": f"t{i:03d}", "input_ids": ids, "labels": labels, "response_positions": pos,
                        "response_ids": rng.integers(0, 60, (len(pos), 8)),
                        "response_logprobs": -rng.exponential(2.0, (len(pos), 8)),
                        "response_tail": np.log(rng.uniform(0.01, 0.5, len(pos)))})
    w = CacheWriter(str(root), chunk_bytes=chunk_bytes)
    entries = [w.write_shard(j, samples[a:a + 40], sparse_mode="topk", k=8, relation="none")
               for j, a in enumerate(range(0, n, 40))]
    w.write_manifest(synthetic_manifest(entries, k=8, relation="none"))
    return str(root)


def test_windowed_order_decodes_each_chunk_about_once_and_reads_the_same_samples(tmp_path, processor, monkeypatch):
    from kd_cache.reader import ChunkCache, KDCache

    url = _write_text_cache(tmp_path / "c", 160, chunk_bytes=1024)
    decoded = []
    put = ChunkCache.put
    monkeypatch.setattr(ChunkCache, "put", lambda self, key, a: (decoded.append(key), put(self, key, a))[1])
    plain = KDCache(url, cache_bytes=1)  # keeps nothing between reads: the plain per-sample path

    def read_epoch(uniform: bool):
        # A budget of 8 chunks of 1 KiB per window read at once, as the default is for 1 MiB chunks.
        ds = StreamingKDDataset(url, processor, image_folder=None, batch_size=4, seed=3, window=16, mix=4,
                                cache_bytes=(4 + 4) * 8 * 1024)
        ds.set_position(1)
        # The reference: the same samples in a uniformly random order (no read locality).
        order = np.random.default_rng(1).permutation(ds._stream) if uniform else ds._stream
        decoded.clear()
        got = [ds._read(int(i)) for i in order]
        n_decoded = len(decoded)
        for i, s in zip(order.tolist(), got):
            want = plain[i]
            assert s.keys() == want.keys() and s["id"] == want["id"]
            for key, v in want.items():
                if isinstance(v, np.ndarray):
                    assert v.dtype == s[key].dtype and np.array_equal(v, s[key]), key
        return n_decoded

    n_chunks = sum(-(-a.shape[0] // a.chunks[0]) for s in range(4) for name, a in
                   plain._open_shard(s).arrays() if a.shape[0] and not name.endswith("offsets"))
    windowed = read_epoch(uniform=False)
    uniform = read_epoch(uniform=True)
    assert windowed <= 1.3 * n_chunks and uniform >= 2.5 * windowed


# Frees a 24 MB block (below the kept mmap threshold of 32 MB) and prints how many MB the process's
# resident memory shrank by: after ``_keep_freed_memory()`` when argv[1] is "keep", else with glibc's
# defaults in a bare interpreter.
_FREE_24MB = """
import ctypes, os, sys
applied = False
if sys.argv[1] == "keep":
    from student.stream import _keep_freed_memory
    applied = _keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
block = libc.malloc(24 << 20)
ctypes.memset(block, 1, 24 << 20)
before = rss()
libc.free(block)
print(applied, (before - rss()) >> 20)
"""


def test_loader_workers_keep_freed_memory_on_glibc():
    import platform
    import subprocess
    import sys

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("the allocator settings are glibc's")

    # What every loader worker runs at start, in a process of its own (it changes the allocator).
    def shrink(mode: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", _FREE_24MB, mode], capture_output=True, text=True, check=True)
        applied, mb = out.stdout.split()
        return applied, int(mb)

    applied, mb = shrink("plain")
    assert applied == "False" and mb >= 23  # glibc's defaults give the block back to the kernel
    applied, mb = shrink("keep")
    assert applied == "True" and mb <= 1  # a worker keeps it for the next sample
