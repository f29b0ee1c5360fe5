"""The top-k bias of divergences other than forward KL: kd-train's warning, and the measurement
(benchmarks/divergence_bias.py) against dense references."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
from cache_fixtures import synthetic_manifest

from student.cache_checks import TopKBiasWarning, check_cache_options
from student.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.divergence_bias import DIVERGENCES, bias_table, synthetic, topk_arrays  # noqa: E402


def _cfg(tmp_path, divergence):
    return TrainConfig(stage="dft", student=str(tmp_path / "s"), cache=str(tmp_path / "c"), out=str(tmp_path / "o"),
                       divergence=divergence)


def test_kd_train_warns_for_biased_divergences_on_topk_caches(tmp_path):
    topk = synthetic_manifest([], k=8, relation="none", vocab_size=400)
    with pytest.warns(TopKBiasWarning, match=r"--divergence rkl on a top-8 cache \(vocabulary 400\).*--divergence fkl"):
        check_cache_options(_cfg(tmp_path, "rkl"), topk)
    with pytest.warns(TopKBiasWarning, match="--divergence srkl"):
        check_cache_options(_cfg(tmp_path, "srkl"), topk)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_cache_options(_cfg(tmp_path, "fkl"), topk)  # forward KL: no warning
        # k covering the vocabulary: the K + 1 bins are the distribution, nothing is biased
        check_cache_options(_cfg(tmp_path, "rkl"), synthetic_manifest([], k=400, relation="none", vocab_size=400))


def test_bias_is_zero_when_k_covers_the_vocabulary_and_forward_kl_is_never_over():
    student, teacher = synthetic(n=256, vocab=50, seed=1)
    tab = bias_table(student, teacher, [2, 5, 10, 25, 50])
    assert set(tab) == set(DIVERGENCES)
    for name, row in tab.items():
        assert row["dense"] > 0 and abs(row["50"]) < 1e-4, (name, row)  # k = V: the dense value
    # Forward KL loses only the KL inside the tail bin (log-sum inequality): never above the dense value,
    # and closer with every larger k.
    fkl = [tab["fkl"][str(k)] for k in (2, 5, 10, 25, 50)]
    assert all(b <= 1e-6 for b in fkl) and fkl == sorted(fkl) and fkl[0] < -0.01


def test_topk_arrays_are_what_a_cache_stores():
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0]])
    ids, lps, tail = topk_arrays(logits, 2)
    p = logits.softmax(-1)[0]
    assert ids.tolist() == [[0, 2]]
    assert torch.allclose(lps.exp()[0], p[[0, 2]]) and torch.allclose(tail.exp(), p[[1, 3]].sum().reshape(1))
