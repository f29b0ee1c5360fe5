"""Record loading and the shared tokenisation: label masks, templates, image expansion, bad records."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from kd_cache.encoding import Encoder
from kd_cache.records import BadRecord, Record, dataset_identity, load_records
from kd_cache.schema import response_positions, visual_positions


@pytest.fixture(scope="module")
def encoder_factory(processor):
    n = processor.image_token_id  # the tiny LLaVA's config and processor name the same token

    def make(template="chat", max_length=512, folder=None):
        return Encoder(processor, template, max_length, folder, n)

    return make


def test_chat_labels_cover_assistant_turns_only(processor, chat_data, encoder_factory):
    enc = encoder_factory(folder=str(chat_data[1]))
    rec = load_records(str(chat_data[0]))[0]
    e = enc.encode(rec)
    tok = processor.tokenizer
    labelled = tok.decode(e.input_ids[e.labels != -100])
    answers = [t["value"] for t in rec.conversations if t["from"] == "gpt"]
    assert labelled == "".join(f"{a}<|im_end|>\n" for a in answers)
    # Labels are the token ids themselves where set (transformers alignment).
    m = e.labels != -100
    np.testing.assert_array_equal(e.labels[m], e.input_ids[m])
    n_img = int((e.input_ids == processor.image_token_id).sum())
    assert n_img == 16 == (32 // 8) ** 2 and e.image_token_counts == [16]
    assert (e.labels[e.input_ids == processor.image_token_id] == -100).all()
    full = tok.decode(e.input_ids)
    assert full.startswith("<|im_start|>user\n<image><image>") and "What colour is the shape?" in full
    np.testing.assert_array_equal(response_positions(e.labels), np.nonzero(m)[0] - 1)
    np.testing.assert_array_equal(visual_positions(e.input_ids, processor.image_token_id),
                                  np.nonzero(e.input_ids == processor.image_token_id)[0])


def test_pretrain_template_labels_caption(processor, caption_data, encoder_factory):
    enc = encoder_factory("pretrain", folder=str(caption_data[1]))
    rec = load_records(str(caption_data[0]))[0]
    e = enc.encode(rec)
    tok = processor.tokenizer
    caption = rec.conversations[-1]["value"]
    assert tok.decode(e.input_ids[e.labels != -100]) == caption + "\n"
    assert tok.decode(e.input_ids) == "<image>" * 16 + caption + "\n"


def test_image_without_tag_goes_first(processor, chat_data, encoder_factory):
    enc = encoder_factory(folder=str(chat_data[1]))
    rec = load_records(str(chat_data[0]))[0]
    no_tag = Record(rec.id, [dict(t, value=t["value"].replace("<image>\n", "")) for t in rec.conversations], rec.images)
    np.testing.assert_array_equal(enc.encode(no_tag).input_ids, enc.encode(rec).input_ids)


@pytest.mark.parametrize("reason,record", [
    ("missing_image", Record("a", [{"from": "human", "value": "<image>hi"}, {"from": "gpt", "value": "red"}], ["none.png"])),
    ("empty_conversation", Record("b", [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "  "}])),
    ("image_tag_count_mismatch", Record("c", [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}], ["x.png"])),
    ("no_assistant_tokens_after_truncation", Record("d", [{"from": "human", "value": "red " * 200}, {"from": "gpt", "value": "x"}])),
])
def test_bad_records_raise_with_reason(encoder_factory, tmp_path, reason, record):
    with pytest.raises(BadRecord) as err:
        encoder_factory(max_length=64, folder=str(tmp_path)).encode(record)
    assert err.value.reason == reason and err.value.record_id == record.id and record.id in str(err.value)


def test_truncation_through_an_image_is_a_bad_record(encoder_factory, chat_data):
    rec = load_records(str(chat_data[0]))[0]
    with pytest.raises(BadRecord) as err:
        encoder_factory(max_length=10, folder=str(chat_data[1])).encode(rec)
    assert err.value.reason == "image_tokens_truncated"


def test_loaders_json_jsonl_datasets_parquet(tmp_path, chat_data):
    import datasets

    recs = json.loads(chat_data[0].read_text())
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in recs))
    rows = [{"id": r["id"], "image": r.get("image", ""), "conversations": r["conversations"]} for r in recs]
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "ds"))
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ref = load_records(str(chat_data[0]))
    for src in (jsonl, tmp_path / "ds", tmp_path / "d.parquet"):
        got = load_records(str(src))
        assert [(r.id, r.images, r.conversations) for r in got] == [(r.id, r.images, r.conversations) for r in ref]
    with pytest.raises(ValueError, match="expected .json"):
        (tmp_path / "x.csv").write_text("a")
        load_records(str(tmp_path / "x.csv"))


def _flip_one_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_dataset_fingerprint_follows_the_bytes_not_the_place(tmp_path, chat_data):
    import datasets

    # A data file: a copy in another folder keeps the fingerprint, one changed byte changes it.
    original = dataset_identity(str(chat_data[0]))["digest"]
    (tmp_path / "elsewhere").mkdir()
    copy = Path(shutil.copy(chat_data[0], tmp_path / "elsewhere"))
    assert dataset_identity(str(copy))["digest"] == original
    _flip_one_byte(copy)
    assert dataset_identity(str(copy))["digest"] != original

    # A dataset directory: the same for a byte in any of its files.
    datasets.Dataset.from_list(json.loads(chat_data[0].read_text())).save_to_disk(str(tmp_path / "ds"))
    original = dataset_identity(str(tmp_path / "ds"))["digest"]
    moved = Path(shutil.copytree(tmp_path / "ds", tmp_path / "elsewhere" / "ds-copy"))
    assert dataset_identity(str(moved))["digest"] == original
    _flip_one_byte(max(moved.rglob("*.arrow")))
    assert dataset_identity(str(moved))["digest"] != original


def test_causal_tokenizer_text_only(processor):
    tok = processor.tokenizer
    enc = Encoder(tok, "chat", 128)
    e = enc.encode(Record("t", [{"from": "human", "value": "Is red a colour?"}, {"from": "gpt", "value": "yes"}]))
    assert tok.decode(e.input_ids[e.labels != -100]) == "yes<|im_end|>\n"
    with pytest.raises(BadRecord, match="image"):
        enc.encode(Record("i", [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}], ["a.png"]))


def test_tiny_dataset_images_exist(chat_data):
    for r in load_records(str(chat_data[0])):
        for im in r.images:
            assert (chat_data[1] / im.path).is_file() and im.data is None
