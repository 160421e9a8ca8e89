"""An annotation session: where a judge is in the sample, and what a click does. No widgets here
(:mod:`atp_repro.pairwise.annotator` draws it), so it is tested without a browser.

* It opens at the first item (in sample order) the judge has not judged: a session that was closed
  or killed resumes where the judge stopped, whatever happened in between.
* ``choose`` writes the judgement to disk (flushed and synced) *before* it moves on; then it goes to
  the next unjudged item after the current one (wrapping around), or to "done".
* ``skip`` moves to the next unjudged item without judging; ``back`` steps to the previous item in
  sample order, judged or not, where a new choice is recorded as a revision.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .records import JudgementLog, latest
from .sample import Item, PairwiseSample, load_sample

__all__ = ["AnnotationSession", "View"]


@dataclass(frozen=True)
class View:
    """What the annotator shows: never which system gave which answer."""

    done: bool
    position: int  # 0-based index of the item in the sample (len(sample) when done)
    total: int
    judged: int
    item_id: str = ""
    image_path: Path | None = None
    question: str = ""
    answer_a: str = ""
    answer_b: str = ""
    current_choice: str = ""  # this judge's recorded choice for the item, "" if none

    @property
    def progress(self) -> str:
        """e.g. "item 38 / 200 · 37 judged" """
        where = "done" if self.done else f"item {self.position + 1} / {self.total}"
        return f"{where} · {self.judged} / {self.total} judged"


class AnnotationSession:
    def __init__(self, sample_folder: str | os.PathLike[str], judge: str, *, kind: str = "human",
                 sample: PairwiseSample | None = None) -> None:
        self.folder = Path(sample_folder)
        self.sample = sample or load_sample(self.folder)
        self.log = JudgementLog(self.sample, self.folder, judge, kind)
        self._choices = {k: j.choice for k, j in latest(self.log.read()).items()}
        self.position: int | None = self._next_unjudged(-1)

    # ----- state -----------------------------------------------------------------------------------
    @property
    def items(self) -> tuple[Item, ...]:
        return self.sample.items

    @property
    def judged(self) -> int:
        return len(self._choices)

    @property
    def current(self) -> Item | None:
        return None if self.position is None else self.items[self.position]

    def _next_unjudged(self, after: int) -> int | None:
        n = len(self.items)
        for step in range(1, n + 1):
            k = (after + step) % n
            if self.items[k].id not in self._choices:
                return k
        return None

    def view(self) -> View:
        it = self.current
        if it is None:
            return View(True, len(self.items), len(self.items), self.judged)
        a, b = it.shown
        return View(False, self.position, len(self.items), self.judged, it.id, self.folder / it.image,
                    it.question, a, b, self._choices.get(it.id, ""))

    # ----- actions ---------------------------------------------------------------------------------
    def choose(self, choice: str) -> View:
        """Record ``choice`` ("A", "B" or "tie") for the current item, then go to the next unjudged one."""
        it = self.current
        if it is None:
            raise RuntimeError("every item is judged; use back() to change a judgement")
        self.log.record(it.id, choice)  # on disk before the session moves
        self._choices[it.id] = choice
        self.position = self._next_unjudged(self.position)
        return self.view()

    def skip(self) -> View:
        """Leave the current item unjudged and go to the next unjudged one (it comes round again)."""
        if self.position is not None:
            nxt = self._next_unjudged(self.position)
            self.position = nxt if nxt is not None else self.position
        return self.view()

    def back(self) -> View:
        """Step to the previous item in sample order (from "done": the last item)."""
        if self.position is None:
            self.position = len(self.items) - 1
        elif self.position > 0:
            self.position -= 1
        return self.view()
