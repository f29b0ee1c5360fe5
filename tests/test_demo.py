"""kd-demo --quick (and --ablation) through the real CLI in a fresh interpreter: every step runs, the
result entries have finite metrics that agree with the predictions written beside them and with
kd-eval, the plots are written; the verdict's statistics against hand-computed values. Whether
distillation wins is checked by the full demo (benchmarks/demo_seeds.py, results in
benchmarks/RESULTS.md), not here: the quick run is far too small to mean anything."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.kd_demo_cli import app, join_seeds
from kd_demo.config import QUICK, DemoConfig
from kd_demo.verdict import compare, paired_accuracy, paired_ratio

REPO = Path(__file__).resolve().parents[1]


def _quick_demo(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", "from cli.kd_demo_cli import main; main()", "--out", str(out),
                           "--quick", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _predictions(out: Path, name: str, split: str = "test") -> list[dict]:
    return [json.loads(x) for x in (out / f"predictions-{split}-{name}.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_quick_demo_runs_every_step(tmp_path):
    out = tmp_path / "demo"
    proc = _quick_demo(out, "--seed", "3")
    results = json.loads((out / "results.json").read_text())
    from student.evaluate import evaluate_cache

    for split, n, metrics in (("test", QUICK["n_test"], results), ("val", QUICK["n_val"], results["val"])):
        kinds = {r["id"]: r["question_type"] for r in json.loads((out / "data" / f"{split}.json").read_text())}
        assert len(kinds) == n
        for name in ("teacher", "baseline", "distilled"):
            for key in ("accuracy", "mc_accuracy", "kl_to_teacher", "top1_agreement"):
                assert math.isfinite(metrics[name][key]), (split, name, key, metrics[name][key])
            # Accuracy overall and per question type, recounted from the model's written predictions.
            preds = _predictions(out, name, split)
            assert [p["id"] for p in preds] == list(kinds) and metrics[name]["questions"] == len(kinds)
            assert metrics[name]["accuracy"] == pytest.approx(sum(p["correct"] for p in preds) / len(preds))
            for kind, acc in metrics[name]["accuracy_by_question"].items():
                hits = [p["correct"] for p in preds if kinds[p["id"]] == kind]
                assert acc == pytest.approx(sum(hits) / len(hits)), (name, kind)
            # The per-question KL sums add up to kd-eval's KL to the teacher.
            assert sum(p["kl"] for p in preds) / sum(p["kl_positions"] for p in preds) == pytest.approx(
                metrics[name]["kl_to_teacher"], rel=1e-6)
    ref = evaluate_cache(out / "runs" / "distilled-dft", str(out / "caches" / "test"), batch_size=5)
    assert results["distilled"]["kl_to_teacher"] == pytest.approx(ref["kl_to_teacher"], rel=1e-4)
    assert results["distilled"]["top1_agreement"] == pytest.approx(ref["top1_agreement"])
    assert results["distilled"]["kl_visual"] == pytest.approx(ref["kl_visual"], rel=1e-4)
    # The verdict is recomputed from the written predictions.
    per = {n: _predictions(out, n) for n in ("baseline", "distilled")}
    view = {n: {"ids": [p["id"] for p in v], "correct": [p["correct"] for p in v], "response_kl": [p["kl"] for p in v],
                "response_n": [p["kl_positions"] for p in v]} for n, v in per.items()}
    assert results["verdict"] == pytest.approx(compare(view["distilled"], view["baseline"]))
    # The teacher pre-trained on captions before its instructions, and its caption CE was measured.
    assert len((out / "runs" / "teacher-pt" / "metrics.jsonl").read_text().splitlines()) == QUICK["teacher_pt_steps"]
    assert math.isfinite(results["teacher"]["caption_ce"])
    # The teacher pre-trains on bare captions; the students' caption cache is the chat turn its
    # instruction mix keeps.
    for cache, template in (("teacher-captions", "pretrain"), ("captions", "chat")):
        assert json.loads((out / "caches" / cache / "manifest.json").read_text())["template"] == template, cache
    # The teacher evaluated on its own cache: k covers the vocabulary, so the KL is ~0.
    assert results["teacher"]["kl_to_teacher"] < 1e-3 and results["teacher"]["top1_agreement"] == 1.0
    assert results["config"]["quick"] is True and results["config"]["seed"] == 3
    # The student LLM is ~8x smaller than the teacher's, and both students start from one checkpoint.
    assert 6.0 <= results["teacher_to_student_llm_params"] <= 10.0
    for run in ("baseline-pt", "distilled-dpt"):
        cfg = json.loads((out / "runs" / run / "train_config.json").read_text())
        assert cfg["student"] == str(out / "models" / "student-init")
    # LLaVA-KD as published: all three terms on in DPT and DFT.
    for run in ("distilled-dpt", "distilled-dft"):
        cfg = json.loads((out / "runs" / run / "train_config.json").read_text())
        assert (cfg["alpha"], cfg["beta"], cfg["gamma"]) == (1.0, 1.0, 1.0)
    assert (out / "curves.png").stat().st_size > 10_000
    assert "distilled" in proc.stdout and "kl_to_teacher" in proc.stdout  # the printed table


def test_paired_statistics_against_hand_values():
    # 4 questions: distilled right where the baseline was wrong once, the reverse never.
    gain, se = paired_accuracy([1, 1, 1, 0], [1, 0, 1, 0])
    assert gain == pytest.approx(0.25) and se == pytest.approx(0.5 / math.sqrt(4))  # std of (0,1,0,0) = 0.5
    # KL sums a, b over n positions: D = sum(a - b) / sum(n) = (1 + 1 - 1) / 6.
    a, b, n = [2.0, 3.0, 1.0], [1.0, 2.0, 2.0], [1, 2, 3]
    d, se = paired_ratio(a, b, n)
    resid = [1 - d * 1, 1 - d * 2, -1 - d * 3]
    assert d == pytest.approx(1 / 6)
    assert se == pytest.approx(math.sqrt(3 / 2 * sum(r * r for r in resid)) / 6)


def test_verdict_needs_both_margins_beyond_two_standard_errors():
    ids = [str(i) for i in range(100)]

    def model(correct, kl):
        return {"ids": ids, "correct": correct, "response_kl": kl, "response_n": [2] * 100}

    base = model([i % 2 == 0 for i in range(100)], [1.0 + (i % 3) * 0.1 for i in range(100)])
    better = model([i % 2 == 0 or i % 5 == 1 for i in range(100)], [0.5 + (i % 3) * 0.1 for i in range(100)])
    v = compare(better, base)
    assert v["accuracy_gain"] == pytest.approx(0.1) and v["kl_reduction"] == pytest.approx(0.25)
    assert v["accuracy_gain_z"] > 2 and v["kl_reduction_z"] > 2 and v["verdict"]
    # Equal accuracy (no discordant question: no spread at all) is no win, however close the KL.
    same = compare(model(base["correct"], better["response_kl"]), base)
    assert same["accuracy_gain"] == 0 and same["accuracy_gain_z"] == 0 and not same["verdict"]
    # One lucky question out of 100 is within the noise.
    lucky = compare(model([c or i == 1 for i, c in enumerate(base["correct"])], better["response_kl"]), base)
    assert 0 < lucky["accuracy_gain_z"] < 2 and not lucky["verdict"]
    with pytest.raises(ValueError, match="different questions"):
        compare(model(base["correct"], base["response_kl"]) | {"ids": ids[::-1]}, base)


def test_demo_config_and_cli_reject_nonsense(tmp_path):
    with pytest.raises(ValueError, match="--n-train"):
        DemoConfig(out=str(tmp_path), n_train=0)
    with pytest.raises(ValueError, match="--method 'other': expected one of llavakd, llavadi"):
        DemoConfig(out=str(tmp_path), method="other")
    res = CliRunner().invoke(app, ["--out", str(tmp_path / "x"), "--method", "other"])
    assert res.exit_code == 2 and "--method" in res.output
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="--seeds is for --ablation"):
        DemoConfig(out=str(tmp_path), seeds=(0, 1))
    res = CliRunner().invoke(app, ["--out", str(tmp_path / "x"), "--ablation", "--seeds", "0 x"])
    assert res.exit_code == 2 and "--seeds '0 x': expected integers" in res.output
    res = CliRunner().invoke(app, ["--out", str(tmp_path / "x"), "--ablation", "--seeds", "1 1"])
    assert res.exit_code == 2 and "distinct" in res.output
    # `kd-demo --seeds 0 1 2` (several words) reaches typer as the one value the option takes.
    assert join_seeds(["--out", "d", "--ablation", "--seeds", "0", "1", "2", "--quick"]) == \
        ["--out", "d", "--ablation", "--seeds", "0 1 2", "--quick"]
    assert join_seeds(["--seeds", "4"]) == ["--seeds", "4"]


@pytest.mark.slow
def test_quick_demo_llavadi_arm(tmp_path):
    out = tmp_path / "demo"
    _quick_demo(out, "--method", "llavadi")
    results = json.loads((out / "results.json").read_text())
    assert {"teacher", "baseline", "distilled", "llavadi"} <= set(results)
    assert all(math.isfinite(results["llavadi"][k]) for k in ("accuracy", "kl_to_teacher", "top1_agreement"))
    cfg = json.loads((out / "runs" / "llavadi-dft" / "train_config.json").read_text())
    assert cfg["positions"] in ("response,visual,prompt", ["response", "visual", "prompt"]) and cfg["gamma"] == 0.0
    assert (out / "runs" / "llavadi-dft" / "hidden_projector" / "model.safetensors").is_file()
    metrics = [json.loads(x) for x in (out / "runs" / "llavadi-dft" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["hidden"] is not None and m["mdist_prompt"] is not None for m in metrics)


def test_ablation_arms_have_equal_steps_from_one_start(tmp_path):
    from kd_demo.run import ABLATION_ARMS, student_arms

    cfg = DemoConfig(out=str(tmp_path), ablation=True, pt_steps=7, sft_steps=11, dft_steps=13)
    arms = student_arms(cfg, tmp_path / "start", tmp_path / "caches", tmp_path / "runs")
    assert set(arms) == {"baseline", "distilled", "lora", *(a[0] for a in ABLATION_ARMS)}
    stages = {name: [leg["stage"] for leg in legs] for name, legs in arms.items()}
    assert stages["baseline"] == ["sft", "sft", "sft"]  # PT is SFT's recipe on captions
    assert stages["dpt-sft"] == ["dpt", "sft", "sft"]
    assert stages["distilled"] == stages["dft-no-visual"] == ["dpt", "sft", "dft"]
    assert stages["pt-sft-dft"] == ["sft", "sft", "dft"]
    # The LoRA student: LLaVA-KD's DPT leg itself, then SFT and DFT through adapters with DFT's weights.
    assert stages["lora"] == ["dpt", "sft", "dft"] and arms["lora"][0] == arms["distilled"][0]
    assert [leg.get("lora_r", 0) for leg in arms["lora"]] == [0, cfg.lora_r, cfg.lora_r] and cfg.lora_r > 0
    assert {k: v for k, v in arms["lora"][2].items() if k not in ("lora_r", "student", "out")} == \
        {k: v for k, v in arms["distilled"][2].items() if k not in ("student", "out")}
    for name, legs in arms.items():
        assert legs[0]["student"] == str(tmp_path / "start"), name
        assert [leg["student"] for leg in legs[1:]] == [leg["out"] for leg in legs[:-1]], name  # a chain
        assert sum(leg["max_steps"] for leg in legs) == 7 + 11 + 13, name
        assert legs[2]["lr"] == legs[1]["lr"] == cfg.lr and legs[0]["lr"] == cfg.pt_lr, name
    # A leg two arms share is the same run (trained once); each DFT variant switches off its term only.
    assert arms["dft-no-rdist"][:2] == arms["distilled"][:2] and arms["dpt-sft"][:2] == arms["distilled"][:2]
    assert arms["pt-sft-dft"][:2] == arms["baseline"][:2]
    weights = {n: tuple(arms[n][2].get(w, None) for w in ("alpha", "beta", "gamma"))
               for n in ("distilled", "pt-sft-dft", "dft-no-response", "dft-no-visual", "dft-no-rdist")}
    assert weights == {"distilled": (1.0, 1.0, 1.0), "pt-sft-dft": (1.0, 1.0, 1.0), "dft-no-response": (0.0, 1.0, 1.0),
                       "dft-no-visual": (1.0, 0.0, 1.0), "dft-no-rdist": (1.0, 1.0, 0.0)}
    assert len({leg["out"] for legs in arms.values() for leg in legs}) == 13
    assert set(student_arms(DemoConfig(out=str(tmp_path)), tmp_path, tmp_path, tmp_path)) == {"baseline", "distilled"}


def test_ablation_summary_table_and_plot(tmp_path):
    from kd_demo.ablation import LABELS, plot, summarise, table

    def metrics(acc, kl):
        return {"accuracy": acc, "kl_to_teacher": kl, "top1_agreement": 1 - kl,
                "accuracy_by_question": {"colour": acc - 0.1, "shape": acc, "place": acc + 0.05}}

    per_seed = {}
    for seed, shift in ((0, 0.0), (1, 0.02), (2, 0.04)):
        row = {arm: metrics(0.8 + i / 100 + shift, 0.1 - i / 100) for i, arm in enumerate(("teacher", *LABELS))}
        per_seed[seed] = {**row, "val": {arm: metrics(0.5, 0.2) for arm in row}}
    s = summarise(per_seed)
    acc = s["test"]["distilled"]["accuracy"]
    assert acc["values"] == pytest.approx([0.84, 0.86, 0.88]) and acc["mean"] == pytest.approx(0.86)
    assert acc["std"] == pytest.approx(0.02)  # sample standard deviation over seeds
    assert s["test"]["baseline"]["acc_colour"]["mean"] == pytest.approx(0.81 - 0.1 + 0.02)
    assert s["val"]["distilled"]["kl_to_teacher"] == {"values": [0.2] * 3, "mean": pytest.approx(0.2), "std": 0.0}
    md = table(s, "test", [0, 1, 2])
    assert "| DPT -> SFT -> DFT (LLaVA-KD) | 0.860 ± 0.020 |" in md and "| 57.9 |" in md and "| 54.7 |" in md
    assert len([x for x in md.splitlines() if x.startswith("| ")]) == 1 + 1 + len(LABELS)  # header, teacher, arms
    assert plot(s, tmp_path / "a.png") and (tmp_path / "a.png").stat().st_size > 10_000


@pytest.mark.slow
def test_quick_ablation_through_the_cli(tmp_path):
    out = tmp_path / "abl"
    proc = _quick_demo(out, "--ablation", "--seeds", "5")
    result = json.loads((out / "ablation.json").read_text())
    assert result["seeds"] == [5] and set(result["verdicts"]) == {"5"}
    seed = json.loads((out / "seed-5" / "results.json").read_text())
    assert result["summary"]["test"]["dft-no-rdist"]["accuracy"]["values"] == [seed["dft-no-rdist"]["accuracy"]]
    steps = QUICK["pt_steps"] + QUICK["sft_steps"] + QUICK["dft_steps"]
    for legs in (("baseline-pt", "baseline-sft", "baseline-sft2"), ("distilled-dpt", "distilled-sft", "distilled-dft-no-visual"),
                 ("baseline-pt", "baseline-sft", "baseline-dft")):
        n = sum(len((out / "seed-5" / "runs" / leg / "metrics.jsonl").read_text().splitlines()) for leg in legs)
        assert n == steps, legs
    # Without RDist the loss is CE + both MDists (RDist is still measured, with weight 0).
    no_rdist = out / "seed-5" / "runs" / "distilled-dft-no-rdist"
    assert json.loads((no_rdist / "train_config.json").read_text())["gamma"] == 0.0
    for m in map(json.loads, (no_rdist / "metrics.jsonl").read_text().splitlines()):
        assert m["rdist"] > 0 and m["loss"] == pytest.approx(m["ce"] + m["mdist_response"] + m["mdist_visual"])
    assert "DFT without visual MDist" in (out / "ablation.md").read_text() and "PT -> SFT" in proc.stdout
    # The LoRA arm's student is an adapter on the LLaVA-KD DPT leg's student, evaluated like the others.
    lora_dft = out / "seed-5" / "runs" / "lora-dft"
    assert (lora_dft / "adapter_config.json").is_file() and not (lora_dft / "model.safetensors").exists()
    assert json.loads((lora_dft / "trainer_state.json").read_text())["trainable"]["llm"]["adapters"] > 0
    assert result["summary"]["test"]["lora"]["accuracy"]["values"] == [seed["lora"]["accuracy"]]
    assert "LoRA student" in (out / "ablation.md").read_text()
    assert (out / "ablation.png").stat().st_size > 10_000
    # Run again: the finished seed is reused (same configuration), nothing is retrained.
    again = _quick_demo(out, "--ablation", "--seeds", "5")
    assert "seed 5: finished with this configuration" in again.stdout and "kd-train" not in again.stdout
    assert json.loads((out / "ablation.json").read_text())["summary"] == result["summary"]


def test_instructions_keep_a_caption_turn(tmp_path):
    """The instruction conversations (the teacher's and the students') each keep one caption turn (its
    answer is the image's caption, the same text and request as the caption records every caption
    cache is built from), while the evaluation sets are the three questions alone."""
    from kd_demo.task import CAPTION_PROMPT, QUESTIONS, make_task

    cfg = DemoConfig(out=str(tmp_path), quick=True, seed=5)
    files = make_task(tmp_path / "data", cfg)
    rows = {k: json.loads(files[k].read_text()) for k in ("teacher", "teacher_captions", "captions", "train", "test")}
    captions = {r["id"]: r["conversations"] for r in rows["teacher_captions"]}
    for key in ("teacher", "train"):
        places = set()
        for r in rows[key]:
            conv = r["conversations"]
            asks = [t["value"].removeprefix("<image>\n") for t in conv[0::2]]
            assert conv[0]["value"].startswith("<image>\n") and sum("<image>" in t["value"] for t in conv) == 1
            assert sorted(asks) == sorted([CAPTION_PROMPT, *(q for q, _ in QUESTIONS.values())]), r["id"]
            at = asks.index(CAPTION_PROMPT)
            places.add(at)
            answer = conv[2 * at + 1]["value"]
            if key == "teacher":
                assert answer == captions[r["id"]][1]["value"]
                assert captions[r["id"]][0]["value"] == "<image>\n" + CAPTION_PROMPT
            # the caption names the answers of the conversation's own questions
            said = {q: a for q, a in zip(asks, [t["value"] for t in conv[1::2]])}
            colour, shape, place = (said[QUESTIONS[k][0]] for k in ("colour", "shape", "place"))
            assert answer == f"a {colour} {shape} on the {place}.", r["id"]
        assert places == {0, 1, 2, 3}, key  # the caption turn is not always in one place
    for r in rows["captions"]:
        assert [t["value"].split(" ")[0] for t in r["conversations"]][::2] == ["<image>\nDescribe"]
    assert all(CAPTION_PROMPT not in t["value"] for r in rows["test"] for t in r["conversations"])
    # A seed gives the same files.
    again = make_task(tmp_path / "again", cfg)
    assert all(files[k].read_text() == again[k].read_text() for k in ("teacher", "captions", "train", "test", "val"))


def test_cross_demo_pair_differs(tmp_path):
    """``--cross-tokenizer``'s student really is another model than the teacher's tokens: another
    tokenizer (hash, pieces: SentencePiece's ``▁``, byte fallback), chat template and image grid, and its
    tokenizer keeps the pipeline it was trained with through ``compose_student``."""
    from kd_demo.run import make_models, make_student, pair_facts

    cfg = DemoConfig(out=str(tmp_path), quick=True, cross_tokenizer=True)
    _, teacher, student_llm = make_models(cfg, tmp_path / "models")
    student = make_student(cfg, teacher, student_llm, tmp_path / "models")
    facts = pair_facts(teacher, student)
    t, s = facts["teacher"], facts["student"]
    assert t["tokenizer_hash"] != s["tokenizer_hash"]
    assert (t["turn_marker"], s["turn_marker"]) == ("<|im_start|>", "<start_of_turn>")
    assert t["chat_template"] != s["chat_template"] and "<start_of_turn>" not in t["chat_template"]
    assert (t["visual_tokens"], s["visual_tokens"]) == (16, 9)
    from transformers import AutoProcessor

    tok = AutoProcessor.from_pretrained(student).tokenizer
    pieces = tok.convert_ids_to_tokens(tok("a red circle\n", add_special_tokens=False)["input_ids"])
    assert "\u2581red" in pieces and pieces[-1] == "<0x0A>", pieces
    # The default demo's student shares the teacher's tokenizer, template and grid.
    same = DemoConfig(out=str(tmp_path), quick=True)
    _, teacher, student_llm = make_models(same, tmp_path / "same")
    facts = pair_facts(teacher, make_student(same, teacher, student_llm, tmp_path / "same"))
    assert facts["teacher"] == facts["student"]
    with pytest.raises(ValueError, match="--cross-tokenizer"):
        DemoConfig(out=str(tmp_path), cross_tokenizer=True, ablation=True)


@pytest.mark.slow
def test_quick_cross_demo(tmp_path):
    out = tmp_path / "demo"
    proc = _quick_demo(out, "--cross-tokenizer")
    results = json.loads((out / "results.json").read_text())
    runs = out / "runs"
    for name in ("baseline", "distilled", "response-only"):
        preds = _predictions(out, name)
        assert math.isfinite(results[name]["kl_to_teacher"]) and 0 <= results[name]["aligned_share"] <= 1
        assert sum(p["kl"] for p in preds) / sum(p["kl_positions"] for p in preds) == pytest.approx(
            results[name]["kl_to_teacher"], rel=1e-6)
    # kd-train aligned every student leg on its own, and logged the aligned share per step.
    for leg in ("baseline-pt", "distilled-dpt", "distilled-dft", "response-only-dft"):
        state = json.loads((runs / leg / "trainer_state.json").read_text())
        assert state["alignment"]["cross"] and "GOLD" in state["alignment"]["text"], leg
    for leg in ("distilled-dft", "response-only-dft"):
        shares = [json.loads(x)["aligned_share"] for x in (runs / leg / "metrics.jsonl").read_text().splitlines()]
        assert shares and all(0 < v <= 1 for v in shares)
        assert results["cross"]["legs"][leg]["aligned_share"] == pytest.approx(sum(shares) / len(shares))
    only = json.loads((runs / "response-only-dft" / "train_config.json").read_text())
    assert only["positions"] in ("response", ["response"]) and only["gamma"] == 0.0
    per = {n: _predictions(out, n) for n in ("response-only", "distilled")}
    view = {n: {"ids": [p["id"] for p in v], "correct": [p["correct"] for p in v], "response_kl": [p["kl"] for p in v],
                "response_n": [p["kl_positions"] for p in v]} for n, v in per.items()}
    assert results["cross"]["verdict_response_only"] == pytest.approx(compare(view["distilled"], view["response-only"]))
    assert results["teacher"]["kl_to_teacher"] < 1e-3  # the teacher itself: same ids, today's cache_agreement
    assert "response-only" in proc.stdout and "aligned share" in proc.stdout
    # The aligned KL of a model that shares the cache's tokens, forced through the alignment, is kd-eval's.
    from student.evaluate import aligned_cache_agreement as agreement
    from student.evaluate import cache_agreement, load_model

    model, processor = load_model(runs / "teacher-pt", "cpu")
    ref = cache_agreement(model, processor, out / "caches" / "val")
    got = agreement(model, processor, out / "caches" / "val", alignment="cross")
    for kind in ("response", "visual"):
        assert got.kl[kind] == pytest.approx(ref.kl[kind], rel=1e-5)
        assert (got.positions[kind] == ref.positions[kind]).all() and (got.agree[kind] == ref.agree[kind]).all()
