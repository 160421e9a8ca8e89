"""Deterministic synthetic scenes for the mini world.

A scene is a handful of coloured shapes (and optionally a short rendered text label) on a plain
or textured grey background. Everything is drawn from one ``numpy.random.Generator``, so a scene
is a pure function of its seed. Text is drawn with a built-in 5x7 bitmap font (no font files, no
dependence on the Pillow version), shapes with Pillow's non-anti-aliased primitives.

Scene complexity varies from one object on a flat background up to ``max_objects`` objects on a
textured background with a text label: instance-adaptive pruning should need fewer vision tokens
for the simple ones. :attr:`Scene.n_elements` (objects + text label) is the declared complexity
measure; :func:`busy_patch_fraction` is a pixel-level alternative reported beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
SHAPE_PLURALS: dict[str, str] = {s: s + "s" for s in SHAPES}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 80, 230),
    "yellow": (240, 215, 30),
    "purple": (150, 60, 200),
    "orange": (245, 135, 25),
}
SIZES: dict[str, float] = {"small": 5.5, "large": 10.0}  # radius in pixels at a 96 px canvas
BACKGROUNDS: tuple[str, ...] = ("plain", "stripes", "checker", "dots")
TONES: dict[str, tuple[int, int]] = {"dark": (45, 85), "light": (185, 225)}  # grey-level ranges

# 5x7 bitmap glyphs. The alphabet avoids look-alikes (no O/0, I/1, S/5).
GLYPHS: dict[str, tuple[str, ...]] = {
    "A": (".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "C": (".####", "#....", "#....", "#....", "#....", "#....", ".####"),
    "E": ("#####", "#....", "#....", "####.", "#....", "#....", "#####"),
    "H": ("#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "K": ("#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"),
    "P": ("####.", "#...#", "#...#", "####.", "#....", "#....", "#...."),
    "T": ("#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."),
    "X": ("#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#"),
    "3": ("####.", "....#", "....#", ".###.", "....#", "....#", "####."),
    "7": ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
}
TEXT_ALPHABET: tuple[str, ...] = tuple(GLYPHS)


@dataclass(frozen=True)
class SceneConfig:
    """How scenes are drawn. Defaults give a 96 px canvas (a 12x12 grid at patch 8, 24x24 at patch 4)."""

    image_size: int = 96
    min_objects: int = 1
    max_objects: int = 8
    p_textured: float = 0.5
    p_text: float = 0.5
    text_length: int = 2
    glyph_scale: int = 2

    def __post_init__(self) -> None:
        if self.image_size < 48:
            raise ValueError(f"SceneConfig.image_size must be >= 48, got {self.image_size}")
        if not 1 <= self.min_objects <= self.max_objects <= 10:
            raise ValueError(
                "SceneConfig needs 1 <= min_objects <= max_objects <= 10, got "
                f"min_objects={self.min_objects}, max_objects={self.max_objects}"
            )
        for name in ("p_textured", "p_text"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"SceneConfig.{name} must be in [0, 1], got {value}")
        if not 1 <= self.text_length <= 4:
            raise ValueError(f"SceneConfig.text_length must be in 1..4, got {self.text_length}")
        if self.glyph_scale not in (1, 2, 3):
            raise ValueError(f"SceneConfig.glyph_scale must be one of 1, 2, 3, got {self.glyph_scale}")

    @property
    def scale(self) -> float:
        return self.image_size / 96.0


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    x: float  # centre, pixels
    y: float
    radius: float


@dataclass(frozen=True)
class TextLabel:
    text: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: str
    tone: str
    text: TextLabel | None
    image: np.ndarray = field(repr=False, compare=False)  # (H, W, 3) uint8

    @property
    def n_elements(self) -> int:
        """Declared complexity: number of foreground elements (objects plus the text label)."""
        return len(self.objects) + (1 if self.text is not None else 0)

    @property
    def complexity(self) -> int:
        """Complexity level used in reports: elements, plus one for a textured background."""
        return self.n_elements + (0 if self.background == "plain" else 1)


Box = tuple[float, float, float, float]  # x0, y0, x1, y1


def _overlaps(box: Box, boxes: list[Box], gap: float) -> bool:
    x0, y0, x1, y1 = box
    return any(x0 < b[2] + gap and b[0] < x1 + gap and y0 < b[3] + gap and b[1] < y1 + gap for b in boxes)


def _draw_background(rng: np.random.Generator, size: int, kind: str, tone: str) -> np.ndarray:
    lo, hi = TONES[tone]
    base = int(rng.integers(lo, hi + 1))
    img = np.full((size, size), base, dtype=np.int16)
    if kind != "plain":
        delta = int(rng.integers(18, 30)) * (1 if tone == "dark" else -1)
        period = int(rng.integers(4, 9))
        yy, xx = np.mgrid[0:size, 0:size]
        if kind == "stripes":
            direction = int(rng.integers(0, 3))
            coord = (yy, xx, xx + yy)[direction]
            mask = (coord // max(period // 2, 2)) % 2 == 0
        elif kind == "checker":
            mask = ((yy // period) + (xx // period)) % 2 == 0
        elif kind == "dots":
            mask = rng.random((size, size)) < 0.18
        else:
            raise ValueError(f"background kind must be one of {BACKGROUNDS}, got {kind!r}")
        img = img + delta * mask
    return np.repeat(np.clip(img, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)


def _shape_polygon(obj: SceneObject) -> list[tuple[float, float]]:
    x, y, r = obj.x, obj.y, obj.radius
    if obj.shape == "triangle":
        return [(x, y - r), (x + r, y + r * 0.85), (x - r, y + r * 0.85)]
    if obj.shape == "diamond":
        return [(x, y - r), (x + r, y), (x, y + r), (x - r, y)]
    raise ValueError(f"no polygon for shape {obj.shape!r}")


def _draw_objects(image: np.ndarray, objects: tuple[SceneObject, ...]) -> np.ndarray:
    pil = Image.fromarray(image)
    draw = ImageDraw.Draw(pil)
    for obj in objects:
        fill = COLOURS[obj.colour]
        box = (obj.x - obj.radius, obj.y - obj.radius, obj.x + obj.radius, obj.y + obj.radius)
        if obj.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif obj.shape == "square":
            s = obj.radius * 0.85
            draw.rectangle((obj.x - s, obj.y - s, obj.x + s, obj.y + s), fill=fill)
        else:
            draw.polygon(_shape_polygon(obj), fill=fill)
    return np.asarray(pil, dtype=np.uint8).copy()


def render_text(image: np.ndarray, label: TextLabel, scale: int) -> None:
    """Draw ``label`` in place: black glyphs on a white box."""
    x0, y0, x1, y1 = label.box
    image[y0:y1, x0:x1] = 255
    pad = scale
    for i, ch in enumerate(label.text):
        glyph = np.array([[c == "#" for c in row] for row in GLYPHS[ch]], dtype=bool)
        glyph = np.kron(glyph, np.ones((scale, scale), dtype=bool))
        gx = x0 + pad + i * (5 + 1) * scale
        gy = y0 + pad
        region = image[gy : gy + glyph.shape[0], gx : gx + glyph.shape[1]]
        region[glyph] = 0


def text_box_size(cfg: SceneConfig) -> tuple[int, int]:
    w = cfg.text_length * 6 * cfg.glyph_scale - cfg.glyph_scale + 2 * cfg.glyph_scale
    h = 7 * cfg.glyph_scale + 2 * cfg.glyph_scale
    return w, h


def generate_scene(
    rng: np.random.Generator,
    cfg: SceneConfig = SceneConfig(),
    *,
    require_text: bool = False,
    min_objects: int | None = None,
) -> Scene:
    """Draw one scene. ``require_text`` forces a text label; ``min_objects`` raises the object floor."""
    size = cfg.image_size
    lo = max(cfg.min_objects, min_objects or 0)
    n_target = int(rng.integers(lo, cfg.max_objects + 1))
    textured = bool(rng.random() < cfg.p_textured)
    background = BACKGROUNDS[1 + int(rng.integers(0, len(BACKGROUNDS) - 1))] if textured else "plain"
    tone = ("dark", "light")[int(rng.integers(0, 2))]
    has_text = require_text or bool(rng.random() < cfg.p_text)

    boxes: list[tuple[float, float, float, float]] = []
    label: TextLabel | None = None
    if has_text:
        w, h = text_box_size(cfg)
        tx = int(rng.integers(1, size - w - 1))
        ty = int(rng.integers(1, size - h - 1))
        text = "".join(TEXT_ALPHABET[int(i)] for i in rng.integers(0, len(TEXT_ALPHABET), cfg.text_length))
        label = TextLabel(text=text, box=(tx, ty, tx + w, ty + h))
        boxes.append((tx, ty, tx + w, ty + h))

    objects: list[SceneObject] = []
    gap = 2.0 * cfg.scale
    for _ in range(60 * n_target):
        if len(objects) == n_target:
            break
        size_name = ("small", "large")[int(rng.integers(0, 2))]
        r = SIZES[size_name] * cfg.scale
        x = float(rng.uniform(r + 1, size - r - 1))
        y = float(rng.uniform(r + 1, size - r - 1))
        box = (x - r, y - r, x + r, y + r)
        shape = SHAPES[int(rng.integers(0, len(SHAPES)))]
        colour = tuple(COLOURS)[int(rng.integers(0, len(COLOURS)))]
        if _overlaps(box, boxes, gap):
            continue
        boxes.append(box)
        objects.append(SceneObject(shape, colour, size_name, round(x, 2), round(y, 2), r))
    if len(objects) < lo:  # extremely rare with the default sizes; retry deterministically
        return generate_scene(rng, cfg, require_text=require_text, min_objects=min_objects)

    image = _draw_background(rng, size, background, tone)
    image = _draw_objects(image, tuple(objects))
    if label is not None:
        render_text(image, label, cfg.glyph_scale)
    return Scene(objects=tuple(objects), background=background, tone=tone, text=label, image=image)


def busy_patch_fraction(image: np.ndarray, grid: int, threshold: float = 12.0) -> float:
    """Fraction of grid patches whose pixels are not (nearly) uniform: a pixel-level clutter measure."""
    h, w, _ = image.shape
    p = h // grid
    patches = image[: grid * p, : grid * p].reshape(grid, p, grid, p, 3).astype(np.float32)
    std = patches.std(axis=(1, 3)).mean(axis=-1)
    return float((std > threshold).mean())


def label_maps(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel object ids (0 = background, i + 1 = ``scene.objects[i]``) and text glyph ids
    (0 = none, k + 1 = ``TEXT_ALPHABET[k]``), drawn with the same primitives as the image."""
    size = scene.image.shape[0]
    pil = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(pil)
    for i, obj in enumerate(scene.objects):
        box = (obj.x - obj.radius, obj.y - obj.radius, obj.x + obj.radius, obj.y + obj.radius)
        if obj.shape == "circle":
            draw.ellipse(box, fill=i + 1)
        elif obj.shape == "square":
            s = obj.radius * 0.85
            draw.rectangle((obj.x - s, obj.y - s, obj.x + s, obj.y + s), fill=i + 1)
        else:
            draw.polygon(_shape_polygon(obj), fill=i + 1)
    objects = np.asarray(pil, dtype=np.int64).copy()
    glyphs = np.zeros((size, size), dtype=np.int64)
    for _, ch, rows, cols in _glyph_cells(scene.text):
        glyphs[rows, cols] = TEXT_ALPHABET.index(ch) + 1
    if scene.text is not None:
        x0, y0, x1, y1 = scene.text.box
        objects[y0:y1, x0:x1] = 0
    return objects, glyphs


def glyph_slot_map(scene: Scene) -> np.ndarray:
    """Per-pixel place of the glyph in the text label (0 = none, i + 1 = the label's i-th character)."""
    size = scene.image.shape[0]
    slots = np.zeros((size, size), dtype=np.int64)
    for i, _, rows, cols in _glyph_cells(scene.text):
        slots[rows, cols] = i + 1
    return slots


def _glyph_cells(text: TextLabel | None) -> list[tuple[int, str, slice, slice]]:
    """(index, character, pixel rows, pixel columns) of each glyph of a text label, as drawn."""
    if text is None:
        return []
    x0, y0, _, y1 = text.box
    scale = (y1 - y0) // 9
    cells = []
    for i, ch in enumerate(text.text):
        gx = x0 + scale + i * 6 * scale
        cells.append((i, ch, slice(y0 + scale, y0 + 8 * scale), slice(gx, gx + 5 * scale)))
    return cells


def patch_labels(labels: np.ndarray, grid: int, min_pixels: int = 1) -> np.ndarray:
    """(grid, grid) majority non-zero label per patch (0 if fewer than ``min_pixels`` labelled pixels)."""
    h = labels.shape[0]
    p = h // grid
    blocks = labels[: grid * p, : grid * p].reshape(grid, p, grid, p).transpose(0, 2, 1, 3).reshape(grid, grid, p * p)
    n = int(labels.max()) + 1
    counts = np.stack([(blocks == k).sum(-1) for k in range(n)], axis=-1)
    counts[..., 0] = 0
    best = counts.argmax(-1)
    best[counts.max(-1) < min_pixels] = 0
    return best
