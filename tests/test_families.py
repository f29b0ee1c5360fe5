"""Every VLM family of ``tests/vlm_families.py`` through ``kd_cache.processing``: the ids are the
processor's own, each image's visual positions match the features the model produces for it, a
padded batch of samples with images of different sizes gives each sample's own logits, and the
labels cover exactly the answers."""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from kd_cache.processing import (
    TOKEN_INPUTS,
    collate,
    config_image_token_id,
    encode,
    is_prefix_lm,
    render_chat,
)
from kd_cache.schema import IGNORE_INDEX
from tests.vlm_families import FAMILIES

pytest.importorskip("torchvision", reason="torchvision does not import here: the processors of LLaVA-OneVision, "
                    "Qwen2/2.5/3-VL, SmolVLM, InternVL and Mistral3 (Pixtral) need it")
warnings.filterwarnings("ignore", message=".*slow image processor.*")


def _image(w: int, h: int, colour: str) -> Image.Image:
    img = Image.new("RGB", (w, h), "white")
    ImageDraw.Draw(img).ellipse([w // 4, h // 4, 3 * w // 4, 3 * h // 4], fill=colour)
    return img


# Images of different sizes and aspect ratios, so dynamic-resolution families expand them differently.
IMAGES = {"wide": _image(48, 32, "red"), "tall": _image(40, 64, "blue"), "strip": _image(64, 20, "green"),
          "small": _image(24, 40, "yellow")}


def records(chat: bool) -> list[tuple[list[dict], list[Image.Image]]]:
    """(conversation, images): one image and two turns, two images, one small image, text only.
    A prefix-LM family (PaliGemma) gets one question and one answer per record."""
    recs = [
        ([{"role": "user", "content": "<image>\nWhat colour is the circle?"},
          {"role": "assistant", "content": "red"},
          {"role": "user", "content": "Where is it?"},
          {"role": "assistant", "content": "in the center of the picture."}], ["wide"]),
        ([{"role": "user", "content": "<image>\n<image>\nCompare the two images."},
          {"role": "assistant", "content": "the first is blue, the second is green."}], ["tall", "strip"]),
        ([{"role": "user", "content": "<image>\nDescribe the image in one word."},
          {"role": "assistant", "content": "yellow"}], ["small"]),
    ]
    if not chat:
        recs[0] = (recs[0][0][:2], recs[0][1])
    return [(conv, [IMAGES[k] for k in keys]) for conv, keys in recs]


def answers(conv: list[dict]) -> list[str]:
    return [m["content"] for m in conv if m["role"] == "assistant"]


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """name -> (model, processor), each family built once per session and loaded back from disk."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.utils import logging

    logging.set_verbosity_error()
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            path = FAMILIES[name].build(tmp_path_factory.mktemp(name))
            model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
            cache[name] = (model, AutoProcessor.from_pretrained(path))
        return cache[name]

    return get


FAMILY_NAMES = list(FAMILIES)


@pytest.fixture(params=FAMILY_NAMES)
def family(request, built):
    model, processor = built(request.param)
    return request.param, model, processor


def _encodings(name, model, processor):
    tid = config_image_token_id(model.config)
    return [(conv, imgs, encode(processor, tid, conv, imgs)) for conv, imgs in records(FAMILIES[name].chat)]


def test_ids_and_inputs_equal_the_processors_own(family):
    """(a) ids and every model input equal what the processor's own chat path gives for the conversation."""
    name, model, processor = family
    for conv, imgs, enc in _encodings(name, model, processor):
        if is_prefix_lm(processor):
            prompt = "\n".join(m["content"].replace("<image>", "").strip() for m in conv if m["role"] == "user")
            ref = processor(text=processor.image_token * len(imgs) + prompt, images=imgs,
                            suffix=conv[-1]["content"], return_tensors="pt")
            ref.pop("labels")
        else:
            msgs = []
            it = iter(imgs)
            for m in conv:
                parts = []
                for j, chunk in enumerate(m["content"].split("<image>")):
                    if j:
                        parts.append({"type": "image", "image": next(it)})
                    if chunk:
                        parts.append({"type": "text", "text": chunk})
                msgs.append({"role": m["role"], "content": parts})
            ref = processor.apply_chat_template(msgs, tokenize=True, return_dict=True, return_tensors="pt")
        assert np.array_equal(enc.input_ids, ref["input_ids"][0].numpy())
        assert sorted(enc.inputs) == sorted(k for k in ref if torch.is_tensor(ref[k])), name
        for k, v in enc.inputs.items():
            assert torch.equal(v, ref[k]), (name, k)


def _feature_counts(model, inputs: dict, n_images: int) -> list[int] | int:
    """Image features (rows of the projected embeddings) the model makes from ``inputs``: one count per
    image where its output is split by image, else the total (tiles of several images in one tensor)."""
    fn = model.model.get_image_features
    params = inspect.signature(fn).parameters
    with torch.no_grad():
        out = fn(**{k: v for k, v in inputs.items() if k in params and k not in TOKEN_INPUTS})
    feats, hidden = out.pooler_output, model.config.get_text_config().hidden_size
    if isinstance(feats, (list, tuple)) and len(feats) == n_images:
        return [f.numel() // hidden for f in feats]
    if torch.is_tensor(feats) and feats.dim() == 3 and feats.shape[0] == n_images:
        return [feats.shape[1]] * n_images
    feats = feats if isinstance(feats, (list, tuple)) else [feats]
    return sum(f.numel() for f in feats) // hidden


def test_visual_positions_match_image_features(family):
    """(b) each image's visual positions are as many as the features the model makes from that image.

    LLaVA-OneVision gives an image of a multi-image sample its base features only (anyres is for
    single-image samples), so an image's count depends on its sample: compare within the sample."""
    name, model, processor = family
    tid = config_image_token_id(model.config)
    for _, imgs, enc in _encodings(name, model, processor):
        assert len(enc.visual_positions) == len(imgs)
        assert sum(enc.image_token_counts) == int((enc.input_ids == tid).sum())
        counts = _feature_counts(model, enc.inputs, len(imgs))
        if isinstance(counts, list):
            assert enc.image_token_counts == counts, name
            continue
        assert sum(enc.image_token_counts) == counts, name
        for img, count in zip(imgs, enc.image_token_counts):  # tiles of all images in one tensor: one at a time
            alone = encode(processor, tid, [{"role": "user", "content": "<image>\nWhat is it?"},
                                            {"role": "assistant", "content": "a shape."}], [img])
            made = _feature_counts(model, alone.inputs, 1)
            assert alone.image_token_counts == [count] == (made if isinstance(made, list) else [made]), name
    sizes = [e.image_token_counts for _, _, e in _encodings(name, model, processor)]
    print(name, "visual tokens per image, per sample:", sizes)


def test_batched_forward_equals_each_sample_alone(family):
    """(c) a padded batch of samples with images of different sizes gives every sample's own logits."""
    name, model, processor = family
    encs = [e for _, _, e in _encodings(name, model, processor)]
    batch = collate(encs, processor.tokenizer.pad_token_id)
    with torch.no_grad():
        batched = model(**batch).logits
        for i, e in enumerate(encs):
            alone = model(**e.inputs).logits[0]
            n = len(e.input_ids)
            torch.testing.assert_close(batched[i, :n], alone, atol=1e-4, rtol=1e-4,
                                       msg=lambda m, where=f"{name} sample {i}": f"{where}: {m}")


def _runs(labels: np.ndarray) -> list[np.ndarray]:
    idx = np.nonzero(labels != IGNORE_INDEX)[0]
    return np.split(idx, np.nonzero(np.diff(idx) > 1)[0] + 1) if len(idx) else []


def test_labels_cover_exactly_the_answers(family):
    """(d) decoding each labelled run gives one answer, its first word included."""
    name, model, processor = family
    tok = processor.tokenizer
    for conv, _, enc in _encodings(name, model, processor):
        got = [tok.decode(enc.input_ids[r], skip_special_tokens=True).strip() for r in _runs(enc.labels)]
        assert got == answers(conv), name


def test_answer_spans_tile_the_answer_text(family):
    """(e) the answer text is the answers as given, concatenated, and the labelled tokens' answer spans,
    decoded, give it back: what aligns a teacher's and a student's tokens whatever their templates."""
    name, model, processor = family
    tok = processor.tokenizer
    for conv, _, enc in _encodings(name, model, processor):
        text = enc.answer_text
        assert text == "".join(a.strip() for a in answers(conv)), name
        spans = enc.answer_spans
        labelled = enc.labels != IGNORE_INDEX
        assert (spans[~labelled] == -1).all()
        covered = spans[labelled & (spans[:, 1] > spans[:, 0])]
        # the spans follow each other and cover every character once (a token may carry spaces the
        # text has not: they are outside the answer, so spans are clipped to it)
        assert covered[0, 0] == 0 and covered[-1, 1] == len(text), name
        assert (covered[1:, 0] == covered[:-1, 1]).all(), (name, covered.tolist())
        for (a, b), t in zip(covered, enc.input_ids[labelled & (spans[:, 1] > spans[:, 0])]):
            assert text[a:b].strip() in tok.decode([int(t)]), (name, text[a:b], tok.decode([int(t)]))


def test_generation_prompt_ending_in_a_space_keeps_the_first_word(built):
    """LLaVA-1.5's ``ASSISTANT: `` prompt: the answer's first token straddles the boundary and is labelled."""
    model, processor = built("llava")
    conv = records(True)[2][0]
    text, spans = render_chat(processor, conv)
    assert text[: spans[0][0]].endswith("ASSISTANT: ")
    enc = encode(processor, config_image_token_id(model.config), conv, [IMAGES["small"]])
    first = np.nonzero(enc.labels != IGNORE_INDEX)[0][0]
    assert processor.tokenizer.decode(enc.input_ids[first: first + 1]).startswith(" ")  # the straddling " yellow"
    assert processor.tokenizer.decode(enc.input_ids[enc.labels != IGNORE_INDEX], skip_special_tokens=True).strip() == "yellow"


@pytest.mark.parametrize("name", [n for n in FAMILY_NAMES if FAMILIES[n].chat])
def test_pretrain_template_labels_the_caption(built, name):
    model, processor = built(name)
    conv, imgs = records(True)[2]
    enc = encode(processor, config_image_token_id(model.config), conv, imgs, template="pretrain")
    assert enc.image_token_counts and enc.image_token_counts[0] > 0
    got = processor.tokenizer.decode(enc.input_ids[enc.labels != IGNORE_INDEX], skip_special_tokens=True).strip()
    assert got == "yellow"
    with torch.no_grad():
        model(**enc.inputs)


def test_student_shares_the_processor_and_reloads(tmp_path):
    """The same-family student encodes a conversation to the teacher's ids (same processor)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    fam = FAMILIES["qwen2_5_vl"]
    t, s = fam.build(tmp_path / "t"), fam.build(tmp_path / "s", student=True)
    conv, imgs = records(True)[1]
    ids = []
    for path in (t, s):
        model = AutoModelForImageTextToText.from_pretrained(path)
        enc = encode(AutoProcessor.from_pretrained(path), config_image_token_id(model.config), conv, imgs)
        ids.append(enc.input_ids)
        with torch.no_grad():
            model(**enc.inputs)
    assert np.array_equal(*ids)
    assert model.config.get_text_config().hidden_size == 32
