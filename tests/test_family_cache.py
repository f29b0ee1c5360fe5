"""``kd-cache build`` on a tiny teacher of every family in ``tests/vlm_families.py``, checked against the
model and its processor directly: the cached ids are the processor's, the cached top-k log-probs, tails
and per-image relation matrices are those of ``model(**processor outputs)`` (fp16 storage noise only),
and the training stream gives a same-family student exactly its processor's inputs.

Records hold images of different sizes, two images in one sample and a text-only sample (batched with
the image samples), so the per-image counts, padded tiles and mixed batches are all exercised.
"""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from kd_cache import open_cache, processing
from kd_cache.build import build_cache
from kd_cache.build_config import BuildConfig
from kd_cache.processing import config_image_token_id
from student.stream import StreamingKDDataset
from tests.vlm_families import FAMILIES

pytest.importorskip("torchvision", reason="the processors of 7 families need torchvision")
warnings.filterwarnings("ignore", message=".*slow image processor.*")

SIZES = {"wide.png": (48, 32, "red"), "tall.png": (40, 64, "blue"), "strip.png": (64, 20, "green"),
         "small.png": (24, 40, "yellow")}
TOP_K = 8


def _records(chat: bool) -> list[dict]:
    """LLaVA-format records; a prefix-LM family (PaliGemma: one prompt, one answer, images required)
    gets single-turn image records only."""
    recs = [
        {"id": "two-turns", "image": ["wide.png"], "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the circle?"}, {"from": "gpt", "value": "red"},
            {"from": "human", "value": "Where is it?"}, {"from": "gpt", "value": "in the center of the picture."}]},
        {"id": "two-images", "image": ["tall.png", "strip.png"], "conversations": [
            {"from": "human", "value": "<image>\n<image>\nCompare the two images."},
            {"from": "gpt", "value": "the first is blue, the second is green."}]},
        {"id": "small", "image": ["small.png"], "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image in one word."}, {"from": "gpt", "value": "yellow"}]},
        {"id": "text-only", "conversations": [
            {"from": "human", "value": "How many shapes are there?"}, {"from": "gpt", "value": "three"}]},
    ]
    if not chat:
        recs[0]["conversations"] = recs[0]["conversations"][:2]
        recs = recs[:3]
    return recs


def _messages(rec: dict) -> list[dict]:
    role = {"human": "user", "gpt": "assistant"}
    return [{"role": role[t["from"]], "content": t["value"]} for t in rec["conversations"]]


@pytest.fixture(scope="session")
def family_cache(family_builds):
    """name -> dict(model, processor, cache, records, images, student_processor), built once per family."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    def make(fam, root, folder) -> dict:
        teacher = fam.build(root / "teacher")
        student = fam.build(root / "student", student=True)
        recs = _records(fam.chat)
        (root / "data.json").write_text(json.dumps(recs))
        # One batch of all records: images of different sizes and a text-only sample padded together.
        cfg = BuildConfig(teacher=str(teacher), data=str(root / "data.json"), out=str(root / "cache"),
                          image_folder=str(folder), top_k=TOP_K, batch_size=len(recs), device="cpu",
                          dtype="float32", progress=False, strict=True)
        build_cache(cfg)
        return {
            "model": AutoModelForImageTextToText.from_pretrained(teacher, dtype=torch.float32).eval(),
            "processor": AutoProcessor.from_pretrained(teacher),
            "student_processor": AutoProcessor.from_pretrained(student),
            "student_path": student,
            "cache": open_cache(str(root / "cache")),
            "records": {r["id"]: r for r in recs},
            "images": {n: Image.open(folder / n).convert("RGB") for n in SIZES},
        }

    return family_builds("cache", SIZES, make)


@pytest.fixture(params=list(FAMILIES))
def fam(request, family_cache):
    return request.param, family_cache(request.param)


def _encode(f: dict, processor, s: dict):
    rec = f["records"][s["id"]]
    imgs = [f["images"][p] for p in rec.get("image", [])]
    return processing.encode(processor, config_image_token_id(f["model"].config), _messages(rec), imgs)


def test_cached_ids_are_the_processors(fam):
    name, f = fam
    samples = list(f["cache"])
    assert len(samples) == len(f["records"]) and f["cache"].manifest.skipped == []
    for s in samples:
        enc = _encode(f, f["processor"], s)
        np.testing.assert_array_equal(s["input_ids"], enc.input_ids, err_msg=f"{name} {s['id']}")
        np.testing.assert_array_equal(s["labels"], enc.labels, err_msg=f"{name} {s['id']}")
        assert s["image_token_counts"].tolist() == enc.image_token_counts, (name, s["id"])
        np.testing.assert_array_equal(s["visual_positions"], np.concatenate(
            [np.zeros(0, np.int64), *enc.visual_positions]), err_msg=f"{name} {s['id']}")
    counts = {s["id"]: s["image_token_counts"].tolist() for s in samples}
    print(name, "visual tokens per image:", counts)


def test_cached_distributions_and_relations_are_the_models(fam):
    """Top-k ids, log-probs and tails equal a dense log-softmax of ``model(**inputs).logits``; each
    image's relation matrix is ``Z Z^T / ||Z Z^T||_F`` of the logits at its own visual positions."""
    name, f = fam
    vocab = f["cache"].manifest.vocab_size
    for s in f["cache"]:
        enc = _encode(f, f["processor"], s)
        with torch.no_grad():
            z = f["model"](**enc.inputs).logits[0, :, :vocab].float()
        logp = torch.log_softmax(z, -1)
        for kind in ("response", "visual"):
            pos = torch.from_numpy(s[f"{kind}_positions"].astype(np.int64))
            ref = logp[pos].topk(TOP_K)
            where = f"{name} {s['id']} {kind}"
            np.testing.assert_allclose(s[f"{kind}_logprobs"], ref.values.numpy(), atol=5e-3, rtol=2e-3, err_msg=where)
            got = np.take_along_axis(logp[pos].numpy(), s[f"{kind}_ids"].astype(np.int64), 1)
            np.testing.assert_allclose(got, ref.values.numpy(), atol=1e-5, err_msg=where)  # same ids up to ties
            tail = torch.log1p(-ref.values.exp().sum(-1).clamp_max(1 - 1e-7))
            np.testing.assert_allclose(s[f"{kind}_tail"], tail.numpy(), atol=2e-3, rtol=2e-3, err_msg=where)
        assert len(s["relation"]) == len(enc.visual_positions)
        for R, vis in zip(s["relation"], enc.visual_positions):
            zi = z[torch.from_numpy(vis)]
            r = zi @ zi.T
            np.testing.assert_allclose(R, (r / r.norm()).numpy(), atol=2e-3, err_msg=f"{name} {s['id']}")


def test_stream_gives_the_student_its_processors_inputs(fam):
    name, f = fam
    cache = f["cache"]
    samples = [cache[i] for i in range(len(cache))]
    ds = StreamingKDDataset(cache, f["student_processor"], image_folder=None, batch_size=len(samples), shuffle=False)
    batch = ds.collate(samples)
    pad = f["student_processor"].tokenizer.pad_token_id
    ref = processing.collate([_encode(f, f["student_processor"], s) for s in samples], pad)
    got = batch["model_inputs"]
    assert sorted(got) == sorted(ref), name
    for k in ref:
        assert torch.equal(got[k], ref[k]), (name, k)
    # One relation per image at its own size, indexing that image's visual positions (-1 padded).
    counts = [c for s in samples for c in s["image_token_counts"].tolist()]
    assert batch["relation_counts"].tolist() == counts
    flat = batch["model_inputs"]["input_ids"].reshape(-1)
    tid = config_image_token_id(f["model"].config)
    for r, n in enumerate(counts):
        idx = batch["relation_index"][r]
        assert (flat[idx[:n]] == tid).all() and (idx[n:] == -1).all()


def test_stream_refuses_a_sample_its_processor_encodes_differently(family_cache):
    """A student processor that expands images differently (here: Qwen's pixel budget lowered) is
    refused per sample, naming it and both counts; one that cannot read the text at all too."""
    import copy

    f = family_cache("qwen2_5_vl")
    cache = f["cache"]
    s = next(x for x in cache if x["id"] == "two-images")
    smaller = copy.deepcopy(f["student_processor"])
    smaller.image_processor.size = {"shortest_edge": 16 * 16, "longest_edge": 32 * 32}
    ds = StreamingKDDataset(cache, smaller, image_folder=None, batch_size=1, shuffle=False)
    counts = s["image_token_counts"].tolist()
    expected = (r"sample 'two-images': the student's processor gives \d+ tokens with \[.*\] visual tokens per "
                rf"image, the cache holds {len(s['input_ids'])} tokens with {re.escape(str(counts))}")
    with pytest.raises(ValueError, match=expected):
        ds.collate([s])
    other = StreamingKDDataset(cache, family_cache("llava_next")["student_processor"], image_folder=None,
                               batch_size=1, shuffle=False)
    with pytest.raises(ValueError, match="sample 'two-images': the student's processor cannot encode"):
        other.collate([s])


def test_chat_template_required_unless_the_processor_takes_a_suffix(family_cache):
    """``--template chat`` needs the processor's chat template; PaliGemma's prompt/suffix call is the
    documented exception. The refusal lists the supported families."""
    import copy

    from kd_cache.teacher import Teacher, check_template

    for name in ("llava", "paligemma"):
        f = family_cache(name)
        proc = copy.deepcopy(f["processor"])
        proc.chat_template = None
        t = Teacher(f["model"], proc, proc.tokenizer, config_image_token_id(f["model"].config), True,
                    torch.device("cpu"))
        check_template(t, "pretrain")
        if name == "paligemma":
            check_template(t, "chat")
            continue
        with pytest.raises(ValueError, match=r"has no chat template.*Supported image-text families: LLaVA, "
                                             r"VipLLaVA, LLaVA-NeXT, .*Mistral3"):
            check_template(t, "chat")


def test_dft_step_on_the_cache_equals_the_dense_reference_of_the_two_models(fam):
    """One DFT forward of the same-family student on the teacher's cache (the real loader, stream and
    ``DistillStudent``) gives the loss sums of a dense reference computed from the two models directly:
    CE at response positions, forward KL over the teacher's top-k ids + one tail bin at response and
    visual positions (the teacher's bins from its own full log-softmax), and RDist per image from both
    models' logits at that image's visual positions. Only the cache's fp16 storage separates them."""
    from student.distill import DistillStudent, LossSettings
    from student.model import load_student
    from student.train import _to_device

    name, f = fam
    student, processor = load_student(f["student_path"])
    student.eval()
    cache = f["cache"]
    samples = [cache[i] for i in range(len(cache))]
    ds = StreamingKDDataset(cache, processor, image_folder=None, batch_size=len(samples), shuffle=False)
    wrapper = DistillStudent(student, LossSettings())
    with torch.no_grad():
        sums = wrapper(_to_device(ds.collate(samples), torch.device("cpu")))

    vocab = cache.manifest.vocab_size
    ref = {"ce": 0.0, "response": 0.0, "visual": 0.0, "rdist": 0.0}
    for s in samples:
        with torch.no_grad():
            zt = f["model"](**_encode(f, f["processor"], s).inputs).logits[0, :, :vocab].double()
            zs = student(**_encode(f, processor, s).inputs).logits[0].double()
        lt, ls = torch.log_softmax(zt, -1), torch.log_softmax(zs, -1)
        resp = torch.from_numpy(s["response_positions"].astype(np.int64))
        targets = torch.from_numpy(s["labels"].astype(np.int64))[resp + 1]
        ref["ce"] -= ls[resp, targets].sum().item()
        for kind in ("response", "visual"):
            pos = torch.from_numpy(s[f"{kind}_positions"].astype(np.int64))
            top = lt[pos].topk(TOP_K)
            p = torch.cat([top.values, torch.log1p(-top.values.exp().sum(-1, keepdim=True).clamp_max(1 - 1e-12))], -1)
            q_ids = ls[pos].gather(1, top.indices)
            q = torch.cat([q_ids, torch.log1p(-q_ids.exp().sum(-1, keepdim=True).clamp_max(1 - 1e-12))], -1)
            ref[kind] += (p.exp() * (p - q)).sum().item()
        offsets = np.cumsum([0, *s["image_token_counts"].tolist()])
        vis = s["visual_positions"].astype(np.int64)
        for a, b in zip(offsets[:-1], offsets[1:]):
            idx = torch.from_numpy(vis[a:b])
            rt, rs = zt[idx] @ zt[idx].T, zs[idx] @ zs[idx].T
            ref["rdist"] += 1.0 - torch.nn.functional.cosine_similarity(rt.reshape(1, -1), rs.reshape(1, -1)).item()

    got = {"ce": sums["ce_sum"].item(), "response": sums["mdist_response_sum"].item(),
           "visual": sums["mdist_visual_sum"].item(), "rdist": sums["rdist_sum"].item()}
    assert got["ce"] == pytest.approx(ref["ce"], rel=1e-4), name
    for key in ("response", "visual"):  # teacher log-probs and tails are stored in fp16 / fp32
        assert got[key] == pytest.approx(ref[key], rel=5e-3, abs=1e-4), (name, key, got, ref)
    assert got["rdist"] == pytest.approx(ref["rdist"], rel=2e-3, abs=1e-5), (name, got, ref)


def test_alignment_forced_on_the_same_processor_gives_todays_loss(fam):
    """``--alignment cross`` on a student that shares the teacher's processor: each sample re-encoded from
    its stored conversation, its answer tokens aligned by text offsets (all one-to-one), the vocabulary
    projection the identity, every visual token's box equal to the teacher's (the identity map). In float64
    the loss sums are today's path's to 1e-9 (the projected bins are summed in another order; in fp32 a KL
    sum near 0 is a small difference of large terms, 1e-4 relative apart)."""
    from student.alignment import detect_pairing
    from student.distill import DistillStudent, LossSettings
    from student.model import load_student
    from student.stream import load_sample_images
    from student.train import _to_device

    name, f = fam
    student, processor = load_student(f["student_path"])
    student.double().eval()
    cache = f["cache"]
    samples = [cache[i] for i in range(len(cache))]
    folder = cache.manifest.image_folder
    pairing = detect_pairing(cache, processor, student.config, mode="cross",
                             load_images=lambda s: load_sample_images(s, folder))
    assert pairing.cross and pairing.text == "byte spans, same vocabulary" and pairing.projection.coverage == 1.0
    sums = {}
    for key, p in (("today", None), ("aligned", pairing)):
        ds = StreamingKDDataset(cache, processor, image_folder=None, batch_size=len(samples), shuffle=False, pairing=p)
        batch = ds.collate(samples)
        if p is not None:
            assert batch["cross_one_to_one"] == batch["cross_answer_positions"] > 0, name
        wrapper = DistillStudent(student, LossSettings(), projection=pairing.projection)
        with torch.no_grad():
            sums[key] = {k: v.item() for k, v in wrapper(_to_device(batch, torch.device("cpu"))).items()}
    for k in ("ce_sum", "mdist_response_sum", "mdist_visual_sum", "rdist_sum"):
        assert sums["aligned"][k] == pytest.approx(sums["today"][k], rel=1e-9, abs=1e-12), (name, k, sums)
