"""Stable fingerprints used to check that a cache, a teacher and a student belong together."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tokenizer_hash(tokenizer) -> str:
    """Hash of the token -> id map (added tokens included): equal hashes mean identical token ids."""
    return _sha(sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]))


def config_hash(config) -> str:
    """Hash of a ``transformers`` config (the architecture, not the weights)."""
    d = config.to_dict()
    for key in ("_name_or_path", "transformers_version", "_commit_hash", "torch_dtype", "dtype"):
        d.pop(key, None)
    return _sha(d)
