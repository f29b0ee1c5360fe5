"""The demo's synthetic visual task, drawn with Pillow.

One shape per 32x32 image, with a kind (circle/square/triangle), a hue drawn uniformly on the colour
wheel and named after the nearest of six anchor hues, and a place (left/right/top/bottom/center,
jittered). ``make_task`` writes the LLaVA-format files: caption records (a brief-description request
and its caption) feed pre-training (the teacher's, and the students' DPT / PT), three-question
conversations (colour, shape, place) the fine-tuning stages, and the held-out test set and the
validation set (every choice of the demo's configuration) have one question per image, with its
``options``. The instruction conversations (the teacher's and the students') also keep one caption turn
each, as LLaVA-1.5's instruction mix keeps brief descriptions: the finished teacher still captions, and
a student's fine-tuning ties the questions to the captions it pre-trained on.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kd_demo import tiny
from kd_demo.config import DemoConfig

SHAPES = list(tiny.SHAPES)
PLACES = list(tiny.POSITIONS)


# Colour names and the hue (degrees) each one is anchored at: a shape's hue is drawn uniformly on the
# colour wheel and named after the nearest anchor, so hues near the middle of two anchors are hard.
HUES = {"red": 0.0, "orange": 30.0, "yellow": 58.0, "green": 120.0, "blue": 225.0, "purple": 280.0}
ANCHORS = {"left": (0.2, 0.5), "right": (0.8, 0.5), "top": (0.5, 0.2), "bottom": (0.5, 0.8), "center": (0.5, 0.5)}

QUESTIONS = {
    "colour": ("What colour is the shape?", list(HUES)),
    "shape": ("What shape is it?", SHAPES),
    "place": ("Where is the shape?", PLACES),
}
CAPTION_PROMPT = "Describe the image briefly."


def hue_distance(a: float, b: float) -> float:
    d = abs(a - b) % 360.0
    return min(d, 360.0 - d)


def colour_name(hue: float) -> str:
    return min(HUES, key=lambda c: hue_distance(hue, HUES[c]))


@dataclass
class Scene:
    shape: str
    hue: float  # degrees
    place: str
    dx: float = 0.0  # offset from the place's anchor, in pixels
    dy: float = 0.0
    radius: float = 5.0

    @property
    def colour(self) -> str:
        return colour_name(self.hue)

    def answer(self, kind: str) -> str:
        return {"colour": self.colour, "shape": self.shape, "place": self.place}[kind]


def random_scene(rng: random.Random, cfg: DemoConfig) -> Scene:
    j = cfg.place_jitter
    return Scene(rng.choice(SHAPES), rng.uniform(0.0, 360.0), rng.choice(PLACES), rng.uniform(-j, j),
                 rng.uniform(-j, j), rng.uniform(*cfg.radius))


def draw_scene(path: Path, scene: Scene, size: int = 32) -> None:
    """One shape on a white canvas, at its place's anchor plus its offset, filled with its hue."""
    import colorsys

    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(img)
    fx, fy = ANCHORS[scene.place]
    cx, cy, r = fx * size + scene.dx, fy * size + scene.dy, scene.radius
    fill = tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(scene.hue / 360.0, 0.85, 0.9))
    tiny.draw_shape(d, scene.shape, cx, cy, r, fill)
    img.save(path)


# Every record draws its scene (and questions) from one ``random.Random(cfg.seed)`` in the order
# ``make_task`` asks for them, so a seed gives the same files.


def _scenes(rng: random.Random, cfg: DemoConfig, images: Path, prefix: str, n: int) -> Iterator[tuple[str, str, Scene]]:
    """Draw ``n`` random scenes into ``images``; yields (record id, image file name, scene)."""
    for i in range(n):
        sc = random_scene(rng, cfg)
        name = f"{prefix}-{i:05d}.png"
        draw_scene(images / name, sc)
        yield f"{prefix}-{i:05d}", name, sc


def caption(sc: Scene) -> str:
    return f"a {sc.colour} {sc.shape} on the {sc.place}."


def caption_record(rid: str, name: str, sc: Scene) -> dict:
    return {"id": rid, "image": name, "conversations": [{"from": "human", "value": "<image>\n" + CAPTION_PROMPT},
                                                        {"from": "gpt", "value": caption(sc)}]}


def _qa_records(rng: random.Random, cfg: DemoConfig, images: Path, prefix: str, n: int,
                captions: list[dict] | None = None, caption_turns: random.Random | None = None) -> list[dict]:
    """Conversations asking the three questions in a random order; appends each image's caption to
    ``captions`` when given. With ``caption_turns`` (its own generator, so that the other files of a
    seed do not depend on it), one caption turn is inserted at a random place of each conversation."""
    out = []
    for rid, name, sc in _scenes(rng, cfg, images, prefix, n):
        if captions is not None:
            captions.append(caption_record(rid, name, sc))
        turns = [(QUESTIONS[kind][0], sc.answer(kind)) for kind in rng.sample(list(QUESTIONS), len(QUESTIONS))]
        if caption_turns is not None:
            turns.insert(caption_turns.randrange(len(turns) + 1), (CAPTION_PROMPT, caption(sc)))
        conv = []
        for j, (q, a) in enumerate(turns):
            conv += [{"from": "human", "value": ("<image>\n" if j == 0 else "") + q}, {"from": "gpt", "value": a}]
        out.append({"id": rid, "image": name, "conversations": conv})
    return out


def _test_records(rng: random.Random, cfg: DemoConfig, images: Path, n: int, prefix: str = "test") -> list[dict]:
    """One random question per image, with its ``question_type`` and multiple-choice ``options``."""
    out = []
    for rid, name, sc in _scenes(rng, cfg, images, prefix, n):
        kind = rng.choice(list(QUESTIONS))
        q, options = QUESTIONS[kind]
        conv = [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": sc.answer(kind)}]
        out.append({"id": rid, "image": name, "question_type": kind, "options": list(options),
                    "conversations": conv})
    return out


def make_task(root: Path, cfg: DemoConfig) -> dict[str, Path]:
    """Write images and the task's LLaVA-format JSON files; returns their paths and the image folder."""
    rng = random.Random(cfg.seed)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    teacher_captions: list[dict] = []
    files = {
        "teacher": _qa_records(rng, cfg, images, "teacher", cfg.n_teacher, teacher_captions,
                               caption_turns=random.Random(f"{cfg.seed}-caption-turns")),
        "teacher_captions": teacher_captions,  # the teacher's own images, captioned (its pre-training)
        "captions": [caption_record(*r) for r in _scenes(rng, cfg, images, "caption", cfg.n_caption)],
        "train": _qa_records(rng, cfg, images, "train", cfg.n_train,
                             caption_turns=random.Random(f"{cfg.seed}-student-caption-turns")),
        "test": _test_records(rng, cfg, images, cfg.n_test),
        # drawn after the others so that adding it left every other file of a seed as it was
        "val": _test_records(rng, cfg, images, cfg.n_val, "val"),
    }
    paths = {}
    for key, rows in files.items():
        paths[key] = root / f"{key}.json"
        paths[key].write_text(json.dumps(rows, indent=1))
    paths["images"] = images
    return paths
