"""kd-eval through the real CLI: accuracy against answers computed independently (one unbatched
``generate`` per question on a prompt built with the processor's own chat template), multiple-choice
accuracy against a dense log-likelihood, and KL / top-1 agreement against a dense full-vocabulary
computation (KL ~ 0 when the model *is* the teacher and k covers the vocabulary)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from student_fixtures import load_llava, model_inputs
from typer.testing import CliRunner

from cli.kd_eval_cli import app
from kd_cache import open_cache
from kd_cache.build import BuildConfig, build_cache
from kd_demo import tiny
from student.losses import dense_divergence

MAX_NEW = 4


def _eval(*args) -> dict:
    res = CliRunner().invoke(app, [*map(str, args), "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def _messages(turns):
    """Structured chat messages for the processor's own chat template (independent of kd_cache.encoding)."""
    msgs = []
    for t in turns:
        role = "user" if t["from"] == "human" else "assistant"
        parts = []
        for j, chunk in enumerate(t["value"].split("<image>")):
            if j:
                parts.append({"type": "image"})
            if chunk:
                parts.append({"type": "text", "text": chunk})
        msgs.append({"role": role, "content": parts})
    return msgs


def _inputs(proc, turns, image, answer: str | None = None):
    prompt = proc.apply_chat_template(_messages(turns), add_generation_prompt=True)
    text = prompt if answer is None else prompt + answer + proc.tokenizer.eos_token
    return proc(text=text, images=None if image is None else [image], return_tensors="pt"), prompt


def _greedy_answer(model, proc, turns, image) -> str:
    """The model's greedy answer after ``turns`` (one unbatched ``generate``), decoded like kd-eval."""
    enc, _ = _inputs(proc, turns, image)
    tok = proc.tokenizer
    with torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
    answer = tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert answer, "the tiny model answered with nothing; pick another seed"
    return answer


@pytest.fixture(scope="module")
def qa(tmp_path_factory, teacher_dir):
    """Single-question records; the reference answer is the model's own greedy answer on a known subset."""
    from PIL import Image

    root = tmp_path_factory.mktemp("qa")
    (root / "images").mkdir()
    model, proc = load_llava(teacher_dir)
    questions = ["What colour is the shape?", "Where is the shape?", "How many shapes are there?"]
    options = list(tiny.COLOURS)[:4]
    records, expected_correct, expected_mc = [], 0, 0
    for i in range(8):
        name = f"q{i}.png"
        tiny.draw_shapes(root / "images" / name, [(tiny.SHAPES[i % 3], list(tiny.COLOURS)[i % 6],
                                                    tiny.POSITIONS[i % 5])])
        image = Image.open(root / "images" / name).convert("RGB")
        turns = [{"from": "human", "value": "<image>\n" + questions[i % 3]}]
        direct = _greedy_answer(model, proc, turns, image)
        right = i % 3 != 2  # 2 of every 3 records carry the model's own answer, the rest a wrong one
        answer = direct if right else direct + " nope"
        expected_correct += right

        # Multiple choice, dense: full forward over prompt + option + <|im_end|>, sum the option's log-probs.
        scores = []
        for opt in options:
            full, prompt = _inputs(proc, turns, image, answer=opt)
            n_prompt = proc(text=prompt, images=[image], return_tensors="pt")["input_ids"].shape[1]
            with torch.no_grad():
                logp = model(**full).logits[0].float().log_softmax(-1)
            ids = full["input_ids"][0]
            scores.append(float(sum(logp[t - 1, ids[t]] for t in range(n_prompt, len(ids)))))
        best = int(np.argmax(scores))
        mc_answer = options[best] if i % 2 == 0 else options[(best + 1) % len(options)]
        expected_mc += i % 2 == 0
        records.append({"id": f"q{i}", "image": name, "conversations": [*turns, {"from": "gpt", "value": answer}]})
        records.append({"id": f"m{i}", "image": name, "options": options,
                        "conversations": [*turns, {"from": "gpt", "value": mc_answer}]})
    data = root / "qa.json"
    data.write_text(json.dumps(records))
    return data, root / "images", expected_correct, expected_mc


def test_multiple_choice_matches_dense_likelihood(teacher_dir, qa):
    data, images, _, expected_mc = qa
    # Batch 3 over 16 questions: left padding over uneven prompt lengths, and a short last batch.
    out = _eval("--model", teacher_dir, "--data", data, "--image-folder", images, "--batch-size", 3,
                "--max-new-tokens", MAX_NEW)["qa"]
    assert out["questions"] == 16 and out["records"] == 16 and out["skipped"] == []
    assert out["mc_questions"] == 8
    assert out["mc_accuracy"] == pytest.approx(expected_mc / 8)
    assert _eval("--model", teacher_dir, "--data", data, "--image-folder", images, "--limit", 1,
                 "--max-new-tokens", MAX_NEW)["qa"]["questions"] == 1


def test_accuracy_on_generated_answers(teacher_dir, qa, tmp_path):
    data, images, expected_correct, _ = qa
    rows = [r for r in json.loads(data.read_text()) if r["id"].startswith("q")]
    only_q = tmp_path / "q.jsonl"
    only_q.write_text("".join(json.dumps(r) + "\n" for r in rows))
    preds = tmp_path / "preds.jsonl"
    res = CliRunner().invoke(app, ["--model", str(teacher_dir), "--data", str(only_q), "--image-folder", str(images),
                                   "--batch-size", "3", "--max-new-tokens", str(MAX_NEW), "--predictions", str(preds),
                                   "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)["qa"]
    assert out["correct"] == expected_correct
    assert out["accuracy"] == pytest.approx(expected_correct / 8)
    lines = [json.loads(x) for x in preds.read_text().splitlines()]
    assert [p["correct"] for p in lines] == [i % 3 != 2 for i in range(8)]


@pytest.fixture(scope="module")
def multi_turn(tmp_path_factory, teacher_dir):
    """Two-question conversations (every 4th record text-only with one question) whose reference answer
    for a known subset of turns is the model's own greedy answer given the earlier turns and references."""
    from PIL import Image

    root = tmp_path_factory.mktemp("multi-turn")
    (root / "images").mkdir()
    model, proc = load_llava(teacher_dir)
    records, expected = [], []
    for i in range(8):
        record, image = {"id": f"t{i}"}, None
        if i % 4 == 3:
            questions = ["Is red a colour?"]
        else:
            record["image"] = f"t{i}.png"
            tiny.draw_shapes(root / "images" / record["image"], [(tiny.SHAPES[i % 3], list(tiny.COLOURS)[i % 6],
                                                                   tiny.POSITIONS[i % 5])])
            image = Image.open(root / "images" / record["image"]).convert("RGB")
            questions = ["<image>\nWhat colour is the shape?", "Where is the shape?"]
        turns = []
        for question in questions:
            turns.append({"from": "human", "value": question})
            direct = _greedy_answer(model, proc, turns, image)
            right = len(expected) % 3 != 2
            turns.append({"from": "gpt", "value": direct if right else direct + " nope"})
            expected.append(right)
        records.append({**record, "conversations": turns})
    data = root / "multi.json"
    data.write_text(json.dumps(records))
    return data, root / "images", expected


def test_multi_turn_records_count_every_answer(teacher_dir, multi_turn, tmp_path):
    data, images, expected = multi_turn  # 6 records with two questions, 2 text-only with one
    preds = tmp_path / "preds.jsonl"
    out = _eval("--model", teacher_dir, "--data", data, "--image-folder", images, "--batch-size", 3,
                "--max-new-tokens", MAX_NEW, "--predictions", preds)["qa"]
    assert out["questions"] == len(expected) == 2 * 6 + 2 and out["mc_accuracy"] is None
    assert out["correct"] == sum(expected) and out["accuracy"] == pytest.approx(sum(expected) / len(expected))
    lines = [json.loads(x) for x in preds.read_text().splitlines()]
    assert [(p["id"], p["turn"]) for p in lines] == [(f"t{i}", t) for i in range(8) for t in range(1 if i % 4 == 3 else 2)]
    assert [p["correct"] for p in lines] == expected


def _build_cache(tmp_path_factory, teacher_dir, chat_data, name: str, **kw):
    out = tmp_path_factory.mktemp(name) / "cache"
    data, images = chat_data
    build_cache(BuildConfig(teacher=str(teacher_dir), data=str(data), image_folder=str(images), out=str(out),
                            relation="none", device="cpu", progress=False, **kw))
    return out


@pytest.fixture(scope="module")
def full_cache(tmp_path_factory, teacher_dir, chat_data):
    return _build_cache(tmp_path_factory, teacher_dir, chat_data, "eval-cache", top_k=400, shard_size=4)


@pytest.fixture(scope="module")
def top8_cache(tmp_path_factory, teacher_dir, chat_data):
    """Top-8 of a 400-token vocabulary: the tail bin carries mass."""
    return _build_cache(tmp_path_factory, teacher_dir, chat_data, "eval-top8", top_k=8, shard_size=4)


@pytest.fixture(scope="module")
def sample_cache(tmp_path_factory, teacher_dir, chat_data):
    """Sample mode without per-entry log-probs (``logp_mean`` and counts only)."""
    out = _build_cache(tmp_path_factory, teacher_dir, chat_data, "eval-sampled", sparse="sample", samples=512)
    assert "response_logprobs" not in open_cache(str(out))[0]
    return out


def _dense_log_probs(model_dir, cache_path) -> list[dict[str, torch.Tensor]]:
    """Per cached sample, in cache order: the model's full-vocabulary log-probs (float64 [P, V]) at the
    sample's response and visual positions, from one unbatched forward of plain transformers."""
    from PIL import Image

    model, proc = load_llava(model_dir)
    folder = open_cache(str(cache_path)).manifest.image_folder
    out = []
    for s in open_cache(str(cache_path)):
        inputs = model_inputs(proc, s["input_ids"], [Image.open(f"{folder}/{p}").convert("RGB") for p in s["images"]])
        with torch.no_grad():
            logits = model(**inputs).logits[0].double()
        out.append({kind: logits[torch.from_numpy(np.asarray(s[f"{kind}_positions"], dtype=np.int64))].log_softmax(-1)
                    for kind in ("response", "visual")})
    return out


def _dense_metrics(teacher_dir, model_dir, cache_path):
    """Mean forward KL and top-1 agreement from both models' full logits at the response positions."""
    kls, agree = [], []
    for t, q in zip(_dense_log_probs(teacher_dir, cache_path), _dense_log_probs(model_dir, cache_path)):
        kls.append(dense_divergence(q["response"], t["response"], divergence="fkl"))
        agree.append(q["response"].argmax(-1) == t["response"].argmax(-1))
    return float(torch.cat(kls).mean()), float(torch.cat(agree).float().mean()), int(sum(len(k) for k in kls))


def test_kl_is_zero_for_the_teacher_itself(teacher_dir, full_cache):
    out = _eval("--model", teacher_dir, "--cache", full_cache, "--batch-size", 3)["cache"]
    assert out["kl_to_teacher"] == pytest.approx(0.0, abs=1e-4)
    assert out["top1_agreement"] == 1.0
    assert out["kl_visual"] == pytest.approx(0.0, abs=1e-4) and out["top1_visual"] == 1.0
    assert out["positions"] > 0 and out["visual_positions"] > 0 and out["samples"] == 10


def test_kl_and_top1_match_dense_reference(teacher_dir, student_dir, full_cache):
    out = _eval("--model", student_dir, "--cache", full_cache, "--batch-size", 4)["cache"]
    kl, top1, n = _dense_metrics(teacher_dir, student_dir, full_cache)
    assert out["positions"] == n
    assert kl > 0.1  # a different model: far from the teacher
    assert out["kl_to_teacher"] == pytest.approx(kl, rel=1e-3)  # fp16 stored teacher log-probs
    assert out["top1_agreement"] == pytest.approx(top1)


def test_human_output_and_errors(teacher_dir, full_cache, tmp_path):
    res = CliRunner().invoke(app, ["--model", str(teacher_dir), "--cache", str(full_cache)])
    assert res.exit_code == 0, res.output
    assert "kl_to_teacher" in res.stdout and "top1_agreement" in res.stdout
    res = CliRunner().invoke(app, ["--model", str(teacher_dir)])
    assert res.exit_code == 2 and "nothing to evaluate" in res.output
    res = CliRunner().invoke(app, ["--model", str(tmp_path / "missing"), "--cache", str(full_cache)])
    assert res.exit_code == 2 and "config.json" in res.output


def test_kl_on_a_sample_mode_cache(teacher_dir, student_dir, sample_cache):
    """kd-eval --cache on a sample-mode cache (no per-entry log-probs, logp_mean only): the teacher's KL
    to itself is 0, and the student's sampled estimate is close to its dense KL."""
    own = _eval("--model", teacher_dir, "--cache", sample_cache)["cache"]
    assert own["kl_to_teacher"] == pytest.approx(0.0, abs=1e-4)
    student = _eval("--model", student_dir, "--cache", sample_cache)["cache"]
    kl, _, n = _dense_metrics(teacher_dir, student_dir, sample_cache)
    assert student["positions"] == n and kl > 0.1
    assert student["kl_to_teacher"] == pytest.approx(kl, rel=0.05)


def _per_sample(values: list[torch.Tensor]) -> np.ndarray:
    return np.array([float(v.sum()) for v in values])


@pytest.mark.parametrize("cache", ["full_cache", "top8_cache"])
@pytest.mark.parametrize("who", ["student_dir", "teacher_dir"])
def test_cache_agreement_per_sample_on_topk_matches_dense(teacher_dir, who, cache, request):
    """Per sample and kind, ``cache_agreement``'s KL sums are the KL between the two models' dense
    distributions coarsened to the cached ids + one tail bin (the full-vocabulary KL when k covers the
    vocabulary), its agreements the positions where both dense argmaxes are equal."""
    from student.evaluate import cache_agreement, evaluate_cache, load_model

    path, model_dir = request.getfixturevalue(cache), request.getfixturevalue(who)
    model, proc = load_model(model_dir, "cpu")
    got = cache_agreement(model, proc, path, batch_size=3, chunk_size=7)  # chunks cut samples on purpose
    teacher, student = _dense_log_probs(teacher_dir, path), _dense_log_probs(model_dir, path)
    samples = list(open_cache(str(path)))
    assert got.ids == [s["id"] for s in samples]
    for kind in ("response", "visual"):
        kls, agree = [], []
        for s, t, q in zip(samples, teacher, student):
            ids = torch.from_numpy(s[f"{kind}_ids"].astype(np.int64))
            stored = torch.zeros_like(t[kind], dtype=torch.bool).scatter_(-1, ids, True)
            # K + 1 bins: the stored ids, and everything else (empty when k covers the vocabulary).
            bins_p = torch.cat([t[kind].gather(-1, ids), t[kind].masked_fill(stored, -torch.inf).logsumexp(-1)[:, None]], -1)
            bins_q = torch.cat([q[kind].gather(-1, ids), q[kind].masked_fill(stored, -torch.inf).logsumexp(-1)[:, None]], -1)
            kls.append(torch.xlogy(bins_p.exp(), bins_p.exp()).sum(-1) - (bins_p.exp() * bins_q.clamp_min(-100)).sum(-1))
            if len(ids) and ids.shape[1] == t[kind].shape[1]:  # k covers the vocabulary: the dense KL itself
                torch.testing.assert_close(kls[-1], dense_divergence(q[kind], t[kind]), rtol=1e-6, atol=1e-9)
            agree.append(q[kind].argmax(-1) == t[kind].argmax(-1))
        np.testing.assert_array_equal(got.positions[kind], [len(s[f"{kind}_positions"]) for s in samples])
        np.testing.assert_allclose(got.kl[kind], _per_sample(kls), rtol=2e-3, atol=1e-5)  # fp16 stored log-probs
        np.testing.assert_array_equal(got.agree[kind], _per_sample(agree))
    assert got.positions["visual"].sum() > 0
    if who == "student_dir":  # a different model: far from the teacher
        assert got.kl["response"].sum() > 0.1 * got.positions["response"].sum()
    else:  # the teacher itself: it agrees everywhere
        assert (got.agree["response"] == got.positions["response"]).all() and got.kl["response"].sum() < 1e-3
    # kd-eval's numbers are these sums over the whole cache.
    out = evaluate_cache(model_dir, str(path), batch_size=3, chunk_size=7, model=model, processor=proc)
    assert out["kl_to_teacher"] == got.kl["response"].sum() / got.positions["response"].sum()
    assert out["top1_agreement"] == got.agree["response"].sum() / got.positions["response"].sum()
    assert out["kl_visual"] == got.kl["visual"].sum() / got.positions["visual"].sum()
    assert out["samples"] == len(samples) and out["positions"] == got.positions["response"].sum()


@pytest.mark.parametrize("who", ["student_dir", "teacher_dir"])
def test_cache_agreement_per_sample_on_sample_mode_without_logprobs(who, sample_cache, request):
    """Sample mode stores no per-entry log-probs: the KL sums are the sampled estimate
    sum_i (c_i / N)(log p_i - log q_i) = logp_mean - sum_i (c_i / N) log q_i, recomputed from the cached
    counts and the model's dense log-probs, and the teacher's top id is its most drawn one."""
    from student.evaluate import cache_agreement, load_model

    model_dir = request.getfixturevalue(who)
    model, proc = load_model(model_dir, "cpu")
    got = cache_agreement(model, proc, sample_cache, batch_size=4, chunk_size=5)
    student = _dense_log_probs(model_dir, sample_cache)
    samples = list(open_cache(str(sample_cache)))
    assert got.ids == [s["id"] for s in samples]
    for kind in ("response", "visual"):
        kls, agree, rows = [], [], []
        for s, q in zip(samples, student):
            ids = torch.from_numpy(s[f"{kind}_ids"].astype(np.int64))
            counts = torch.from_numpy(s[f"{kind}_counts"].astype(np.float64))
            w = counts / counts.sum(-1, keepdim=True)
            kls.append(torch.from_numpy(s[f"{kind}_logp_mean"].astype(np.float64))
                       - (w * q[kind].gather(-1, ids.clamp_min(0))).sum(-1))
            most_drawn = ids.gather(-1, counts.argmax(-1, keepdim=True))[:, 0]
            agree.append(q[kind].argmax(-1) == most_drawn)
            rows.append((ids >= 0).any(-1))
        np.testing.assert_array_equal(got.positions[kind], _per_sample(rows))
        np.testing.assert_allclose(got.kl[kind], _per_sample(kls), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(got.agree[kind], _per_sample(agree))
    assert got.positions["visual"].sum() > 0
    if who == "teacher_dir":  # the teacher mostly draws its own argmax most often
        assert got.agree["response"].sum() > 0.5 * got.positions["response"].sum()
        assert abs(got.kl["response"].sum()) < 1e-3 * got.positions["response"].sum()
    else:
        assert got.kl["response"].sum() > 0.1 * got.positions["response"].sum()
