"""The manifest of a cache written without a teacher pass (tests that write shards with ``CacheWriter``).

It is the build's own ``Manifest`` type, so a synthetic cache has the layout and the manifest fields of a
built one; only the teacher facts are placeholders unless a test gives them.
"""

from __future__ import annotations

import numpy as np

from kd_cache.schema import DEFAULT_KINDS, HiddenInfo, Manifest, ShardEntry, SkippedRecord, SparseInfo, TeacherInfo


def synthetic_manifest(entries: list[ShardEntry], *, sparse_mode: str = "topk", k: int, relation: str,
                       positions: tuple[str, ...] = DEFAULT_KINDS, teacher_path: str = "synthetic",
                       skipped: list[SkippedRecord] | None = None, **fields) -> Manifest:
    """``Manifest`` of the shards ``entries`` (as ``CacheWriter.write_shard`` returned them); ``fields``
    overrides any other manifest field (e.g. ``vocab_size``, ``image_token_id``, ``build_config``)."""
    sample = sparse_mode == "sample"
    values = dict(
        teacher=TeacherInfo(path=teacher_path, model_type="llava", revision=None, config_hash="synthetic",
                            multimodal=True),
        tokenizer_hash="synthetic", vocab_size=0, teacher_head_rows=0, image_token_id=None,
        template="chat", max_length=2048,
        sparse=SparseInfo(mode=sparse_mode, k=k, samples=k if sample else None,
                          scheme="systematic" if sample else None, logprobs_stored=False if sample else None),
        relation=relation, positions=tuple(positions), hidden=HiddenInfo(), generated=None,
        dataset_fingerprint="synthetic", build_config={"data": "synthetic", "image_folder": None},
        shards=list(entries), skipped=list(skipped or []),
    )
    values.update(fields)
    return Manifest(**values)


def dense_table(ids: np.ndarray, values: np.ndarray, vocab: int) -> np.ndarray:
    """[P, vocab] float64 table of a sparse per-id array (0 where an id is not stored; padding -1 ignored)."""
    ids = np.asarray(ids).astype(np.int64)
    out = np.zeros((len(ids), vocab))
    if ids.size:
        rows, cols = np.nonzero(ids >= 0)
        out[rows, ids[rows, cols]] = np.asarray(values, dtype=np.float64)[rows, cols]
    return out


def assert_logprobs_close(g_ids, g_lp, w_ids, w_lp) -> None:
    """Top-k log-probs read back within the storage's quantisation (``kd_cache.format._pack_logprobs``):
    the row's top log-prob to fp16, every id's ``sqrt(p / p_top)`` within half a step (plus the fp16
    rounding of the result), checked on dense tables against the fp32 input."""
    from kd_cache.format import LOGPROB_STEPS

    real = np.asarray(w_ids) >= 0
    vocab = int(max(np.max(w_ids, initial=0), np.max(g_ids, initial=0))) + 1
    top = np.where(real, w_lp, -np.inf).max(axis=1)
    g_top = np.where(np.asarray(g_ids) >= 0, g_lp.astype(np.float64), -np.inf).max(axis=1)
    np.testing.assert_allclose(g_top, top, rtol=2 ** -10, atol=1e-6)
    got = dense_table(g_ids, np.sqrt(np.exp(g_lp.astype(np.float64) - top[:, None])), vocab)
    want = dense_table(w_ids, np.sqrt(np.exp(np.asarray(w_lp, np.float64) - top[:, None])), vocab)
    fp16 = got * 2 ** -11 * (np.abs(top)[:, None] + np.abs(dense_table(g_ids, g_lp, vocab)) + 1)  # d sqrt(e^x) = sqrt(e^x) dx / 2
    assert (np.abs(got - want) <= 0.5 / LOGPROB_STEPS + fp16 + 1e-9).all(), np.abs(got - want).max()
