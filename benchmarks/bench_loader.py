"""Loader speed: ``StreamingKDDataset`` + ``make_loader`` at realistic shapes, samples/s per worker.

The cache is written by ``CacheWriter`` (default codecs and chunking) with LLaVA-1.5/OneVision-like
shapes: one 384x384 JPEG per sample (SigLIP patch 14: 729 visual tokens), ~600 text tokens of which
~450 are the answer, top-64 at every response and visual position, and a ``full`` relation matrix
(729 x 729). Teacher distributions are synthetic but shaped like real ones (descending log-probs,
a heavy tail; ids drawn from a Zipf-like law so they compress as real ids do). The loader does
what ``kd-train`` does: read and decode the shard arrays, decode the JPEG and run the student's
image processor, collate and pad the batch (DFT: with the teacher arrays).

Samples/s are counted in steady state (after the first batch has arrived, so worker start-up and
shard opening are excluded), and divided by the number of workers. The per-sample breakdown is
measured inside a loader worker too (same allocator settings, same read order); what the rate
leaves beyond it is mostly handing the batch to the main process (tensors copied into shared
memory, ~4.8 MB per sample at these shapes).
"""

from __future__ import annotations

import resource
import shutil
import time
from pathlib import Path

import numpy as np

from benchmarks.models import Profile, write_jpeg


def _zipf_ids(rng: np.random.Generator, shape, vocab: int) -> np.ndarray:
    """Distinct ids per row, drawn with probability ~ 1/rank (as frequent tokens dominate real top-k)."""
    P, K = shape
    out = np.empty((P, K), dtype=np.int32)
    w = 1.0 / np.arange(1, vocab + 1)
    w /= w.sum()
    perm = rng.permutation(vocab)  # token frequency rank -> id
    for r in range(P):
        out[r] = perm[rng.choice(vocab, size=K, replace=False, p=w)]
    return out


def _topk(rng, P: int, K: int, vocab: int, id_pool: np.ndarray) -> dict:
    z = rng.standard_normal((P, K)).astype(np.float32) * 2.0
    z = -np.sort(-z, axis=1)
    tail_mass = rng.uniform(0.02, 0.2, size=P).astype(np.float32)
    p = np.exp(z - z.max(1, keepdims=True))
    p = p / p.sum(1, keepdims=True) * (1 - tail_mass)[:, None]
    ids = id_pool[rng.integers(0, len(id_pool), size=P)]
    return {"ids": ids, "logprobs": np.log(p).astype(np.float32), "tail": np.log(tail_mass)}


def write_cache(root: Path, profile: Profile, processor, vocab: int, seed: int = 0,
                store_images: bool = False, alignment: bool = False, words: list[str] | None = None,
                name: str | None = None) -> tuple[Path, Path, dict]:
    """The synthetic cache (``store_images``: each sample's JPEG bytes in the shard, a self-contained
    cache; otherwise read by path from the image folder) -> (cache, image folder, shape).

    ``alignment``: also the arrays a student of another tokenizer needs, as the teacher pass writes them
    (``kd_cache.schema.ALIGNMENT_EXTRAS``: each response position's answer characters, the realised
    token's log-prob (here the top-1's), each visual position's image box; the conversation; the
    tokenizer files). ``words``: prompt and answer are words drawn from it (about the profile's token
    counts) instead of decoded random ids; ``name``: the cache folder under ``root``."""
    from PIL import Image

    from kd_cache import processing
    from kd_cache.fingerprint import tokenizer_hash
    from kd_cache.schema import DEFAULT_KINDS, HiddenInfo, Manifest, SparseInfo, TeacherInfo
    from kd_cache.writer import CacheWriter
    from kd_demo import tiny

    rng = np.random.default_rng(seed)
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids(tiny.IMAGE_TOKEN)
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    special = set(tok.all_special_ids)
    normal = np.array([i for i in range(len(tok)) if i not in special])
    # A pool of realistic top-64 id rows, reused across positions (drawing each row costs ~1 ms).
    id_pool = _zipf_ids(rng, (256, 64), vocab)
    config = None
    if alignment:  # the model config the visual-token boxes are read against (kd_cache.regions)
        from benchmarks.models import LMSize, VisionSize, llava_config

        config = llava_config(processor, vocab, LMSize(hidden=64, layers=1, heads=2, kv_heads=1, intermediate=64),
                              VisionSize(hidden=32, layers=1, heads=2, intermediate=64,
                                         image_size=profile.ld_image_size, patch_size=profile.ld_patch))
    per_word = len(tok(" ".join(words * 4))["input_ids"]) / (4 * len(words)) if words else 1.0
    samples = []
    for i in range(profile.ld_samples):
        sample_name = f"ld-{i:05d}.jpg"
        write_jpeg(img_dir / sample_name, profile.ld_image_size, seed * 1000 + i)
        n_prompt = profile.ld_text_tokens - profile.ld_response_tokens
        # Text of about the profile's token counts, encoded by the processor (the stream re-runs it).
        if words:
            prompt = " ".join(rng.choice(words, size=max(1, round(n_prompt / per_word)))) + "?"
            answer = " ".join(rng.choice(words, size=max(1, round(profile.ld_response_tokens / per_word)))) + "."
        else:
            prompt = tok.decode(rng.choice(normal, size=n_prompt))
            answer = tok.decode(rng.choice(normal, size=profile.ld_response_tokens))
        conversation = [{"role": "user", "content": "<image>\n" + prompt}, {"role": "assistant", "content": answer}]
        with Image.open(img_dir / sample_name) as im:
            image = im.convert("RGB")
        enc = processing.encode(processor, image_id, conversation, [image])
        ids, labels = enc.input_ids.astype(np.int32), enc.labels.astype(np.int32)
        resp = np.nonzero(labels[1:] != -100)[0].astype(np.int32)
        vis = np.nonzero(ids == image_id)[0].astype(np.int32)
        n_vis = len(vis)
        s = {"id": f"ld-{i:05d}", "images": [sample_name], "input_ids": ids, "labels": labels,
             "image_bytes": [(img_dir / sample_name).read_bytes() if store_images else None],
             "image_token_counts": np.asarray(enc.image_token_counts, np.int32), "processor_call": enc.call,
             "response_positions": resp, "visual_positions": vis}
        for kind, pos in (("response", resp), ("visual", vis)):
            for f, v in _topk(rng, len(pos), 64, vocab, id_pool).items():
                s[f"{kind}_{f}"] = v
        if alignment:
            from kd_cache import regions

            s["conversation"] = conversation
            s["response_spans"] = enc.answer_spans[resp + 1].astype(np.int32)
            s["response_realised"] = s["response_logprobs"][:, 0].astype(np.float16)
            s["visual_boxes"] = np.concatenate(regions.image_regions(processor, config, enc, [image.size])
                                               ).astype(np.float16)
        # Relation of real-looking logits: a dominant shared direction plus a few smaller ones.
        z = rng.standard_normal((n_vis, 16)).astype(np.float32) @ rng.standard_normal((16, 64)).astype(np.float32)
        z += 8.0 * rng.standard_normal(64).astype(np.float32)
        s["relation"] = [z @ z.T]
        samples.append(s)
    out = root / (name or ("cache-stored" if store_images else "cache"))
    shutil.rmtree(out, ignore_errors=True)
    w = CacheWriter(str(out))
    per_shard = profile.ld_shard_size or max(1, profile.ld_samples // 4)
    entries = [w.write_shard(j, samples[a:a + per_shard], sparse_mode="topk", k=64, relation="full")
               for j, a in enumerate(range(0, len(samples), per_shard))]
    tokenizer_files = w.write_tokenizer(tok) if alignment else {}
    w.write_manifest(Manifest(
        teacher=TeacherInfo(path="synthetic", model_type="llava", revision=None, config_hash="synthetic",
                            multimodal=True, tokenizer_files=tokenizer_files),
        tokenizer_hash=tokenizer_hash(tok), vocab_size=vocab, teacher_head_rows=vocab, image_token_id=image_id,
        template="chat", max_length=4096, sparse=SparseInfo(mode="topk", k=64),
        relation="full", positions=DEFAULT_KINDS, hidden=HiddenInfo(), generated=None,
        dataset_fingerprint="synthetic", build_config={"image_folder": str(img_dir), "data": "synthetic"},
        shards=entries))
    shape = {"tokens": int(len(samples[0]["input_ids"])), "visual_tokens": int(n_vis),
             "response_positions": int(len(samples[0]["response_positions"])),
             "bytes_per_sample": sum(e.bytes for e in entries) / len(samples),
             "shards": len(entries), "samples_per_shard": per_shard}
    return out, img_dir, shape


def _stamped_dataset_class():
    from torch.utils.data import get_worker_info

    from student.stream import StreamingKDDataset

    class CpuStamped(StreamingKDDataset):
        """The real dataset; every batch also carries its worker's id, CPU clock and page-fault count
        when it was made."""

        def __iter__(self):
            info = get_worker_info()
            for batch in super().__iter__():
                batch["_worker"] = info.id if info is not None else -1
                batch["_cpu"] = time.process_time()
                batch["_faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                yield batch

    return CpuStamped


def _breakdown_dataset_class():
    from student.stream import StreamingKDDataset

    class Breakdown(StreamingKDDataset):
        """Yields, per batch of the worker's stream, the CPU seconds of each step instead of the batch."""

        def __iter__(self):
            for j in range(len(self)):
                a = time.process_time()
                samples = [self._read(int(i)) for i in self.batch_indices(j)]
                b = time.process_time()
                images = [im for s in samples for im in self._load_images(s)]
                if images:
                    self.image_processor(images=images, return_tensors="pt")
                c = time.process_time()
                self.collate(samples)
                d = time.process_time()
                # collate loads and processes the images again: subtract that
                yield {"n": len(samples), "read": b - a, "image": c - b, "collate": (d - c) - (c - b)}

    return Breakdown


def _epoch(ds, workers: int, epoch: int) -> dict:
    """One epoch through ``make_loader``, in steady state (after each worker's first batch).

    ``cpu_per_worker``: samples per CPU-second of a worker process, from the CPU clock each worker
    stamps on its batches (first to last batch of the worker), i.e. the rate of a worker that has a
    core to itself. ``wall_per_worker``: samples/s arriving in the main process after the first
    batch, divided by the number of workers.
    """
    from student.stream import make_loader

    ds.set_position(epoch, 0)
    t_start = time.perf_counter()
    first = None
    n_after_first = 0
    per_worker: dict[int, list[tuple[float, int]]] = {}
    for batch in make_loader(ds, workers):
        per_worker.setdefault(batch["_worker"], []).append((batch["_cpu"], batch["n_samples"], batch["_faults"]))
        if first is None:
            first = time.perf_counter()
            continue
        n_after_first += batch["n_samples"]
    end = time.perf_counter()
    cpu = sum(v[-1][0] - v[0][0] for v in per_worker.values())
    faults = sum(v[-1][2] - v[0][2] for v in per_worker.values())
    n_cpu = sum(sum(n for _, n, _ in v[1:]) for v in per_worker.values())
    return {"wall_per_worker": n_after_first / (end - first) / workers, "first_batch_s": first - t_start,
            "cpu_per_worker": n_cpu / cpu if cpu > 0 else float("nan"), "worker_cpu_s": cpu,
            "samples_timed": n_after_first, "page_faults_per_sample": faults / max(1, n_cpu)}


def run(profile: Profile, workdir: Path, vocab: int, basis_cpu: bool = True, log=print,
        store_images: bool = False) -> dict:
    """The loader benchmark; ``store_images``: on a self-contained cache (images decoded from the shard,
    no image folder) instead of one whose images are read from files."""
    from benchmarks.models import VisionSize, processor_for
    from student.stream import make_loader

    Stamped = _stamped_dataset_class()  # noqa: N806
    vision = VisionSize(hidden=0, layers=0, heads=0, intermediate=0, image_size=profile.ld_image_size,
                        patch_size=profile.ld_patch)
    processor = processor_for(vision, vocab)
    t0 = time.perf_counter()
    cache, img_dir, shape = write_cache(workdir / "ld", profile, processor, vocab, store_images=store_images)
    folder = None if store_images else str(img_dir)
    log(f"  loader cache: {profile.ld_samples} samples of {shape['tokens']} tokens ({shape['visual_tokens']} visual, "
        f"{shape['response_positions']} response positions), {shape['bytes_per_sample'] / 2**20:.2f} MiB/sample "
        f"on disk ({time.perf_counter() - t0:.0f} s to write)")
    results = {}
    for workers in profile.ld_workers:
        runs = []
        for e in range(profile.ld_epochs):
            ds = Stamped(str(cache), processor, image_folder=folder, batch_size=profile.ld_batch,
                         seed=0, shuffle=True, with_teacher=True)
            runs.append(_epoch(ds, workers, e))
        results[workers] = {k: [r[k] for r in runs] for k in runs[0]}
        log(f"  {workers} worker(s): {np.median(results[workers]['cpu_per_worker']):.1f} samples per worker "
            f"CPU-second, {np.median(results[workers]['wall_per_worker']):.1f} samples/s per worker wall-clock "
            f"(steady state; first batch after {np.median(results[workers]['first_batch_s']):.2f} s)")
    # Per-sample breakdown inside one loader worker, over a whole epoch in the dataset's own order:
    # shard read + decode, image decode + processing, collation (teacher arrays, relation), and the
    # hand-over to the main process.
    Breakdown = _breakdown_dataset_class()  # noqa: N806
    ds = Breakdown(str(cache), processor, image_folder=folder, batch_size=profile.ld_batch, seed=0,
                   shuffle=True, with_teacher=True)
    steps = list(make_loader(ds, 1))[1:]  # steady state: without the first batch (shard opening)
    n_steps = max(1, sum(t["n"] for t in steps))
    per_sample = {k: 1e3 * sum(t[k] for t in steps) / n_steps for k in ("read", "image", "collate")}
    rate_1 = np.median(results[profile.ld_workers[0]]["cpu_per_worker"])
    per_sample["rest"] = 1e3 / rate_1 - sum(per_sample.values())  # hand-over to the main process, loader
    log("  per sample in a worker (CPU ms): " + ", ".join(f"{k} {v:.1f}" for k, v in per_sample.items()) +
        f"; {np.median(results[profile.ld_workers[0]]['page_faults_per_sample']):.0f} page faults")
    key_workers = profile.ld_workers[0]
    basis = "cpu" if basis_cpu else "wall"
    return {
        "loader_samples_per_s_per_worker": float(np.median(results[key_workers][f"{basis}_per_worker"])),
        "details": {"workers_reported": key_workers, "basis": basis,
                    "definition": "cpu: samples per CPU-second of a worker process, first to last batch of each "
                                  "worker (a worker with a core to itself); wall: samples/s reaching the main "
                                  "process after the first batch, / workers", "per_workers": {str(k): v for k, v in results.items()},
                    "batch_size": profile.ld_batch, "shape": shape, "images_stored_in_cache": store_images, "image_size": profile.ld_image_size,
                    "cpu_ms_per_sample_in_worker": {"shard_read_and_decode": per_sample["read"],
                                                    "image_decode_and_process": per_sample["image"],
                                                    "collate_without_image": per_sample["collate"],
                                                    "rest_handover_to_main_process": per_sample["rest"]},
                    "image_processor": type(processor.image_processor).__name__,
                    "order": {"window": ds.window, "mix": ds.mix, "block_shards": ds.block_shards,
                              "worker_chunk_cache_bytes": ds.cache_bytes},
                    "torch_threads_in_workers": 1},
    }


def compare_image_sources(profile: Profile, workdir: Path, vocab: int, log=print) -> dict:
    """Bytes per sample and loader rate (samples per worker CPU-second) with the images read from files
    and with them stored in the cache (``kd-cache build --store-images``, or embedded data)."""
    out = {}
    for stored in (False, True):
        log(f"images {'stored in the cache' if stored else 'read from files'}:")
        r = run(profile, workdir, vocab, log=log, store_images=stored)
        d = r["details"]
        out["stored" if stored else "files"] = {
            "bytes_per_sample": d["shape"]["bytes_per_sample"],
            "samples_per_worker_cpu_s": {w: float(np.median(v["cpu_per_worker"])) for w, v in d["per_workers"].items()},
            "image_ms_per_sample": d["cpu_ms_per_sample_in_worker"]["image_decode_and_process"],
            "read_ms_per_sample": d["cpu_ms_per_sample_in_worker"]["shard_read_and_decode"]}
    return out


if __name__ == "__main__":  # pragma: no cover - manual run
    import json
    import sys

    from benchmarks.models import PROFILES

    profile = PROFILES[sys.argv[1] if len(sys.argv) > 1 else "quick"]
    wd = Path(sys.argv[2] if len(sys.argv) > 2 else "/tmp/ld-bench")
    wd.mkdir(parents=True, exist_ok=True)
    if "--compare-images" in sys.argv:
        print(json.dumps(compare_image_sources(profile, wd, 32768), indent=1))
    else:
        print(run(profile, wd, 32768))
