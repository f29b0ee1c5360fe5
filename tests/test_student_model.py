"""Composing a student from parts, loading it with plain transformers, and cache/student compatibility."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from student_fixtures import one_torch_thread, write_synthetic_cache  # noqa: F401
from typer.testing import CliRunner

from cli.kd_train_cli import app
from kd_cache import open_cache
from kd_cache.encoding import CHATML_TEMPLATE
from kd_cache.processing import encode
from kd_cache.runtime import attn_implementation
from student.model import CompatibilityError, check_compatibility, compose_student, load_student


def _tokenizer_without_image_token():
    """A Qwen-style BPE tokenizer (its own small vocabulary) without an <image> token, like a plain LLM's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["a red circle on the left", "what colour is the shape"] * 10, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    return fast


@pytest.fixture(scope="module")
def parts(tmp_path_factory, processor):
    """A SiglipVisionModel directory and a Qwen2 causal LM whose tokenizer lacks the image token."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    root = tmp_path_factory.mktemp("parts")
    torch.manual_seed(0)
    vision = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                                  intermediate_size=64, image_size=32, patch_size=8))
    vision.save_pretrained(root / "vision")
    processor.image_processor.save_pretrained(root / "vision")
    tok = _tokenizer_without_image_token()
    lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, intermediate_size=64, tie_word_embeddings=False))
    lm.save_pretrained(root / "llm")
    tok.save_pretrained(root / "llm")
    return root / "vision", root / "llm"


def test_compose_from_vision_model_and_llm(parts, tmp_path):
    from PIL import Image
    from transformers import (
        AutoModelForCausalLM,
        AutoProcessor,
        LlavaForConditionalGeneration,
        SiglipVisionModel,
    )

    vision_dir, llm_dir = parts
    out = compose_student(vision_dir, llm_dir, tmp_path / "student")
    model = LlavaForConditionalGeneration.from_pretrained(out)  # plain transformers
    proc = AutoProcessor.from_pretrained(out)

    # The image token was added (a new id n) and the embeddings grew by exactly one row.
    src_lm = AutoModelForCausalLM.from_pretrained(llm_dir)
    n = src_lm.config.vocab_size
    assert proc.tokenizer.convert_tokens_to_ids("<image>") == n == model.config.image_token_id
    assert model.config.text_config.vocab_size == n + 1 == len(proc.tokenizer)
    conv = [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "a"}]
    enc = encode(proc, model.config.image_token_id, conv, [Image.new("RGB", (40, 40))], template="pretrain")
    assert enc.image_token_counts == [16] == [model.config.image_seq_length]
    assert model.config.vision_feature_layer == -2 and model.config.projector_hidden_act == "gelu"
    assert proc.chat_template == CHATML_TEMPLATE

    src_v = SiglipVisionModel.from_pretrained(vision_dir)
    for (key, a), (_, b) in zip(src_v.state_dict().items(), model.model.vision_tower.state_dict().items(),
                                strict=True):
        assert torch.equal(a, b), key
    assert torch.equal(model.model.language_model.embed_tokens.weight[:n], src_lm.model.embed_tokens.weight)
    assert torch.equal(model.lm_head.weight[:n], src_lm.lm_head.weight)
    assert torch.equal(model.model.language_model.layers[1].mlp.up_proj.weight, src_lm.model.layers[1].mlp.up_proj.weight)
    proj = model.model.multi_modal_projector
    assert proj.linear_1.in_features == 32 and proj.linear_2.out_features == 32

    # A forward pass with an image through the saved processor works.
    enc = proc(text="<image>what colour", images=[Image.new("RGB", (40, 40), "red")], return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape[-1] == n + 1 and torch.isfinite(logits).all()


def test_compose_reuses_the_vision_tower_of_a_llava_checkpoint(teacher_dir, causal_teacher_dir, tmp_path):
    from transformers import LlavaForConditionalGeneration

    out = compose_student(teacher_dir, causal_teacher_dir, tmp_path / "student", seed=3)
    model, _ = load_student(out)
    teacher = LlavaForConditionalGeneration.from_pretrained(teacher_dir)
    for (n, a), (_, b) in zip(teacher.model.vision_tower.state_dict().items(),
                              model.model.vision_tower.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    assert model.config.vision_feature_layer == teacher.config.vision_feature_layer
    assert model.config.vision_feature_select_strategy == teacher.config.vision_feature_select_strategy
    assert model.config.text_config.vocab_size == 400  # the tokenizer already had <image>: no resize
    assert not torch.equal(model.model.multi_modal_projector.linear_1.weight,
                           teacher.model.multi_modal_projector.linear_1.weight)
    assert model.config._attn_implementation == attn_implementation()


@pytest.mark.parametrize("gpu,flash_importable,expected", [
    (True, True, "flash_attention_2"),
    (True, False, "sdpa"),
    (False, True, "sdpa"),
    (False, False, "sdpa"),
])
def test_attention_follows_what_is_available(monkeypatch, gpu, flash_importable, expected):
    import sys
    import types

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    # A module set to None in sys.modules makes ``import flash_attn`` raise ImportError.
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn") if flash_importable else None)
    assert attn_implementation() == expected


def test_compatibility_mismatches_name_both_values(tmp_path, processor, student_dir):
    cache = open_cache(str(write_synthetic_cache(tmp_path, processor, n=2, shard_size=2)))
    model, proc = load_student(student_dir)
    check_compatibility(cache.manifest, model, proc, template="chat")  # the fixture pair agrees

    cases = {
        "vocab_size": (512, "cache vocab_size 512 != student vocab_size 400: logit distillation"),
        "tokenizer_hash": ("0123", "cache tokenizer_hash 0123 != student tokenizer_hash"),
        "image_token_id": (7, "cache image_token_id 7 != student image_token_id 3"),
        "template": ("pretrain", "cache template 'pretrain' != stage template 'chat'"),
        "shards": ([dataclasses.replace(cache.manifest.shards[0], max_tokens=10 ** 6)],
                   "the cache's longest sample has 1000000 tokens > student max_position_embeddings"),
    }
    for key, (value, message) in cases.items():
        manifest = dataclasses.replace(cache.manifest, **{key: value})
        with pytest.raises(CompatibilityError) as err:
            check_compatibility(manifest, model, proc, template="chat")
        assert message in str(err.value), (key, str(err.value))
    # A build's --max-length above the student's positions is fine when every cached sample fits.
    longest = cache.manifest.longest_sample
    assert 0 < longest == max(len(s["input_ids"]) for s in cache)
    check_compatibility(dataclasses.replace(cache.manifest, max_length=10 ** 6), model, proc, template="chat")


def test_cli_init_student_and_mismatched_train(parts, tmp_path, processor):
    runner = CliRunner()
    vision_dir, llm_dir = parts
    out = tmp_path / "student"
    res = runner.invoke(app, ["init-student", "--vision", str(vision_dir), "--llm", str(llm_dir), "--out", str(out),
                              "--vision-feature-layer", "-1", "--seed", "5"])
    assert res.exit_code == 0, res.output
    for name in ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "kd_student.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text())["vision_feature_layer"] == -1

    # This student has its own tokenizer: training on a cache of the fixture tokenizer must refuse.
    cache = write_synthetic_cache(tmp_path / "cache", processor, n=2, shard_size=2)
    res = runner.invoke(app, ["train", "--stage", "dft", "--student", str(out), "--cache", str(cache),
                              "--out", str(tmp_path / "run")])
    assert res.exit_code == 2
    n = json.loads((out / "config.json").read_text())["text_config"]["vocab_size"]
    assert f"cache vocab_size 400 != student vocab_size {n}" in res.output
    assert "cache tokenizer_hash" in res.output
    assert not (tmp_path / "run" / "model.safetensors").exists()

    res = runner.invoke(app, ["init-student", "--vision", str(tmp_path / "nope"), "--llm", str(llm_dir),
                              "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "--vision" in res.output and "config.json" in res.output


def test_compose_keeps_a_tokenizer_pipeline_the_llm_type_would_replace(parts, tmp_path):
    """A SentencePiece-style tokenizer ("▁" spaces, byte fallback) saved beside a Qwen2 LM: AutoTokenizer
    alone loads it as Qwen2's byte-level tokenizer over the same vocabulary (other pieces, other offsets,
    the same vocabulary hash); the composed student keeps the pipeline it was saved with."""
    from transformers import AutoProcessor, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from tests.vlm_families import make_tokenizer, other_tokenizer

    vision_dir, _ = parts
    with other_tokenizer():
        tok = make_tokenizer(bos="<s>", eos="</s>", pad="<pad>", chat_template=CHATML_TEMPLATE)
    llm = tmp_path / "llm"
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, intermediate_size=32)).save_pretrained(llm)
    tok.save_pretrained(llm)
    text = " the red circle é"
    assert AutoTokenizer.from_pretrained(llm).tokenize(text) != tok.tokenize(text)  # what the fix is for
    out = compose_student(vision_dir, llm, tmp_path / "student")
    assert AutoProcessor.from_pretrained(out).tokenizer.tokenize(text) == tok.tokenize(text)
