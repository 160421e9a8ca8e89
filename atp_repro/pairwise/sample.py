"""The sample of a pairwise evaluation: which items are judged, and which answer is shown on the left.

Items are drawn with a seed from two evaluation runs of the same questions (one row per question,
with the question, the reference answer and the run's prediction); for each item a second seeded
draw decides which system's answer is shown on the left ("A"). The sample folder holds everything an
annotator needs and nothing that names the systems on screen::

    <folder>/manifest.json        items, seeds, source runs and their hashes, the sample id
    <folder>/images/<item>.png    the image of each item
    <folder>/judgements/*.jsonl   one file per judge (atp_repro.pairwise.records)

The sample id is a hash of the manifest's content (seeds, sources, items with their answers and
sides), so a judgement file records which sample it judged; the images are checked against their
hashes in the manifest.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from atp_repro import paths

__all__ = ["Item", "PairwiseSample", "draw_sample", "find_sample_folder", "records_hash", "write_sample", "load_sample"]

MANIFEST = "manifest.json"
FORMAT = "atp-repro pairwise sample"
VERSION = 1
REQUIRED_COLUMNS = ("question", "answer", "prediction")


@dataclass(frozen=True)
class Item:
    id: str
    question: str
    reference: str  # the ground-truth answer (used by the reference judge, never shown to annotators)
    answers: dict[str, str]  # system -> its answer
    left: str  # the system whose answer is shown as "A"
    question_id: str = ""  # the question's id in the evaluation runs
    image: str = ""  # path of the image, relative to the sample folder
    image_sha256: str = ""

    @property
    def right(self) -> str:
        """The system whose answer is shown as "B"."""
        return next(s for s in self.answers if s != self.left)

    def side(self, choice: str) -> str | None:
        """The system a choice ("A" / "B" / "tie") prefers; None for a tie."""
        return None if choice == "tie" else {"A": self.left, "B": self.right}[choice]

    @property
    def shown(self) -> tuple[str, str]:
        """The answers as the annotator sees them: (A, B)."""
        return self.answers[self.left], self.answers[self.right]


@dataclass(frozen=True)
class PairwiseSample:
    sample_id: str
    seed: int
    systems: tuple[str, str]  # (system judged, system it is compared with), e.g. ("atp", "upper_bound")
    sources: dict[str, dict[str, Any]]  # system -> what produced its answers (run names, hashes)
    items: tuple[Item, ...]

    def item(self, item_id: str) -> Item:
        for it in self.items:
            if it.id == item_id:
                return it
        raise KeyError(f"item {item_id!r} is not in sample {self.sample_id}")

    def __len__(self) -> int:
        return len(self.items)


def records_hash(records: pd.DataFrame) -> str:
    """sha256 of the columns a sample reads from an evaluation run (identifies the run's outputs)."""
    cols = [c for c in ("question", "answer", "prediction") if c in records.columns]
    return hashlib.sha256(records[cols].to_csv(index=True).encode("utf-8")).hexdigest()


def _content_id(seed: int, systems: tuple[str, str], sources: Mapping, items: list[Item]) -> str:
    """Hash of what was judged: seeds, sources, and each item's text, answers and sides (the images are
    checked against the hashes in the manifest instead, so the id is known before they are written)."""
    content = [{k: v for k, v in asdict(it).items() if k not in ("image", "image_sha256")} for it in items]
    blob = json.dumps({"seed": seed, "systems": list(systems), "sources": sources, "items": content},
                      sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]


def draw_sample(runs: Mapping[str, pd.DataFrame], n: int, seed: int, *,
                sources: Mapping[str, Mapping[str, Any]] | None = None, prefix: str = "q") -> PairwiseSample:
    """``n`` items drawn with ``seed`` from two runs' per-question outputs, sides randomised per item.

    Args:
        runs: exactly two systems, {name: records}; the first is the system judged (its win rate is
            reported). Records share their index (the question id) and have the columns
            ``question``, ``answer`` (reference) and ``prediction``.
        n: items to draw (without replacement), 1 <= n <= the number of questions.
        seed: draws the items and, from a second stream, the side of each.
        sources: per system, what produced the records (run names, artifact hashes); the records'
            own hash is added.
    """
    if len(runs) != 2:
        raise ValueError(f"runs must hold exactly two systems, got {list(runs)}")
    systems = tuple(runs)
    for name, rec in runs.items():
        missing = [c for c in REQUIRED_COLUMNS if c not in rec.columns]
        if missing:
            raise ValueError(f"runs[{name!r}]: missing columns {missing}; expected {list(REQUIRED_COLUMNS)}")
        if rec.index.has_duplicates:
            raise ValueError(f"runs[{name!r}]: question ids (the index) must be unique")
    a, b = (runs[s] for s in systems)
    if set(a.index) != set(b.index):
        raise ValueError(f"runs {systems[0]!r} and {systems[1]!r} must answer the same questions "
                         f"({len(set(a.index) ^ set(b.index))} ids differ)")
    b = b.loc[a.index]
    if not (a["question"].astype(str).values == b["question"].astype(str).values).all():
        raise ValueError(f"runs {systems[0]!r} and {systems[1]!r} have different questions under the same id")
    if not (isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0):
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if not (isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= len(a)):
        raise ValueError(f"n must be an int from 1 to {len(a)} (the questions both runs answered), got {n!r}")
    ids = np.random.default_rng([seed, 0]).choice(np.asarray(a.index), size=n, replace=False)
    left_first = np.random.default_rng([seed, 1]).random(n) < 0.5
    items = []
    width = len(str(max(int(i) for i in a.index))) if a.index.dtype.kind in "iu" else 0
    for qid, first in zip(ids.tolist(), left_first.tolist()):
        ra, rb = a.loc[qid], b.loc[qid]
        items.append(Item(id=f"{prefix}{qid:0{width}d}" if width else f"{prefix}{qid}", question=str(ra["question"]),
                          reference=str(ra["answer"]),
                          answers={systems[0]: str(ra["prediction"]), systems[1]: str(rb["prediction"])},
                          left=systems[0] if first else systems[1], question_id=str(qid)))
    srcs = {s: {**dict((sources or {}).get(s, {})), "records_sha256": records_hash(runs[s])} for s in systems}
    return PairwiseSample(_content_id(seed, systems, srcs, items), seed, systems, srcs, tuple(items))


def _png(image: np.ndarray | bytes) -> bytes:
    if isinstance(image, bytes):
        return image
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def write_sample(sample: PairwiseSample, folder: str | os.PathLike[str],
                 image: Callable[[Item], np.ndarray | bytes]) -> PairwiseSample:
    """Write the images and the manifest into ``folder``; returns the sample with its image paths and
    hashes (same id).

    ``image(item)`` gives the item's picture (an (H, W, 3) uint8 array or PNG bytes). Every file is
    written atomically and the manifest last, so a folder with a manifest is complete. An existing
    manifest of the same sample is left as it is; one of another sample is an error (its judgements
    would be orphaned).
    """
    folder = Path(folder)
    items = []
    for it in sample.items:
        data = _png(image(it))
        rel = f"images/{it.id}.png"
        target = folder / rel
        if not (target.exists() and target.read_bytes() == data):
            paths.atomic_write_bytes(target, data)
        items.append(Item(**{**asdict(it), "image": rel, "image_sha256": hashlib.sha256(data).hexdigest()}))
    sid = sample.sample_id
    full = PairwiseSample(sid, sample.seed, sample.systems, sample.sources, tuple(items))
    text = json.dumps({"format": FORMAT, "version": VERSION, "sample_id": sid, "seed": full.seed,
                       "systems": list(full.systems), "sources": full.sources,
                       "items": [asdict(it) for it in items]}, indent=1, ensure_ascii=False) + "\n"
    manifest = folder / MANIFEST
    if manifest.exists():
        old = load_sample(folder, check_images=False)
        if old.sample_id != sid:
            raise ValueError(f"{manifest}: holds sample {old.sample_id}, not {sid}; write the new sample to "
                             "another folder (judgements of the old one refer to it)")
        if manifest.read_text(encoding="utf-8") == text:
            return full
    paths.atomic_write_text(manifest, text)
    return full


def load_sample(folder: str | os.PathLike[str], *, check_images: bool = True) -> PairwiseSample:
    """The sample of ``folder``, checked: format, id against content, and (by default) image hashes."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest}: no sample manifest here (create the sample first)")
    try:
        raw = json.loads(manifest.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{manifest}: not JSON ({err.msg}, line {err.lineno})") from None
    if raw.get("format") != FORMAT or raw.get("version") != VERSION:
        raise ValueError(f"{manifest}: not a {FORMAT!r} version {VERSION} manifest")
    items = tuple(Item(**it) for it in raw["items"])
    systems = tuple(raw["systems"])
    sid = _content_id(raw["seed"], systems, raw["sources"], list(items))
    if sid != raw["sample_id"]:
        raise ValueError(f"{manifest}: content does not match its sample id {raw['sample_id']} (edited by hand?)")
    if check_images:
        for it in items:
            path = folder / it.image
            if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != it.image_sha256:
                raise ValueError(f"{path}: missing or changed (item {it.id} of sample {sid})")
    return PairwiseSample(sid, raw["seed"], systems, raw["sources"], items)


ANNOTATIONS_DIR = "annotations"  # under the output root: the repository root for `make reproduce`


def find_sample_folder(sample_folder: str | os.PathLike[str] = "") -> Path:
    """``sample_folder`` resolved from the repository root; empty: the newest sample under ``annotations/``."""
    if str(sample_folder):
        folder = paths.resolve(sample_folder)
        if not (folder / MANIFEST).is_file():
            raise FileNotFoundError(f"sample_folder {sample_folder}: no {MANIFEST} there")
        return folder
    found = sorted((paths.resolve(ANNOTATIONS_DIR)).glob(f"*/{MANIFEST}"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no sample under {ANNOTATIONS_DIR}/: run the supp_table5_pairwise_evaluation "
                                "notebook (or `make reproduce`) first, or give sample_folder")
    return found[-1].parent
