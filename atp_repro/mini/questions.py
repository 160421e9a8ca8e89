"""Question families over mini-world scenes, mirroring the paper's benchmark groups (SPEC §2.1).

============  =====================================================  ====================
family        example                                                 paper analogue
============  =====================================================  ====================
counting      how many circles are there ?  -> 3                      VQAv2/GQA counting
attribute     what colour is the triangle ?  -> red                   GQA attributes, MME
existence     is there a blue square ?  -> no   (absent negatives)    POPE
spatial       where is the red circle relative to the blue square ?   GQA relations,
              -> left                                                 RealWorldQA
text          what does the text say ?  -> K 7                        TextVQA/OCRBench
scene         what is the background ?  -> stripes                    coarse/scene (MME)
============  =====================================================  ====================

Answers are short word sequences and are scored by exact match on generated text. Each sample
carries a ``subtype`` (for example ``fine`` counting with >= 5 objects, or POPE-style ``random`` vs
``adversarial`` negatives) so that harder slices can be reported separately.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from .scenes import BACKGROUNDS, COLOURS, SHAPE_PLURALS, SHAPES, SIZES, TEXT_ALPHABET, Scene, SceneObject

FAMILIES: tuple[str, ...] = ("counting", "attribute", "existence", "spatial", "text", "scene")
RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")
FINE_COUNT_MIN_OBJECTS = 5


class Unanswerable(Exception):
    """The scene does not support a question of the requested family (the caller redraws)."""


@dataclass(frozen=True)
class Question:
    family: str
    subtype: str
    question: str  # space-separated words
    answer: str  # space-separated words


def _unique_by(objects: tuple[SceneObject, ...], key) -> list[SceneObject]:
    counts = Counter(key(o) for o in objects)
    return [o for o in objects if counts[key(o)] == 1]


def _pick(rng: np.random.Generator, items: list) -> object:
    if not items:
        raise Unanswerable
    return items[int(rng.integers(0, len(items)))]


def counting(scene: Scene, rng: np.random.Generator) -> Question:
    objs = scene.objects
    sub = "fine" if len(objs) >= FINE_COUNT_MIN_OBJECTS else "coarse"
    kind = int(rng.integers(0, 3))
    if kind == 0:
        return Question("counting", sub, "how many objects are there ?", str(len(objs)))
    if kind == 1:
        shape = SHAPES[int(rng.integers(0, len(SHAPES)))]
        n = sum(o.shape == shape for o in objs)
        return Question("counting", sub, f"how many {SHAPE_PLURALS[shape]} are there ?", str(n))
    colour = tuple(COLOURS)[int(rng.integers(0, len(COLOURS)))]
    n = sum(o.colour == colour for o in objs)
    return Question("counting", sub, f"how many {colour} objects are there ?", str(n))


def attribute(scene: Scene, rng: np.random.Generator) -> Question:
    kind = int(rng.integers(0, 3))
    if kind == 0:
        obj = _pick(rng, _unique_by(scene.objects, lambda o: o.shape))
        return Question("attribute", "colour", f"what colour is the {obj.shape} ?", obj.colour)
    if kind == 1:
        obj = _pick(rng, _unique_by(scene.objects, lambda o: o.colour))
        return Question("attribute", "shape", f"what shape is the {obj.colour} object ?", obj.shape)
    obj = _pick(rng, _unique_by(scene.objects, lambda o: (o.colour, o.shape)))
    return Question("attribute", "size", f"what size is the {obj.colour} {obj.shape} ?", obj.size)


def existence(scene: Scene, rng: np.random.Generator) -> Question:
    present = {(o.colour, o.shape) for o in scene.objects}
    if rng.random() < 0.5:
        colour, shape = _pick(rng, sorted(present))
        return Question("existence", "positive", f"is there a {colour} {shape} ?", "yes")
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    present_shapes = {s for _, s in present}
    adversarial = [(c, s) for c, s in absent if s in present_shapes]  # a present shape in another colour
    if adversarial and rng.random() < 0.5:
        colour, shape = _pick(rng, adversarial)
        return Question("existence", "adversarial", f"is there a {colour} {shape} ?", "no")
    colour, shape = _pick(rng, absent)
    return Question("existence", "random", f"is there a {colour} {shape} ?", "no")


def relation(a: SceneObject, b: SceneObject, min_margin: float, dominance: float = 1.5) -> str | None:
    """Relation of ``a`` to ``b`` along the clearly dominant axis, or ``None`` if ambiguous."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= dominance * abs(dy) and abs(dx) >= min_margin:
        return "left" if dx < 0 else "right"
    if abs(dy) >= dominance * abs(dx) and abs(dy) >= min_margin:
        return "above" if dy < 0 else "below"
    return None


def spatial(scene: Scene, rng: np.random.Generator) -> Question:
    named = _unique_by(scene.objects, lambda o: (o.colour, o.shape))
    margin = 12.0 * scene.image.shape[0] / 96.0
    pairs = [(a, b) for a in named for b in named if a is not b and relation(a, b, margin) is not None]
    a, b = _pick(rng, pairs)
    rel = relation(a, b, margin)
    return Question("spatial", "relation", f"where is the {a.name} relative to the {b.name} ?", rel)


def text(scene: Scene, rng: np.random.Generator) -> Question:
    if scene.text is None:
        raise Unanswerable
    return Question("text", "read", "what does the text say ?", " ".join(scene.text.text))


def scene_level(scene: Scene, rng: np.random.Generator) -> Question:
    if rng.random() < 0.5:
        return Question("scene", "background", "what is the background ?", scene.background)
    return Question("scene", "tone", "is the background dark or light ?", scene.tone)


GENERATORS = {
    "counting": counting,
    "attribute": attribute,
    "existence": existence,
    "spatial": spatial,
    "text": text,
    "scene": scene_level,
}


def make_question(family: str, scene: Scene, rng: np.random.Generator) -> Question:
    """Ask a ``family`` question about ``scene``; raises :class:`Unanswerable` if it cannot."""
    if family not in GENERATORS:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return GENERATORS[family](scene, rng)


def answer_space(family: str, max_objects: int = 10, text_length: int = 2) -> list[str]:
    """All possible answers of a family (used for uniform chance levels)."""
    if family == "counting":
        return [str(i) for i in range(max_objects + 1)]
    if family == "attribute":
        return list(COLOURS) + list(SHAPES) + list(SIZES)
    if family == "existence":
        return ["yes", "no"]
    if family == "spatial":
        return list(RELATIONS)
    if family == "text":
        return [str(len(TEXT_ALPHABET) ** text_length)]  # size only; enumerating is pointless
    if family == "scene":
        return list(BACKGROUNDS) + ["dark", "light"]
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


def vocabulary() -> list[str]:
    """Every word a question or answer can contain, in a fixed order."""
    words: list[str] = []
    fixed = (
        "how many objects are there ? what colour is the shape object size is there a where relative to "
        "does text say background dark or light"
    )
    words += fixed.split()
    words += list(SHAPES) + list(SHAPE_PLURALS.values()) + list(COLOURS) + list(SIZES)
    words += ["yes", "no"] + list(RELATIONS) + list(BACKGROUNDS)
    words += [str(i) for i in range(11)] + list(TEXT_ALPHABET)
    seen: dict[str, None] = {}
    for w in words:
        seen.setdefault(w, None)
    return list(seen)
