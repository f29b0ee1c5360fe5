"""The part of the original image each visual token covers: one normalised box per visual position.

``image_regions(processor, config, sample, sizes)`` gives, for each image of an encoded sample
(``kd_cache.processing.ProcessedSample``), a float64 ``[N_i, 4]`` array of boxes ``(x0, y0, x1, y1)`` in
``[0, 1]`` of that image as it was given (before the processor resized, cropped, padded or tiled it),
one row per position of ``sample.visual_positions[i]``, in the same order. A visual position that
covers no part of the image (a CLS feature kept by the ``full`` feature-select strategy) is a row of
NaN. Boxes of different families' tokens can then be compared by overlap.

The layout of a family (its registry entry's ``regions``, ``kd_cache.families.RegionLayout``) is read
from its ``transformers`` 5.25 processor and model code, never re-derived by expanding a prompt:

* ``single_view`` (LLaVA, VipLLaVA, Gemma3, PaliGemma): one view, the image resized (CLIP: shortest edge,
  then a centre crop, so the view can be a part of the image; SigLIP / Gemma3: to a fixed size), then
  a row-major grid of patches (Gemma3: average-pooled to ``mm_tokens_per_image``);
* ``qwen_grid`` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): ``smart_resize`` scales the whole image to
  ``image_grid_thw``'s patch grid; the merger makes one token of ``merge x merge`` patches, tokens
  row-major over the merged grid (the image processor orders patches so);
* ``idefics_tiles`` (Idefics3, SmolVLM): the image resized to whole tiles, the tiles row by row
  (the ``<row_i_col_j>`` markers of the processor's expansion give the grid), then a global view of the
  whole image squeezed into one tile; each tile pixel-shuffled to a row-major token grid;
* ``internvl_tiles`` (InternVL): GotOcr2's ``get_optimal_tiled_canvas`` grid of tiles, row by row, then
  a thumbnail of the whole image when there is more than one tile; each tile pixel-shuffled;
* ``pixtral`` (Mistral3): the image resized to whole merged patches (``image_sizes`` is its size), the
  merged patches row-major (the ``[IMG_BREAK]`` tokens between rows are not image tokens);
* ``anyres`` (LLaVA-NeXT, LLaVA-OneVision): the whole image squeezed into one tile, then the tiles of the
  image resized and centre-padded into its best pinpoint resolution; the model's own
  ``pack_image_features`` orders, unpads and closes rows with the image-newline feature (NaN boxes);
  OneVision gives an image of a multi-image sample its base tile alone (and a newline).

Every layout's token count is checked against the processor's visual positions
(``RegionLayoutError`` when they differ), so a processor setting this module does not follow stops
here instead of giving wrong boxes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

from kd_cache.families import FAMILIES, RegionLayout
from kd_cache.processing import ProcessedSample


class RegionLayoutError(ValueError):
    """The layout computed for an image does not match what the processor produced."""


def grid_boxes(rows: int, cols: int, view: Sequence[float] = (0.0, 0.0, 1.0, 1.0)) -> np.ndarray:
    """``[rows * cols, 4]``: the cells of a ``rows x cols`` grid over ``view`` (normalised, may reach outside
    ``[0, 1]``), row-major."""
    x0, y0, x1, y1 = view
    xs, ys = np.linspace(x0, x1, cols + 1), np.linspace(y0, y1, rows + 1)
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    r, c = r.ravel(), c.ravel()
    return np.stack([xs[c], ys[r], xs[c + 1], ys[r + 1]], axis=1).astype(np.float64)


def clip_boxes(boxes: np.ndarray) -> np.ndarray:
    """Boxes cut to the image; a box left with no area (it lies on padding) becomes NaN."""
    out = np.clip(boxes, 0.0, 1.0)
    empty = (out[:, 2] <= out[:, 0]) | (out[:, 3] <= out[:, 1])
    out[empty] = np.nan
    return out


def _nan_rows(n: int) -> np.ndarray:
    return np.full((n, 4), np.nan)


# -- one resized (and cropped) view ---------------------------------------------------------------

def _resized_hw(ip, width: int, height: int) -> tuple[int, int]:
    """The (height, width) the image processor resizes an image of ``width x height`` to, by its own rule."""
    from transformers.image_transforms import get_resize_output_image_size
    from transformers.image_utils import ChannelDimension

    size = ip.size
    if not getattr(ip, "do_resize", True):
        return height, width
    if size.shortest_edge and not size.longest_edge:
        return tuple(get_resize_output_image_size(np.empty((1, height, width), np.uint8), size=size.shortest_edge,
                                                  default_to_square=False, input_data_format=ChannelDimension.FIRST))
    if size.height and size.width:
        return size.height, size.width
    raise NotImplementedError(f"{type(ip).__name__} resizes by {size}; image regions follow shortest_edge or "
                              "height/width resizing only")


def _view(ip, width: int, height: int) -> tuple[tuple[float, float, float, float], tuple[int, int]]:
    """The box of the original image that the image processor's output canvas shows (beyond ``[0, 1]``
    where a centre crop pads), and that canvas's (height, width) in pixels."""
    rh, rw = _resized_hw(ip, width, height)
    if not getattr(ip, "do_center_crop", False):
        return (0.0, 0.0, 1.0, 1.0), (rh, rw)
    ch, cw = ip.crop_size.height, ip.crop_size.width

    def start(r: int, c: int) -> int:  # TorchvisionBackend.center_crop: pad (c - r) // 2 before, or crop
        return -((c - r) // 2) if c > r else int((r - c) / 2.0)

    top, left = start(rh, ch), start(rw, cw)
    return (left / rw, top / rh, (left + cw) / rw, (top + ch) / rh), (ch, cw)


def _single_view(ctx: _Image) -> np.ndarray:
    proc, cfg = ctx.processor, ctx.config
    view, (ch, cw) = _view(proc.image_processor, ctx.width, ctx.height)
    extra = 0
    if cfg.model_type == "gemma3":
        if getattr(proc.image_processor, "do_pan_and_scan", False):
            raise NotImplementedError("Gemma3 with pan-and-scan crops: image regions cover its single-view layout only")
        side = int(round(cfg.mm_tokens_per_image ** 0.5))  # the projector average-pools the patches to side x side
        rows = cols = side
    else:
        patch = getattr(proc, "patch_size", None) or cfg.vision_config.patch_size
        rows, cols = ch // patch, cw // patch
        view = _patch_view(view, (ch, cw), rows * patch, cols * patch)
        if cfg.model_type in ("llava", "vipllava"):  # the LLaVA processor's count: patches + CLS, less CLS if "default"
            extra = getattr(proc, "num_additional_image_tokens", 0) or 0
            if getattr(proc, "vision_feature_select_strategy", None) == "default":
                extra -= 1
    return np.concatenate([_nan_rows(max(extra, 0)), clip_boxes(grid_boxes(rows, cols, view))])


def _patch_view(view, canvas_hw: tuple[int, int], used_h: int, used_w: int):
    """The part of ``view`` that whole patches cover (a canvas not a multiple of the patch loses its edge)."""
    x0, y0, x1, y1 = view
    ch, cw = canvas_hw
    return (x0, y0, x0 + (x1 - x0) * used_w / cw, y0 + (y1 - y0) * used_h / ch)


# -- per-family layouts ---------------------------------------------------------------------------

class _Image:
    """What a layout reads about image ``index`` of a sample."""

    def __init__(self, processor, config, sample: ProcessedSample, index: int, size: tuple[int, int]):
        self.processor, self.config, self.sample, self.index = processor, config, sample, index
        self.width, self.height = int(size[0]), int(size[1])
        self.count = len(sample.visual_positions[index])

    def input(self, name: str):
        if name not in self.sample.inputs:
            raise RegionLayoutError(f"{self.config.model_type}: the processor returned no {name!r}, which the image "
                                    "regions need")
        return self.sample.inputs[name]

    def span_tokens(self) -> list[str]:
        a, b = self.sample.image_spans[self.index]
        return self.processor.tokenizer.convert_ids_to_tokens(self.sample.input_ids[a:b].tolist())


def _qwen_grid(ctx: _Image) -> np.ndarray:
    t, h, w = (int(v) for v in ctx.input("image_grid_thw")[ctx.index])
    merge = ctx.config.vision_config.spatial_merge_size
    if t != 1:
        raise RegionLayoutError(f"{ctx.config.model_type}: image {ctx.index} has {t} temporal steps; an image has 1")
    return grid_boxes(h // merge, w // merge)


def _tiles(rows: int, cols: int, per_tile: int, side: int, thumbnail: bool) -> np.ndarray:
    """Tiles of an image split into ``rows x cols`` (row by row), each a ``side x side`` token grid, then
    (``thumbnail``) one more view of the whole image at the same grid."""
    parts = [grid_boxes(side, side, grid_boxes(rows, cols)[k]) for k in range(rows * cols)]
    if thumbnail:
        parts.append(grid_boxes(side, side))
    if side * side != per_tile:
        raise RegionLayoutError(f"a tile of {per_tile} tokens is not a {side} x {side} grid")
    return np.concatenate(parts)


def _side(per_tile: int) -> int:
    return int(round(per_tile ** 0.5))


def _idefics_tiles(ctx: _Image) -> np.ndarray:
    marks = [tuple(map(int, m.groups())) for tok in ctx.span_tokens() if (m := re.fullmatch(r"<row_(\d+)_col_(\d+)>", tok))]
    rows, cols = (max(r for r, _ in marks), max(c for _, c in marks)) if marks else (1, 1)
    views = rows * cols + (1 if marks else 0)  # a split image gets a global view after its tiles
    per_tile = ctx.count // views
    return _tiles(rows, cols, per_tile, _side(per_tile), thumbnail=bool(marks))


def _internvl_tiles(ctx: _Image) -> np.ndarray:
    from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

    ip, per_tile = ctx.processor.image_processor, ctx.processor.image_seq_length
    cols = rows = 1
    if ip.crop_to_patches and ip.max_patches > 1:  # as GotOcr2ImageProcessor.get_number_of_image_patches
        cols, rows = get_optimal_tiled_canvas((ctx.height, ctx.width), (ip.size.height, ip.size.width),
                                              ip.min_patches, ip.max_patches)
    return _tiles(rows, cols, per_tile, _side(per_tile), thumbnail=rows * cols > 1)


def _pixtral(ctx: _Image) -> np.ndarray:
    h, w = (int(v) for v in ctx.input("image_sizes")[ctx.index])  # the resized image, before batch padding
    cell = ctx.processor.patch_size * ctx.processor.spatial_merge_size
    rows, cols = h // cell, w // cell
    return grid_boxes(rows, cols, (0.0, 0.0, cols * cell / w, rows * cell / h))


def _anyres(ctx: _Image) -> np.ndarray:
    """LLaVA-NeXT / OneVision: the base tile (the whole image squeezed to one tile), then the tiles of the
    image resized into its best pinpoint resolution and centre-padded, as one grid that the model unpads
    and closes each row of with the image-newline feature. The boxes of every tile's patches go through
    the model's own ``pack_image_features`` as 4-channel features (the newline feature: NaN), so the
    order, unpadding and newlines are the model's."""
    import importlib
    from types import SimpleNamespace

    import torch
    from transformers.image_processing_utils import get_patch_output_size, select_best_resolution

    cfg, ip, mt = ctx.config, ctx.processor.image_processor, ctx.config.model_type
    modeling = importlib.import_module(f"transformers.models.{mt}.modeling_{mt}")
    model_cls = getattr(modeling, "LlavaNextModel" if mt == "llava_next" else "LlavaOnevisionModel")
    tile = cfg.vision_config.image_size
    side = tile // cfg.vision_config.patch_size
    crop = ip.crop_size if getattr(ip, "do_center_crop", False) else ip.size
    base = ip.size.height or ip.size.shortest_edge
    if (crop.height, crop.width) != (tile, tile) or base != tile:
        raise NotImplementedError(f"{mt}: image regions follow tiles of the vision tower's size {tile}; the image "
                                  f"processor resizes to {ip.size} and crops to {crop}")
    strategy = cfg.vision_feature_select_strategy
    has_cls = cfg.vision_config.model_type != "siglip_vision_model"  # CLIP's tower puts a CLS feature first
    if (strategy == "full") == has_cls:  # "full" keeps it; "default" drops the first feature
        raise NotImplementedError(f"{mt}: image regions need patch features without a CLS feature "
                                  f"(vision_feature_select_strategy {strategy!r} on {type(cfg.vision_config).__name__})")
    h, w = (int(v) for v in ctx.input("image_sizes")[ctx.index])  # the original image's (height, width)
    if (w, h) != (ctx.width, ctx.height):
        raise RegionLayoutError(f"{mt}: image_sizes says {w}x{h}, the image is {ctx.width}x{ctx.height}")
    bh, bw = select_best_resolution((h, w), cfg.image_grid_pinpoints)
    nh, nw = get_patch_output_size(np.empty((1, h, w)), (bh, bw), "channels_first")
    px, py = (bw - nw) // 2, (bh - nh) // 2  # LlavaNextImageProcessor._get_padding_size: the image's offset
    rows, cols = bh // tile, bw // tile
    canvas = grid_boxes(rows * side, cols * side, (-px / nw, -py / nh, (bw - px) / nw, (bh - py) / nh))
    # [rows, side, cols, side, 4] -> one feature row per tile, in divide_to_patches' row-major tile order
    tiles = canvas.reshape(rows, side, cols, side, 4).transpose(0, 2, 1, 3, 4).reshape(rows * cols, side * side, 4)
    n_images = ctx.sample.inputs.get("batch_num_images")
    if mt == "llava_onevision" and n_images is not None and int(n_images[0]) > 1:
        tiles = tiles[:0]  # OneVision keeps only the base tile of each image of a multi-image sample
    feats = torch.from_numpy(np.concatenate([grid_boxes(side, side)[None], tiles]))
    newline = torch.full((4,), float("nan"), dtype=feats.dtype)
    sizes = torch.tensor([[h, w]])
    owner = SimpleNamespace(config=cfg)
    if mt == "llava_next":
        packed, _ = model_cls.pack_image_features(owner, [feats], sizes, strategy, image_newline=newline)
    else:
        unpadded = modeling.unpad_image(torch.zeros(1, rows * side, cols * side), (h, w)).shape[1:]
        limit = int(cfg.vision_aspect_ratio.removeprefix("anyres_max_"))
        if math.sqrt(unpadded[0] * unpadded[1] / (limit * side**2)) > 1.1:
            raise NotImplementedError(f"{mt}: image {ctx.index} ({w}x{h}) is bilinearly downsampled by the model "
                                      f"({cfg.vision_aspect_ratio}); image regions do not cover that yet")
        packed, _ = model_cls.pack_image_features(owner, [feats], sizes, image_newline=newline,
                                                  vision_aspect_ratio=cfg.vision_aspect_ratio)
    return clip_boxes(packed[0].numpy().astype(np.float64))


LAYOUTS = {
    RegionLayout.single_view: _single_view,
    RegionLayout.qwen_grid: _qwen_grid,
    RegionLayout.idefics_tiles: _idefics_tiles,
    RegionLayout.internvl_tiles: _internvl_tiles,
    RegionLayout.pixtral: _pixtral,
    RegionLayout.anyres: _anyres,
}


def image_regions(processor, config, sample: ProcessedSample, sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """Per image of ``sample`` (encoded by ``processor``, the processor of a model with ``config``), the box
    ``(x0, y0, x1, y1)`` of the original image each of its visual positions covers, float64 ``[N_i, 4]``
    (NaN rows: covers nothing). ``sizes``: each original image's ``(width, height)`` (PIL's ``.size``).

    Raises ``NotImplementedError`` for a family (or processor setting) without a layout here, and
    ``RegionLayoutError`` when a layout's token count differs from the processor's.
    """
    family = FAMILIES.get(getattr(config, "model_type", None))
    if family is None:
        raise NotImplementedError(f"image regions: {getattr(config, 'model_type', None)!r} is not a supported family")
    if len(sizes) != len(sample.visual_positions):
        raise ValueError(f"{len(sizes)} image sizes for a sample of {len(sample.visual_positions)} images")
    out = []
    for i, size in enumerate(sizes):
        ctx = _Image(processor, config, sample, i, size)
        boxes = LAYOUTS[family.regions](ctx)
        if len(boxes) != ctx.count:
            raise RegionLayoutError(f"{family.name}: the {family.regions.value} layout of image {i} ({ctx.width}x"
                                    f"{ctx.height}) has {len(boxes)} tokens, the processor gave {ctx.count} visual "
                                    "positions; the processor's settings differ from the layout this module follows")
        out.append(boxes)
    return out
