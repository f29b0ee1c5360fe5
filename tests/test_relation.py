"""Relation-matrix encodings: round trips, low-rank energy, size, spec parsing."""

from __future__ import annotations

import numpy as np
import pytest

from kd_cache.relation import (
    decode_relation,
    encode_relation,
    encoded_nbytes,
    normalise,
    parse_relation_spec,
    resolve_relation_spec,
)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _gram(rng, n: int, d: int) -> np.ndarray:
    Z = rng.standard_normal((n, d)).astype(np.float32) * 3.0 + 1.0
    return (Z @ Z.T).astype(np.float32)


def test_normalise_unit_norm_and_zero():
    rng = np.random.default_rng(0)
    R = _gram(rng, 7, 5)
    Rn = normalise(R)
    assert Rn.dtype == np.float32
    assert np.linalg.norm(Rn) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(Rn * np.linalg.norm(R), R, rtol=1e-5)
    Z = normalise(np.zeros((4, 4)))
    assert Z.dtype == np.float32 and not Z.any()


def test_full_round_trip_within_fp16():
    rng = np.random.default_rng(1)
    R = _gram(rng, 23, 40) * 1000.0  # scale must not matter
    enc = encode_relation(R, "full")
    assert set(enc) == {"upper"}
    assert enc["upper"].dtype == np.float16 and enc["upper"].shape == (23 * 24 // 2,)
    out = decode_relation(enc, 23, "full")
    assert out.dtype == np.float32 and out.shape == (23, 23)
    np.testing.assert_array_equal(out, out.T)
    np.testing.assert_allclose(out, normalise(R), rtol=2e-3, atol=1e-5)
    assert np.linalg.norm(out) == pytest.approx(1.0, abs=1e-5)


def test_lowrank_exact_on_rank3():
    rng = np.random.default_rng(2)
    R = _gram(rng, 30, 3)
    for spec in ("lowrank:3", "lowrank:8", "lowrank:100"):  # r >= rank keeps everything that matters
        enc = encode_relation(R, spec)
        r = min(int(spec.split(":")[1]), 30)
        assert enc["eigvals"].dtype == np.float32 and enc["eigvals"].shape == (r,)
        assert enc["eigvecs"].dtype == np.float16 and enc["eigvecs"].shape == (30, r)
        assert float(enc["energy"]) == pytest.approx(1.0, abs=1e-6)
        out = decode_relation(enc, 30, spec)
        assert _cos(out, normalise(R)) > 0.9999
        assert np.linalg.norm(out) == pytest.approx(1.0, abs=1e-5)


def test_lowrank_truncation_energy_matches_hand_computed():
    rng = np.random.default_rng(3)
    R = _gram(rng, 12, 3)
    w = np.linalg.eigvalsh(normalise(R).astype(np.float64))
    w_sorted = w[np.argsort(-np.abs(w))]
    expected = float(np.sum(w_sorted[:2] ** 2) / np.sum(w**2))
    enc = encode_relation(R, "lowrank:2")
    assert float(enc["energy"]) < 1.0
    assert float(enc["energy"]) == pytest.approx(expected, rel=1e-5)
    # the reconstruction is the best rank-2 approximation, rescaled
    V = np.linalg.eigh(normalise(R).astype(np.float64))[1][:, np.argsort(-np.abs(w))[:2]]
    best = normalise((V * w_sorted[:2]) @ V.T)
    assert _cos(decode_relation(enc, 12, "lowrank:2"), best) > 0.9999


def test_lowrank_negative_eigenvalues_kept_by_magnitude():
    V = np.linalg.qr(np.random.default_rng(4).standard_normal((6, 6)))[0]
    w = np.array([5.0, -4.0, 0.1, 0.05, 0.0, 0.0])
    R = ((V * w) @ V.T).astype(np.float32)
    enc = encode_relation(R, "lowrank:2")
    np.testing.assert_allclose(sorted(enc["eigvals"] * np.linalg.norm(w)), [-4.0, 5.0], rtol=1e-4)


def test_lowrank32_is_much_smaller_than_full_at_729():
    rng = np.random.default_rng(5)
    R = _gram(rng, 729, 64)
    full = encoded_nbytes(encode_relation(R, "full"))
    low = encoded_nbytes(encode_relation(R, "lowrank:32"))
    assert full == 729 * 730 // 2 * 2
    assert low / full < 0.125


def test_spec_parsing_and_errors():
    assert parse_relation_spec("full") == ("full", None)
    assert parse_relation_spec("none") == ("none", None)
    assert parse_relation_spec("lowrank:32") == ("lowrank", 32)
    assert parse_relation_spec("auto") == ("auto", None)
    assert resolve_relation_spec("auto", 576) == "full" and resolve_relation_spec("auto", 577) == "lowrank:32"
    assert resolve_relation_spec("full", 4096) == "full"
    for bad in ("lowrank", "lowrank:", "lowrank:0", "lowrank:-3", "lowrank:2.5", "svd:4", "", "fulll"):
        with pytest.raises(ValueError, match="expected 'auto', 'full', 'none' or 'lowrank:R'"):
            parse_relation_spec(bad)
    with pytest.raises(ValueError, match="lowrank:R"):
        encode_relation(np.eye(3, dtype=np.float32), "topk")
    assert encode_relation(np.eye(3, dtype=np.float32), "none") == {}


def test_encode_rejects_bad_matrices():
    with pytest.raises(ValueError, match="square"):
        encode_relation(np.ones((3, 4), np.float32), "full")
    with pytest.raises(ValueError, match="symmetric"):
        encode_relation(np.arange(9, dtype=np.float32).reshape(3, 3), "full")
