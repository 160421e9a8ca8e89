"""Question families over mini-world scenes, mirroring the paper's benchmark groups.

============  =====================================================  ====================
family        example                                                 paper analogue
============  =====================================================  ====================
counting      how many circles are there ?  -> 3                      VQAv2/GQA counting
attribute     what colour is the triangle ?  -> red                   GQA attributes, MME
existence     are there any squares ?  -> no   (absent negatives)    POPE
spatial       where is the circle relative to the centre ?  -> above  GQA relations,
                                                                      RealWorldQA
text          what does the text say ?  -> K 7                        TextVQA/OCRBench
scene         what is the background ?  -> stripes                    coarse/scene (MME)
============  =====================================================  ====================

Answers are short word sequences and are scored by exact match on generated text. Each sample
carries a ``subtype`` (for example ``fine`` counting with >= 5 objects, or POPE's ``random`` absent-object
negatives) so that harder slices can be reported separately.

Objects are named by category (shape) in existence and spatial questions, as POPE and GQA name
them; colour is asked about (attribute) and counted, not used to name. The colour-and-shape names
of earlier versions ("is there a red circle ?") made those families conjunction searches that the
upper bound answered at chance (README, "Where the mini world stands").
"""

from __future__ import annotations

import dataclasses
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
    """POPE's question with shapes as the object categories: "are there any circles ?".

    POPE names an object by its class, never by class and attribute. The colour-and-shape version
    ("is there a red circle ?") asked for a conjunction that the upper bound answered at chance
    after 1200 steps, and the singular "is there a circle ?" was learnt in one of two upper-bound
    runs only (README "Where the mini world stands"); the plural shares its words with the counting
    questions ("how many circles are there ?"), whose zero counts the upper bound gets right.
    The negative is a shape absent from the scene (POPE's random sampling); a scene showing every
    shape has no negative, so such scenes only get positives.
    """
    present = sorted({o.shape for o in scene.objects})
    if rng.random() < 0.5:
        return Question("existence", "positive", f"are there any {SHAPE_PLURALS[_pick(rng, present)]} ?", "yes")
    absent = [s for s in SHAPES if s not in present]
    return Question("existence", "random", f"are there any {SHAPE_PLURALS[_pick(rng, absent)]} ?", "no")


def relation(a: SceneObject, b: SceneObject, min_margin: float, dominance: float = 1.5) -> str | None:
    """Relation of ``a`` to ``b`` along the clearly dominant axis, or ``None`` if ambiguous."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= dominance * abs(dy) and abs(dx) >= min_margin:
        return "left" if dx < 0 else "right"
    if abs(dy) >= dominance * abs(dx) and abs(dy) >= min_margin:
        return "above" if dy < 0 else "below"
    return None


def spatial(scene: Scene, rng: np.random.Generator) -> Question:
    """Where an object (named by its category, unique in the scene) lies relative to the image centre.

    The object's place in the image (RealWorldQA style) is what pruning positional encoding has to
    preserve. Relations between two named objects ("where is the circle relative to the square ?")
    are not asked: the upper bound answered them at chance (0.29 vs a blind prior of 0.36, README
    "Where the mini world stands"), so a retention rate on them would be a ratio of guesses.
    The relation uses the dominant-axis rule of :func:`relation`; ambiguous placements are not asked.
    """
    named = _unique_by(scene.objects, lambda o: o.shape)
    margin = 12.0 * scene.image.shape[0] / 96.0
    centre = scene.image.shape[0] / 2.0
    placed = [(a, relation(a, dataclasses.replace(a, x=centre, y=centre), margin)) for a in named]
    a, rel = _pick(rng, [(a, r) for a, r in placed if r is not None])
    return Question("spatial", "frame", f"where is the {a.shape} relative to the centre ?", rel)


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
        "does text say background dark or light centre any"
    )
    words += fixed.split()
    words += list(SHAPES) + list(SHAPE_PLURALS.values()) + list(COLOURS) + list(SIZES)
    words += ["yes", "no"] + list(RELATIONS) + list(BACKGROUNDS)
    words += [str(i) for i in range(11)] + list(TEXT_ALPHABET)
    seen: dict[str, None] = {}
    for w in words:
        seen.setdefault(w, None)
    return list(seen)
