"""Shared fixtures: tiny real models and datasets, built offline once per session."""

from __future__ import annotations

import os
import warnings

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", message=".*torchvision.*")

from kd_demo import tiny  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped on a machine without a CUDA device (pyproject.toml's marker)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def processor():
    return tiny.build_processor()


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, processor):
    """A tiny SigLIP + Qwen2 LLaVA teacher saved to disk (load it with from_pretrained)."""
    return tiny.build_llava(tmp_path_factory.mktemp("teacher"), processor=processor, seed=0)


@pytest.fixture(scope="session")
def student_dir(tmp_path_factory, processor):
    """A smaller-text student sharing the tokenizer and the vision geometry."""
    sizes = tiny.TinySizes(text_hidden=32, text_heads=2, text_kv_heads=1, text_intermediate=64)
    return tiny.build_llava(tmp_path_factory.mktemp("student"), processor=processor, sizes=sizes, seed=1)


@pytest.fixture(scope="session")
def causal_teacher_dir(tmp_path_factory, processor):
    return tiny.build_causal_lm(tmp_path_factory.mktemp("causal"), tokenizer=processor.tokenizer, seed=2)


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory):
    """(data.json, image folder): 10 two-turn image QA records, every 4th text-only."""
    return tiny.make_llava_dataset(tmp_path_factory.mktemp("chat"), n=10, seed=0, text_only_every=4)


@pytest.fixture(scope="session")
def data7(tmp_path_factory):
    """(data.json, image folder): 7 image QA records, 3 shards of 3 + 3 + 1 at --shard-size 3."""
    return tiny.make_llava_dataset(tmp_path_factory.mktemp("data7"), n=7, seed=5)


@pytest.fixture(scope="session")
def caption_data(tmp_path_factory):
    return tiny.make_llava_dataset(tmp_path_factory.mktemp("caption"), n=8, seed=1, caption=True, fmt="jsonl")


@pytest.fixture(scope="module")
def accelerator():
    """An ``accelerate.Accelerator`` on CPU, for tests that run the trainer's step by hand."""
    from accelerate import Accelerator

    return Accelerator(cpu=True)


@pytest.fixture(scope="session")
def family_builds(tmp_path_factory):
    """What the tests over every family of ``tests/vlm_families.py`` build, once per session:
    ``family_builds(kind, sizes, make)`` returns ``get(name)``, which calls ``make(family, root, images)``
    the first time a family is asked for (``root``: a fresh folder of its own; ``images``: a folder with
    the images ``sizes`` names, drawn once per ``kind``) and returns that result from then on."""
    from transformers.utils import logging

    from tests.vlm_families import FAMILIES, draw_images

    logging.set_verbosity_error()
    kinds: dict[str, object] = {}

    def for_kind(kind: str, sizes: dict, make):
        if kind not in kinds:
            images = draw_images(tmp_path_factory.mktemp(f"{kind}-images"), sizes)
            built: dict[str, object] = {}

            def get(name: str):
                if name not in built:
                    built[name] = make(FAMILIES[name], tmp_path_factory.mktemp(f"{kind}-{name}"), images)
                return built[name]

            kinds[kind] = get
        return kinds[kind]

    return for_kind
