"""Bad input never aborts a build: each bad record is skipped with its reason, through the real CLI.

One build over good records mixed with a table of bad ones (``BAD``) checks that every bad record is
listed under its reason and id, and that the good records are all cached. Errors that concern the
whole data file name the file; a build that skips everything fails with the counts and the ids.
"""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli.kd_cache_cli import app
from kd_cache import open_cache
from kd_cache.records import content_id, decode_image, load_records
from kd_cache.schema import Manifest
from kd_demo import tiny

Q = "<image>\nWhat colour is the shape?"


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (no pixel data): PIL refuses it at open."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _png16(values: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(values.astype(np.uint16)).save(buf, format="PNG")  # mode I;16
    return buf.getvalue()


def _conv(answer="red"):
    return [{"from": "human", "value": Q}, {"from": "gpt", "value": answer}]


# (id in the manifest, reason, the record as written to the JSON list). A record without a usable id
# is listed by its place in the file.
BAD = [
    ("data.json:6", "not_a_record", "just a string"),
    ("turn-str", "bad_turn", {"id": "turn-str", "image": "good.png",
                              "conversations": ["<image> hi", {"from": "gpt", "value": "red"}]}),
    ("surrogate", "invalid_text", {"id": "surrogate", "image": "good.png",
                                   "conversations": [{"from": "human", "value": Q + " \ud800"},
                                                     {"from": "gpt", "value": "red"}]}),
    ("bomb", "image_too_large", {"id": "bomb", "image": "bomb.png", "conversations": _conv()}),
    ("null", "null_text", {"id": "null", "image": "good.png",
                           "conversations": [{"from": "human", "value": Q}, {"from": "gpt", "value": None}]}),
    ("role", "unknown_role", {"id": "role", "image": "good.png",
                              "conversations": [{"from": "narrator", "value": Q}, {"from": "gpt", "value": "red"}]}),
    ("dup", "duplicate_id", {"id": "dup", "image": "good.png", "conversations": _conv("blue")}),
    ("img-int", "bad_image_value", {"id": "img-int", "image": 42, "conversations": _conv()}),
    ("no-conv", "no_conversation_column", {"id": "no-conv", "image": "good.png", "text": "hello"}),
    ("missing", "missing_image", {"id": "missing", "image": "nope.png", "conversations": _conv()}),
    ("broken", "unreadable_image", {"id": "broken", "image": "broken.png", "conversations": _conv()}),
]


@pytest.fixture(scope="module")
def bad_build(teacher_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-input")
    data, images = tiny.make_llava_dataset(root, n=6, seed=3)
    good = json.loads(data.read_text())
    tiny.draw_shapes(images / "good.png", [("circle", "red", "left")])
    (images / "bomb.png").write_bytes(_png_header_only(40000, 40000))
    (images / "broken.png").write_bytes(b"not a png")
    grey = np.full((32, 32), 128 * 257, dtype=np.uint16)  # mid grey in 16 bit
    (images / "grey16.png").write_bytes(_png16(grey))
    long_answer = " ".join(["the shape is red and round"] * 30)
    extra = [
        {"id": "dup", "image": "good.png", "conversations": _conv()},  # first "dup": kept
        {"id": "grey16", "image": "grey16.png", "conversations": _conv("grey")},
        {"image": "good.png", "conversations": _conv("no id")},  # gets a content-derived id
        {"id": "long", "conversations": [{"from": "human", "value": "Describe it."},
                                         {"from": "gpt", "value": long_answer}]},
    ]
    records = good + [rec for _, _, rec in BAD[:1]] + extra + [rec for _, _, rec in BAD[1:]]
    assert records[6] == "just a string"
    data.write_text(json.dumps(records))  # ensure_ascii: the lone surrogate is written as \ud800
    out = root / "cache"
    args = ["build", "--teacher", str(teacher_dir), "--data", str(data), "--image-folder", str(images),
            "--out", str(out), "--device", "cpu", "--no-progress", "--top-k", "4", "--max-length", "120",
            "--max-skip-share", "0.6"]
    res = CliRunner().invoke(app, args)
    return {"res": res, "out": out, "data": data, "images": images, "good": good, "extra": extra}


def test_bad_records_are_skipped_with_their_reason_and_the_build_finishes(bad_build):
    res = bad_build["res"]
    assert res.exit_code == 0, res.output
    m = Manifest.from_json((bad_build["out"] / "manifest.json").read_text())
    listed = {(x.id, x.reason) for x in m.skipped}
    assert listed == {(rid, reason) for rid, reason, _ in BAD}
    # Every good record is cached, plus the first "dup", the 16-bit image, the id-less record and the long one.
    ids = [s["id"] for s in open_cache(str(bad_build["out"]))]
    no_id = [i for i in ids if i.startswith("sha256:")]
    assert len(no_id) == 1
    assert sorted(ids) == sorted([r["id"] for r in bad_build["good"]] + ["dup", "grey16", "long"] + no_id)
    assert m.num_samples == len(bad_build["good"]) + 4
    assert f"skipped {len(BAD)} records" in res.output


def test_skip_details_say_where(bad_build):
    skipped = {}
    for f in sorted((bad_build["out"] / "shards").glob("*.skipped.json")):
        skipped.update({x["id"]: x for x in json.loads(f.read_text())["skipped"]})
    assert "narrator" in skipped["role"]["detail"] and "turn 0" in skipped["role"]["detail"]
    assert "turn 1 value is null" in skipped["null"]["detail"]
    assert "bomb.png" in skipped["bomb"]["detail"]
    assert "surrogate" in skipped["surrogate"]["detail"]
    assert "turn 0 is a str" in skipped["turn-str"]["detail"]


def test_null_value_is_never_the_text_none(bad_build):
    cache = open_cache(str(bad_build["out"]))
    texts = [s["processor_call"]["text"] for s in cache]
    assert not any("None" in t for t in texts)


def test_answer_cut_by_max_length_is_counted(bad_build):
    m = Manifest.from_json((bad_build["out"] / "manifest.json").read_text())
    assert m.truncated == ["long"]
    assert json.loads((bad_build["out"] / "manifest.json").read_text())["truncated_count"] == 1
    sample = next(s for s in open_cache(str(bad_build["out"])) if s["id"] == "long")
    assert len(sample["input_ids"]) == 120


def test_record_without_id_gets_a_content_id_stable_across_reads(bad_build):
    recs = load_records(str(bad_build["data"]))
    no_id = [r for r in recs if r.id.startswith("sha256:")]
    assert len(no_id) == 1 and no_id[0].problem is None
    again = [r for r in load_records(str(bad_build["data"])) if r.id.startswith("sha256:")]
    assert again[0].id == no_id[0].id == content_id(no_id[0].conversations, no_id[0].images)
    # The id follows the content, not the record's place in the file.
    extra = bad_build["extra"][2]
    moved = bad_build["data"].parent / "moved.json"
    moved.write_text(json.dumps([{"id": "x", "conversations": _conv()}, extra]))
    assert [r.id for r in load_records(str(moved))][1] == no_id[0].id


def test_16_bit_png_is_scaled_not_whitened(bad_build):
    data = (bad_build["images"] / "grey16.png").read_bytes()
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    rgb = np.asarray(decode_image(data, "grey16"))
    assert rgb.shape == (32, 32, 3) and (rgb == 128).all()
    ramp = np.arange(0, 65536, 257, dtype=np.uint16).reshape(16, 16)  # 0..65535 in 256 steps
    got = np.asarray(decode_image(_png16(ramp), "ramp"))[..., 0]
    np.testing.assert_array_equal(got, np.arange(256).reshape(16, 16))


def test_jsonl_line_that_does_not_parse_is_one_skip(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"id": "a", "conversations": _conv()}) + "\n{not json\n"
                 + json.dumps({"id": "b", "conversations": _conv()}) + "\n")
    recs = load_records(str(p))
    assert [(r.id, r.problem.reason if r.problem else None) for r in recs] == [
        ("a", None), ("d.jsonl:line2", "invalid_json"), ("b", None)]


@pytest.mark.parametrize("content,expect", [
    (b"\xff\xfe\x00[]", "not UTF-8 text (invalid byte 0xff at byte 0)"),
    (b"", "the file is empty"),
    (b"  \n", "the file is empty"),
])
def test_unreadable_data_files_are_named(teacher_dir, tmp_path, content, expect):
    data = tmp_path / "records.json"
    data.write_bytes(content)
    res = CliRunner().invoke(app, ["build", "--teacher", str(teacher_dir), "--data", str(data), "--out",
                                   str(tmp_path / "c"), "--device", "cpu", "--no-progress"])
    assert res.exit_code != 0
    assert str(data) in res.output and expect in res.output


def test_a_build_that_skips_everything_fails_with_counts_and_ids(teacher_dir, tmp_path):
    data = tmp_path / "msgs.json"
    # A format the tool cannot read as given: the conversation sits in a column it does not know.
    data.write_text(json.dumps([{"id": f"r{i}", "dialogue": [{"role": "user", "content": "Is red a colour?"},
                                                             {"role": "assistant", "content": "yes"}]}
                                for i in range(7)]))
    args = ["build", "--teacher", str(teacher_dir), "--data", str(data), "--device", "cpu", "--no-progress",
            "--max-skip-share", "1", "--top-k", "4"]
    res = CliRunner().invoke(app, args + ["--out", str(tmp_path / "c")])
    assert res.exit_code != 0
    assert "every one of the 7 records was skipped" in res.output
    assert "no_conversation_column: 7" in res.output and "r0" in res.output and "r4" in res.output
    assert "    r5" not in res.output  # the first five ids, not all
    assert not (tmp_path / "c/manifest.json").exists()
    # Mapped to the right column, the same data builds.
    res = CliRunner().invoke(app, args + ["--out", str(tmp_path / "mapped"), "--conversation-column", "dialogue"])
    assert res.exit_code == 0, res.output
    assert [s["id"] for s in open_cache(str(tmp_path / "mapped"))] == [f"r{i}" for i in range(7)]


@pytest.fixture(scope="module")
def paligemma_dir(tmp_path_factory):
    from vlm_families import FAMILIES

    return FAMILIES["paligemma"].build(tmp_path_factory.mktemp("paligemma"))


def test_multi_turn_record_for_a_prefix_lm_is_one_skip(paligemma_dir, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    tiny.draw_shapes(images / "a.png", [("circle", "red", "left")])
    one = {"id": "one", "image": "a.png", "conversations": _conv()}
    two = {"id": "two", "image": "a.png", "conversations": _conv() + [
        {"from": "human", "value": "Where is it?"}, {"from": "gpt", "value": "left"}]}
    data = tmp_path / "d.json"
    data.write_text(json.dumps([one, two, dict(one, id="three")]))
    res = CliRunner().invoke(app, ["build", "--teacher", str(paligemma_dir), "--data", str(data), "--image-folder",
                                   str(images), "--out", str(tmp_path / "c"), "--device", "cpu", "--no-progress",
                                   "--top-k", "4"])
    assert res.exit_code == 0, res.output
    m = Manifest.from_json((tmp_path / "c/manifest.json").read_text())
    assert [(x.id, x.reason) for x in m.skipped] == [("two", "unsupported_conversation")]
    assert m.num_samples == 2
