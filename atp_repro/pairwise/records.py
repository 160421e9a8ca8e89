"""Judgement records: one JSON line per judgement, appended and flushed to disk on every click.

A line (all fields required, nothing else allowed)::

    {"sample": "3f9c0d2a61be", "item": "q000123", "judge": "H1", "kind": "human",
     "left": "atp", "choice": "A", "revision": 0, "time": "2026-12-01T05:12:09.120Z"}

* ``sample``: the id of the sample the item belongs to (a file of another sample is refused);
* ``left``: which system's answer was shown on the left, as "A" (the sample fixes it per item);
* ``choice``: "A" (left better), "B" (right better) or "tie";
* ``revision``: 0 for the first judgement of an item by this judge, k for its k-th change (the
  annotator's "back" lets a judge change a choice; the file stays append-only and the last
  revision counts). A repeated revision is a duplicate judgement and an error.

A file holds one judge's judgements of one sample: ``<sample folder>/judgements/<judge>.jsonl``.
A crash while a line is written leaves a last line without its newline: readers ignore that torn
line with a warning (only the click in flight is lost), and the writer removes it before it appends.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock

__all__ = [
    "CHOICES",
    "KINDS",
    "Judgement",
    "JudgementError",
    "JudgementLog",
    "check_judge_id",
    "judgement_path",
    "latest",
    "read_judgements",
]

CHOICES = ("A", "B", "tie")
KINDS = ("human", "automatic")
JUDGEMENTS_DIR = "judgements"
_JUDGE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class JudgementError(ValueError):
    """A judgement file that cannot be trusted; the message names the file and the line."""


@dataclass(frozen=True)
class Judgement:
    sample: str
    item: str
    judge: str
    kind: str
    left: str
    choice: str
    revision: int
    time: str

    def to_line(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False) + "\n"


FIELDS = tuple(f.name for f in fields(Judgement))


def check_judge_id(judge: str) -> str:
    """A judge id is also a file name: letters, digits, ``_ . -``, at most 64 characters."""
    if not isinstance(judge, str) or not _JUDGE_ID.fullmatch(judge):
        raise ValueError(f"judge must be 1-64 letters, digits, '_', '.' or '-' (starting with a letter or digit), "
                         f"got {judge!r}")
    return judge


def judgement_path(sample_folder: str | os.PathLike[str], judge: str) -> Path:
    return Path(sample_folder) / JUDGEMENTS_DIR / f"{check_judge_id(judge)}.jsonl"


def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _split_torn(text: str, path: Path) -> list[str]:
    """The complete lines of ``text``; a last line without its newline (a torn write) is dropped."""
    lines = text.split("\n")
    if lines[-1]:
        warnings.warn(f"{path}: line {len(lines)} is incomplete (a write was interrupted); ignoring it",
                      stacklevel=3)
    return lines[:-1]


def read_judgements(path: str | os.PathLike[str], sample) -> list[Judgement]:
    """Every judgement of ``path`` (all revisions, in file order), each checked against ``sample``
    (a :class:`~atp_repro.pairwise.sample.PairwiseSample`).

    Raises:
        JudgementError: naming the file and line, for a malformed line, a judgement of another sample,
            an unknown item, a ``left`` that is not the sample's, a judge other than the file's, or a
            duplicate judgement (a revision that is not the next one for its item).
    """
    path = Path(path)
    judge = path.stem
    items = {it.id: it for it in sample.items}
    seen: dict[str, int] = {}
    out = []
    for number, line in enumerate(_split_torn(path.read_text(encoding="utf-8"), path), start=1):
        where = f"{path}, line {number}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as err:
            raise JudgementError(f"{where}: not a JSON object ({err.msg})") from None
        if not isinstance(raw, dict) or set(raw) != set(FIELDS):
            got = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
            raise JudgementError(f"{where}: expected the fields {list(FIELDS)}, got {got}")
        j = Judgement(**raw)
        if j.sample != sample.sample_id:
            raise JudgementError(f"{where}: judgement of sample {j.sample!r}, but this folder's sample is "
                                 f"{sample.sample_id!r} (a file of another sample?)")
        if j.judge != judge:
            raise JudgementError(f"{where}: judge {j.judge!r} in the file of judge {judge!r}")
        if j.kind not in KINDS:
            raise JudgementError(f"{where}: kind must be one of {KINDS}, got {j.kind!r}")
        if j.choice not in CHOICES:
            raise JudgementError(f"{where}: choice must be one of {CHOICES}, got {j.choice!r}")
        if j.item not in items:
            raise JudgementError(f"{where}: unknown item {j.item!r} (not in sample {sample.sample_id})")
        if j.left != items[j.item].left:
            raise JudgementError(f"{where}: item {j.item!r} was shown with {items[j.item].left!r} on the left, "
                                 f"the line says {j.left!r}")
        expected = seen.get(j.item, 0)
        if not isinstance(j.revision, int) or isinstance(j.revision, bool) or j.revision != expected:
            what = "duplicate judgement" if isinstance(j.revision, int) and j.revision < expected else "bad revision"
            raise JudgementError(f"{where}: {what} of item {j.item!r}: revision {j.revision!r}, expected {expected}")
        seen[j.item] = expected + 1
        out.append(j)
    return out


def latest(judgements: list[Judgement]) -> dict[str, Judgement]:
    """The judgement that counts for each item: its last revision."""
    return {j.item: j for j in judgements}


class JudgementLog:
    """Appends one judge's judgements of one sample, each line flushed and synced before returning.

    Every append re-reads the file under a lock, so two sessions of the same judge (two browser tabs,
    a reloaded page) never write the same revision twice.
    """

    def __init__(self, sample, sample_folder: str | os.PathLike[str], judge: str, kind: str = "human") -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.sample, self.judge, self.kind = sample, check_judge_id(judge), kind
        self.path = judgement_path(sample_folder, judge)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.path.with_name(f".{self.path.name}.lock")))

    def read(self) -> list[Judgement]:
        return read_judgements(self.path, self.sample) if self.path.exists() else []

    def _drop_torn_tail(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(self.path, "r+b") as fh:
                fh.truncate(data.rfind(b"\n") + 1)

    def record(self, item: str, choice: str) -> Judgement:
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {CHOICES}, got {choice!r}")
        it = self.sample.item(item)
        with self._lock:
            self._drop_torn_tail()
            revision = sum(j.item == item for j in self.read())
            j = Judgement(self.sample.sample_id, it.id, self.judge, self.kind, it.left, choice, revision, now_utc())
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(j.to_line())
                fh.flush()
                os.fsync(fh.fileno())
        return j
