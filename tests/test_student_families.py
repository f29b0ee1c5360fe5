"""The student side over every family of ``tests/vlm_families.py``: loaded as its own class,
its parts found for DPT/SFT/DFT freezing, one DFT step's losses equal to a dense reference computed from
the model's own logits, and the trained student saved and reloaded as its own class, generating."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from student_fixtures import one_torch_thread  # noqa: F401

from kd_cache.processing import collate, config_image_token_id, encode, is_prefix_lm
from kd_cache.schema import IGNORE_INDEX
from student.distill import DistillStudent, LossSettings
from student.families import FAMILIES as STUDENT_FAMILIES
from student.families import UnsupportedModelError, parameter_parts
from student.model import load_student
from student.stages import RECIPES, Stage, set_trainable, trainable_summary
from tests.vlm_families import FAMILIES

pytest.importorskip("torchvision", reason="the processors of 7 families need torchvision")
from tests.test_families import IMAGES, records  # noqa: E402  (after the torchvision check)

NAMES = list(FAMILIES)


@pytest.fixture(scope="module")
def student_path(tmp_path_factory):
    """name -> the saved tiny student of that family (built once per module)."""
    paths = {}

    def get(name: str):
        if name not in paths:
            out = tmp_path_factory.mktemp(name)
            paths[name] = FAMILIES[name].build(out, student=True)
        return paths[name]

    return get


# ----------------------------------------------------------------------------------------- loading, parts


@pytest.mark.parametrize("name", NAMES)
def test_loaded_as_its_own_class_with_every_parameter_in_one_part(student_path, name):
    model, processor = load_student(student_path(name))
    family = STUDENT_FAMILIES[model.config.model_type]
    assert type(model).__name__ == family.model_class
    parts = parameter_parts(model)  # refuses a parameter no part claims
    assert set(parts) == {n for n, _ in model.named_parameters()}
    groups = {part: {n for n, p in parts.items() if p == part} for part in ("vision", "projector", "llm")}
    assert all(groups.values()), {k: len(v) for k, v in groups.items()}
    # The facts of docs/FAMILIES.md: the vision tower's own attribute, the connector, the LLM and its head.
    vision_attr = {"qwen2_vl": "model.visual.", "qwen2_5_vl": "model.visual.", "qwen3_vl": "model.visual.",
                   "idefics3": "model.vision_model.", "smolvlm": "model.vision_model."}.get(name, "model.vision_tower.")
    assert all(n.startswith(vision_attr) for n in groups["vision"])
    assert all(n.startswith(("model.language_model.", "model.text_model.", "lm_head.")) for n in groups["llm"])
    assert not any(".merger" in n or "deepstack" in n for n in groups["vision"])
    if name.startswith("qwen"):
        assert all(n.startswith(("model.visual.merger.", "model.visual.deepstack_merger_list."))
                   for n in groups["projector"])
    if name.startswith(("llava_next", "llava_onevision")):
        assert "model.image_newline" in groups["projector"]
    if name == "vipllava":
        assert any("projector_layernorm" in n for n in groups["projector"])
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert ("lm_head.weight" in groups["llm"]) != tied  # a tied head is the LLM's input embedding
    summary = trainable_summary(model)
    assert sum(r["parameters"] for r in summary.values()) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_stages_freeze_by_part(student_path, name):
    """DPT trains the projector only (Qwen's merger inside ``visual`` included, the rest of ``visual``
    frozen); SFT/DFT add the LLM; training the vision tower too finds the parameters its features use."""
    model, _ = load_student(student_path(name))
    parts = parameter_parts(model)
    trained = set(set_trainable(model, RECIPES[Stage.DPT].train_modules))
    assert trained == {n for n, p in parts.items() if p == "projector"}
    if name.startswith("qwen"):
        assert any(n.startswith("model.visual.merger.") for n in trained)
        assert not any(n.startswith("model.visual.blocks.") for n in trained)
    trained = set(set_trainable(model, RECIPES[Stage.DFT].train_modules))
    assert trained == {n for n, p in parts.items() if p in ("projector", "llm")}
    trained = set(set_trainable(model, ("vision", "projector", "llm")))
    assert {n for n in trained if parts[n] == "vision"}, "no vision parameter trains"


def test_unsupported_families_are_refused_with_the_supported_list(tmp_path, student_path, monkeypatch):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, intermediate_size=32)).save_pretrained(tmp_path / "lm")
    with pytest.raises(UnsupportedModelError, match=r"'qwen2' model.*supported student families.*Qwen2\.5-VL "
                                                    r"\(qwen2_5_vl\).*Mistral3"):
        load_student(tmp_path / "lm")
    # A family whose layout the table misses is refused naming the parameters no part claims.
    model, _ = load_student(student_path("llava"))
    import student.families as fam

    monkeypatch.setitem(fam.FAMILIES, "llava", dataclasses.replace(fam.FAMILIES["llava"], projector=()))
    with pytest.raises(UnsupportedModelError, match=r"belong to none of vision/projector/llm.*"
                                                    r"model\.multi_modal_projector\.linear_1\.weight"):
        parameter_parts(model)


# --------------------------------------------------------------------------------- one DFT step vs dense


def _teacher(P: int, V: int, k: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Top-k ids, their log-probs and the log tail mass of a random teacher distribution per row."""
    logp = torch.log_softmax(3.0 * torch.randn(P, V, generator=g), -1)
    lp, ids = logp.topk(k, -1)
    tail = torch.log1p(-lp.exp().sum(-1).clamp_max(1 - 1e-6))
    return {"ids": ids, "logprobs": lp, "tail": tail}


def family_batch(model, processor, name: str, k: int = 4, seed: int = 0) -> dict:
    """A collated training batch of the three image records of ``tests/test_families.py`` (images of different
    sizes; one sample with two images): ``model_inputs`` from ``kd_cache.processing.encode``/``collate``,
    response/visual positions, synthetic teacher arrays, and one relation target per image at its own size
    (``relation_index`` -1 padded to the largest image)."""
    tid = config_image_token_id(model.config)
    encs = [encode(processor, tid, conv, imgs) for conv, imgs in records(FAMILIES[name].chat)]
    inputs = collate(encs, processor.tokenizer.pad_token_id)
    B, T = inputs["input_ids"].shape
    resp, targets, vis, images = [], [], [], []
    for b, e in enumerate(encs):
        pos = np.nonzero(e.labels[1:] != IGNORE_INDEX)[0]  # the logits at t predict the token at t + 1
        resp.append(b * T + pos)
        targets.append(e.labels[pos + 1])
        vis.extend(b * T + p for p in e.visual_positions)
        images.extend(b * T + p for p in e.visual_positions)
    g = torch.Generator().manual_seed(seed)
    V = model.get_output_embeddings().weight.shape[0]
    batch = {"model_inputs": inputs, "input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
             "response_index": torch.from_numpy(np.concatenate(resp)),
             "response_targets": torch.from_numpy(np.concatenate(targets)),
             "visual_index": torch.from_numpy(np.concatenate(vis))}
    for kind in ("response", "visual"):
        for key, value in _teacher(len(batch[f"{kind}_index"]), V, k, g).items():
            batch[f"{kind}_{key}"] = value
    n_max = max(len(i) for i in images)
    rel_index = torch.full((len(images), n_max), -1, dtype=torch.long)
    rel_target = torch.zeros(len(images), n_max, n_max)
    for r, idx in enumerate(images):
        rel_index[r, :len(idx)] = torch.from_numpy(idx)
        h = torch.randn(len(idx), 8, generator=g)
        rel_target[r, :len(idx), :len(idx)] = h @ h.T
    batch["relation_index"], batch["relation_target"] = rel_index, rel_target
    return batch


def dense_reference(logits: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
    """The step's loss sums from full-vocabulary logits [B, T, V]: CE at response positions, forward KL over the
    k stored ids + one tail bin at response/visual positions, RDist (1 - cos of Z Z^T) per image."""
    z = logits.float().reshape(-1, logits.shape[-1])
    out = {"ce_sum": F.cross_entropy(z[batch["response_index"]], batch["response_targets"], reduction="sum")}
    for kind in ("response", "visual"):
        log_q = torch.log_softmax(z[batch[f"{kind}_index"]], -1)
        ids, lp, tail = batch[f"{kind}_ids"], batch[f"{kind}_logprobs"], batch[f"{kind}_tail"]
        q_tail = torch.log1p(-log_q.gather(-1, ids).exp().sum(-1).clamp_max(1 - 1e-7))
        p = torch.cat([lp, tail[:, None]], -1)
        q = torch.cat([log_q.gather(-1, ids), q_tail[:, None]], -1)
        out[f"mdist_{kind}_sum"] = (p.exp() * (p - q)).sum()
    rdist = []
    for idx, target in zip(batch["relation_index"], batch["relation_target"]):
        n = int((idx >= 0).sum())
        zi = z[idx[:n]]
        rdist.append(1 - F.cosine_similarity((zi @ zi.T).flatten(), target[:n, :n].flatten(), dim=0))
    out["rdist_sum"] = torch.stack(rdist).sum()
    return out


def _generation_inputs(processor, name: str) -> dict:
    image = IMAGES["wide"]
    if is_prefix_lm(processor):
        return processor(text=processor.image_token + "What colour?", images=[image], return_tensors="pt")
    msgs = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What colour?"}]}]
    return processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt")


@pytest.mark.parametrize("name", NAMES)
def test_dft_step_equals_the_dense_reference_and_the_student_reloads(student_path, name, tmp_path):
    from transformers import AutoModelForImageTextToText

    model, processor = load_student(student_path(name))
    model.eval()  # no dropout: the two sides see the same network
    set_trainable(model, RECIPES[Stage.DFT].train_modules)
    batch = family_batch(model, processor, name)
    assert len(set(int((i >= 0).sum()) for i in batch["relation_index"])) > 1 or name in (
        "llava", "vipllava", "gemma3", "paligemma"), "images of different sizes give different counts"

    student = DistillStudent(model, LossSettings())
    sums = student(batch)
    ref = dense_reference(model(**batch["model_inputs"]).logits, batch)
    for key, value in ref.items():
        torch.testing.assert_close(sums[key], value, rtol=2e-4, atol=2e-5, msg=lambda m, k=key: f"{name} {k}: {m}")

    # One update, then the final save (save_pretrained of the model itself, as kd-train's save_final does).
    total = sum(sums[k] for k in ref)
    total.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 1e-2 * p.grad
    model.save_pretrained(tmp_path / "out")
    processor.save_pretrained(tmp_path / "out")

    family = STUDENT_FAMILIES[model.config.model_type]
    again = AutoModelForImageTextToText.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(again).__name__ == family.model_class and again.config.model_type == model.config.model_type
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    enc = _generation_inputs(processor, name)
    out = again.generate(**enc, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == enc["input_ids"].shape[1] + 3


@pytest.mark.parametrize("name", NAMES)
def test_text_only_batch_reaches_every_trainable_vision_and_projector_parameter(student_path, name):
    """A micro-batch without images runs a zero-weighted blank image through vision tower and projector, so
    every trainable parameter gets a gradient (DDP) in every family."""
    model, processor = load_student(student_path(name))
    trained = set(set_trainable(model, ("vision", "projector", "llm")))
    conv = [{"role": "user", "content": "Say a colour."}, {"role": "assistant", "content": "red"}]
    if is_prefix_lm(processor):  # PaliGemma's processor takes no text-only sample: its tokenizer, all causal
        ids = processor.tokenizer("Say a colour. red", return_tensors="pt")["input_ids"]
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.ones_like(ids)}
        labels = ids[0].numpy()
    else:
        enc = encode(processor, config_image_token_id(model.config), conv, [])
        inputs, labels = collate([enc], processor.tokenizer.pad_token_id), enc.labels
    pos = np.nonzero(labels[1:] != IGNORE_INDEX)[0]
    batch = {"model_inputs": inputs, "input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
             "response_index": torch.from_numpy(pos), "response_targets": torch.from_numpy(labels[pos + 1]),
             "visual_index": torch.zeros(0, dtype=torch.long)}
    sums = DistillStudent(model, LossSettings(distill=False))(batch)
    sum(sums.values()).backward()
    missing = sorted(n for n, p in model.named_parameters() if n in trained and p.grad is None)
    assert not missing, missing[:5]


def test_vipllava_keeps_its_projector_layernorm(student_path):
    from transformers import VipLlavaForConditionalGeneration

    path = student_path("vipllava")
    model, processor = load_student(path)
    reference = VipLlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    assert isinstance(model, VipLlavaForConditionalGeneration) and model.config.model_type == "vipllava"
    assert torch.equal(model.model.multi_modal_projector.projector_layernorm.weight,
                       reference.model.multi_modal_projector.projector_layernorm.weight)


@pytest.mark.parametrize("name", NAMES)
def test_lora_dft_step_saves_as_adapter_and_merged_model(student_path, name, tmp_path):
    """A LoRA student of every family (``student.lora``): one DFT step reaches the adapters and the projector
    only, and the adapter (peft's format) and the merged model (its own class, plain transformers) give the
    trained model's logits."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from student.lora import add_adapters, load_merged

    model, processor = load_student(student_path(name))
    model.eval()
    adapter = add_adapters(model, RECIPES[Stage.DFT].train_modules, r=2, alpha=4.0, dropout=0.0,
                           base=str(student_path(name)))
    batch = family_batch(model, processor, name)
    sums = DistillStudent(model, LossSettings())(batch)
    sum(sums.values()).backward()
    parts = parameter_parts(model)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trained
    assert {parts[n] for n in trained if ".lora_" in n} == {"llm"}
    assert {parts[n] for n in trained if ".lora_" not in n} <= {"projector"}
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.5 * p.grad
        logits = model(**batch["model_inputs"]).logits
    adapter.save_pretrained(tmp_path / "adapter")
    load_merged(tmp_path / "adapter").save_pretrained(tmp_path / "merged")

    family = STUDENT_FAMILIES[model.config.model_type]
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert type(merged).__name__ == family.model_class
    base = AutoModelForImageTextToText.from_pretrained(student_path(name), dtype=torch.float32).eval()
    with torch.no_grad():
        assert (base(**batch["model_inputs"]).logits - logits).abs().max() > 1e-4  # the step changed the model
        on_base = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()  # injects into base
        torch.testing.assert_close(merged(**batch["model_inputs"]).logits, logits, rtol=1e-4, atol=5e-5)
        torch.testing.assert_close(on_base(**batch["model_inputs"]).logits, logits, rtol=1e-4, atol=1e-5)
