"""Helpers for the trainer tests: synthetic teacher caches written with the real ``CacheWriter``.

A synthetic cache has exactly the layout ``kd-cache build`` writes, with the teacher replaced by a
random distribution per position, so data-path tests (order, resumption, collation, gradients) run
without a teacher pass and on any number of samples.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from cache_fixtures import synthetic_manifest
from PIL import Image

from kd_cache import open_cache, processing
from kd_cache.fingerprint import tokenizer_hash
from kd_cache.writer import CacheWriter
from kd_demo import tiny


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Run the trainer tests' tiny models on one intra-op thread.

    They gain nothing from more, and on a small shared CI machine a second spinning thread makes
    them many times slower whenever another process holds a core. Import this into a test module to
    apply it there (autouse); the previous setting is restored afterwards.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Killed(Exception):
    """Raised where a killed process would stop (see ``kill_after_checkpoint``)."""


def kill_after_checkpoint(monkeypatch, step: int) -> None:
    """Make ``train`` raise ``Killed`` right after it saves the checkpoint of ``step``, as a process killed
    at that moment would stop; ``monkeypatch.undo()`` restores the real saving."""
    import student.train as train_mod

    real_save = train_mod.save_checkpoint

    def save_then_die(accelerator, out, at_step, data_state, cfg, **kw):
        path = real_save(accelerator, out, at_step, data_state, cfg, **kw)
        if at_step == step:
            raise Killed
        return path

    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_die)


def read_all(cache_path) -> list[dict]:
    """Every sample of a cache, in order."""
    cache = open_cache(str(cache_path))
    return [cache[i] for i in range(len(cache))]


def load_llava(path):
    """``(model, processor)`` with plain transformers, the model in fp32 and eval mode: the reference side
    of a test, independent of the code under test."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval(), \
        AutoProcessor.from_pretrained(path)


def model_inputs(processor, input_ids, images) -> dict[str, torch.Tensor]:
    """One unpadded sequence as model inputs: ``input_ids`` [1, L], plus ``pixel_values`` when it has images."""
    inputs = {"input_ids": torch.from_numpy(np.asarray(input_ids, dtype=np.int64))[None]}
    if images:
        inputs["pixel_values"] = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    return inputs


def _sparse(logits: np.ndarray, k: int, mode: str, rng: np.random.Generator, draws: int = 16) -> dict:
    """Top-k (or sampled) ids, log-probs and exact log tail of softmax(logits) [P, V]."""
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    P = logits.shape[0]
    if mode == "topk":
        ids = np.argsort(-logp, axis=-1)[:, :k]
        counts = None
    else:
        ids = np.full((P, k), -1, np.int64)
        counts = np.zeros((P, k), np.int64)
        for r in range(P):
            u, c = np.unique(rng.choice(logp.shape[1], size=draws, p=np.exp(logp[r])), return_counts=True)
            ids[r, :len(u)], counts[r, :len(u)] = u[:k], c[:k]
    lp = np.where(ids >= 0, np.take_along_axis(logp, np.maximum(ids, 0), -1), 0.0)
    p = np.exp(logp)
    mass = np.where(ids >= 0, np.take_along_axis(p, np.maximum(ids, 0), -1), 0.0).sum(-1)
    tail = np.log(np.clip(1.0 - mass, 1e-30, None))
    out = {"ids": ids.astype(np.int32), "logprobs": lp.astype(np.float32), "tail": tail.astype(np.float32)}
    if counts is not None:
        out["counts"] = counts
    return out


def write_synthetic_cache(root: str | Path, processor, *, n: int = 12, shard_size: int = 5, k: int = 8,
                          image_every: int = 2, template: str = "chat", sparse_mode: str = "topk",
                          relation: str = "full", seed: int = 0, min_len: int = 6, max_len: int = 24,
                          image_folder: str | Path | None = None, teacher_scale: float = 3.0,
                          teacher_seed: int = 0) -> Path:
    """Write an ``n``-sample cache to ``root/cache``; every ``image_every``-th sample has an image
    (0 = text only). Images are drawn into ``image_folder`` (default ``root/images``). Returns the path.
    The tokens depend on ``seed`` only and the teacher arrays on ``teacher_seed`` too, so two caches
    that differ only in ``teacher_seed`` hold the same sequences with different teachers.
    """
    root = Path(root)
    out = root / "cache"
    img_dir = Path(image_folder) if image_folder is not None else root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    tok = processor.tokenizer
    V = len(tok)
    image_id = tok.convert_tokens_to_ids(tiny.IMAGE_TOKEN)
    words = list(tiny.COLOURS) + tiny.SHAPES + tiny.POSITIONS + tiny.NUMBERS
    rng = np.random.default_rng(seed)
    t_rng = np.random.default_rng([seed, teacher_seed])
    colours, shapes, positions = list(tiny.COLOURS), tiny.SHAPES, tiny.POSITIONS

    samples = []
    for i in range(n):
        has_image = bool(image_every) and i % image_every == 0
        prompt = " ".join(rng.choice(words, size=int(rng.integers(2, 5))))
        answer = " ".join(rng.choice(words, size=int(rng.integers(max(1, min_len // 4), max(2, max_len // 4)))))
        images: list[str] = []
        pil = []
        if has_image:
            name = f"img-{seed}-{i:05d}.png"
            tiny.draw_shapes(img_dir / name, [(shapes[i % 3], colours[i % 6], positions[i % 5])])
            images = [name]
            pil = [Image.open(img_dir / name).convert("RGB")]
            prompt = "<image>\n" + prompt
        # The processor's own encoding, so a student's processor reproduces it from the stored call.
        enc = processing.encode(processor, image_id, [{"role": "user", "content": prompt},
                                                      {"role": "assistant", "content": answer}], pil)
        input_ids, labels = enc.input_ids.astype(np.int32), enc.labels.astype(np.int32)
        resp = np.nonzero(labels[1:] != -100)[0].astype(np.int32)
        vis = np.nonzero(input_ids == image_id)[0].astype(np.int32)
        s = {"id": f"syn-{seed}-{i:05d}", "images": images, "input_ids": input_ids, "labels": labels,
             "image_token_counts": np.asarray(enc.image_token_counts, np.int32), "processor_call": enc.call,
             "response_positions": resp, "visual_positions": vis}
        for kind, pos in (("response", resp), ("visual", vis)):
            logits = teacher_scale * t_rng.standard_normal((len(pos), V))
            for f, v in _sparse(logits, k, sparse_mode, t_rng).items():
                s[f"{kind}_{f}"] = v
        rels = []
        if has_image and relation != "none":
            z = t_rng.standard_normal((enc.image_token_counts[0], V)).astype(np.float32)
            r = z @ z.T
            rels.append((r / np.linalg.norm(r)).astype(np.float32))
        s["relation"] = rels
        samples.append(s)

    writer = CacheWriter(str(out))
    entries = []
    for shard, a in enumerate(range(0, n, shard_size)):
        entries.append(writer.write_shard(shard, samples[a:a + shard_size], sparse_mode=sparse_mode, k=k,
                                          relation=relation))
    writer.write_manifest(synthetic_manifest(
        entries, sparse_mode=sparse_mode, k=k, relation=relation, tokenizer_hash=tokenizer_hash(tok), vocab_size=V,
        teacher_head_rows=V, image_token_id=image_id, template=template,
        build_config={"image_folder": str(img_dir), "data": "synthetic"}))
    return out
