"""Shard writer/reader: round trips, stores, completion markers, manifest, verify, pickling."""

from __future__ import annotations

import json
import os
import pickle
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
from cache_fixtures import synthetic_manifest

from kd_cache import CacheWriter, KDCache, open_cache
from kd_cache.relation import decode_relation, encode_relation, normalise
from kd_cache.schema import FORMAT_VERSION, KINDS, SkippedRecord

VOCAB = 500
N_VIS = 6  # visual tokens of a sample's first image; image m has N_VIS + 2m (relation matrices at each size)


def make_sample(rng: np.random.Generator, i: int, mode: str, k: int, n_images: int | None = None) -> dict:
    """A random sample in the writer's input format (ids padded with -1 in sample mode)."""
    n_img = int(rng.integers(0, 3)) if n_images is None else n_images
    n_vis = [N_VIS + 2 * m for m in range(n_img)]
    L = sum(n_vis) + int(rng.integers(3, 30))
    input_ids = rng.integers(0, VOCAB, L).astype(np.int64)
    labels = input_ids.copy()
    cut = int(rng.integers(1, L))
    labels[:cut] = -100
    if i % 4 == 3:
        labels[:] = -100  # no response positions at all
    resp = np.flatnonzero(labels[1:] != -100)
    vis = np.arange(sum(n_vis))
    s: dict = {
        "id": f"sample-{i}",
        "images": [f"img/{i}_{m}.png" for m in range(n_img)],
        "input_ids": input_ids,
        "labels": labels,
        "image_token_counts": np.asarray(n_vis, np.int32),
        "processor_call": {"text": f"<image> sample {i} \u00e9", "add_special_tokens": False} if i % 2 else {},
    }
    for kind, pos in (("response", resp), ("visual", vis)):
        P = len(pos)
        s[f"{kind}_positions"] = pos.astype(np.int64)
        s[f"{kind}_tail"] = np.log(rng.uniform(0.001, 0.5, P)).astype(np.float32)
        if mode == "topk":
            s[f"{kind}_ids"] = np.array([rng.choice(VOCAB, k, replace=False) for _ in range(P)]).reshape(P, k)
            s[f"{kind}_logprobs"] = -np.sort(rng.exponential(3.0, (P, k)), axis=1).astype(np.float32)
        else:
            ids = np.full((P, k), -1, np.int64)
            counts = np.zeros((P, k), np.int64)
            lps = np.zeros((P, k), np.float32)
            for p in range(P):
                n = int(rng.integers(1, k + 1))
                ids[p, :n] = rng.choice(VOCAB, n, replace=False)
                counts[p, :n] = rng.integers(1, 5, n)
                lps[p, :n] = -rng.exponential(3.0, n)
            s[f"{kind}_ids"], s[f"{kind}_counts"], s[f"{kind}_logprobs"] = ids, counts, lps
    s["relation"] = []
    for n in n_vis:
        Z = rng.standard_normal((n, 16)).astype(np.float32) + 2.0
        s["relation"].append(Z @ Z.T)
    return s


def build_cache(
    url, samples, *, mode="topk", k=8, relation="full", per_shard=4, storage_options=None, sample_logprobs=False,
    **writer_kw,
) -> CacheWriter:
    w = CacheWriter(url, storage_options, **writer_kw)
    entries = []
    for idx, start in enumerate(range(0, len(samples), per_shard)):
        entries.append(
            w.write_shard(idx, samples[start : start + per_shard], sparse_mode=mode, k=k, relation=relation,
                          sample_logprobs=sample_logprobs)
        )
    w.write_manifest(synthetic_manifest(entries, sparse_mode=mode, k=k, relation=relation))
    return w


def assert_sample_equal(got: dict, want: dict, mode: str, k: int, relation: str, logprobs: bool = True,
                        logp_mean_tol: float = 1e-6) -> None:
    """``logprobs``: whether per-entry log-probs are expected back (always in top-k mode)."""
    assert got["id"] == want["id"]
    assert got["images"] == want["images"]
    np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
    np.testing.assert_array_equal(got["labels"], want["labels"])
    assert got["input_ids"].dtype == np.int32 and got["labels"].dtype == np.int32
    assert got["meta"] == want.get("meta", {})
    np.testing.assert_array_equal(got["image_token_counts"], want["image_token_counts"])
    assert got["processor_call"] == want["processor_call"]
    for kind in KINDS:
        if f"{kind}_positions" not in want:  # a kind the sample did not cache reads back empty
            assert got[f"{kind}_positions"].shape == (0,) and got[f"{kind}_ids"].shape == (0, k)
            continue
        P = len(want[f"{kind}_positions"])
        np.testing.assert_array_equal(got[f"{kind}_positions"], want[f"{kind}_positions"])
        assert got[f"{kind}_ids"].shape == (P, k) and got[f"{kind}_ids"].dtype == np.int32
        np.testing.assert_array_equal(got[f"{kind}_ids"], want[f"{kind}_ids"])
        if mode == "topk" or logprobs:
            assert got[f"{kind}_logprobs"].dtype == np.float16
            np.testing.assert_array_equal(got[f"{kind}_logprobs"], want[f"{kind}_logprobs"].astype(np.float16))
            np.testing.assert_allclose(
                got[f"{kind}_logprobs"].astype(np.float32), want[f"{kind}_logprobs"], rtol=1e-3, atol=1e-3
            )
        else:
            assert f"{kind}_logprobs" not in got
        if mode == "sample":
            # sum_i (c_i / N) log p_i per row, from the fp32 input (entry by entry, float64)
            ref = np.zeros(P)
            for p in range(P):
                real = want[f"{kind}_ids"][p] >= 0
                c = want[f"{kind}_counts"][p][real].astype(np.float64)
                ref[p] = (c * want[f"{kind}_logprobs"][p][real]).sum() / c.sum()
            assert got[f"{kind}_logp_mean"].dtype == np.float32 and got[f"{kind}_logp_mean"].shape == (P,)
            np.testing.assert_allclose(got[f"{kind}_logp_mean"], ref, rtol=logp_mean_tol, atol=logp_mean_tol)
        else:
            assert f"{kind}_logp_mean" not in got
        assert got[f"{kind}_tail"].dtype == np.float32
        np.testing.assert_array_equal(got[f"{kind}_tail"], want[f"{kind}_tail"])
        if mode == "sample":
            assert got[f"{kind}_counts"].dtype == np.uint16
            np.testing.assert_array_equal(got[f"{kind}_counts"], want[f"{kind}_counts"])
        else:
            assert f"{kind}_counts" not in got
    if relation == "none":
        assert got["relation"] == [] and got["relation_energy"] == []
        return
    assert len(got["relation"]) == len(want["relation"]) == len(got["relation_energy"])
    for R_got, R_in, energy in zip(got["relation"], want["relation"], got["relation_energy"]):
        assert R_got.dtype == np.float32 and R_got.shape == R_in.shape
        ref = decode_relation(encode_relation(R_in, relation), R_in.shape[0], relation)
        np.testing.assert_allclose(R_got, ref, rtol=1e-6, atol=1e-7)
        assert np.linalg.norm(R_got) == pytest.approx(1.0, abs=1e-5)
        if relation == "full":
            assert energy == 1.0
            np.testing.assert_allclose(R_got, normalise(R_in), rtol=2e-3, atol=1e-4)
        else:  # the share of R's squared eigenvalues the r largest in magnitude keep
            w2 = np.sort(np.linalg.eigvalsh(R_in.astype(np.float64)) ** 2)[::-1]
            assert energy == pytest.approx(w2[: int(relation.split(":")[1])].sum() / w2.sum(), rel=1e-5)


@pytest.fixture
def memory_url():
    name = f"memory://kdtest-{uuid.uuid4().hex}"
    yield name
    fs, path = fsspec.core.url_to_fs(name)
    if fs.exists(path):
        fs.rm(path, recursive=True)


@pytest.mark.parametrize(
    "mode,relation,logprobs",
    [("topk", "full", True), ("topk", "lowrank:3", True), ("topk", "none", True), ("sample", "full", False),
     ("sample", "lowrank:2", True)],
)
def test_round_trip(tmp_path, mode, relation, logprobs):
    rng = np.random.default_rng(0)
    k = 8
    samples = [make_sample(rng, i, mode, k) for i in range(11)]
    samples[0] = make_sample(rng, 0, mode, k, n_images=0)
    samples[1] = make_sample(rng, 1, mode, k, n_images=2)
    # small chunks so samples straddle chunk boundaries
    build_cache(str(tmp_path / "c"), samples, mode=mode, k=k, relation=relation, per_shard=4, chunk_bytes=256,
                sample_logprobs=logprobs)
    cache = open_cache(str(tmp_path / "c"))
    assert len(cache) == 11 and cache.shard_sizes == [4, 4, 3]
    got = list(cache)
    assert len(got) == 11
    for g, w in zip(got, samples):
        assert_sample_equal(g, w, mode, k, relation, logprobs)


def test_sample_mode_stores_logp_mean_instead_of_logprobs(tmp_path):
    """By default a sample shard holds one fp32 logp_mean per position and no per-entry log-probs;
    a given logp_mean is stored as is; neither given is refused with the array names."""
    rng = np.random.default_rng(7)
    samples = [make_sample(rng, i, "sample", 8, n_images=1) for i in range(6)]
    lean = build_cache(tmp_path / "lean", samples, mode="sample", k=8, per_shard=6)
    full = build_cache(tmp_path / "full", samples, mode="sample", k=8, per_shard=6, sample_logprobs=True)
    lm = json.loads((tmp_path / "lean" / "shards" / "00000" / "response" / "logp_mean" / "zarr.json").read_text())
    assert lm["data_type"] == "float32"
    assert not (tmp_path / "lean" / "shards" / "00000" / "response" / "logprobs").exists()
    assert (tmp_path / "full" / "shards" / "00000" / "response" / "logprobs").exists()
    assert lean.read_manifest() and full.read_manifest()
    a, b = list(open_cache(tmp_path / "lean")), list(open_cache(tmp_path / "full"))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["response_logp_mean"], y["response_logp_mean"])
    given = dict(samples[0])
    P = len(given["response_positions"])
    given.pop("response_logprobs")
    given["response_logp_mean"] = np.arange(P, dtype=np.float32) - 3.0
    del given["visual_logprobs"]
    given["visual_logp_mean"] = np.full(len(given["visual_positions"]), -1.5, np.float32)
    build_cache(tmp_path / "given", [given], mode="sample", k=8)
    got = open_cache(tmp_path / "given")[0]
    np.testing.assert_array_equal(got["response_logp_mean"], given["response_logp_mean"])
    neither = dict(given)
    del neither["visual_logp_mean"]
    with pytest.raises(ValueError, match="visual_logp_mean .* or visual_logprobs"):
        build_cache(tmp_path / "bad", [neither], mode="sample", k=8)
    with pytest.raises(ValueError, match="sample_logprobs=True stores per-entry log-probs"):
        build_cache(tmp_path / "bad2", [given], mode="sample", k=8, sample_logprobs=True)


def test_random_access_matches_iteration(tmp_path):
    rng = np.random.default_rng(1)
    samples = [make_sample(rng, i, "topk", 4) for i in range(17)]
    build_cache(tmp_path / "c", samples, k=4, relation="lowrank:2", per_shard=5, chunk_bytes=200)
    cache = open_cache(tmp_path / "c")
    in_order = [s["id"] for s in cache]
    assert in_order == [s["id"] for s in samples]
    order = np.random.default_rng(2).permutation(len(cache))
    for i in order:
        g = cache[int(i)]
        assert_sample_equal(g, samples[i], "topk", 4, "lowrank:2")
    assert cache[-1]["id"] == samples[-1]["id"]
    with pytest.raises(IndexError):
        cache[17]
    assert cache.locate(5) == (1, 0) and cache.locate(16) == (3, 1)
    assert [s["id"] for s in cache.shard_samples(2)] == [s["id"] for s in samples[10:15]]
    assert cache.read_sample(3, 1)["id"] == "sample-16"


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_a_shard_opens_with_one_metadata_read(tmp_path, memory_url, scheme, monkeypatch):
    """Opening a shard reads its zarr.json only (every array's metadata is consolidated in it), not one
    document per array: the per-shard cost every consumer (rank x loader worker) pays."""
    import zarr.storage

    url = memory_url if scheme == "memory" else str(tmp_path / "c")
    rng = np.random.default_rng(5)
    samples = [make_sample(rng, i, "topk", 4) for i in range(6)]
    build_cache(url, samples, k=4, relation="full", per_shard=3)
    read: list[str] = []
    store_cls = zarr.storage.FsspecStore if scheme == "memory" else zarr.storage.LocalStore
    get = store_cls.get

    async def spy(self, key, *args, **kwargs):
        read.append(key)
        return await get(self, key, *args, **kwargs)

    monkeypatch.setattr(store_cls, "get", spy)
    cache = open_cache(url)
    assert_sample_equal(cache.read_sample(1, 2), samples[5], "topk", 4, "full")
    metadata = [k for k in read if k.endswith("zarr.json")]
    assert metadata == ["zarr.json"], metadata
    arrays = {k.split("/c/")[0] for k in read if "/c/" in k}
    assert len(read) == 1 + sum(1 for k in read if "/c/" in k) and "relation/upper" in arrays


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_url_stores(tmp_path, memory_url, scheme):
    url = memory_url if scheme == "memory" else f"file://{tmp_path}/cache"
    rng = np.random.default_rng(3)
    samples = [make_sample(rng, i, "sample", 6) for i in range(7)]
    w = build_cache(url, samples, mode="sample", k=6, relation="full", per_shard=3)
    assert w.is_complete(0) and w.is_complete(2) and not w.is_complete(3)
    cache = open_cache(url)
    for g, s in zip(cache, samples):
        assert_sample_equal(g, s, "sample", 6, "full", logprobs=False)
    assert cache.verify_shards().lines() == []
    if scheme == "file":
        assert (tmp_path / "cache" / "shards" / "00000.complete.json").exists()
        assert (tmp_path / "cache" / "shards" / "00000" / "zarr.json").exists()


def test_completion_marker_semantics(tmp_path):
    rng = np.random.default_rng(4)
    root = tmp_path / "c"
    w = CacheWriter(str(root))
    assert w.shard_name(0) == "00000" and w.shard_name(123) == "00123"
    assert not w.is_complete(0)
    assert w.read_marker(0) is None

    # leftovers of a crashed attempt: data but no marker
    partial = root / "shards" / "00000"
    (partial / "junk").mkdir(parents=True)
    (partial / "junk" / "zarr.json").write_text("{}")
    assert not w.is_complete(0)

    samples = [make_sample(rng, i, "topk", 4) for i in range(3)]
    entry = w.write_shard(0, samples, sparse_mode="topk", k=4, relation="full")
    assert entry.name == "00000" and entry.samples == 3 and entry.bytes > 0
    assert not (partial / "junk").exists(), "write_shard must delete partial leftovers"
    assert w.is_complete(0)
    assert w.read_marker(0) == entry  # the marker holds the entry the manifest lists
    on_disk = sum(p.stat().st_size for p in partial.rglob("*") if p.is_file())
    assert on_disk == entry.bytes and set(entry.files) == {str(p.relative_to(partial)) for p in partial.rglob("*")
                                                            if p.is_file()}

    # rewriting gives the same content hash (deterministic)
    again = w.write_shard(0, samples, sparse_mode="topk", k=4, relation="full")
    assert again == entry

    # an unreadable marker does not count as complete
    marker = root / "shards" / "00000.complete.json"
    marker.write_text("{not json")
    assert not w.is_complete(0)
    marker.unlink()
    assert not w.is_complete(0)

    # a cache whose manifest lists a shard without a marker refuses to read it
    w.write_shard(0, samples, sparse_mode="topk", k=4, relation="full")
    w.write_manifest(synthetic_manifest([w.read_marker(0)], k=4, relation="full"))
    marker.unlink()
    cache = open_cache(str(root))
    with pytest.raises(FileNotFoundError, match="completion marker"):
        cache[0]
    problems = cache.verify_shards().lines()
    assert any("00000.complete.json" in p and "missing" in p for p in problems)


def test_write_shard_validates_input(tmp_path):
    rng = np.random.default_rng(5)
    w = CacheWriter(str(tmp_path / "c"))
    s = make_sample(rng, 0, "topk", 4, n_images=1)
    with pytest.raises(ValueError, match=r"shape \(\d+, 8\)"):
        w.write_shard(0, [s], sparse_mode="topk", k=8, relation="full")
    with pytest.raises(ValueError, match="sparse mode"):
        w.write_shard(0, [s], sparse_mode="topp", k=4, relation="full")
    with pytest.raises(ValueError, match="lowrank:R"):
        w.write_shard(0, [s], sparse_mode="topk", k=4, relation="low")
    bad = dict(s, extra_field=1)
    with pytest.raises(ValueError, match="unknown keys"):
        w.write_shard(0, [bad], sparse_mode="topk", k=4, relation="full")
    bad = dict(s, labels=s["labels"][:-1])
    with pytest.raises(ValueError, match="labels"):
        w.write_shard(0, [bad], sparse_mode="topk", k=4, relation="full")
    assert not w.is_complete(0)


def test_extra_per_position_arrays(tmp_path):
    rng = np.random.default_rng(6)
    samples = [make_sample(rng, i, "topk", 4) for i in range(5)]
    for s in samples:
        s["visual_hidden"] = rng.standard_normal((len(s["visual_positions"]), 3)).astype(np.float16)
    build_cache(tmp_path / "c", samples, k=4, per_shard=5)
    for g, s in zip(open_cache(tmp_path / "c"), samples):
        assert g["visual_hidden"].dtype == np.float16
        np.testing.assert_array_equal(g["visual_hidden"], s["visual_hidden"])
        assert "response_hidden" not in g
    del samples[2]["visual_hidden"]
    with pytest.raises(ValueError, match="visual_hidden"):
        CacheWriter(str(tmp_path / "d")).write_shard(0, samples, sparse_mode="topk", k=4, relation="full")


def test_manifest_atomic_write_and_errors(tmp_path, monkeypatch):
    root = tmp_path / "c"
    with pytest.raises(FileNotFoundError, match="run kd-cache build"):
        open_cache(str(root))
    w = CacheWriter(str(root))
    assert w.read_manifest() is None
    rng = np.random.default_rng(7)
    entry = w.write_shard(0, [make_sample(rng, 0, "topk", 4)], sparse_mode="topk", k=4, relation="none")
    # shards without a manifest: the build did not finish
    with pytest.raises(FileNotFoundError, match="cache incomplete: run kd-cache build again") as ei:
        open_cache(str(root))
    assert str(root / "manifest.json") in str(ei.value)

    manifest = synthetic_manifest([entry], k=4, relation="none")
    w.write_manifest(manifest)
    assert w.read_manifest() == manifest and manifest.format_version == FORMAT_VERSION
    assert (root / "manifest.json").read_text() == manifest.to_json()
    assert sorted(p.name for p in root.iterdir()) == ["manifest.json", "shards"], "no temp file left behind"

    # a failing rename leaves the previous manifest intact
    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        w.write_manifest(synthetic_manifest([entry], k=4, relation="none", skipped=[SkippedRecord("x", "y")]))
    monkeypatch.undo()
    assert w.read_manifest().skipped == []

    data = json.loads((root / "manifest.json").read_text())
    data["format_version"] = 999
    (root / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ValueError) as ei:
        open_cache(str(root))
    msg = str(ei.value)
    assert "999" in msg and f"expected {FORMAT_VERSION}" in msg and str(root / "manifest.json") in msg


def test_verify_detects_flipped_byte(tmp_path):
    rng = np.random.default_rng(8)
    samples = [make_sample(rng, i, "topk", 8, n_images=1) for i in range(6)]
    build_cache(tmp_path / "c", samples, k=8, relation="lowrank:3", per_shard=3)
    cache = open_cache(tmp_path / "c")
    assert cache.verify_shards().lines() == []

    chunk = sorted(
        p for p in (tmp_path / "c" / "shards" / "00000").rglob("*") if p.is_file() and "/c/" in str(p)
    )
    target = next(p for p in chunk if "response/logprobs" in str(p))
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    target.write_bytes(bytes(raw))
    problems = cache.verify_shards().lines()
    assert len(problems) == 1
    assert "00000" in problems[0] and "checksum mismatch" in problems[0]
    assert str(target.relative_to(tmp_path / "c" / "shards" / "00000")) in problems[0]
    assert str(tmp_path / "c" / "shards" / "00000") in problems[0]

    # a missing shard directory is reported too
    import shutil

    shutil.rmtree(tmp_path / "c" / "shards" / "00001")
    assert any("00001" in p and "missing" in p for p in cache.verify_shards().lines())


def test_pickle_and_reopen(tmp_path, memory_url):
    rng = np.random.default_rng(9)
    samples = [make_sample(rng, i, "sample", 4) for i in range(9)]
    for url in (str(tmp_path / "c"), memory_url):
        build_cache(url, samples, mode="sample", k=4, relation="full", per_shard=4)
        cache = open_cache(url)
        _ = cache[5]  # opens a shard; the open handles must not travel in the pickle
        clone = pickle.loads(pickle.dumps(cache))
        assert isinstance(clone, KDCache) and len(clone) == 9
        for i in (8, 0, 5):
            assert_sample_equal(clone[i], samples[i], "sample", 4, "full", logprobs=False)


def test_array_stats(tmp_path):
    rng = np.random.default_rng(10)
    samples = [make_sample(rng, i, "topk", 8) for i in range(6)]
    build_cache(tmp_path / "c", samples, k=8, relation="full", per_shard=6)
    stats = open_cache(Path(tmp_path / "c")).array_stats(0)
    assert {"tokens/input_ids", "response/ids", "response/logprobs", "visual/tail", "relation/upper"} <= set(
        stats
    )
    st = stats["response/logprobs"]
    assert st["dtype"] == "float16" and st["shape"][1] == 8
    assert st["raw_bytes"] == st["shape"][0] * 8 * 2
    assert st["stored_bytes"] > 0 and st["ratio"] == pytest.approx(st["raw_bytes"] / st["stored_bytes"])


@pytest.mark.parametrize("scheme", ["memory", "local"])
def test_rewrite_keeps_siblings_and_drops_leftovers(tmp_path, memory_url, scheme):
    url = memory_url if scheme == "memory" else str(tmp_path / "c")
    rng = np.random.default_rng(11)
    w = CacheWriter(url)
    shards = w.root + "/shards"
    w.fs.makedirs(shards + "/00000/old", exist_ok=True)
    w.fs.pipe_file(shards + "/00000/old/c0", b"stale chunk")  # leftover of a crashed attempt
    w.fs.pipe_file(shards + "/00000.skipped.json", b"{}")  # the build's sibling file
    samples = [make_sample(rng, i, "topk", 4) for i in range(2)]
    entry = w.write_shard(0, samples, sparse_mode="topk", k=4, relation="full")
    assert not w.fs.exists(shards + "/00000/old/c0")
    assert w.fs.cat_file(shards + "/00000.skipped.json") == b"{}"
    assert "old/c0" not in w.read_marker(0).files
    assert w.write_shard(0, samples, sparse_mode="topk", k=4, relation="full") == entry


def _dense_full_relation(upper: np.ndarray, n: int) -> np.ndarray:
    """Reference decode of a ``full`` relation: both triangles filled entry by entry, then unit norm."""
    M = np.zeros((n, n), dtype=np.float32)
    k = 0
    for i in range(n):
        for j in range(i, n):
            M[i, j] = M[j, i] = np.float32(upper[k]) + np.float32(0.0)  # -0.0 reads as +0.0
            k += 1
    norm = float(np.linalg.norm(M))
    return M * np.float32(1.0 / norm) if norm > 0 else M


@pytest.mark.parametrize("n", [1, 2, 7, 40])
def test_full_relation_decode_is_bit_identical_to_a_dense_reference(n):
    rng = np.random.default_rng(n)
    Z = rng.standard_normal((n, 5)).astype(np.float32)
    upper = encode_relation(Z @ Z.T, "full")["upper"]
    upper[::5] = -0.0  # signed zeros too
    for stored in (upper, upper.astype(np.float32)):
        got = decode_relation({"upper": stored}, n, "full")
        want = _dense_full_relation(stored, n)
        assert got.dtype == np.float32 and got.shape == (n, n)
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    assert decode_relation({"upper": np.zeros(0, np.float16)}, 0, "full").shape == (0, 0)
    with pytest.raises(ValueError, match="needs 28 upper-triangle values"):
        decode_relation({"upper": np.zeros(27, np.float16)}, 7, "full")


@pytest.mark.parametrize("cache_bytes", [1, 3000, 1 << 26])
def test_chunk_cache_budget_never_changes_what_is_read(tmp_path, cache_bytes):
    """Whatever the decoded-chunk budget (1 byte keeps only the chunks of the current read), random
    access returns the written samples; the budget holds, also when two readers share one cache;
    copies and pickles start with an empty cache of the same size."""
    import copy

    rng = np.random.default_rng(12)
    samples = [make_sample(rng, i, "topk", 4) for i in range(13)]
    build_cache(tmp_path / "c", samples, k=4, relation="full", per_shard=5, chunk_bytes=200)
    cache = KDCache(str(tmp_path / "c"), cache_bytes=cache_bytes)
    twin = copy.copy(cache)
    assert twin.chunk_cache is not cache.chunk_cache and twin.chunk_cache.max_bytes == cache_bytes
    twin.chunk_cache = cache.chunk_cache
    for i in np.random.default_rng(3).permutation(13).tolist() + [4, 5, 4]:
        reader = cache if i % 2 else twin
        assert_sample_equal(reader[i], samples[i], "topk", 4, "full")
        cc = cache.chunk_cache
        assert cc.nbytes <= cc.max_bytes or len(cc) == 1
    clone = pickle.loads(pickle.dumps(cache))
    assert len(clone.chunk_cache) == 0 and clone.chunk_cache.max_bytes == cache_bytes
    assert_sample_equal(clone[7], samples[7], "topk", 4, "full")


def test_auto_relation_stores_small_images_full_and_large_ones_low_rank(tmp_path):
    """``auto`` picks the encoding per image by its size: one sample with a 10-token and a 600-token image
    (above ``AUTO_FULL_MAX``) reads back the small one exactly and the large one at rank 32."""
    from kd_cache.relation import AUTO_FULL_MAX, AUTO_RANK

    rng = np.random.default_rng(0)
    sizes = [10, AUTO_FULL_MAX + 24]
    s = make_sample(rng, 0, "topk", 4, n_images=0)
    s["images"] = ["small.png", "large.png"]
    s["image_token_counts"] = np.asarray(sizes, np.int32)
    mats = []
    for n in sizes:
        Z = rng.standard_normal((n, 64)).astype(np.float32) + 1.0
        mats.append(Z @ Z.T)
    s["relation"] = mats
    build_cache(str(tmp_path / "c"), [s], relation="auto", k=4)
    got = open_cache(str(tmp_path / "c"))[0]
    small, large = got["relation"]
    np.testing.assert_allclose(small, normalise(mats[0]), atol=1e-3)
    np.testing.assert_array_equal(large, decode_relation(encode_relation(mats[1], f"lowrank:{AUTO_RANK}"),
                                                         sizes[1], f"lowrank:{AUTO_RANK}"))
    assert got["relation_energy"][0] == 1.0 and 0.9 < got["relation_energy"][1] < 1.0
