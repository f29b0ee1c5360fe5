"""What is inside a cache or one shard (for ``inspect-shard`` and debugging).

``inspect_cache`` returns a JSON-serialisable dict; ``format_report`` renders it as text tables
(``kd_cache.build.verify_cache`` re-hashes every shard and lists the problems).
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import numpy as np

from kd_cache.reader import KDCache, open_cache
from kd_cache.schema import IGNORE_INDEX, KINDS, Manifest

# Checksums mean reading every byte; without a chosen shard only small caches are hashed by default.
VERIFY_ALL_MAX_SHARDS = 16


def kind_stats(ids: np.ndarray, logprobs: np.ndarray | None, tail: np.ndarray,
               logp_mean: np.ndarray | None = None) -> dict[str, Any]:
    """Statistics of one kind's stored sparse distributions (P positions).

    ``entropy_estimate`` (nats, mean over positions): top-k: ``-sum p log p`` over the stored ids plus
    the tail bucket as one bin (the tail's own spread is not known, so it is a lower estimate);
    sample mode: ``-logp_mean`` = ``-sum_i (c_i/N) log p_i``, an unbiased estimate of the entropy.
    ``tail_mass_*``: mean and 90th percentile of ``exp(tail)``, the probability outside the stored ids.
    ``ids_per_position``: mean number of stored ids per position (sample mode: distinct drawn ids).
    """
    P = int(tail.shape[0])
    if P == 0:
        return {"positions": 0, "entropy_estimate": None, "tail_mass_mean": None, "tail_mass_p90": None,
                "ids_per_position": None}
    valid = ids >= 0  # sample mode pads rows with id -1
    t = np.exp(tail.astype(np.float64))
    if logp_mean is not None:
        entropy = -np.asarray(logp_mean, dtype=np.float64)
    else:
        lp = logprobs.astype(np.float64)
        p = np.where(valid, np.exp(lp), 0.0)
        head = -np.sum(np.where(valid & (p > 0), p * lp, 0.0), axis=1)
        entropy = head - np.where(t > 0, t * np.log(np.where(t > 0, t, 1.0)), 0.0)
    return {
        "positions": P,
        "entropy_estimate": float(np.mean(entropy)),
        "tail_mass_mean": float(np.mean(t)),
        "tail_mass_p90": float(np.percentile(t, 90)),
        "ids_per_position": float(valid.sum(axis=1).mean()),
    }


def image_sources(sample: dict) -> list[str]:
    """Where each image of a sample comes from: ``stored <size>`` (its bytes are in the shard) or
    ``path <path>`` (read from the image folder at training time)."""
    data = sample.get("image_bytes") or [None] * len(sample["images"])
    return [f"stored {_bytes(len(b))}" + (f" ({p})" if p else "") if b is not None else f"path {p}"
            for p, b in zip(sample["images"], data)]


def sample_stats(sample: dict, tokenizer=None) -> dict[str, Any]:
    """Per-sample summary: lengths, visual tokens per image, per-kind distribution statistics, relation
    energy (1.0 for a matrix stored in full, the kept share for a low-rank one), response text."""
    labels = np.asarray(sample["labels"])
    out: dict[str, Any] = {
        "id": sample["id"],
        "images": len(sample["images"]),
        "image_sources": image_sources(sample),
        "image_token_counts": [int(c) for c in sample.get("image_token_counts", [])],
        "seq_len": int(labels.shape[0]),
        "labelled_tokens": int(np.sum(labels != IGNORE_INDEX)),
    }
    for kind in KINDS:
        out[kind] = kind_stats(sample[f"{kind}_ids"], sample.get(f"{kind}_logprobs"), sample[f"{kind}_tail"],
                               sample.get(f"{kind}_logp_mean"))
    out["relation_energy"] = [float(e) for e in sample.get("relation_energy", [])]
    if tokenizer is not None:
        ids = np.asarray(sample["input_ids"])[labels != IGNORE_INDEX]
        out["response_text"] = tokenizer.decode([int(x) for x in ids])
    return out


def _load_tokenizer(manifest: Manifest) -> tuple[Any, str]:
    path = manifest.teacher.path
    if not path:
        return None, "skipped: no tokenizer given and the manifest has no teacher path"
    if not os.path.isdir(path):
        return None, f"skipped: teacher path {path} is not a directory here"
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path), f"tokenizer from {path}"
    except Exception as e:  # noqa: BLE001 - any failure (missing files, bad config) only disables decoding
        return None, f"skipped: could not load a tokenizer from {path} ({type(e).__name__}: {e})"


def _shard_info(cache: KDCache, index: int, check: bool) -> dict[str, Any]:
    entry = cache.manifest.shards[index]
    info: dict[str, Any] = {"index": index, "name": entry.name, "samples": entry.samples, "bytes": entry.bytes}
    info.update(cache.shard_status(index, check=check))
    try:
        arrays = cache.array_stats(index)
    except (FileNotFoundError, ValueError, KeyError) as e:
        info["arrays"] = {}
        info["error"] = str(e)
        return info
    info["arrays"] = arrays
    stored = sum(a["stored_bytes"] for a in arrays.values())
    raw = sum(a["raw_bytes"] for a in arrays.values())
    info["raw_bytes"] = raw
    info["ratio"] = raw / stored if stored else 0.0
    return info


def sample_key(array: str) -> str:
    """The key of a reader sample that a shard array feeds (``response/logprobs`` -> ``response_logprobs``)."""
    group, _, leaf = array.partition("/")
    if group == "tokens":
        return "(index)" if leaf == "offsets" else leaf
    if group == "relation":
        return (
            "relation_energy" if leaf == "energy" else "(index)" if leaf.endswith("offsets") else "relation"
        )
    if group == "images":
        return "(index)" if leaf.endswith("offsets") else "image_bytes"
    if group in KINDS:
        if leaf in ("offsets", "entry_offsets", "n_entries"):
            return "(index)"
        return f"{group}_{leaf.removeprefix('extra/')}"
    return "-"


def _array_totals(shards: list[dict]) -> dict[str, dict]:
    """Per array name, summed over shards: stored and raw bytes, ratio."""
    tot: dict[str, dict] = {}
    for sh in shards:
        for name, a in sh.get("arrays", {}).items():
            t = tot.setdefault(name, {"dtype": a["dtype"], "stored_bytes": 0, "raw_bytes": 0})
            t["stored_bytes"] += a["stored_bytes"]
            t["raw_bytes"] += a["raw_bytes"]
    for t in tot.values():
        t["ratio"] = t["raw_bytes"] / t["stored_bytes"] if t["stored_bytes"] else 0.0
    return dict(sorted(tot.items()))


def _summary(rows: list[dict]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in KINDS:
        stats = [r[kind] for r in rows if r[kind]["positions"]]
        w = np.array([s["positions"] for s in stats], dtype=np.float64)
        if not stats:
            out[kind] = {"positions": 0, "entropy_estimate": None, "tail_mass_mean": None}
            continue
        out[kind] = {
            "positions": int(w.sum()),
            "entropy_estimate": float(np.average([s["entropy_estimate"] for s in stats], weights=w)),
            "tail_mass_mean": float(np.average([s["tail_mass_mean"] for s in stats], weights=w)),
        }
    energies = [e for r in rows for e in r["relation_energy"]]
    out["relation_energy_min"] = min(energies) if energies else None
    return out


def inspect_cache(
    url: str,
    shard: int | None = None,
    sample: int | None = None,
    tokenizer=None,
    *,
    storage_options: dict | None = None,
    max_samples: int = 50,
    verify: bool | None = None,
) -> dict[str, Any]:
    """Summarise a cache, its shards and samples as a JSON-serialisable dict.

    - ``shard`` chosen: that shard's arrays and samples (``sample`` is then its local index);
    - only ``sample``: that global sample index (and its shard);
    - neither: every shard, and the first ``max_samples`` samples of the first shard.
    ``verify`` re-hashes the shards shown (None: the chosen shard, or all shards of a cache with at
    most 16 shards). Response text is decoded with ``tokenizer`` or the teacher's tokenizer named in
    the manifest when that directory exists; otherwise decoding is skipped and ``decoding`` says why.
    """
    cache = open_cache(url, storage_options)
    m = cache.manifest
    n_shards = len(cache.shard_sizes)
    if shard is not None and not 0 <= shard < n_shards:
        raise IndexError(f"shard {shard} out of range: {url} has {n_shards} shards (0..{n_shards - 1})")
    if sample is not None and shard is None:
        shard, sample = cache.locate(sample)
    if sample is not None and not 0 <= sample < cache.shard_sizes[shard]:
        raise IndexError(
            f"sample {sample} out of range for shard {shard} ({cache.shard_sizes[shard]} samples)"
        )

    if tokenizer is not None:
        decoding = f"tokenizer given ({type(tokenizer).__name__})"
    else:
        tokenizer, decoding = _load_tokenizer(m)

    info: dict[str, Any] = {
        "url": str(url),
        "format_version": m.format_version,
        "samples": len(cache),
        "shards": n_shards,
        "total_bytes": m.total_bytes,
        "sparse": m.sparse.to_dict(),
        "relation": m.relation,
        "build": {k: v for k, v in m.to_dict().items() if k not in ("shards", "skipped", "truncated")},
        "skipped": {"count": len(m.skipped), "by_reason": dict(Counter(s.reason for s in m.skipped))},
        "decoding": decoding,
    }

    shown = [shard] if shard is not None else list(range(n_shards))
    check = verify if verify is not None else (shard is not None or n_shards <= VERIFY_ALL_MAX_SHARDS)
    info["shard_info"] = [_shard_info(cache, i, check) for i in shown]
    info["array_totals"] = _array_totals(info["shard_info"])

    rows: list[dict] = []
    scope_shard = shard if shard is not None else 0
    if n_shards and cache.shard_sizes[scope_shard] > 0:
        if sample is not None:
            locals_ = [sample]
        else:
            locals_ = list(range(min(cache.shard_sizes[scope_shard], max_samples)))
        base = int(sum(cache.shard_sizes[:scope_shard]))
        for j in locals_:
            row = {"shard": scope_shard, "index": j, "global_index": base + j}
            row.update(sample_stats(cache.read_sample(scope_shard, j), tokenizer))
            rows.append(row)
        info["samples_in_scope"] = 1 if sample is not None else cache.shard_sizes[scope_shard]
    else:
        info["samples_in_scope"] = 0
    info["samples_listed"] = rows
    info["samples_truncated"] = len(rows) < info["samples_in_scope"]
    info["summary"] = _summary(rows)
    return info


# --------------------------------------------------------------------------------------------------
# text rendering


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _bytes(n: Any) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cells[0], widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for r in cells[1:]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


def _header_lines(info: dict[str, Any]) -> list[str]:
    out = [
        f"cache {info['url']}",
        f"  format version {info.get('format_version')}, {info['samples']} samples in {info['shards']} "
        f"shards, {_bytes(info['total_bytes'])} on disk",
        f"  sparse {info.get('sparse')}, relation {info.get('relation')}",
        f"  skipped records: {info['skipped']['count']}"
        + (f" {info['skipped']['by_reason']}" if info["skipped"]["count"] else ""),
        f"  samples cut by --max-length: {info['build'].get('truncated_count', 0)}",
    ]
    teacher = (info.get("build") or {}).get("teacher")
    if teacher:
        out.append(f"  teacher {teacher}")
    out.append(f"  decoding: {info.get('decoding')}")
    return out


def _shard_lines(info: dict[str, Any]) -> list[str]:
    rows = [[s["name"], s["samples"], _bytes(s.get("bytes")), s.get("ratio"), "yes" if s.get("complete") else "NO",
             s.get("checksum")] for s in info["shard_info"]]
    out = ["", "shards", _table(["shard", "samples", "bytes", "ratio", "complete", "checksum"], rows)]
    out += [f"  shard {s['name']}: {s['error']}" for s in info["shard_info"] if s.get("error")]
    return out


def _array_lines(info: dict[str, Any]) -> list[str]:
    totals = info.get("array_totals") or {}
    if not totals:
        return []
    shards = info["shard_info"]
    single = len(shards) == 1
    title = (f"arrays of shard {shards[0]['name']} ({shards[0].get('path')})" if single
             else f"arrays, summed over {len(shards)} shards")
    rows = [[name, sample_key(name), a["dtype"],
             "x".join(map(str, shards[0]["arrays"][name]["shape"])) if single else "-",
             _bytes(a["stored_bytes"]), _bytes(a["raw_bytes"]), a["ratio"]] for name, a in totals.items()]
    return ["", title, _table(["array", "sample key", "dtype", "shape", "stored", "raw", "ratio"], rows)]


_SAMPLE_COLUMNS = ["shard", "idx", "id", "len", "imgs (visual tokens)", "resp", "H resp", "tail mean", "tail p90", "vis", "H vis",
                   "vis tail", "rel energy"]


def _sample_row(r: dict[str, Any]) -> list[Any]:
    resp, vis = r["response"], r["visual"]
    images = f"{r['images']} ({','.join(map(str, r['image_token_counts']))})" if r["images"] else "0"
    return [r["shard"], r["index"], r["id"], r["seq_len"], images, resp["positions"], resp["entropy_estimate"],
            resp["tail_mass_mean"], resp["tail_mass_p90"], vis["positions"], vis["entropy_estimate"],
            vis["tail_mass_mean"], ",".join(f"{e:.4f}" for e in r["relation_energy"]) or "-"]


def _summary_line(summ: dict[str, Any]) -> str:
    kinds = "; ".join(
        f"{kind}: {summ[kind]['positions']} positions, entropy~{_fmt(summ[kind]['entropy_estimate'])}, "
        f"tail mass {_fmt(summ[kind]['tail_mass_mean'])}"
        for kind in KINDS if kind in summ)
    energy = (f"; min relation energy {summ['relation_energy_min']:.6f}"
              if summ.get("relation_energy_min") is not None else "")
    return "summary over listed samples: " + kinds + energy


def _sample_lines(info: dict[str, Any]) -> list[str]:
    rows = info.get("samples_listed") or []
    if not rows:
        return []
    more = f" (first {len(rows)} of {info['samples_in_scope']})" if info.get("samples_truncated") else ""
    out = ["", f"samples{more}; entropy is an estimate (stored ids + tail as one bin, nats);",
           "tail = probability mass outside the stored ids, exp(tail)",
           _table(_SAMPLE_COLUMNS, [_sample_row(r) for r in rows])]
    sources = [(r["id"], r["image_sources"]) for r in rows if r.get("image_sources")]
    if sources:
        out += ["", "image sources (stored in the shard, or read by path from the image folder)"]
        out += [f"  [{sid}] " + "; ".join(src) for sid, src in sources]
    texts = [(r["id"], r["response_text"]) for r in rows if "response_text" in r]
    if texts:
        out += ["", "response text (tokens with a label)"] + [f"  [{sid}] {text!r}" for sid, text in texts]
    out += ["", _summary_line(info.get("summary") or {})]
    return out


def format_report(info: dict[str, Any]) -> str:
    """Readable text tables for an ``inspect_cache`` result."""
    out = _header_lines(info) + _shard_lines(info) + _array_lines(info) + _sample_lines(info)
    return "\n".join(out) + "\n"
