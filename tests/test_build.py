"""kd-cache build: stored values equal a dense teacher computation; batching, resumption, ranks,
bad records, causal-LM teachers and fsspec stores."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from student_fixtures import load_llava, model_inputs
from transformers import AutoTokenizer
from typer.testing import CliRunner

from cli.kd_cache_cli import app
from kd_cache import open_cache
from kd_cache.build import BuildConfig, build_cache
from kd_cache.encoding import Encoder
from kd_cache.records import load_records
from kd_cache.schema import Manifest
from kd_cache.teacher import TeacherRunner, load_teacher
from kd_demo import tiny

ARRAYS = ("input_ids", "labels", "response_positions", "visual_positions", "response_ids", "response_logprobs",
          "response_tail", "visual_ids", "visual_logprobs", "visual_tail")


def _build(teacher_dir, data, out, **kw):
    data_file, images = data
    cfg = BuildConfig(teacher=str(teacher_dir), data=str(data_file), image_folder=str(images), out=str(out),
                      device="cpu", progress=False, **kw)
    return build_cache(cfg)


def _dense_logprobs(teacher_dir, data, template="chat"):
    """Per-sample fp32 log-softmax [L, V] from the teacher's own full forward pass (no cache code)."""
    model, proc = load_llava(teacher_dir)
    enc = Encoder(proc, template, 2048, str(data[1]), proc.image_token_id)
    out = {}
    for rec in load_records(str(data[0])):
        e = enc.encode(rec)
        with torch.no_grad():
            logits = model(**model_inputs(proc, e.input_ids, e.pil_images)).logits[0].float()
        out[e.id] = logits
    return out


def test_topk_and_relation_equal_dense(teacher_dir, chat_data, tmp_path):
    manifest = _build(teacher_dir, chat_data, tmp_path / "c", top_k=8, shard_size=4, batch_size=3)
    cache = open_cache(str(tmp_path / "c"))
    assert len(cache) == manifest.num_samples == 10
    dense = _dense_logprobs(teacher_dir, chat_data)
    n_images = 0
    for s in cache:
        logits = dense[s["id"]]
        logp = torch.log_softmax(logits, -1)
        labels = s["labels"]
        np.testing.assert_array_equal(s["response_positions"], np.nonzero(labels[1:] != -100)[0])
        np.testing.assert_array_equal(s["visual_positions"], np.nonzero(s["input_ids"] == manifest.image_token_id)[0])
        for kind in ("response", "visual"):
            pos = torch.from_numpy(s[f"{kind}_positions"].astype(np.int64))
            ref_lp, ref_ids = logp[pos].topk(8, dim=-1)
            np.testing.assert_array_equal(s[f"{kind}_ids"], ref_ids.numpy())
            np.testing.assert_allclose(s[f"{kind}_logprobs"], ref_lp.numpy(), rtol=2e-3, atol=2e-3)  # fp16 storage
            ref_tail = torch.log1p(-ref_lp.exp().sum(-1).clamp(max=1 - 1e-7)).numpy()
            np.testing.assert_allclose(s[f"{kind}_tail"], ref_tail, rtol=1e-3, atol=1e-4)
        assert len(s["relation"]) == len(s["images"])
        for r in s["relation"]:
            z = logits[torch.from_numpy(s["visual_positions"].astype(np.int64))]
            ref = z @ z.T
            ref = (ref / ref.norm()).numpy()
            np.testing.assert_allclose(r, ref, atol=2e-3)  # fp16 upper triangle
            assert abs(np.linalg.norm(r) - 1) < 1e-3
            n_images += 1
    assert n_images > 0 and any(len(s["images"]) == 0 for s in cache)  # text-only samples present too


def test_lowrank_relation_is_close(teacher_dir, chat_data, tmp_path):
    _build(teacher_dir, chat_data, tmp_path / "full", top_k=4)
    _build(teacher_dir, chat_data, tmp_path / "low", top_k=4, relation="lowrank:8")
    full, low = open_cache(str(tmp_path / "full")), open_cache(str(tmp_path / "low"))
    for a, b in zip(full, low):
        for ra, rb, energy in zip(a["relation"], b["relation"], b["relation_energy"]):
            cos = float((ra * rb).sum() / np.linalg.norm(ra) / np.linalg.norm(rb))
            assert cos > 0.999 and energy > 0.999


@pytest.mark.parametrize("scheme", ["systematic", "multinomial"])
def test_sample_mode_is_unbiased(teacher_dir, chat_data, scheme):
    teacher = load_teacher(str(teacher_dir), "cpu", torch.float32)
    enc = Encoder(teacher.processor, "chat", 2048, str(chat_data[1]), teacher.image_token_id)
    e = enc.encode(load_records(str(chat_data[0]))[0])
    dense = _dense_logprobs(teacher_dir, chat_data)[e.id]
    p = torch.softmax(dense[torch.from_numpy(e.labels[1:] != -100).nonzero()[:, 0]], -1).numpy()
    N, trials = 16, 300
    est = np.zeros_like(p)
    runner = TeacherRunner(teacher, sparse="sample", samples=N, sample_scheme=scheme, relation="none")
    h = runner.hidden_states([e])[0, torch.from_numpy(e.labels[1:] != -100).nonzero()[:, 0]]
    for seed in range(trials):
        runner.seed = seed
        s = runner.distribution(h, e.id, "response")
        ids, counts, lp, tail = s["ids"], s["counts"], s["logprobs"], s["tail"]
        assert (counts.sum(-1) == N).all()
        valid = ids >= 0
        np.testing.assert_allclose(lp[valid], np.log(p[np.nonzero(valid)[0], ids[valid]]), atol=1e-5)
        mass = np.where(valid, p[np.arange(len(p))[:, None], np.maximum(ids, 0)], 0).sum(-1)
        np.testing.assert_allclose(np.exp(tail), 1 - mass, atol=1e-5)
        np.add.at(est, (np.nonzero(valid)[0], ids[valid]), counts[valid] / N)
        if scheme == "systematic":  # every token is drawn floor(N p) or ceil(N p) times
            dense_counts = np.zeros_like(p)
            np.add.at(dense_counts, (np.nonzero(valid)[0], ids[valid]), counts[valid])
            assert (dense_counts >= np.floor(N * p - 1e-6)).all() and (dense_counts <= np.ceil(N * p + 1e-6)).all()
    est /= trials
    draws = N * trials
    np.testing.assert_allclose(est.sum(-1), 1.0, atol=1e-6)
    # Ids the teacher draws often: a z-test per id (normal approximation holds there).
    common = p * draws >= 10
    z = (est - p)[common] / np.sqrt(p * (1 - p) / draws)[common]
    assert common.sum() > 20 and np.abs(z).max() < 5
    # Rare ids (binomial far from normal): their total mass per position matches instead.
    rare_est, rare_p = np.where(common, 0, est).sum(-1), np.where(common, 0, p).sum(-1)
    se = np.sqrt(rare_p * (1 - rare_p) / draws)
    assert (np.abs(rare_est - rare_p) <= 5 * se + 1e-4).all()


def test_sample_mode_cache_through_cli(teacher_dir, chat_data, tmp_path):
    """kd-cache build --sparse sample (CLI): logp_mean per position equals sum_i (c_i/N) log p_i from the
    teacher's own dense forward; the per-entry log-probs are stored only with --sample-logprobs."""
    runner = CliRunner()
    outs = {}
    for flag in ([], ["--sample-logprobs"]):
        out = tmp_path / ("with" if flag else "lean")
        res = runner.invoke(app, ["build", "--teacher", str(teacher_dir), "--data", str(chat_data[0]), "--image-folder",
                                  str(chat_data[1]), "--out", str(out), "--sparse", "sample", "--samples", "16",
                                  "--device", "cpu", "--no-progress", "--limit", "5", *flag])
        assert res.exit_code == 0, res.output
        outs[bool(flag)] = out
    lean, full = open_cache(str(outs[False])), open_cache(str(outs[True]))
    assert lean.manifest.sparse.logprobs_stored is False and full.manifest.sparse.logprobs_stored is True
    dense = _dense_logprobs(teacher_dir, chat_data)
    for a, b in zip(lean, full):
        logp = torch.log_softmax(dense[a["id"]], -1).double().numpy()
        for kind in ("response", "visual"):
            assert f"{kind}_logprobs" not in a and f"{kind}_logprobs" in b
            np.testing.assert_array_equal(a[f"{kind}_ids"], b[f"{kind}_ids"])  # same seeded draws
            np.testing.assert_array_equal(a[f"{kind}_logp_mean"], b[f"{kind}_logp_mean"])
            ids, counts = a[f"{kind}_ids"], a[f"{kind}_counts"].astype(np.float64)
            rows = logp[a[f"{kind}_positions"]]
            ref = (np.where(ids >= 0, counts * np.take_along_axis(rows, np.maximum(ids, 0), 1), 0).sum(1)
                   / np.maximum(counts.sum(1), 1))
            np.testing.assert_allclose(a[f"{kind}_logp_mean"], ref, rtol=1e-5, atol=1e-5)
    lean_bytes = lean.manifest.total_bytes
    full_bytes = full.manifest.total_bytes
    assert lean_bytes < full_bytes


def _arrays_close(a, b, exact=False):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["id"] == y["id"] and x["images"] == y["images"]
        for k in ARRAYS:
            if exact or x[k].dtype.kind in "iu":
                np.testing.assert_array_equal(x[k], y[k], err_msg=k)
            else:
                np.testing.assert_allclose(x[k], y[k], atol=2e-3, rtol=2e-3, err_msg=k)
        for ra, rb in zip(x["relation"], y["relation"]):
            np.testing.assert_allclose(ra, rb, atol=2e-3)


def test_batch_size_invariance(teacher_dir, chat_data, tmp_path):
    _build(teacher_dir, chat_data, tmp_path / "b1", top_k=8, batch_size=1)
    _build(teacher_dir, chat_data, tmp_path / "b4", top_k=8, batch_size=4)
    _arrays_close(list(open_cache(str(tmp_path / "b1"))), list(open_cache(str(tmp_path / "b4"))))


def test_token_budget_batches_keep_the_cache(teacher_dir, chat_data, tmp_path):
    """--max-batch-tokens changes which samples share a forward (image samples of 68 tokens in pairs, the
    text-only ones of 22 apart, sorted within each shard's window), not the cache: the same samples in
    the same order, ids and positions equal, log-probs, tails and relations within 2e-3 (the fp16
    storage of log-probs and relations; batch composition only changes float summation order)."""
    _build(teacher_dir, chat_data, tmp_path / "fixed", top_k=8, shard_size=5, batch_size=3)
    budget = _build(teacher_dir, chat_data, tmp_path / "budget", top_k=8, shard_size=5, max_batch_tokens=140,
                    sort_window=5)
    fixed = json.loads((tmp_path / "fixed/manifest.json").read_text())
    assert [e["samples"] for e in fixed["shards"]] == [e.samples for e in budget.shards] == [5, 5]
    _arrays_close(list(open_cache(str(tmp_path / "fixed"))), list(open_cache(str(tmp_path / "budget"))))
    # The grouping is no content setting: the cache resumes (here: is complete) under --batch-size.
    assert _build(teacher_dir, chat_data, tmp_path / "budget", top_k=8, shard_size=5).num_samples == 10


def _cli_build(teacher_dir, data, out, *extra):
    return [sys.executable, "-m", "cli.kd_cache_cli", "build", "--teacher", str(teacher_dir), "--data", str(data[0]),
            "--image-folder", str(data[1]), "--out", str(out), "--device", "cpu", "--no-progress", *extra]


def _shard_checksums(path):
    return [e["checksum"] for e in json.loads((Path(path) / "manifest.json").read_text())["shards"]]


@pytest.mark.slow
def test_kill_and_resume_gives_identical_cache(teacher_dir, tmp_path):
    data = tiny.make_llava_dataset(tmp_path / "data", n=36, seed=5)
    args = ("--top-k", "8", "--shard-size", "3", "--batch-size", "2")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run(_cli_build(teacher_dir, data, tmp_path / "ref", *args), check=True, env=env, capture_output=True)
    out = tmp_path / "killed"
    # A real SIGKILL once the first shard is complete (between/during the following shard writes).
    proc = subprocess.Popen(_cli_build(teacher_dir, data, out, *args), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / "shards").glob("*.complete.json")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted((out / "shards").glob("*.complete.json"))
    assert 1 <= len(done) < 12 and not (out / "manifest.json").exists()
    # The state a kill in the middle of a shard write leaves: data files present, record missing.
    victim = done[0]
    victim.unlink()
    chunks = [p for p in (out / "shards" / victim.name.split(".")[0]).rglob("*") if p.is_file()]
    chunks[len(chunks) // 2].write_bytes(b"partial")
    res = subprocess.run(_cli_build(teacher_dir, data, out, *args), env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert _shard_checksums(out) == _shard_checksums(tmp_path / "ref")
    assert subprocess.run([sys.executable, "-m", "cli.kd_cache_cli", "verify", str(out)], env=env).returncode == 0
    # A rerun with different settings is refused, naming the setting.
    res = subprocess.run(_cli_build(teacher_dir, data, out, "--top-k", "16", "--shard-size", "3"), env=env,
                         capture_output=True, text=True)
    assert res.returncode != 0 and "--top-k" in res.stderr and "8" in res.stderr and "16" in res.stderr


@pytest.mark.slow
def test_two_processes_equal_one(teacher_dir, tmp_path):
    data = tiny.make_llava_dataset(tmp_path / "data", n=14, seed=6, text_only_every=5)
    args = ("--top-k", "8", "--shard-size", "3", "--batch-size", "2")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    subprocess.run(_cli_build(teacher_dir, data, tmp_path / "one", *args), check=True, env=env, capture_output=True)
    # --multi_gpu is accelerate's multi-process launcher; without a GPU it runs the ranks on gloo.
    # (--cpu would start a single process.)
    build = [a for a in _cli_build(teacher_dir, data, tmp_path / "two", *args)[3:] if a != "--no-progress"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
           "-m", "cli.kd_cache_cli", *build]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "teacher pass (rank 1)" in res.stderr and "teacher pass (rank 0)" in res.stderr  # really two ranks
    one, two = json.loads((tmp_path / "one/manifest.json").read_text()), json.loads((tmp_path / "two/manifest.json").read_text())
    assert one["shards"] == two["shards"] and one["num_samples"] == two["num_samples"] == 14
    _arrays_close(list(open_cache(str(tmp_path / "one"))), list(open_cache(str(tmp_path / "two"))), exact=True)


def _bad_dataset(root: Path):
    data, images = tiny.make_llava_dataset(root, n=3, seed=7)
    recs = json.loads(data.read_text())
    (images / "broken.png").write_bytes(b"not a png")
    long_q = "What colour is the shape? " * 40
    recs += [
        {"id": "missing", "image": "nope.png", "conversations": recs[0]["conversations"]},
        {"id": "unreadable", "image": "broken.png", "conversations": recs[0]["conversations"]},
        {"id": "empty", "conversations": []},
        {"id": "too-long", "conversations": [{"from": "human", "value": long_q}, {"from": "gpt", "value": "red"}]},
        {"id": "two-tags", "image": recs[0]["image"],
         "conversations": [{"from": "human", "value": "<image> and <image>"}, {"from": "gpt", "value": "red"}]},
    ]
    data.write_text(json.dumps(recs))
    return data, images


def test_bad_records_are_counted_and_listed(teacher_dir, tmp_path):
    data = _bad_dataset(tmp_path / "bad")
    # 5 of 8 records are bad: above the default --max-skip-share 0.5, so the build fails without a manifest ...
    res = CliRunner().invoke(app, _cli_build(teacher_dir, data, tmp_path / "c", "--max-length", "120", "--top-k", "4")[3:])
    assert res.exit_code != 0 and not (tmp_path / "c/manifest.json").exists()
    assert "5 of 8 records skipped (62% > --max-skip-share 0.5)" in res.output and "missing_image: 1" in res.output
    # ... and rerun with a higher threshold, it finishes from the same (complete) shards.
    res = CliRunner().invoke(app, _cli_build(teacher_dir, data, tmp_path / "c", "--max-length", "120", "--top-k", "4",
                                             "--max-skip-share", "0.7")[3:])
    assert res.exit_code == 0, res.output
    manifest = Manifest.from_json((tmp_path / "c/manifest.json").read_text())
    assert manifest.num_samples == 3
    reasons = {x.id: x.reason for x in manifest.skipped}
    assert reasons == {"missing": "missing_image", "unreadable": "unreadable_image", "empty": "empty_conversation",
                       "too-long": "no_assistant_tokens_after_truncation", "two-tags": "image_tag_count_mismatch"}
    assert manifest.skipped_counts["missing_image"] == 1
    assert "skipped 5 records" in res.output and "unreadable_image: 1" in res.output

    res = CliRunner().invoke(app, _cli_build(teacher_dir, data, tmp_path / "s", "--strict", "--max-length", "120")[3:])
    assert res.exit_code != 0
    assert "missing" in res.output and "missing_image" in res.output


def test_causal_lm_teacher_on_text_only_data(causal_teacher_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path / "text"
    root.mkdir()
    recs = [{"id": f"t{i}", "conversations": [{"from": "human", "value": f"Is {c} a colour?"},
                                              {"from": "gpt", "value": "yes"}]} for i, c in enumerate(tiny.COLOURS)]
    (root / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    manifest = _build(causal_teacher_dir, (root / "d.jsonl", root), tmp_path / "c", top_k=5, relation="full")
    assert manifest.image_token_id is None and manifest.relation == "none"
    model = AutoModelForCausalLM.from_pretrained(causal_teacher_dir).eval()
    tok = AutoTokenizer.from_pretrained(causal_teacher_dir)
    for s in open_cache(str(tmp_path / "c")):
        assert len(s["visual_positions"]) == 0 and s["relation"] == []
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.from_numpy(s["input_ids"].astype(np.int64))[None]).logits[0], -1)
        ref = logp[torch.from_numpy(s["response_positions"].astype(np.int64))].topk(5)
        np.testing.assert_array_equal(s["response_ids"], ref.indices.numpy())
        assert tok.decode(s["input_ids"][s["labels"] != -100]) == "yes<|im_end|>\n"


def test_fsspec_url_stores(teacher_dir, chat_data, tmp_path):
    local = _build(teacher_dir, chat_data, tmp_path / "local", top_k=4, limit=4)
    mem = _build(teacher_dir, chat_data, "memory://kd-test-cache", top_k=4, limit=4)
    url = _build(teacher_dir, chat_data, (tmp_path / "viaurl").as_uri(), top_k=4, limit=4)
    assert local.shards == mem.shards == url.shards
    _arrays_close(list(open_cache(str(tmp_path / "local"))), list(open_cache("memory://kd-test-cache")), exact=True)


def test_inspect_and_verify_through_cli(teacher_dir, chat_data, tmp_path):
    out = tmp_path / "c"
    _build(teacher_dir, chat_data, out, top_k=8, shard_size=5, relation="lowrank:4")
    runner = CliRunner()
    res = runner.invoke(app, ["inspect-shard", str(out)])
    assert res.exit_code == 0, res.output
    assert "response_logprobs" in res.output and "lowrank:4" in res.output
    res = runner.invoke(app, ["inspect-shard", str(out), "--shard", "1", "--sample", "0", "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    # The response text is decoded with the teacher's tokenizer (named by the manifest): every answer
    # of the source record, each closed by the chat template's end of turn.
    (row,) = info["samples_listed"]
    record = next(r for r in json.loads(chat_data[0].read_text()) if r["id"] == row["id"])
    answers = [t["value"] for t in record["conversations"] if t["from"] == "gpt"]
    assert row["response_text"] == "".join(f"{a}<|im_end|>\n" for a in answers)
    res = runner.invoke(app, ["verify", str(out)])
    assert res.exit_code == 0 and "OK" in res.output
    # The teacher's tokenizer files beside the shards (what an aligned student reads) are checked too.
    from kd_cache import open_cache
    from kd_cache.reader import CorruptCacheError

    tok_file = out / "teacher_tokenizer" / "tokenizer.json"
    assert open_cache(str(out)).teacher_tokenizer().get_vocab() == AutoTokenizer.from_pretrained(teacher_dir).get_vocab()
    saved = tok_file.read_bytes()
    tok_file.write_bytes(saved.replace(b'"vocab"', b'"vocab" ', 1))
    res = runner.invoke(app, ["verify", str(out)])
    assert res.exit_code == 1 and "teacher_tokenizer/tokenizer.json does not match its sha256" in res.output
    with pytest.raises(CorruptCacheError, match="tokenizer.json does not match"):
        open_cache(str(out)).teacher_tokenizer()
    tok_file.write_bytes(saved)
    # Corrupt one chunk file: verify must fail and name the shard.
    chunk = next(p for p in sorted((out / "shards" / "00001").rglob("*")) if p.is_file() and p.name != "zarr.json")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    res = runner.invoke(app, ["verify", str(out)])
    assert res.exit_code == 1
    assert "00001" in res.output


def test_prompt_positions_and_hidden_states(teacher_dir, chat_data, tmp_path):
    manifest = _build(teacher_dir, chat_data, tmp_path / "c", top_k=4, positions="prompt,response,visual",
                      hidden=True, limit=4)
    assert manifest.positions == ("response", "visual", "prompt") and manifest.hidden.size == 64
    model, proc = load_llava(teacher_dir)
    enc = Encoder(proc, "chat", 2048, str(chat_data[1]), proc.image_token_id)
    records = {r.id: r for r in load_records(str(chat_data[0]))}
    for s in open_cache(str(tmp_path / "c")):
        L = len(s["input_ids"])
        covered = np.concatenate([s["response_positions"], s["visual_positions"], s["prompt_positions"]])
        # Every position but the last is distilled exactly once.
        np.testing.assert_array_equal(np.sort(covered[covered < L - 1]), np.arange(L - 1))
        e = enc.encode(records[s["id"]])
        with torch.no_grad():
            out = model(**model_inputs(proc, e.input_ids, e.pil_images), output_hidden_states=True)
        h = out.hidden_states[-1][0]
        for kind in ("response", "visual", "prompt"):
            pos = torch.from_numpy(s[f"{kind}_positions"].astype(np.int64))
            assert s[f"{kind}_hidden"].dtype == np.float16 and s[f"{kind}_hidden"].shape == (len(pos), 64)
            np.testing.assert_allclose(s[f"{kind}_hidden"], h[pos].numpy(), rtol=2e-3, atol=2e-3)
            ref = torch.log_softmax(out.logits[0, pos].float(), -1).topk(4).indices.numpy()
            np.testing.assert_array_equal(s[f"{kind}_ids"], ref)


def test_generate_replaces_answers_with_the_teachers(teacher_dir, chat_data, tmp_path):
    _build(teacher_dir, chat_data, tmp_path / "g", top_k=4, generate=True, max_new_tokens=6, limit=3, batch_size=2)
    model, proc = load_llava(teacher_dir)
    tok = proc.tokenizer
    enc = Encoder(proc, "chat", 2048, str(chat_data[1]), proc.image_token_id)
    records = {r.id: r for r in load_records(str(chat_data[0]))}
    for s in open_cache(str(tmp_path / "g")):
        rec = records[s["id"]]
        refs = [t["value"] for t in rec.conversations if t["from"] == "gpt"]
        assert s["meta"]["reference_answers"] == refs
        # Reproduce the first answer with a plain greedy generate on the unpadded prompt.
        prepared = enc.prepare(rec)
        prompt = enc.prompt(prepared, 1)  # the processor's own encoding of the prompt
        gen = model.generate(**prompt.inputs, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
        first = tok.decode(gen[0, len(prompt.input_ids):], skip_special_tokens=True).strip()
        labelled = tok.decode(s["input_ids"][s["labels"] != -100])
        assert labelled.startswith(first + "<|im_end|>\n")
        assert labelled.count("<|im_end|>") == len(refs)  # every turn answered by the teacher


def test_padded_teacher_head_is_cut_to_the_tokenizer(teacher_dir, student_dir, chat_data, tmp_path):
    """Checkpoints pad their output layer past the tokenizer; those rows carry no token and are masked,
    so a student padded differently (here: not at all) stays compatible."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from student.model import check_compatibility, load_student

    model = LlavaForConditionalGeneration.from_pretrained(teacher_dir)
    model.resize_token_embeddings(448)
    with torch.no_grad():
        model.lm_head.weight[400:] = 5.0 * model.lm_head.weight[:48]  # padding rows that would win a top-k
    model.save_pretrained(tmp_path / "padded")
    AutoProcessor.from_pretrained(teacher_dir).save_pretrained(tmp_path / "padded")
    manifest = _build(tmp_path / "padded", chat_data, tmp_path / "c", top_k=8, limit=3)
    assert manifest.vocab_size == 400 and manifest.teacher_head_rows == 448
    dense = {}
    proc = AutoProcessor.from_pretrained(teacher_dir)
    enc = Encoder(proc, "chat", 2048, str(chat_data[1]), proc.image_token_id)
    for rec in load_records(str(chat_data[0]))[:3]:
        e = enc.encode(rec)
        with torch.no_grad():
            dense[e.id] = model(**model_inputs(proc, e.input_ids, e.pil_images)).logits[0]
    for s in open_cache(str(tmp_path / "c")):
        logp = torch.log_softmax(dense[s["id"]][:, :400].float(), -1)
        pos = torch.from_numpy(s["response_positions"].astype(np.int64))
        ref = logp[pos].topk(8)
        np.testing.assert_array_equal(s["response_ids"], ref.indices.numpy())
        np.testing.assert_allclose(s["response_logprobs"], ref.values.numpy(), atol=2e-3, rtol=2e-3)
    student, sproc = load_student(student_dir)
    check_compatibility(manifest, student, sproc, template="chat")
