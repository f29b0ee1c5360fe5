"""The streaming dataset: a pure-function order, resumption without replay, rank/worker splits, collation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from student_fixtures import one_torch_thread, write_synthetic_cache  # noqa: F401

from kd_cache.shards import open_cache
from student.data import StreamingKDDataset, epoch_order, make_loader, rank_stream, steps_per_epoch


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


def test_rank_streams_partition_the_epoch_and_drop_only_the_remainder():
    order = epoch_order([10] * 11 + [7], seed=0, epoch=0)
    streams = [rank_stream(order, 0, r, 2) for r in range(2)]
    assert len(streams[0]) == len(streams[1]) == 58
    assert np.array_equal(np.sort(np.concatenate(streams)), np.sort(order[:116]))
    # After a resumable prefix of 2 * 9 samples each rank continues exactly where it stood.
    assert np.array_equal(rank_stream(order, 18, 1, 2), streams[1][9:])
    assert steps_per_epoch(117, 2, 4, 3) == 5  # 58 per rank -> 15 micro-batches -> 5 steps


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_no_sample_missing_or_repeated(odd_cache, processor, num_workers):
    def dataset(rank=0, world=1):
        return StreamingKDDataset(str(odd_cache), processor, image_folder=None, batch_size=4, seed=7,
                                  rank=rank, world_size=world, with_teacher=False)

    full = dataset()
    full.set_position(epoch=2)
    full_ids, full_pos = _ids(full, num_workers)
    cache = open_cache(str(odd_cache))
    expected = [cache[int(i)]["id"] for i in epoch_order(cache.shard_sizes, 7, 2)]
    assert full_ids == expected  # the order, whatever num_workers is
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

    # Two ranks: disjoint, together the epoch minus its last (117 mod 2) sample, and resumable.
    per_rank = []
    for rank in range(2):
        a = dataset(rank, 2)
        a.set_position(epoch=2)
        h, p = _ids(a, num_workers, stop_after=5)
        b = dataset(rank, 2)
        b.set_position(epoch=2, samples_seen=p[-1])
        t, _ = _ids(b, num_workers)
        c = dataset(rank, 2)
        c.set_position(epoch=2)
        assert h + t == _ids(c, num_workers)[0]
        per_rank.append(h + t)
    assert len(per_rank[0]) == len(per_rank[1]) == 58
    assert set(per_rank[0]).isdisjoint(per_rank[1])
    assert set(per_rank[0]) | set(per_rank[1]) == set(full_ids[:116])


def test_collation_pads_right_and_offsets_positions_into_the_batch(mixed_cache, processor):
    ds = StreamingKDDataset(str(mixed_cache), processor, image_folder=None, batch_size=5, shuffle=False)
    cache = open_cache(str(mixed_cache))
    samples = [cache[i] for i in range(5)]
    batch = ds.collate(samples)
    B, T = batch["input_ids"].shape
    assert B == 5 and T == max(len(s["input_ids"]) for s in samples)
    flat = batch["input_ids"].reshape(-1)
    image_id = cache.manifest["image_token_id"]
    for b, s in enumerate(samples):
        L = len(s["input_ids"])
        assert batch["attention_mask"][b].tolist() == [1] * L + [0] * (T - L)
        assert batch["input_ids"][b, :L].tolist() == s["input_ids"].tolist()
        assert (batch["input_ids"][b, L:] == processor.tokenizer.pad_token_id).all()
    # Response index t predicts token t + 1 of the same row; visual indices are image tokens.
    assert torch.equal(flat[batch["response_index"] + 1], batch["response_targets"])
    assert (flat[batch["visual_index"]] == image_id).all()
    assert torch.equal(batch["response_index"] // T, batch["response_batch"])
    n_img = sum(len(s["images"]) for s in samples)
    assert batch["pixel_values"].shape[0] == n_img == 3
    # Teacher arrays are the samples' arrays, concatenated in order.
    assert torch.equal(batch["response_ids"], torch.from_numpy(
        np.concatenate([s["response_ids"] for s in samples]).astype(np.int64)))
    assert torch.allclose(batch["visual_tail"], torch.from_numpy(
        np.concatenate([s["visual_tail"] for s in samples])))
    # One relation per image, indexing that image's own visual positions.
    assert batch["relation_index"].shape == (3, 16) and batch["relation_target"].shape == (3, 16, 16)
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
