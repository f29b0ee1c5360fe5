"""kd-eval on a tiny model of every family in ``tests/vlm_families.py``, against the model run directly:

* greedy answers: kd-eval batches every question's prompt with left padding (images of different sizes,
  a two-turn record), and each answer must equal ``model.generate(**processor outputs)`` of that prompt
  alone, the prompt built with the processor's own ``apply_chat_template(tokenize=True)`` (PaliGemma:
  ``processor(text=<image> + question, images)``), independently of ``kd_cache``;
* multiple choice: each option's batched score equals the summed log-probabilities of its scored tokens
  (the answer turn's labelled tokens up to its first stop token) from a dense unbatched
  ``model(**inputs).logits``, and kd-eval's choice is that dense argmax;
* ``--cache``: the model against a cache it built itself has KL ~ 0 and top-1 agreement 1 (the stream's
  ``model_inputs`` are the family's own), also through the ``kd-eval`` CLI with ``--data`` and ``--cache``.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cli.kd_eval_cli import app
from kd_cache import processing
from kd_cache.build import build_cache
from kd_cache.build_config import BuildConfig
from kd_cache.encoding import Encoder
from kd_cache.processing import config_image_token_id, is_prefix_lm
from kd_cache.records import load_records
from student.evaluate import (
    build_items,
    evaluate_cache,
    evaluate_qa,
    generate_ids,
    load_model,
    option_scores,
    scored_positions,
    stop_token_ids,
)
from tests.vlm_families import FAMILIES

pytest.importorskip("torchvision", reason="the processors of 7 families need torchvision")
warnings.filterwarnings("ignore", message=".*slow image processor.*")

NAMES = list(FAMILIES)
MAX_NEW = 4
OPTIONS = ["red", "blue", "green"]
SIZES = {"wide.png": (48, 32, "red"), "tall.png": (40, 64, "blue"), "small.png": (24, 40, "green")}


def _records(chat: bool) -> list[dict]:
    """Three image records of different sizes, each with options on its last turn; the second has two
    turns (a prefix-LM family, PaliGemma, takes one prompt and one answer: its first turn only)."""
    second = [{"from": "human", "value": "<image>\nWhat colour is the shape?"}, {"from": "gpt", "value": "blue"}]
    if chat:
        second += [{"from": "human", "value": "Where is it?"}, {"from": "gpt", "value": "red"}]
    return [
        {"id": "wide", "image": "wide.png", "options": OPTIONS, "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the circle?"}, {"from": "gpt", "value": "red"}]},
        {"id": "tall", "image": "tall.png", "options": OPTIONS, "conversations": second},
        {"id": "small", "image": "small.png", "options": OPTIONS, "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image in one word."}, {"from": "gpt", "value": "B"}]},
    ]


@pytest.fixture(scope="session")
def family_eval(family_builds):
    """name -> dict(path, model, processor, data, images, records, root), built once per family."""

    def make(fam, root, images) -> dict:
        path = fam.build(root / "model")
        recs = _records(fam.chat)
        (root / "data.json").write_text(json.dumps(recs))
        model, processor = load_model(path, "cpu", "float32")
        return dict(path=path, model=model, processor=processor, data=root / "data.json", images=images,
                    records=recs, root=root)

    return family_builds("eval", SIZES, make)


def _questions(rec: dict) -> list[tuple[list[dict], int]]:
    """(turns before the question's answer, answer turn index) per assistant turn."""
    turns = rec["conversations"]
    return [(turns[:i], i) for i, t in enumerate(turns) if t["from"] == "gpt"]


def _direct_inputs(processor, before: list[dict], image) -> dict:
    """The processor's own inputs for the prompt (no kd_cache code): chat template with the generation
    prompt, tokenized by the processor; PaliGemma: its image token, then the question."""
    if is_prefix_lm(processor):
        question = before[-1]["value"].replace("<image>", "").strip()
        return processor(text=processor.image_token + question, images=[image], return_tensors="pt")
    msgs = []
    for t in before:
        role = "user" if t["from"] == "human" else "assistant"
        parts = []
        for j, chunk in enumerate(t["value"].split("<image>")):
            if j:
                parts.append({"type": "image", "image": image})
            if chunk:
                parts.append({"type": "text", "text": chunk})
        msgs.append({"role": role, "content": parts})
    return processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt")


@pytest.mark.parametrize("name", NAMES)
def test_batched_greedy_answers_equal_generate_alone(family_eval, name):
    f = family_eval(name)
    model, processor = f["model"], f["processor"]
    tok = processor.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    # One batch of every question: left padding over prompts of different lengths and image sizes.
    out = evaluate_qa(f["path"], str(f["data"]), str(f["images"]), batch_size=8, max_new_tokens=MAX_NEW,
                      strict=True, model=model, processor=processor)
    expected, expected_ids = [], []
    for rec in f["records"]:
        image = Image.open(f["images"] / rec["image"]).convert("RGB")
        for before, _ in _questions(rec):
            inputs = _direct_inputs(processor, before, image)
            inputs = {k: v for k, v in inputs.items() if torch.is_tensor(v)}
            with torch.no_grad():
                gen = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False,
                                     eos_token_id=stop_token_ids(model, tok), pad_token_id=pad)
            expected_ids.append(gen[0, inputs["input_ids"].shape[1]:].tolist())
            expected.append(tok.decode(expected_ids[-1], skip_special_tokens=True).strip())
    got = [p["prediction"] for p in out["predictions"]]
    assert out["questions"] == len(expected) and out["skipped"] == []
    assert got == expected, name
    # The same, token by token (a random tiny model may answer with whitespace only: PaliGemma's does).
    encoder = Encoder(processor, "chat", 2048, str(f["images"]), config_image_token_id(model.config))
    items, _ = build_items(load_records(str(f["data"])), encoder, strict=True)
    assert generate_ids(model, processor, items, batch_size=8, max_new_tokens=MAX_NEW) == expected_ids, name
    assert all(len(ids) for ids in expected_ids)
    print(name, "answers:", got)


@pytest.mark.parametrize("name", NAMES)
def test_option_scores_equal_dense_log_likelihood(family_eval, name):
    f = family_eval(name)
    model, processor = f["model"], f["processor"]
    stop = stop_token_ids(model, processor.tokenizer)
    image_token_id = config_image_token_id(model.config)
    out = evaluate_qa(f["path"], str(f["data"]), str(f["images"]), batch_size=8, max_new_tokens=MAX_NEW,
                      strict=True, model=model, processor=processor)
    encoder = Encoder(processor, "chat", 2048, str(f["images"]), image_token_id)
    items, _ = build_items(load_records(str(f["data"])), encoder, {r["id"]: OPTIONS for r in f["records"]},
                           strict=True, stop_ids=stop)
    batched = option_scores(model, processor, items, batch_size=4)  # 9 options over 3 batches, right padding
    choices = {p["id"]: p for p in out["predictions"] if "choice" in p}
    assert sorted(choices) == sorted(r["id"] for r in f["records"]) and out["mc_questions"] == 3
    for rec in f["records"]:
        image = Image.open(f["images"] / rec["image"]).convert("RGB")
        before, _ = _questions(rec)[-1]
        dense = []
        for opt in OPTIONS:
            msgs = [{"role": t["from"], "content": t["value"]} for t in [*before, {"from": "gpt", "value": opt}]]
            enc = processing.encode(processor, image_token_id, msgs, [image])
            pos = torch.from_numpy(scored_positions(enc.labels, stop))
            with torch.no_grad():
                logp = model(**enc.inputs).logits[0].double().log_softmax(-1)
            ids = torch.from_numpy(enc.input_ids)
            dense.append(float(logp[pos - 1, ids[pos]].sum()))
            assert len(pos) >= 2  # the answer and its end-of-turn/EOS token at least
        item = next(j for j, it in enumerate(items) if it.record_id == rec["id"] and it.options)
        np.testing.assert_allclose(batched[item], dense, rtol=1e-4, err_msg=name)
        best = int(np.argmax(dense))
        assert choices[rec["id"]]["choice"] == OPTIONS[best], (name, rec["id"], dense)
        answer = rec["conversations"][-1]["value"]
        correct = OPTIONS.index(answer) if answer in OPTIONS else "ABC".index(answer)
        assert choices[rec["id"]]["choice_correct"] == (best == correct), (name, rec["id"])
    print(name, "choices:", {i: c["choice"] for i, c in choices.items()})


@pytest.mark.parametrize("name", NAMES)
def test_cache_metrics_of_the_model_against_its_own_cache(family_eval, name):
    f = family_eval(name)
    cache = f["root"] / "cache"
    if not cache.exists():
        build_cache(BuildConfig(teacher=str(f["path"]), data=str(f["data"]), out=str(cache),
                                image_folder=str(f["images"]), top_k=8, relation="none", batch_size=3, max_length=512,
                                device="cpu", dtype="float32", progress=False, strict=True))
    out = evaluate_cache(f["path"], str(cache), batch_size=2, model=f["model"], processor=f["processor"])
    # The CLI, both parts at once, loads the family's model itself.
    res = CliRunner().invoke(app, ["--model", str(f["path"]), "--cache", str(cache), "--data", str(f["data"]),
                                   "--image-folder", str(f["images"]), "--batch-size", "2", "--max-new-tokens",
                                   str(MAX_NEW), "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    cli = json.loads(res.stdout)
    assert cli["cache"]["positions"] == out["positions"] and cli["qa"]["mc_questions"] == 3
    assert cli["cache"]["kl_to_teacher"] == pytest.approx(out["kl_to_teacher"], abs=1e-6)
    assert out["samples"] == 3 and out["positions"] > 0 and out["visual_positions"] > 0
    assert out["kl_to_teacher"] == pytest.approx(0.0, abs=1e-4) and out["top1_agreement"] == 1.0, name
    assert out["kl_visual"] == pytest.approx(0.0, abs=1e-4) and out["top1_visual"] == 1.0, name
