"""A teacher cache distilled into a student of another family: another tokenizer (a SentencePiece-style
BPE with byte fallback against the teacher's byte-level BPE), another chat template and another image
grid, through the real commands' code: ``kd-cache build`` (chat and caption caches), ``kd-train`` DPT and
DFT (the alignment detected on its own, printed, recorded in ``trainer_state.json``, the aligned share in
``metrics.jsonl``), the student saved as its own class. And the pairs that cannot work, refused before
step 1 naming what differs.
"""

from __future__ import annotations

import json
import warnings

import pytest

from kd_cache.build import build_cache
from kd_cache.build_config import BuildConfig
from kd_cache.families import FAMILIES as REGISTRY
from tests.test_family_cache import SIZES, _records
from tests.vlm_families import FAMILIES, draw_images, other_tokenizer

pytest.importorskip("torchvision", reason="the processors of 7 families need torchvision")
warnings.filterwarnings("ignore", message=".*slow image processor.*")

PAIRS = [("llava", "idefics3"), ("qwen2_5_vl", "internvl"), ("gemma3", "llava_onevision"), ("smolvlm", "qwen2_vl")]


def _build(teacher, data, out, images, **kw) -> str:
    build_cache(BuildConfig(teacher=str(teacher), data=str(data), out=str(out), image_folder=str(images), top_k=8,
                            batch_size=4, device="cpu", dtype="float32", progress=False, strict=True, **kw))
    return str(out)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return draw_images(tmp_path_factory.mktemp("cross-images"), SIZES)


@pytest.fixture(scope="module")
def pair(tmp_path_factory, images):
    """pair(teacher, student, other_tok=True) -> dict(teacher, student, chat, caption, root), built once each."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    built: dict = {}

    def get(t: str, s: str, other_tok: bool = True) -> dict:
        key = (t, s, other_tok)
        if key not in built:
            root = tmp_path_factory.mktemp(f"{t}-{s}")
            teacher = FAMILIES[t].build(root / "teacher")
            if other_tok:
                with other_tokenizer():
                    student = FAMILIES[s].build(root / "student", student=True)
            else:
                student = FAMILIES[s].build(root / "student", student=True)
            (root / "chat.json").write_text(json.dumps(_records(True)))
            (root / "caption.json").write_text(json.dumps(_records(False)))
            built[key] = {"teacher": teacher, "student": student, "root": root,
                          "chat": _build(teacher, root / "chat.json", root / "chat-cache", images)}
            if FAMILIES[t].chat:
                built[key]["caption"] = _build(teacher, root / "caption.json", root / "caption-cache", images,
                                               template="pretrain")
        return built[key]

    return get


def _train(cache: str, student, out, stage: str, **kw) -> dict:
    from student.config import TrainConfig
    from student.train import train

    return train(TrainConfig(stage=stage, student=str(student), cache=cache, out=str(out), max_steps=2, batch_size=2,
                             progress=False, **kw))


@pytest.mark.parametrize("t,s", PAIRS, ids=[f"{t}->{s}" for t, s in PAIRS])
def test_dpt_then_dft_into_a_student_of_another_family(pair, t, s, capsys):
    """DPT on the caption cache, then DFT on the chat cache: the alignment is detected and printed, every
    loss term is finite and has items (response groups, visual positions, relation matrices), the share of
    aligned answer positions is logged, and the final student is its own family's class."""
    from transformers import AutoConfig, AutoTokenizer

    from kd_cache.fingerprint import tokenizer_hash

    p = pair(t, s)
    t_tok, s_tok = AutoTokenizer.from_pretrained(p["teacher"]), AutoTokenizer.from_pretrained(p["student"])
    assert tokenizer_hash(t_tok) != tokenizer_hash(s_tok)  # really another tokenizer
    dpt = _train(p["caption"], p["student"], p["root"] / "dpt", "dpt")
    dft = _train(p["chat"], p["root"] / "dpt", p["root"] / "dft", "dft")
    printed = capsys.readouterr().out
    assert printed.count("alignment with the teacher cache: response: byte spans, projected vocabulary (GOLD)") == 2
    for res, out in ((dpt, "dpt"), (dft, "dft")):
        m = res["metrics"]
        state = json.loads((p["root"] / out / "trainer_state.json").read_text())
        assert state["alignment"]["cross"] and state["alignment"]["text"] == "byte spans, projected vocabulary (GOLD)"
        assert state["alignment"]["visual"] == "overlap" and 0 < state["alignment"]["teacher_ids_mapped"] < 1
        lines = [json.loads(x) for x in (p["root"] / out / "metrics.jsonl").read_text().splitlines()]
        assert all(0.0 < x["aligned_share"] <= 1.0 for x in lines), lines
        assert m["positions"]["mdist_response"] > 0 and m["positions"]["mdist_visual"] > 0 and m["positions"]["rdist"] > 0
        for term in ("ce", "mdist_response", "mdist_visual", "rdist"):
            assert m[term] is not None and m[term] == m[term] and abs(m[term]) < 1e4, (out, term, m)
    config = AutoConfig.from_pretrained(p["root"] / "dft")
    assert config.model_type == s and config.architectures == [REGISTRY[s].model_class], config.architectures


def test_hungarian_visual_alignment(pair):
    """``--visual-alignment hungarian`` (a one-to-one matching of visual tokens) trains and is recorded."""
    p = pair("llava", "idefics3")
    _train(p["chat"], p["student"], p["root"] / "hungarian", "dft", visual_alignment="hungarian")
    state = json.loads((p["root"] / "hungarian" / "trainer_state.json").read_text())
    assert state["alignment"]["visual"] == "hungarian"


def test_same_tokenizer_other_template_and_grid(pair):
    """Same vocabulary, another family's template and image grid: aligned with the identity projection."""
    p = pair("llava", "qwen2_vl", other_tok=False)
    res = _train(p["chat"], p["student"], p["root"] / "same-vocab", "dft")
    state = json.loads((p["root"] / "same-vocab" / "trainer_state.json").read_text())
    assert state["alignment"]["text"] == "byte spans, same vocabulary"
    assert state["alignment"]["teacher_ids_mapped"] == 1.0
    # one tokenizer, but not one tokenisation: LLaVA's prompt ends in a space that its first answer token
    # carries (" red"), Qwen's in a newline ("red"), and the end-of-turn markers differ in number
    assert 0.0 < res["metrics"]["aligned_share"] < 1.0


def test_refused_before_step_1(pair, images, tmp_path):
    """Pairs that cannot work stop before step 1 (no metrics written), naming what differs (the
    vocabularies first, then why the alignment cannot bridge them)."""
    from kd_cache.errors import UserError

    p = pair("llava", "idefics3")
    # a sampled cache: the teacher mass of ids the projection cannot map is unknown from draws
    sampled = _build(p["teacher"], p["root"] / "chat.json", tmp_path / "sampled", images, sparse="sample", samples=8)
    with pytest.raises(UserError, match=r"(?s)tokenizer_hash .*cannot align .*sampled teacher tokens .*--sparse topk"):
        _train(sampled, p["student"], tmp_path / "o1", "dft")
    assert not (tmp_path / "o1" / "metrics.jsonl").exists()
    # a student without a chat template (PaliGemma: one prompt, one answer) given a multi-turn chat cache
    pali = tmp_path / "pali"
    with other_tokenizer():
        FAMILIES["paligemma"].build(pali, student=True)
    with pytest.raises(UserError, match=r"two-turns.*cannot encode the cached conversation"):
        _train(p["chat"], pali, tmp_path / "o2", "dft")
    # an option the alignment cannot serve
    with pytest.raises(ValueError, match=r"prompt tokens of two templates differ"):
        _train(p["chat"], p["student"], tmp_path / "o3", "dft", positions="response,visual,prompt")
    # --alignment same: today's path, which refuses another tokenizer as before
    with pytest.raises(Exception, match=r"tokenizer"):
        _train(p["chat"], p["student"], tmp_path / "o4", "dft", alignment="same")


def test_loader_workers_give_the_same_steps(pair):
    """The aligned stream in DataLoader workers (the pairing pickled into each) gives the same losses."""
    p = pair("llava", "idefics3")
    got = [_train(p["chat"], p["student"], p["root"] / f"workers-{n}", "dft", num_workers=n)["metrics"] for n in (0, 2)]
    for key in ("loss", "ce", "mdist_response", "mdist_visual", "rdist", "aligned_share"):
        assert got[0][key] == got[1][key], key
