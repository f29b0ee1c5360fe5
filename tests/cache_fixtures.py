"""The manifest of a cache written without a teacher pass (tests that write shards with ``CacheWriter``).

It is the build's own ``Manifest`` type, so a synthetic cache has the layout and the manifest fields of a
built one; only the teacher facts are placeholders unless a test gives them.
"""

from __future__ import annotations

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
