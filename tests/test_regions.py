"""``kd_cache.regions`` on the tiny model of every family (``tests/vlm_families.py``).

* The boxes: one per visual position of each image (the processor's count), inside the image, and the
  views of an image (a grid of tiles, a global view) each tile their part of it.
* Occlusion, checked by the model itself: with the vision tower's attention outputs zeroed (a forward
  hook; what remains per token, patch embedding, MLPs, norms, merges / pixel shuffle / pooling and the
  projector, sees only its own pixels), paint a rectangle of the original image with noise and take
  the features the model places at its image-token positions (the language model's ``inputs_embeds``).
  The tokens whose features change must be those whose boxes meet the rectangle: every token whose box
  overlaps it by more than the resampling blur changes, and none changes whose box stays further away.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from kd_cache import processing
from kd_cache.families import FAMILIES as REGISTRY
from kd_cache.families import RegionLayout
from kd_cache.processing import config_image_token_id
from kd_cache.regions import image_regions

pytest.importorskip("torchvision", reason="the processors of 7 families need torchvision")
warnings.filterwarnings("ignore", message=".*slow image processor.*")

# Different aspect ratios: a wide one that tiled families split, a tall one, one smaller than a tile.
SIZES = {"wide.png": (96, 56, "red"), "tall.png": (40, 72, "blue"), "small.png": (24, 30, "yellow")}
DONE = list(REGISTRY)
# Per image: the occluded rectangle (normalised x0, y0, x1, y1), not aligned with any token grid.
RECTS = {"wide.png": (0.6, 0.0, 1.0, 0.4), "tall.png": (0.1, 0.62, 0.38, 0.95), "small.png": (0.0, 0.0, 0.3, 0.3)}


def _blur(size: tuple[int, int]) -> tuple[float, float]:
    """How far (normalised, per axis) resampling spreads a pixel change: a Lanczos kernel (Idefics3) reaches 3
    source pixels when upscaling, plus the rectangle's rounding to pixels; downscaling with antialias
    reaches 3 output pixels of a canvas of at least 32."""
    return tuple(max(0.1, 3.5 / side) for side in size)


@pytest.fixture(scope="session")
def region_models(family_builds):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    def make(fam, root, folder) -> dict:
        path = fam.build(root / "teacher")
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
        # Gemma3 initialises its projector's input projection to zeros: every image feature would be 0.
        torch.manual_seed(0)
        for pname, p in model.named_parameters():
            if any(pname.startswith(q) for q in REGISTRY[fam.name].projector) and not p.detach().any():
                torch.nn.init.normal_(p.data, std=0.5)
        return {"model": model,
                "processor": AutoProcessor.from_pretrained(path),
                "images": {n: Image.open(folder / n).convert("RGB") for n in SIZES}}

    return family_builds("regions", SIZES, make)


def _encode(f: dict, images: list[Image.Image]) -> processing.ProcessedSample:
    tags = "".join("<image>\n" for _ in images)
    messages = [{"role": "user", "content": tags + "Compare the images."}, {"role": "assistant", "content": "red"}]
    return processing.encode(f["processor"], config_image_token_id(f["model"].config), messages, images)


def _regions(f: dict, images: list[Image.Image]):
    sample = _encode(f, images)
    return sample, image_regions(f["processor"], f["model"].config, sample, [im.size for im in images])


def _union_area(boxes: np.ndarray, n: int = 400) -> float:
    """Area of the union of boxes, on an ``n x n`` raster of the unit square."""
    c = (np.arange(n) + 0.5) / n
    x, y = np.meshgrid(c, c)
    covered = np.zeros((n, n), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        covered |= (x >= x0) & (x < x1) & (y >= y0) & (y < y1)
    return float(covered.mean())


def _expected_union(name: str, size: tuple[int, int]) -> float:
    """The share of the image the tokens see: CLIP's centre crop keeps a square of the shorter side."""
    if name in ("llava", "vipllava"):
        return min(size) / max(size)
    return 1.0


@pytest.mark.parametrize("name", DONE)
def test_boxes_tile_each_image(name, region_models):
    f = region_models(name)
    images = [f["images"][n] for n in SIZES]
    for one in images:  # one image per sample (LLaVA-OneVision tiles only these) and all in one sample
        _check_boxes(name, f, [one])
    _check_boxes(name, f, images)


def _check_boxes(name: str, f: dict, images: list[Image.Image]):
    sample, regions = _regions(f, images)
    assert [len(r) for r in regions] == sample.image_token_counts
    for image, boxes in zip(images, regions):
        newline = np.isnan(boxes).all(1)
        assert not (np.isnan(boxes).any(1) & ~newline).any(), name
        if REGISTRY[name].regions is RegionLayout.anyres:  # the image-newline feature closes each row of the tile grid
            assert newline.any() and not newline[0] and newline[-1], name
        else:  # none of these tiny configs keeps a CLS feature
            assert not newline.any(), name
        boxes = boxes[~newline]
        assert (boxes >= 0).all() and (boxes <= 1).all(), name
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all(), name
        union = _union_area(boxes)
        assert union == pytest.approx(_expected_union(name, image.size), abs=0.02), (name, image.size)
        # Views (a tile grid, a global view) tile the image without gaps: the areas add up to a whole
        # number of covers of the union (2 where tiles come with a global view / thumbnail).
        areas = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sum()
        views = areas / union
        # LLaVA-NeXT's unpadding cuts whole token rows, so the tile grid can miss up to a token's strip of
        # the image along the padded sides.
        slack = 0.2 if REGISTRY[name].regions is RegionLayout.anyres else 0.02
        assert views == pytest.approx(round(views), abs=slack) and round(views) in (1, 2), (name, image.size, views)
        tiled = name in ("idefics3", "smolvlm", "internvl", "llava_next") or name == "llava_onevision" and len(images) == 1
        if tiled and image.size == (96, 56):
            assert round(views) == 2, f"{name}: the wide image is tiled, with a global view"
    print(name, "tokens per image:", sample.image_token_counts)


def _occluded(image: Image.Image, rect, seed: int) -> Image.Image:
    w, h = image.size
    x0, y0, x1, y1 = round(rect[0] * w), round(rect[1] * h), round(rect[2] * w), round(rect[3] * h)
    out = np.asarray(image).copy()
    out[y0:y1, x0:x1] = np.random.default_rng(seed).integers(0, 256, (y1 - y0, x1 - x0, 3))
    return Image.fromarray(out)


def _placed_features(f: dict, name: str, sample: processing.ProcessedSample) -> torch.Tensor:
    """The language model's input embeddings at the sample's visual positions, from a forward of the
    model with its vision tower's attention outputs zeroed."""
    model, family = f["model"], REGISTRY[name]
    hooks, captured = [], {}

    def no_attention(module, args, out):
        return (torch.zeros_like(out[0]), *out[1:]) if isinstance(out, tuple) else torch.zeros_like(out)

    def capture(module, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"]

    for prefix in family.vision:
        for mod in model.get_submodule(prefix).modules():
            if type(mod).__name__.endswith("Attention"):
                hooks.append(mod.register_forward_hook(no_attention))
    assert hooks, f"{name}: no attention module found in the vision tower"
    hooks.append(model.get_submodule(family.llm[0]).register_forward_pre_hook(capture, with_kwargs=True))
    try:
        with torch.no_grad():
            model(**sample.inputs)
    finally:
        for h in hooks:
            h.remove()
    return captured["embeds"][0, np.concatenate(sample.visual_positions)]


def _meets(boxes: np.ndarray, rect, grow: tuple[float, float]) -> np.ndarray:
    """Boxes whose overlap with ``rect`` grown by ``grow`` (x, y) on every side (shrunk where negative) has area."""
    gx, gy = grow
    x0, y0, x1, y1 = rect[0] - gx, rect[1] - gy, rect[2] + gx, rect[3] + gy
    with np.errstate(invalid="ignore"):
        return (np.minimum(boxes[:, 2], x1) > np.maximum(boxes[:, 0], x0)) & \
               (np.minimum(boxes[:, 3], y1) > np.maximum(boxes[:, 1], y0))


@pytest.mark.parametrize("name", DONE)
def test_occlusion_changes_the_tokens_of_the_region(name, region_models):
    f = region_models(name)
    _check_occlusion(name, f, list(SIZES))
    _check_occlusion(name, f, ["wide.png"])  # alone: LLaVA-OneVision tiles it


def _check_occlusion(name: str, f: dict, names: list[str]):
    images = [f["images"][n] for n in names]
    sample, regions = _regions(f, images)
    base = _placed_features(f, name, sample)
    offsets = np.cumsum([0, *sample.image_token_counts])
    for i, n in enumerate(names):
        occluded = [(_occluded(im, RECTS[n], seed=i) if j == i else im) for j, im in enumerate(images)]
        other = _encode(f, occluded)
        assert other.image_token_counts == sample.image_token_counts
        diff = (_placed_features(f, name, other) - base).abs().amax(-1).numpy()
        changed = diff > 1e-4 * float(base.abs().max())
        within = np.zeros(len(diff), dtype=bool)
        within[offsets[i]:offsets[i + 1]] = True
        boxes = np.full((len(diff), 4), np.nan)
        boxes[within] = regions[i]
        gx, gy = _blur(images[i].size)
        must = within & _meets(boxes, RECTS[n], (-gx, -gy))
        may = within & _meets(boxes, RECTS[n], (gx, gy))
        assert must.any() and not may[within].all(), f"{name} {n}: the rectangle does not test anything"
        assert not (changed & ~may).any(), (f"{name} {n}: tokens {np.nonzero(changed & ~may)[0].tolist()} changed, "
                                            f"their boxes are away from the occluded rectangle")
        assert not (must & ~changed).any(), (f"{name} {n}: tokens {np.nonzero(must & ~changed)[0].tolist()} did not "
                                             f"change, their boxes overlap the occluded rectangle")
