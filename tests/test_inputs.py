"""Data as users have it: every accepted input shape builds the same cache as its LLaVA-format equivalent.

Fixtures copy the published schemas (built locally, nothing downloaded):

* ``HuggingFaceH4/llava-instruct-mix-vsft``: ``messages: [{role, content: [{index, text, type}]}]``,
  ``images: Sequence(Image)`` (TRL's role/content format with embedded images);
* ``trl-lib/llava-instruct-mix``: ``images`` + conversational ``prompt`` / ``completion``;
* ``HuggingFaceM4/the_cauldron``: ``images: Sequence(Image)``, ``texts: [{user, assistant, source}]``,
  one subset (config) per source dataset: read as a Hub repo (``--subset``, ``--split``);
* ``lmms-lab/LLaVA-OneVision-Data``: ``id``, ``image: Image``, ``conversations: [{from, value}]``,
  ``data_source`` (a ``save_to_disk`` dataset here);
* LLaMA-Factory's ShareGPT: ``messages: [{role, content}]`` with ``<image>`` tags and ``images`` paths (JSONL).

A Hub dataset id is read by ``datasets.load_dataset(id, subset, split=...)``; the test points it at a
local folder laid out as a Hub dataset repository (``README.md`` configs + parquet files), which
``load_dataset`` resolves exactly as it resolves a downloaded repository.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cli.kd_cache_cli import app
from kd_cache import open_cache
from kd_cache.records import ImageRef, load_records, to_record
from kd_cache.report import format_report, inspect_cache
from student.stream import StreamingKDDataset

# Three images: a PNG, a JPEG (stored as its own bytes, never re-encoded) and a second PNG.
COLOURS = {"a.png": "red", "b.jpg": "blue", "c.png": "green"}
Q1, Q2 = "What colour is the shape?", "Compare the two images."
RECORDS = [  # id, image names, user text, answer
    ("one", ["a.png"], Q1, "red"),
    ("jpeg", ["b.jpg"], Q1, "blue"),
    ("two", ["a.png", "c.png"], Q2, "the first is red, the second is green."),
]


def _encode(name: str) -> bytes:
    img = Image.new("RGB", (40, 28) if name != "c.png" else (24, 36), "white")
    from PIL import ImageDraw

    ImageDraw.Draw(img).ellipse([6, 6, 20, 20], fill=COLOURS[name])
    buf = io.BytesIO()
    img.save(buf, format="JPEG" if name.endswith(".jpg") else "PNG", quality=80)
    return buf.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    (root / "images").mkdir()
    blobs = {name: _encode(name) for name in COLOURS}
    for name, b in blobs.items():
        (root / "images" / name).write_bytes(b)
    return {"root": root, "images": root / "images", "blobs": blobs}


def _llava(tag_sep: str) -> list[dict]:
    """The LLaVA-format equivalent (image paths; ``tag_sep`` follows each ``<image>`` tag)."""
    return [{"id": rid, "image": names, "conversations": [
        {"from": "human", "value": "".join(f"<image>{tag_sep}" for _ in names) + q}, {"from": "gpt", "value": a}]}
        for rid, names, q, a in RECORDS]


def _embedded(names, blobs):
    return [{"bytes": blobs[n], "path": None} for n in names]


def _write_trl_vsft(root: Path, blobs) -> Path:
    """HuggingFaceH4/llava-instruct-mix-vsft: parquet, messages with typed parts, images embedded."""
    import datasets

    rows = {"messages": [], "images": []}
    for _rid, names, q, a in RECORDS:
        parts = [{"index": i, "text": None, "type": "image"} for i in range(len(names))]
        parts.append({"index": None, "text": q, "type": "text"})
        rows["messages"].append([{"role": "user", "content": parts},
                                 {"role": "assistant", "content": [{"index": None, "text": a, "type": "text"}]}])
        rows["images"].append(_embedded(names, blobs))
    feats = datasets.Features({
        "messages": [{"content": [{"index": datasets.Value("int64"), "text": datasets.Value("string"),
                                   "type": datasets.Value("string")}], "role": datasets.Value("string")}],
        "images": datasets.Sequence(datasets.Image())})
    path = root / "vsft.parquet"
    datasets.Dataset.from_dict(rows, features=feats).to_parquet(str(path))
    return path


def _write_trl_prompt_completion(root: Path, blobs) -> Path:
    """trl-lib/llava-instruct-mix: images + conversational prompt / completion."""
    import datasets

    rows = {"images": [], "prompt": [], "completion": []}
    for _rid, names, q, a in RECORDS:
        parts = [{"type": "image", "text": None}] * len(names) + [{"type": "text", "text": q}]
        rows["images"].append(_embedded(names, blobs))
        rows["prompt"].append([{"role": "user", "content": parts}])
        rows["completion"].append([{"role": "assistant", "content": [{"type": "text", "text": a}]}])
    feats = datasets.Features({
        "images": datasets.Sequence(datasets.Image()),
        "prompt": [{"role": datasets.Value("string"),
                    "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}]}],
        "completion": [{"role": datasets.Value("string"),
                        "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}]}]})
    out = root / "trl-pc"
    datasets.Dataset.from_dict(rows, features=feats).save_to_disk(str(out))
    return out


def _write_cauldron_repo(root: Path, blobs) -> Path:
    """HuggingFaceM4/the_cauldron as a Hub repository: one config per source, ``train`` split parquet."""
    import datasets

    repo = root / "the_cauldron"
    feats = datasets.Features({"images": datasets.Sequence(datasets.Image()),
                               "texts": [{"user": datasets.Value("string"), "assistant": datasets.Value("string"),
                                          "source": datasets.Value("string")}]})
    for subset, recs in (("shapes", RECORDS), ("other", RECORDS[:1])):
        rows = {"images": [_embedded(names, blobs) for _, names, _, _ in recs],
                "texts": [[{"user": q, "assistant": a, "source": subset}] for _, _, q, a in recs]}
        (repo / subset).mkdir(parents=True)
        datasets.Dataset.from_dict(rows, features=feats).to_parquet(str(repo / subset / "train-00000-of-00001.parquet"))
    (repo / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: shapes\n  data_files:\n  - split: train\n    path: shapes/train-*\n"
        "- config_name: other\n  data_files:\n  - split: train\n    path: other/train-*\n---\n")
    return repo


def _write_onevision(root: Path, blobs) -> Path:
    """lmms-lab/LLaVA-OneVision-Data: id, image (one Image), conversations, data_source; save_to_disk."""
    import datasets

    recs = [r for r in RECORDS if len(r[1]) == 1]
    rows = {"id": [r[0] for r in recs], "image": [_embedded(r[1], blobs)[0] for r in recs],
            "conversations": [[{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]
                              for _, _, q, a in recs],
            "data_source": ["shapes"] * len(recs)}
    feats = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                               "conversations": [{"from": datasets.Value("string"), "value": datasets.Value("string")}],
                               "data_source": datasets.Value("string")})
    out = root / "onevision"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=feats)}).save_to_disk(str(out))
    return out


def _write_sharegpt(root: Path) -> Path:
    """LLaMA-Factory ShareGPT: messages with <image> tags in string content, image paths (JSONL)."""
    path = root / "sharegpt.jsonl"
    path.write_text("".join(json.dumps({"id": rid, "messages": [
        {"role": "user", "content": "<image>" * len(names) + q}, {"role": "assistant", "content": a}],
        "images": names}) + "\n" for rid, names, q, a in RECORDS))
    return path


def _build(teacher_dir, data, out, *extra) -> list[dict]:
    args = ["build", "--teacher", str(teacher_dir), "--data", str(data), "--out", str(out), "--device", "cpu",
            "--no-progress", "--top-k", "4", *extra]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    return list(open_cache(str(out)))


@pytest.fixture(scope="module")
def reference(teacher_dir, files):
    """The LLaVA-format caches (image paths), one per tag separator."""
    out = {}
    for sep in ("", "\n"):
        data = files["root"] / f"llava{len(sep)}.json"
        data.write_text(json.dumps(_llava(sep)))
        out[sep] = _build(teacher_dir, data, files["root"] / f"ref{len(sep)}", "--image-folder", str(files["images"]))
    return out


def _assert_same(samples, ref, blobs, ids=None):
    by_id = {s["id"]: s for s in ref}
    assert len(samples) == len(ids or ref)
    for s, rid in zip(samples, ids or [s["id"] for s in samples]):
        r = by_id[rid]
        np.testing.assert_array_equal(s["input_ids"], r["input_ids"])
        np.testing.assert_array_equal(s["response_ids"], r["response_ids"])
        np.testing.assert_array_equal(s["response_logprobs"], r["response_logprobs"])
        np.testing.assert_array_equal(s["visual_logprobs"], r["visual_logprobs"])
        names = dict(zip([x[0] for x in RECORDS], [x[1] for x in RECORDS]))[rid]
        # The original encoded bytes, not a re-encoding (the JPEG included).
        assert s["image_bytes"] == [blobs[n] for n in names]


@pytest.mark.parametrize("shape", ["trl_vsft_parquet", "trl_prompt_completion_saved", "onevision_saved"])
def test_embedded_shapes_equal_the_llava_reference(shape, teacher_dir, files, reference, tmp_path):
    blobs = files["blobs"]
    data, sep, ids = {
        "trl_vsft_parquet": (lambda: _write_trl_vsft(tmp_path, blobs), "", None),
        "trl_prompt_completion_saved": (lambda: _write_trl_prompt_completion(tmp_path, blobs), "", None),
        "onevision_saved": (lambda: _write_onevision(tmp_path, blobs), "\n", ["one", "jpeg"]),
    }[shape]
    samples = _build(teacher_dir, data(), tmp_path / "c")
    if ids is None:  # no id column: content-derived ids; the cache keeps the input order
        assert all(s["id"].startswith("sha256:") for s in samples)
        ids = [r[0] for r in RECORDS]
    _assert_same(samples, reference[sep], blobs, ids)


def test_hub_repository_with_subset_split_and_streaming(teacher_dir, files, reference, tmp_path):
    repo = _write_cauldron_repo(tmp_path, files["blobs"])
    ids = [r[0] for r in RECORDS]
    for streaming in ([], ["--streaming"]):
        samples = _build(teacher_dir, repo, tmp_path / f"c{len(streaming)}", "--subset", "shapes", "--split", "train",
                         *streaming)
        _assert_same(samples, reference["\n"], files["blobs"], ids)
    other = _build(teacher_dir, repo, tmp_path / "other", "--subset", "other")
    assert len(other) == 1
    res = CliRunner().invoke(app, ["build", "--teacher", str(teacher_dir), "--data", str(repo), "--subset", "shapes",
                                   "--split", "validation", "--out", str(tmp_path / "v"), "--device", "cpu"])
    assert res.exit_code != 0 and "validation" in res.output


def test_sharegpt_paths_with_and_without_store_images(teacher_dir, files, reference, tmp_path):
    data = _write_sharegpt(tmp_path)
    by_path = _build(teacher_dir, data, tmp_path / "paths", "--image-folder", str(files["images"]))
    assert all(s["image_bytes"] == [None] * len(s["images"]) for s in by_path)
    stored = _build(teacher_dir, data, tmp_path / "stored", "--image-folder", str(files["images"]), "--store-images")
    _assert_same(stored, reference[""], files["blobs"])
    assert [s["images"] for s in stored] == [s["images"] for s in by_path] == [r[1] for r in RECORDS]
    text = format_report(inspect_cache(str(tmp_path / "stored"), shard=0))
    assert "stored" in text and "(a.png)" in text
    assert "path a.png" in format_report(inspect_cache(str(tmp_path / "paths"), shard=0))


def test_trainer_reads_stored_images_without_an_image_folder(teacher_dir, files, reference, processor, tmp_path):
    """A self-contained cache trains with no image folder: the stream's model inputs equal those of the
    path cache read from the folder."""
    stored = tmp_path / "stored"
    _build(teacher_dir, _write_trl_vsft(tmp_path, files["blobs"]), stored)
    ref_url = str(files["root"] / "ref0")

    def batch(url, folder):
        ds = StreamingKDDataset(url, processor, image_folder=folder, batch_size=3, shuffle=False)
        return ds.collate([ds._read(i) for i in range(3)])

    got, want = batch(str(stored), None), batch(ref_url, str(files["images"]))
    assert "pixel_values" in want["model_inputs"] and sorted(got["model_inputs"]) == sorted(want["model_inputs"])
    for key, v in want["model_inputs"].items():
        assert torch.equal(got["model_inputs"][key], v), key


def test_row_values_become_image_refs(files):
    blobs = files["blobs"]
    pil = Image.open(io.BytesIO(blobs["a.png"]))
    rec = to_record({"messages": [{"role": "user", "content": [{"type": "image", "image": pil},
                                                               {"type": "text", "text": "hi"}]},
                                  {"role": "assistant", "content": "red"}],
                     "images": [blobs["b.jpg"], {"bytes": None, "path": "c.png"}]}, "row:0")
    assert rec.problem is None and rec.conversations[0]["value"] == "<image>hi"
    assert rec.images[0] == ImageRef("", blobs["b.jpg"]) and rec.images[1] == ImageRef("c.png")
    png = rec.images[2].data  # a PIL image: encoded losslessly
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), np.asarray(pil.convert(pil.mode)))


def test_content_ids_differ_with_the_image_bytes(files):
    blobs = files["blobs"]
    conv = [{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "a"}]
    a = to_record({"messages": conv, "images": [blobs["a.png"]]}, "r:0")
    b = to_record({"messages": conv, "images": [blobs["c.png"]]}, "r:0")
    assert a.id != b.id and a.id == to_record({"messages": conv, "images": [blobs["a.png"]]}, "r:9").id
    assert hashlib.sha256(blobs["a.png"]).hexdigest()[:16] == a.images[0].digest()
    assert len(load_records(str(_write_sharegpt(files["root"])))) == len(RECORDS)


def test_parquet_glob_and_a_missing_dataset(files, tmp_path):
    import shutil

    first = _write_trl_vsft(tmp_path, files["blobs"])
    (tmp_path / "parts").mkdir()
    shutil.copy(first, tmp_path / "parts" / "train-00000-of-00002.parquet")
    shutil.copy(first, tmp_path / "parts" / "train-00001-of-00002.parquet")
    recs = load_records(str(tmp_path / "parts" / "train-*.parquet"))
    assert len(recs) == 2 * len(RECORDS)
    # the two copies hold the same content: the second copy's records are duplicates of the first's
    assert [r.problem.reason for r in recs[len(RECORDS):]] == ["duplicate_id"] * len(RECORDS)
    with pytest.raises(FileNotFoundError, match="no-such-dataset-dir"):
        load_records(str(tmp_path / "no-such-dataset-dir" / "x.parquet"))
    with pytest.raises(ValueError, match="cannot load it as a dataset"):
        load_records(str(tmp_path / "parts" / "nothing-*.parquet"))
