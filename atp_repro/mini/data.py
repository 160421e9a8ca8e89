"""Mini-world VQA splits and batching.

A sample is a pure function of ``(world_seed, split, index)``: the split seeds are fixed, families
are balanced (``index % 6``), and the scene is redrawn (with the same generator) until the
family's question is answerable. Nothing is stored on disk; a 20k-sample epoch costs about 10 s of
rendering on one core.

Sequence layout (LLaVA-1.5 chat format, word-level)::

    <s> USER: <image> x V  question-words  ASSISTANT:  answer-words </s>

Labels are ``-100`` everywhere except on the answer words and the closing ``</s>``.

Training conversations (``turns > 1``) follow LLaVA-665k's multi-turn format: one image, then up to
``turns`` question/answer rounds about it (one per answerable family, in a random order)::

    <s> USER: <image> x V q1 ASSISTANT: a1 </s> USER: q2 ASSISTANT: a2 </s> ...

which gives several supervised answers per image for the cost of one image encoding. Evaluation is
always single-turn, like the benchmarks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

from .questions import FAMILIES, Question, Unanswerable, make_question
from .scenes import Scene, SceneConfig, busy_patch_fraction, generate_scene
from .tokenizer import ASSISTANT, USER, encode_words

SPLIT_SEEDS: dict[str, int] = {"train": 11, "val": 22, "test": 33}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IGNORE_INDEX = -100
DEFAULT_SCENE = SceneConfig()  # frozen, so one shared default instance is safe


@dataclass(frozen=True)
class Sample:
    index: int
    scene: Scene = field(repr=False)
    question: Question

    @property
    def family(self) -> str:
        return self.question.family


def make_sample(world_seed: int, split: str, index: int, scene_cfg: SceneConfig = DEFAULT_SCENE) -> Sample:
    """The ``index``-th sample of ``split``; identical on every call and every machine."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {tuple(SPLIT_SEEDS)}, got {split!r}")
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    rng = np.random.default_rng([world_seed, SPLIT_SEEDS[split], index])
    family = FAMILIES[index % len(FAMILIES)]
    for _ in range(100):
        scene = generate_scene(
            rng,
            scene_cfg,
            require_text=family == "text",
            min_objects=2 if family == "spatial" else None,
        )
        try:
            return Sample(index, scene, make_question(family, scene, rng))
        except Unanswerable:
            continue
    raise RuntimeError(f"could not draw an answerable {family!r} sample for index {index}")  # pragma: no cover


SIMPLE_SCENE_MAX_OBJECTS = 3


FamilyWeights = tuple[tuple[str, int], ...]  # ((family, questions per round), ...)


def check_family_weights(family_weights: FamilyWeights, name: str = "family_weights") -> None:
    """Raise a ValueError naming ``name`` unless every family has a whole weight >= 1."""
    families = [f for f, _ in family_weights]
    if sorted(families) != sorted(FAMILIES) or any(not isinstance(w, int) or w < 1 for _, w in family_weights):
        raise ValueError(f"{name} must give each family of {FAMILIES} once with an integer weight >= 1, "
                         f"got {family_weights!r}")


def check_single_every(single_every: int, name: str = "single_every") -> None:
    """Raise a ValueError naming ``name`` unless it is 0 (never) or an int >= 2."""
    if not (isinstance(single_every, int) and single_every >= 0) or single_every == 1:
        raise ValueError(f"{name} must be 0 (never) or an int >= 2, got {single_every!r}")


def make_conversation(world_seed: int, split: str, index: int, turns: int,
                      scene_cfg: SceneConfig = DEFAULT_SCENE,
                      simple_fraction: float = 0.0,
                      family_weights: FamilyWeights | None = None) -> tuple[Scene, list[Question]]:
    """A scene and up to ``turns`` distinct questions about it.

    Questions come in rounds of one per answerable family (shuffled within each round), so that
    ``turns <= 6`` asks each family at most once and larger values ask several questions per family.
    ``family_weights`` asks family ``f`` that many times per round instead of once (a data mixture,
    as LLaVA-665k mixes its sources in chosen proportions).
    With probability ``simple_fraction`` the scene has at most ``SIMPLE_SCENE_MAX_OBJECTS`` objects:
    finding the one object a question names among few is how a decoder trained from scratch first
    learns where to look, which it then needs in cluttered scenes.
    """
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {tuple(SPLIT_SEEDS)}, got {split!r}")
    if not 0.0 <= simple_fraction <= 1.0:
        raise ValueError(f"simple_fraction must be in [0, 1], got {simple_fraction}")
    if family_weights is not None:
        check_family_weights(family_weights)
    pool = list(FAMILIES) if family_weights is None else [f for f, w in family_weights for _ in range(w)]
    rng = np.random.default_rng([world_seed, SPLIT_SEEDS[split], index, turns])
    if simple_fraction > 0 and rng.random() < simple_fraction:
        scene_cfg = dataclasses.replace(scene_cfg, max_objects=min(scene_cfg.max_objects, SIMPLE_SCENE_MAX_OBJECTS),
                                        min_objects=min(scene_cfg.min_objects, SIMPLE_SCENE_MAX_OBJECTS))
    scene = generate_scene(rng, scene_cfg)
    questions: list[Question] = []
    asked: set[str] = set()
    for _ in range(-(-turns // len(pool)) + 2):  # a few spare rounds for repeats and unanswerables
        for family in rng.permutation(len(pool)):
            try:
                q = make_question(pool[int(family)], scene, rng)
            except Unanswerable:
                continue
            if q.question in asked:
                continue
            asked.add(q.question)
            questions.append(q)
            if len(questions) == turns:
                return scene, questions
    return scene, questions


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32, CLIP-normalised."""
    x = torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (x - mean) / std


class MiniVQA(torch.utils.data.Dataset):
    """``n`` samples of one split, with per-sample metadata for the evaluation tables."""

    def __init__(
        self,
        split: str,
        n: int,
        tokenizer: PreTrainedTokenizerFast,
        n_image_tokens: int,
        world_seed: int = 0,
        scene_cfg: SceneConfig = DEFAULT_SCENE,
        offset: int = 0,
        turns: int = 1,
        simple_fraction: float = 0.0,
        family_weights: FamilyWeights | None = None,
        single_every: int = 0,
    ) -> None:
        if n <= 0:
            raise ValueError(f"n must be > 0, got {n}")
        if n_image_tokens <= 0:
            raise ValueError(f"n_image_tokens must be > 0, got {n_image_tokens}")
        if turns < 1:
            raise ValueError(f"turns must be >= 1, got {turns}")
        check_single_every(single_every)
        self.split, self.n, self.offset, self.turns = split, n, offset, turns
        self.simple_fraction = simple_fraction  # multi-turn (training) conversations only
        self.family_weights = family_weights  # likewise
        # Multi-turn only: every single_every-th item is one question about its own image instead of a
        # conversation (0 = never); the k-th such item is the split's single-question sample k.
        self.single_every = single_every if turns > 1 else 0
        self.tokenizer, self.n_image_tokens = tokenizer, n_image_tokens
        self.world_seed, self.scene_cfg = world_seed, scene_cfg
        self._prefix = [tokenizer.bos_token_id] + encode_words(tokenizer, USER)
        self._assistant = encode_words(tokenizer, ASSISTANT)
        self._items: dict[int, tuple[dict, np.ndarray]] | None = None  # see keep_items(): (item, uint8 image)

    def keep_items(self) -> MiniVQA:
        """Keep every item in memory once built (returns ``self``).

        For a split that many models are evaluated on (the test split): drawing, rendering and encoding
        cost about 1 ms per item, some 15% of an evaluation of 6000 questions. The store holds the ids,
        the metadata and the 8-bit image (27 KB at 96 px: 166 MB for 6000 items); each access returns
        fresh copies and converts the image again (0.1 ms), so a caller cannot change what the next
        one gets."""
        if self._items is None:
            self._items = {}
        return self

    def __len__(self) -> int:
        return self.n

    def sample(self, i: int) -> Sample:
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} samples")
        return make_sample(self.world_seed, self.split, self.offset + i, self.scene_cfg)

    def encode(self, s: Sample) -> dict:
        tok = self.tokenizer
        prompt = (
            self._prefix
            + [tok.image_token_id] * self.n_image_tokens
            + encode_words(tok, s.question.question)
            + self._assistant
        )
        answer = encode_words(tok, s.question.answer) + [tok.eos_token_id]
        grid = int(round(self.n_image_tokens**0.5))
        return {
            "prompt_ids": prompt,
            "answer_ids": answer,
            "pixel_values": image_to_tensor(s.scene.image),
            "meta": {
                "index": s.index,
                "family": s.question.family,
                "subtype": s.question.subtype,
                "question": s.question.question,
                "answer": s.question.answer,
                "n_objects": len(s.scene.objects),
                "n_elements": s.scene.n_elements,
                "complexity": s.scene.complexity,
                "background": s.scene.background,
                "busy_fraction": busy_patch_fraction(s.scene.image, grid),
            },
        }

    def encode_conversation(self, scene: Scene, questions: list[Question], index: int) -> dict:
        """Multi-turn training item: prompt_ids holds everything before the first answer."""
        tok = self.tokenizer
        ids = self._prefix + [tok.image_token_id] * self.n_image_tokens
        labels = [IGNORE_INDEX] * len(ids)
        user = encode_words(tok, USER)
        for k, q in enumerate(questions):
            prompt = (user if k else []) + encode_words(tok, q.question) + self._assistant
            answer = encode_words(tok, q.answer) + [tok.eos_token_id]
            ids += prompt + answer
            labels += [IGNORE_INDEX] * len(prompt) + answer
        return {"input_ids": ids, "labels": labels, "pixel_values": image_to_tensor(scene.image),
                "meta": {"index": index, "turns": len(questions)}}

    def __getitem__(self, i: int) -> dict:
        if self._items is None:
            return self._build(i)[0]
        if i not in self._items:
            item, image = self._build(i)
            self._items[i] = ({**item, "pixel_values": None}, image)
        item, image = self._items[i]
        return {k: image_to_tensor(image) if k == "pixel_values"
                else dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v
                for k, v in item.items()}

    def _build(self, i: int) -> tuple[dict, np.ndarray]:
        """(encoded item, its (H, W, 3) uint8 image)."""
        if self.turns > 1:
            if not 0 <= i < self.n:
                raise IndexError(f"index {i} out of range for {self.n} samples")
            if self.single_every and i % self.single_every == self.single_every - 1:
                single = make_sample(self.world_seed, self.split, self.offset + i // self.single_every, self.scene_cfg)
                return self.encode(single), single.scene.image
            scene, qs = make_conversation(self.world_seed, self.split, self.offset + i, self.turns, self.scene_cfg,
                                          self.simple_fraction, self.family_weights)
            return self.encode_conversation(scene, qs, self.offset + i), scene.image
        sample = self.sample(i)
        return self.encode(sample), sample.scene.image


@dataclass(frozen=True)
class Collator:
    """Pads a list of encoded samples.

    ``mode="train"`` concatenates prompt and answer, right-pads, and puts labels on the answer only.
    ``mode="generate"`` keeps the prompt only and left-pads (what ``generate`` expects).
    """

    pad_token_id: int
    mode: str = "train"

    def __post_init__(self) -> None:
        if self.mode not in ("train", "generate"):
            raise ValueError(f"Collator.mode must be 'train' or 'generate', got {self.mode!r}")

    def __call__(self, items: list[dict]) -> dict:
        if self.mode == "train":
            seqs = [it["input_ids"] if "input_ids" in it else it["prompt_ids"] + it["answer_ids"] for it in items]
            labs = [it["labels"] if "labels" in it else [IGNORE_INDEX] * len(it["prompt_ids"]) + it["answer_ids"]
                    for it in items]
        else:
            seqs = [it["prompt_ids"] for it in items]
            labs = None
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
        for b, s in enumerate(seqs):
            sl = slice(0, len(s)) if self.mode == "train" else slice(width - len(s), width)
            ids[b, sl] = torch.tensor(s)
            mask[b, sl] = 1
            if labs is not None:
                labels[b, sl] = torch.tensor(labs[b])
        batch = {
            "input_ids": ids,
            "attention_mask": mask,
            "pixel_values": torch.stack([it["pixel_values"] for it in items]),
            "meta": [it["meta"] for it in items],
            "answers": [it.get("answer_ids") for it in items],
        }
        if labs is not None:
            batch["labels"] = labels
        return batch
