"""A student of another tokenizer (``student.alignment``): its step cost, its loader rate, and the bytes
the alignment arrays add to a cache.

* Step (``cross_batch``, timed by ``benchmarks/bench_student.py`` beside its DFT step, same student,
  same micro-batches): the DFT batch that ``StreamingKDDataset.collate`` gives, turned into what
  ``_collate_cross`` gives for a student of another tokenizer with the same image layout: the same
  student positions, the teacher's response rows at its own positions (``cross_response_*``) with
  ``cross_groups`` of a realistic alignment (``GROUP_SHARES``: mostly one-to-one, some 1:2 and 2:1
  chunks), the visual rows as they are (an identical layout maps them one to one), and a vocabulary
  projection that maps ``COVERAGE`` of the teacher's ids. ``DistillStudent`` then takes its cross path
  (GOLD's loss per group, ``chunked_cross_divergence``, at the response and visual positions).
* Loader (``run``): samples per worker CPU-second of ``StreamingKDDataset`` on one cache (the loader
  benchmark's shapes, written with the alignment arrays), for the cache's own processor (today's path)
  and for a student processor with a SentencePiece-style tokenizer (``student_processor``: other ids,
  other pieces, byte fallback; same chat template and image processor), paired by ``detect_pairing``.
  Epochs of the two alternate (ABBA) on one worker.
* Bytes (``run``): the stored bytes of the format-7 alignment arrays (``response/extra/spans``,
  ``response/extra/realised``, ``visual/extra/boxes``, ``tokens/conversation`` and its offsets, each
  array's chunks and metadata) and the teacher's tokenizer files (per cache, divided by its samples),
  read from the shard on disk, at LLaVA-1.5 shapes (336px, 576 visual tokens, 200 answer tokens,
  top-64, full relation); checked against the same samples written without them.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from benchmarks.models import Profile

# One-to-one groups, then chunks of one teacher token and two student tokens, then two and one.
GROUP_SHARES = {(1, 1): 0.85, (1, 2): 0.075, (2, 1): 0.075}
COVERAGE = 0.70  # share of the teacher's ids the projection maps
LOADER_ROUNDS = 2  # ABBA rounds of (same, cross) epochs


# ------------------------------------------------------------------------------------------ step


def synthetic_projection(vocab: int, coverage: float = COVERAGE, seed: int = 0):
    """A teacher -> student projection on ``vocab`` ids mapping a random ``coverage`` share of them, each to
    a distinct student id (``student.cross_tokenizer.VocabProjection``)."""
    from student.cross_tokenizer import VocabProjection

    g = torch.Generator().manual_seed(seed)
    n = int(round(coverage * vocab))
    to_student = torch.full((vocab,), -1, dtype=torch.long)
    to_student[torch.randperm(vocab, generator=g)[:n]] = torch.randperm(vocab, generator=g)[:n]
    matched = torch.zeros(vocab, dtype=torch.bool)
    matched[to_student[to_student >= 0]] = True
    return VocabProjection(to_student, matched, f"bench-{coverage:.2f}")


def _groups(n_student: int, rng: np.random.Generator) -> np.ndarray:
    """[G, 4] groups (teacher first row, teacher rows, student first row, student rows) covering
    ``n_student`` student rows, shapes drawn from ``GROUP_SHARES``."""
    shapes = list(GROUP_SHARES)
    p = np.array([GROUP_SHARES[s] for s in shapes])
    out, t, s = [], 0, 0
    while s < n_student:
        t_len, s_len = shapes[rng.choice(len(shapes), p=p / p.sum())]
        s_len = min(s_len, n_student - s)
        out.append((t, t_len, s, s_len))
        t, s = t + t_len, s + s_len
    return np.asarray(out, dtype=np.int64).reshape(-1, 4)


def cross_batch(batch: dict, seed: int = 0) -> dict:
    """The keys ``StreamingKDDataset._collate_cross`` gives, from a same-tokenizer DFT batch (see the module
    docstring); the teacher's response rows are the batch's own, repeated or cut to the teacher's count."""
    rng = np.random.default_rng(seed)
    out = {k: v for k, v in batch.items() if not k.startswith("response_") or k in ("response_index",
                                                                                   "response_batch",
                                                                                   "response_targets")}
    rb = batch["response_batch"].numpy()
    n_samples = int(batch["n_samples"])
    groups, rows, s0 = [], [], 0
    t0 = 0
    for b in range(n_samples):
        n = int((rb == b).sum())
        g = _groups(n, rng)
        n_t = int(g[-1, 0] + g[-1, 1]) if len(g) else 0
        groups.append(g + np.array([t0, 0, s0, 0]))
        rows.append(s0 + np.minimum(np.arange(n_t), max(n - 1, 0)))
        t0, s0 = t0 + n_t, s0 + n
    idx = torch.from_numpy(np.concatenate(rows))
    for name in ("ids", "logprobs", "tail"):
        out[f"cross_response_{name}"] = batch[f"response_{name}"][idx]
    out["cross_response_realised"] = batch["response_logprobs"][idx, 0].float()  # the top-1 as realised
    out["cross_groups"] = torch.from_numpy(np.concatenate(groups).reshape(-1, 4))
    one = (out["cross_groups"][:, 1] == 1) & (out["cross_groups"][:, 3] == 1)
    out["cross_one_to_one"] = int(one.sum())
    out["cross_answer_positions"] = int(batch["response_index"].shape[0])
    out["cross"] = torch.ones(())
    return out


# ------------------------------------------------------------------------------------------ loader


def student_processor(vision, vocab: int | None = None):
    """A LlavaProcessor like ``benchmarks.models.processor_for``'s (same image processor, ChatML template,
    special tokens, padded to ``vocab``) whose tokenizer is SentencePiece-style BPE trained on the same
    corpus with as many merges (``tests/vlm_families.py``'s ``other_tokenizer``): "▁" for spaces, byte
    fallback, other ids and pieces."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from kd_cache.encoding import CHATML_TEMPLATE
    from kd_demo import tiny

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token=None))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400 + 256, special_tokens=tiny.SPECIAL_TOKENS + byte_pieces,
                                  show_progress=False)
    tok.train_from_iterator(tiny._corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>", bos_token=None,
                                   unk_token=None, additional_special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                              tiny.IMAGE_TOKEN])
    fast.chat_template = CHATML_TEMPLATE
    if vocab is not None and len(fast) < vocab:
        fast.add_tokens([f"<bench_unused_{i}>" for i in range(vocab - len(fast))])
    return tiny.build_processor(tokenizer=fast, image_size=vision.image_size, patch_size=vision.patch_size)


def _loader_vision(profile: Profile):
    from benchmarks.models import VisionSize

    return VisionSize(hidden=32, layers=1, heads=2, intermediate=64, image_size=profile.ld_image_size,
                      patch_size=profile.ld_patch)


def _collate_parts(cache: Path, folder: str, processor, pairing, profile: Profile, n: int) -> dict:
    """CPU ms per sample, in this process, of the collation of both paths on the same read samples, and
    of the cross path's parts (``Pairing.sample``: the student's encoding, the text groups, the visual map)."""
    from student.stream import StreamingKDDataset

    same = StreamingKDDataset(str(cache), processor, image_folder=folder, batch_size=profile.ld_batch,
                              shuffle=False, with_teacher=True)
    cross = StreamingKDDataset(str(cache), pairing.processor, image_folder=folder, batch_size=profile.ld_batch,
                               shuffle=False, with_teacher=True, pairing=pairing)
    samples = [same._read(i) for i in range(min(n, len(same.cache)))]
    batches = [samples[a:a + profile.ld_batch] for a in range(0, len(samples), profile.ld_batch)]
    out: dict[str, float] = {}
    for name, ds in (("same", same), ("cross", cross), ("same_again", same), ("cross_again", cross)):
        t = time.process_time()
        for b in batches:
            ds.collate(b)
        out[name] = (time.process_time() - t) * 1e3 / len(samples)
    parts = {"load_images": 0.0, "encode": 0.0, "text_groups": 0.0, "visual": 0.0}
    kinds = cross.teacher_kinds
    for s in samples:
        t0 = time.process_time()
        images = cross._load_images(s)
        t1 = time.process_time()
        enc = pairing.encode(s, images)
        t2 = time.process_time()
        from kd_cache.schema import derive_positions

        resp = derive_positions("response", enc.input_ids, enc.labels, pairing.student_image_token_id).astype(np.int64)
        pairing._text_groups(s, enc, resp)
        t3 = time.process_time()
        vis = [np.asarray(p, dtype=np.int64) for p in enc.visual_positions]
        pairing._visual(s, enc, images, vis, "visual" in kinds, bool(s.get("relation")))
        t4 = time.process_time()
        for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            parts[k] += v * 1e3 / len(samples)
    same_model_inputs = 0.0
    for s in samples:
        ids, labels = np.asarray(s["input_ids"], dtype=np.int64), np.asarray(s["labels"], dtype=np.int64)
        t = time.process_time()
        same._model_inputs(s, ids, labels)
        same_model_inputs += (time.process_time() - t) * 1e3 / len(samples)
    return {"collate_ms_per_sample": {"same": min(out["same"], out["same_again"]),
                                      "cross": min(out["cross"], out["cross_again"])},
            "cross_sample_ms": parts, "same_model_inputs_ms_incl_images": same_model_inputs, "samples": len(samples)}


def loader(profile: Profile, workdir: Path, vocab: int, log=print) -> dict:
    """Samples per worker CPU-second, today's path and the cross path, on one cache with the alignment arrays."""
    from benchmarks.bench_loader import _epoch, _stamped_dataset_class, write_cache
    from benchmarks.models import WORDS, LMSize, llava_config, processor_for
    from kd_cache.reader import open_cache
    from student.alignment import detect_pairing
    from student.stream import StreamingKDDataset, load_sample_images

    vision = _loader_vision(profile)
    processor = processor_for(vision, vocab)
    t0 = time.perf_counter()
    cache, img_dir, shape = write_cache(workdir / "x-ld", profile, processor, vocab, alignment=True, words=WORDS)
    folder = str(img_dir)
    s_proc = student_processor(vision, vocab)
    s_config = llava_config(s_proc, vocab, LMSize(hidden=64, layers=1, heads=2, kv_heads=1, intermediate=64), vision)
    t1 = time.perf_counter()
    pairing = detect_pairing(open_cache(str(cache)), s_proc, s_config, mode="auto",
                             load_images=lambda s: load_sample_images(s, folder),
                             projection_dir=str(workdir / "x-projections"))
    log(f"  cross loader cache: {profile.ld_samples} samples of {shape['tokens']} tokens ({shape['visual_tokens']} "
        f"visual, {shape['response_positions']} response positions), {time.perf_counter() - t0:.0f} s to write; "
        f"pairing: {pairing.describe()} ({time.perf_counter() - t1:.1f} s to detect)")
    if not pairing.cross:
        raise RuntimeError("the student processor gives the teacher's ids: the cross path would not run")
    Stamped = _stamped_dataset_class()  # noqa: N806
    workers = profile.ld_workers[0]
    runs: dict[str, list[dict]] = {"same": [], "cross": []}
    aligned = [0, 0]
    order = [m for r in range(LOADER_ROUNDS) for m in (("same", "cross") if r % 2 == 0 else ("cross", "same"))]
    for e, mode in enumerate(order):
        ds = Stamped(str(cache), s_proc if mode == "cross" else processor, image_folder=folder,
                     batch_size=profile.ld_batch, seed=0, shuffle=True, with_teacher=True,
                     pairing=pairing if mode == "cross" else None)
        runs[mode].append(_epoch(ds, workers, e))
    rate = {m: float(np.median([r["cpu_per_worker"] for r in runs[m]])) for m in runs}
    parts = _collate_parts(cache, folder, processor, pairing, profile, n=min(32, profile.ld_samples))
    # the alignment the cross path found on these samples (share of student answer positions in 1:1 groups)
    ds = StreamingKDDataset(str(cache), s_proc, image_folder=folder, batch_size=profile.ld_batch, shuffle=False,
                            with_teacher=True, pairing=pairing)
    n_t = n_s = 0
    for j in range(min(4, len(ds))):
        b = ds.collate([ds._read(int(i)) for i in ds.batch_indices(j)])
        aligned[0] += b["cross_one_to_one"]
        aligned[1] += b["cross_answer_positions"]
        n_t += int(b["cross_response_ids"].shape[0])
        n_s += int(b["response_index"].shape[0])
    log(f"  {workers} worker(s), samples per worker CPU-second: same tokenizer {rate['same']:.1f}, other tokenizer "
        f"{rate['cross']:.1f} ({rate['cross'] / rate['same']:.3f}x); collate in-process, CPU ms per sample: same "
        f"{parts['collate_ms_per_sample']['same']:.1f}, cross {parts['collate_ms_per_sample']['cross']:.1f} (cross "
        "parts: " + ", ".join(f"{k} {v:.1f}" for k, v in parts["cross_sample_ms"].items()) +
        f"); 1:1 share {aligned[0] / max(1, aligned[1]):.2f}, student/teacher answer tokens {n_s / max(1, n_t):.2f}")
    return {"ratio": rate["cross"] / rate["same"],
            "details": {"samples_per_worker_cpu_s": rate, "workers": workers, "runs": runs, "order": order,
                        "pairing": pairing.describe(), "projection_coverage": pairing.projection.coverage,
                        "aligned_share": aligned[0] / max(1, aligned[1]),
                        "student_over_teacher_answer_tokens": n_s / max(1, n_t), "shape": shape, **parts}}


# ------------------------------------------------------------------------------------------ bytes

# What format 7 adds to a shard (each array's chunks and metadata), and per cache.
ALIGNMENT_ARRAYS = ("response/extra/spans", "response/extra/realised", "visual/extra/boxes",
                    "tokens/conversation", "tokens/conversation_offsets")


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def alignment_bytes(profile: Profile, workdir: Path, vocab: int, log=print) -> dict:
    """Stored bytes per sample of the alignment arrays at LLaVA-1.5 shapes, per array from the shard on
    disk, and the difference to the same samples written without them."""
    from benchmarks.bench_loader import write_cache
    from benchmarks.models import WORDS, processor_for

    if profile.name == "smoke":
        p = profile
    else:  # LLaVA-1.5: 336 px / 14 = 576 visual tokens, 200 answer tokens of 320
        p = replace(profile, ld_image_size=336, ld_patch=14, ld_text_tokens=320, ld_response_tokens=200)
    processor = processor_for(_loader_vision(p), vocab)
    with_, _, shape = write_cache(workdir / "x-bytes", p, processor, vocab, alignment=True, words=WORDS,
                                  name="with")
    without, _, shape0 = write_cache(workdir / "x-bytes", p, processor, vocab, alignment=False, words=WORDS,
                                     name="without")
    n = p.ld_samples
    shards = sorted((with_ / "shards").glob("[0-9]*[0-9]"))
    per_array = {a: sum(_dir_bytes(s / a) for s in shards) / n for a in ALIGNMENT_ARRAYS}
    meta = {"with": sum((s / "zarr.json").stat().st_size for s in shards) / n,
            "without": sum((s / "zarr.json").stat().st_size for s in sorted((without / "shards").glob("[0-9]*[0-9]")))
            / n}
    tokenizer_cache = _dir_bytes(with_ / "teacher_tokenizer")
    arrays = sum(per_array.values()) + meta["with"] - meta["without"]
    sample = shape["bytes_per_sample"]
    diff = sample - shape0["bytes_per_sample"]
    log(f"  alignment arrays at {shape['visual_tokens']} visual / {shape['response_positions']} response positions: "
        f"{arrays:.0f} bytes per sample in the shard ({arrays / sample:.2%} of {sample / 1024:.0f} KiB; with - without "
        f"= {diff:.0f}): " + ", ".join(f"{a.split('/')[-1]} {v:.0f}" for a, v in per_array.items()) +
        f"; tokenizer files {tokenizer_cache / 1024:.0f} KiB per cache ({tokenizer_cache / n:.0f} bytes per sample "
        f"over {n} samples)")
    return {"bytes_per_sample": arrays, "share": arrays / sample, "tokenizer_bytes": tokenizer_cache,
            "details": {"per_array_bytes_per_sample": per_array, "shard_metadata_bytes_per_sample": meta,
                        "arrays_bytes_per_sample": arrays, "with_minus_without_bytes_per_sample": diff,
                        "sample_bytes_with": sample, "sample_bytes_without": shape0["bytes_per_sample"],
                        "tokenizer_files_bytes_per_cache": tokenizer_cache, "samples_per_cache": n,
                        "tokenizer_vocab": len(processor.tokenizer), "shape": shape,
                        "definition": "per sample: the arrays' stored bytes (chunks + their zarr.json) + the growth "
                                      "of the shard's consolidated zarr.json; share: of the sample's stored bytes "
                                      "with them (ShardEntry.bytes / samples); the tokenizer files are per cache"}}


def run(profile: Profile, device: torch.device, workdir: Path, log=print) -> dict:
    """The loader and bytes figures (the step figure is measured by ``benchmarks.bench_student``)."""
    os.environ.setdefault("KD_HOME", str(workdir / "kd-home"))
    ld = loader(profile, workdir, profile.vocab, log=log)
    by = alignment_bytes(profile, workdir, profile.vocab, log=log)
    return {"cross_loader_over_same_loader": ld["ratio"], "alignment_bytes_per_sample": by["bytes_per_sample"],
            "alignment_bytes_share": by["share"], "teacher_tokenizer_bytes_per_cache": float(by["tokenizer_bytes"]),
            "details": {"loader": ld["details"], "bytes": by["details"]}}
