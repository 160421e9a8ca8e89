"""Automatic judges: they see what an annotator sees (image, question, answers A and B) and write
judgements in the same record format as people do.

* :class:`ReferenceJudge` (the mini world's): prefers the answer that matches the ground truth; a tie
  when both or neither match. It stands in for an oracle annotator, not for a model.
* :class:`ModelJudge`: any local model behind a ``generate(image_path, prompt) -> text`` function,
  prompted with :data:`PROMPT_TEMPLATE` (the paper used GPT-4V; this package never calls a network
  service). :meth:`ModelJudge.from_pretrained` builds the function from a local Hugging Face
  image-text-to-text model folder.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

from atp_repro import paths

from .records import CHOICES, Judgement, check_judge_id, judgement_path, latest, now_utc, read_judgements
from .sample import Item, PairwiseSample

__all__ = ["Judge", "ReferenceJudge", "ModelJudge", "PROMPT_TEMPLATE", "parse_choice", "run_judge"]

PROMPT_TEMPLATE = (
    "You compare two answers to a question about the image.\n"
    "Question: {question}\n"
    "Answer A: {answer_a}\n"
    "Answer B: {answer_b}\n"
    "Which answer is better? Reply with exactly one of: A, B, tie."
)

class Judge:
    """A judge decides "A", "B" or "tie" for an item as shown (left answer = A)."""

    judge_id: str
    kind: str = "automatic"

    def choose(self, item: Item, image_path: Path) -> str:  # pragma: no cover - interface
        raise NotImplementedError

class ReferenceJudge(Judge):
    """Prefers the answer equal to the reference answer; tie when both or neither are."""

    def __init__(self, judge_id: str = "reference") -> None:
        self.judge_id = check_judge_id(judge_id)

    def choose(self, item: Item, image_path: Path) -> str:
        a, b = item.shown
        ok_a, ok_b = a == item.reference, b == item.reference
        return "A" if ok_a and not ok_b else "B" if ok_b and not ok_a else "tie"

def parse_choice(text: str) -> str | None:
    """The first standalone "A" or "B" (capital: "a" is an article) or "tie" (any case) in a model's reply;
    None when there is none."""
    m = re.search(r"\b(A|B|[Tt][Ii][Ee])\b", text)
    if m is None:
        return None
    return m.group(1) if m.group(1) in ("A", "B") else "tie"

class ModelJudge(Judge):
    """A local model as judge: ``generate(image_path, prompt)`` returns its reply, parsed by
    :func:`parse_choice`. A reply without a choice is an error naming the item and the reply."""

    def __init__(self, judge_id: str, generate: Callable[[Path, str], str], template: str = PROMPT_TEMPLATE) -> None:
        self.judge_id = check_judge_id(judge_id)
        for field in ("{question}", "{answer_a}", "{answer_b}"):
            if field not in template:
                raise ValueError(f"template must contain {field}; got {template!r}")
        self.generate, self.template = generate, template

    def prompt(self, item: Item) -> str:
        a, b = item.shown
        return self.template.format(question=item.question, answer_a=a, answer_b=b)

    def choose(self, item: Item, image_path: Path) -> str:
        reply = self.generate(image_path, self.prompt(item))
        choice = parse_choice(reply)
        if choice is None:
            raise ValueError(f"judge {self.judge_id}: no A / B / tie in the reply for item {item.id}: {reply!r}")
        return choice

    @classmethod
    def from_pretrained(cls, model_path: str | os.PathLike[str], judge_id: str | None = None, *,
                        template: str = PROMPT_TEMPLATE, max_new_tokens: int = 8, device: str = "cpu",
                        **model_kwargs) -> ModelJudge:
        """A judge from a local image-text-to-text model folder (weights, processor with a chat template).

        Loads with ``local_files_only=True``: nothing is downloaded. Decoding is greedy.
        """
        folder = Path(model_path).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"model_path {model_path}: not a local folder (a model judge loads local "
                                    "weights only; download them first)")
        import torch
        from PIL import Image
        from transformers import AutoModelForImageTextToText, AutoProcessor

        processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
        model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True, **model_kwargs)
        model = model.to(device).eval()

        @torch.inference_mode()
        def generate(image_path: Path, prompt: str) -> str:
            chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            text = processor.apply_chat_template(chat, add_generation_prompt=True)
            inputs = processor(images=Image.open(image_path).convert("RGB"), text=text, return_tensors="pt").to(device)
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            return processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

        return cls(judge_id or folder.name, generate, template)

def run_judge(judge: Judge, sample: PairwiseSample, folder: str | os.PathLike[str]) -> Path:
    """Judge every item of ``sample`` and write ``<folder>/judgements/<judge>.jsonl`` (atomically).

    A file that already holds the same choices for every item is kept as it is (its times too), so
    re-running a deterministic judge leaves the folder unchanged.
    """

    folder = Path(folder)
    choices = {it.id: judge.choose(it, folder / it.image) for it in sample.items}
    for item_id, choice in choices.items():
        if choice not in CHOICES:
            raise ValueError(f"judge {judge.judge_id}: choice {choice!r} for item {item_id}; expected one of {CHOICES}")
    path = judgement_path(folder, judge.judge_id)
    if path.exists():
        old = {k: j.choice for k, j in latest(read_judgements(path, sample)).items()}
        if old == choices:
            return path
    time = now_utc()
    lines = [Judgement(sample.sample_id, it.id, judge.judge_id, judge.kind, it.left, choices[it.id], 0, time).to_line()
             for it in sample.items]
    return paths.atomic_write_text(path, "".join(lines))
