"""inspect_cache values, the text report, and verify_cache."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from cache_fixtures import synthetic_manifest

from kd_cache import open_cache
from kd_cache.build import verify_cache
from kd_cache.reader import CorruptCacheError
from kd_cache.report import format_report, inspect_cache, kind_stats
from kd_cache.schema import SkippedRecord
from kd_cache.writer import CacheWriter

K = 4


def _sample(rng, i: int, n_img: int, mode: str = "topk") -> dict:
    L = 6 * n_img + 12
    ids = rng.integers(10, 200, L)
    labels = ids.copy()
    labels[: L - 5] = -100
    s = {"id": f"s{i}", "images": [f"{i}.png"] * n_img, "input_ids": ids, "labels": labels,
         "image_token_counts": np.full(n_img, 6, np.int32)}
    for kind, pos in (("response", np.arange(L - 6, L - 1)), ("visual", np.arange(6 * n_img))):
        P = len(pos)
        s[f"{kind}_positions"] = pos
        logits = rng.standard_normal((P, K))
        s[f"{kind}_logprobs"] = (logits - np.log(np.exp(logits).sum(1, keepdims=True) * 1.25)).astype(
            np.float32
        )
        s[f"{kind}_tail"] = np.full(P, np.log(0.2), np.float32) + rng.uniform(-0.5, 0.5, P).astype(np.float32)
        tid = np.array([rng.choice(500, K, replace=False) for _ in range(P)]).reshape(P, K)
        if mode == "sample":
            tid[:, -1] = -1
            s[f"{kind}_logprobs"][:, -1] = 0.0
            s[f"{kind}_counts"] = np.where(tid >= 0, 2, 0)
        s[f"{kind}_ids"] = tid
    s["relation"] = []
    for _ in range(n_img):
        Z = rng.standard_normal((6, 5)).astype(np.float32)
        s["relation"].append(Z @ Z.T)
    return s


@pytest.fixture
def cache_dir(tmp_path):
    rng = np.random.default_rng(0)
    samples = [_sample(rng, i, n_img=i % 3) for i in range(7)]
    w = CacheWriter(str(tmp_path / "c"))
    entries = [
        w.write_shard(0, samples[:4], sparse_mode="topk", k=K, relation="lowrank:2"),
        w.write_shard(1, samples[4:], sparse_mode="topk", k=K, relation="lowrank:2"),
    ]
    w.write_manifest(synthetic_manifest(entries, k=K, relation="lowrank:2", teacher_path=str(tmp_path / "no-such-teacher"),
                                        skipped=[SkippedRecord("bad1", "missing image"),
                                                 SkippedRecord("bad2", "missing image")]))
    return tmp_path / "c", samples


class FakeTokenizer:
    def decode(self, ids):
        return " ".join(f"t{i}" for i in ids)


def test_kind_stats_hand_computed():
    lp = np.log(np.array([[0.5, 0.3, 0.1], [0.6, 0.2, 1.0]]))
    lp[1, 2] = 0.0  # second row: last entry is padding (id -1, logprob 0)
    ids = np.array([[1, 2, 3], [4, 5, -1]])
    tail = np.log(np.array([0.1, 0.2]))
    st = kind_stats(ids, lp.astype(np.float16), tail.astype(np.float32))
    p16 = np.exp(lp.astype(np.float16).astype(np.float64))
    h0 = -(p16[0] * np.log(p16[0])).sum() - 0.1 * np.log(0.1)
    h1 = -(p16[1, :2] * np.log(p16[1, :2])).sum() - 0.2 * np.log(0.2)
    assert st["entropy_estimate"] == pytest.approx((h0 + h1) / 2, rel=1e-5)
    assert st["tail_mass_mean"] == pytest.approx(0.15, rel=1e-6)
    assert st["tail_mass_p90"] == pytest.approx(np.percentile([0.1, 0.2], 90), rel=1e-6)
    empty = kind_stats(np.zeros((0, 3), np.int32), np.zeros((0, 3), np.float16), np.zeros(0, np.float32))
    assert empty["positions"] == 0 and empty["entropy_estimate"] is None


def test_inspect_values(cache_dir):
    root, samples = cache_dir
    info = inspect_cache(str(root), shard=1, tokenizer=FakeTokenizer())
    json.dumps(info)  # JSON-serialisable
    assert info["samples"] == 7 and info["shards"] == 2
    assert info["skipped"] == {"count": 2, "by_reason": {"missing image": 2}}
    assert info["build"]["relation"] == "lowrank:2"
    assert len(info["shard_info"]) == 1
    sh = info["shard_info"][0]
    assert sh["name"] == "00001" and sh["complete"] and sh["checksum"] == "ok" and sh["samples"] == 3
    assert sh["arrays"]["response/logprobs"]["dtype"] == "float16"
    assert info["total_bytes"] == sum(
        e["bytes"] for e in json.loads((root / "manifest.json").read_text())["shards"]
    )

    rows = info["samples_listed"]
    stored = open_cache(str(root))  # what the reader returns (its values are checked in test_shards.py)
    assert [r["id"] for r in rows] == ["s4", "s5", "s6"]
    assert [r["global_index"] for r in rows] == [4, 5, 6]
    for r, s in zip(rows, samples[4:]):
        assert r["seq_len"] == len(s["input_ids"])
        assert r["response"]["positions"] == len(s["response_positions"])
        assert r["visual"]["positions"] == len(s["visual_positions"])
        tail = s["response_tail"].astype(np.float64)
        assert r["response"]["tail_mass_mean"] == pytest.approx(np.mean(np.exp(tail)), rel=1e-6)
        assert r["response"]["tail_mass_p90"] == pytest.approx(np.percentile(np.exp(tail), 90), rel=1e-6)
        assert len(r["relation_energy"]) == len(s["images"])
        assert r["relation_energy"] == pytest.approx(stored[r["global_index"]]["relation_energy"])
        kept = s["input_ids"][s["labels"] != -100]
        assert r["response_text"] == " ".join(f"t{i}" for i in kept)
    assert info["decoding"].startswith("tokenizer given")


def test_inspect_single_sample_and_decoding_skipped(cache_dir):
    root, _ = cache_dir
    info = inspect_cache(str(root), sample=5)  # global index -> shard 1, local 1
    assert [r["id"] for r in info["samples_listed"]] == ["s5"]
    assert info["samples_listed"][0]["shard"] == 1 and info["samples_listed"][0]["index"] == 1
    assert "response_text" not in info["samples_listed"][0]
    assert info["decoding"].startswith("skipped") and "no-such-teacher" in info["decoding"]
    info = inspect_cache(str(root), shard=0, sample=2)
    assert info["samples_listed"][0]["id"] == "s2"
    info = inspect_cache(str(root), max_samples=2)
    assert len(info["shard_info"]) == 2 and info["samples_truncated"] and len(info["samples_listed"]) == 2
    with pytest.raises(IndexError, match="out of range"):
        inspect_cache(str(root), shard=5)


def test_format_report(cache_dir):
    root, _ = cache_dir
    text = format_report(inspect_cache(str(root), shard=0, tokenizer=FakeTokenizer()))
    for needle in (
        str(root),
        "7 samples in 2 shards",
        "00000",
        "response/logprobs",
        "ratio",
        "entropy",
        "tail mean",
        "rel energy",
        "missing image",
        "checksum",
        "ok",
        "[s0]",
    ):
        assert needle in text, needle


def test_verify_cache_detects_corruption(cache_dir):
    root, _ = cache_dir
    assert verify_cache(str(root)).lines() == []
    shard = root / "shards" / "00001"
    target = next(p for p in sorted(shard.rglob("*")) if p.is_file() and "c" in p.relative_to(shard).parts)
    raw = bytearray(target.read_bytes())
    raw[-1] ^= 0x01
    target.write_bytes(bytes(raw))
    problems = verify_cache(str(root)).lines()
    assert len(problems) == 1 and "00001" in problems[0] and target.name in problems[0]
    assert open_cache(str(root)).shard_status(1)["checksum"] == "mismatch"
    # The shard's samples are not shown from a chunk that fails its checksum: the error names the file.
    with pytest.raises(CorruptCacheError, match=re.escape(str(target))):
        inspect_cache(str(root), shard=1)
    (root / "manifest.json").unlink()
    assert "run kd-cache build again" in verify_cache(str(root)).lines()[0]


@pytest.mark.parametrize("logprobs", [False, True])
def test_sample_mode_entropy_ignores_padding(tmp_path, logprobs):
    """Sample mode: the entropy estimate is -mean(sum_i c_i/N log p_i) over real (not -1) ids, with or
    without the per-entry log-probs in the cache; ids_per_position counts the distinct drawn ids."""
    rng = np.random.default_rng(1)
    samples = [_sample(rng, i, n_img=1, mode="sample") for i in range(2)]
    w = CacheWriter(str(tmp_path / "c"))
    e = w.write_shard(0, samples, sparse_mode="sample", k=K, relation="full", sample_logprobs=logprobs)
    w.write_manifest(synthetic_manifest([e], sparse_mode="sample", k=K, relation="full"))
    info = inspect_cache(str(tmp_path / "c"))
    r = info["samples_listed"][0]
    s = samples[0]
    real = s["response_ids"] >= 0
    assert (~real).any(), "the fixture must pad some rows"
    c = np.where(real, s["response_counts"], 0).astype(np.float64)
    lp = np.where(real, s["response_logprobs"], 0.0).astype(np.float64)
    want = -np.mean((c * lp).sum(1) / c.sum(1))
    assert r["response"]["entropy_estimate"] == pytest.approx(want, rel=1e-6)
    assert r["response"]["ids_per_position"] == pytest.approx(real.sum(1).mean())
    assert r["relation_energy"] == [1.0]
    # the same through kind_stats on the in-memory sample
    st = kind_stats(s["response_ids"], None, s["response_tail"],
                    logp_mean=((c * lp).sum(1) / c.sum(1)).astype(np.float32))
    assert st["entropy_estimate"] == pytest.approx(want, rel=1e-6)


def test_report_over_all_shards_names_sample_keys(cache_dir):
    root, _ = cache_dir
    info = inspect_cache(str(root))
    tot = info["array_totals"]["response/logprobs"]
    per = [s["arrays"]["response/logprobs"] for s in info["shard_info"]]
    assert tot["stored_bytes"] == sum(a["stored_bytes"] for a in per)
    text = format_report(info)
    assert "summed over 2 shards" in text and "response_logprobs" in text and "relation_energy" in text
