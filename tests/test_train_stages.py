"""Stage recipes through the real training loop: which parts move, what is written to OUT."""

from __future__ import annotations

import json

import pytest
import torch
from student_fixtures import one_torch_thread, write_synthetic_cache  # noqa: F401

from student.checkpoints import checkpoint_dirs
from student.config import TrainConfig
from student.families import parameter_parts
from student.train import train

METRIC_KEYS = {"step", "loss", "ce", "mdist_response", "mdist_visual", "rdist", "lr", "samples_per_s"}


@pytest.fixture(scope="module")
def caches(tmp_path_factory, processor):
    root = tmp_path_factory.mktemp("stage-caches")
    return {
        "pretrain": write_synthetic_cache(root / "caption", processor, n=6, shard_size=4, image_every=1,
                                          template="pretrain"),
        "chat": write_synthetic_cache(root / "chat", processor, n=6, shard_size=4, image_every=2),
    }


def _model(path):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(path)


def _params(path) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in _model(path).named_parameters()}


def _moved(before: dict, after: dict, parts: dict[str, str]) -> dict[str, set[str]]:
    """module -> names of parameters that changed."""
    out: dict[str, set[str]] = {"vision": set(), "projector": set(), "llm": set()}
    for name, value in before.items():
        if not torch.equal(value, after[name]):
            out[parts[name]].add(name)
    return out


def _train(stage, student, cache, out, **kw):
    cfg = TrainConfig(stage=stage, student=str(student), cache=str(cache), out=str(out), batch_size=2,
                      max_steps=2, warmup_ratio=0.0, progress=False, **kw)
    return train(cfg)


@pytest.mark.parametrize(("stage", "template", "expect"), [
    ("dpt", "pretrain", {"projector"}),
    ("sft", "chat", {"projector", "llm"}),
    ("dft", "chat", {"projector", "llm"}),
])
def test_stage_trains_only_its_modules(student_dir, caches, tmp_path, stage, template, expect):
    result = _train(stage, student_dir, caches[template], tmp_path / stage, save_every=1)
    before, after = _params(student_dir), _params(tmp_path / stage)
    parts = parameter_parts(_model(student_dir))
    moved = _moved(before, after, parts)
    assert {m for m, names in moved.items() if names} == expect
    # Every parameter of a trained module moves (nothing silently frozen); the vision tower never.
    trained = {n for n in before if parts[n] in expect}
    assert moved["projector"] | moved["llm"] == trained
    assert not moved["vision"]

    out = tmp_path / stage
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2] and result["step"] == 2
    assert all(METRIC_KEYS <= set(m) for m in lines)
    assert lines[0]["lr"] == pytest.approx(1e-3 if stage == "dpt" else 2e-5)
    if stage == "sft":
        assert lines[0]["mdist_response"] is None and lines[0]["rdist"] is None
    else:
        assert lines[0]["mdist_response"] > 0 and lines[0]["mdist_visual"] > 0 and 0 < lines[0]["rdist"] < 2
    cfg = json.loads((out / "train_config.json").read_text())
    assert cfg["stage"] == stage and cfg["lr"] == (1e-3 if stage == "dpt" else 2e-5)
    assert cfg["train_modules"] == ",".join(m for m in ("vision", "projector", "llm") if m in expect)
    ckpts = checkpoint_dirs(out)
    assert [c.name for c in ckpts] == ["step-1", "step-2"]
    for name in ("model.safetensors", "optimizer.bin", "random_states_0.pkl", "trainer_state.json",
                 "train_config.json", "COMPLETE"):
        assert (ckpts[-1] / name).is_file(), name
    assert json.loads((ckpts[0] / "trainer_state.json").read_text())["samples_seen"] == 2


def test_final_output_loads_with_plain_transformers_and_generates(student_dir, caches, tmp_path):
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    _train("dft", student_dir, caches["chat"], tmp_path / "out")
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out")
    proc = AutoProcessor.from_pretrained(tmp_path / "out")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    prompt = proc.apply_chat_template(messages, add_generation_prompt=True)
    enc = proc(text=prompt, images=[Image.new("RGB", (48, 48), "blue")], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == enc["input_ids"].shape[1] + 3


def test_train_modules_override_can_train_the_vision_tower(student_dir, caches, tmp_path):
    _train("dft", student_dir, caches["chat"], tmp_path / "all", train_modules="vision,projector,llm", lr=1e-3)
    moved = _moved(_params(student_dir), _params(tmp_path / "all"), parameter_parts(_model(student_dir)))
    assert moved["vision"] and moved["projector"] and moved["llm"]
    # Parameters LLaVA never reads (SigLIP's pooling head, post-layernorm) stay put even then.
    assert not any(".head." in n or "post_layernorm" in n for n in moved["vision"])


def test_config_validation_names_the_flag(student_dir, caches, tmp_path):
    base = {"stage": "dft", "student": str(student_dir), "cache": str(caches["chat"]), "out": str(tmp_path)}
    for kw, flag in [({"lr": 0}, "--lr"), ({"batch_size": 0}, "--batch-size"), ({"grad_accum": 0}, "--grad-accum"),
                     ({"warmup_ratio": 1.5}, "--warmup-ratio"), ({"divergence": "kl"}, "--divergence"),
                     ({"train_modules": "vision,decoder"}, "--train-modules"), ({"stage": "pt"}, "--stage"),
                     ({"jsd_beta": 2.0}, "--jsd-beta"), ({"max_steps": 0}, "--max-steps"),
                     ({"skew": 1.0}, r"--skew must lie in \[0, 1\)"), ({"skew": -0.1}, "--skew"),
                     ({"temperature": 0.0}, "--temperature must be > 0")]:
        with pytest.raises(ValueError, match=flag):
            TrainConfig(**{**base, **kw})
    with pytest.raises(ValueError, match="cache template 'chat' != stage template 'pretrain'"):
        _train("dpt", student_dir, caches["chat"], tmp_path / "x")
    # --any-template lets a stage read another template's cache.
    assert _train("dpt", student_dir, caches["chat"], tmp_path / "y", any_template=True)["step"] == 2


def test_sample_mode_cache_refuses_biased_divergences(student_dir, processor, tmp_path):
    cache = write_synthetic_cache(tmp_path / "c", processor, n=4, shard_size=4, sparse_mode="sample")
    for div in ("rkl", "srkl"):
        with pytest.raises(ValueError, match=f"--divergence {div}.*only forward KL is unbiased"):
            _train("dft", student_dir, cache, tmp_path / div, divergence=div)
    assert _train("dft", student_dir, cache, tmp_path / "fkl")["metrics"]["mdist_response"] > 0


def test_cache_given_as_an_fsspec_url(student_dir, caches, tmp_path):
    url = caches["chat"].resolve().as_uri()  # file:///...
    result = _train("dft", student_dir, url, tmp_path / "url", num_workers=2)
    assert result["step"] == 2 and result["metrics"]["rdist"] > 0


def test_missing_tracker_package_is_reported_before_training(student_dir, caches, tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        pytest.skip("tensorboard is installed here")
    with pytest.raises(ValueError, match="--report-to tensorboard needs the tensorboard package"):
        _train("dft", student_dir, caches["chat"], tmp_path / "tb", report_to="tensorboard")
    assert not (tmp_path / "tb" / "metrics.jsonl").exists()
