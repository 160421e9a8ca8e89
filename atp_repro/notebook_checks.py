"""Checks on executed notebooks: what a reader sees, not only what the notebook wrote.

An executed notebook (``build/notebooks/<profile>/<name>.ipynb``) must show at least one figure
(an ``image/png`` output) and every claim of its claims file in full (pandas cuts long cells to
50 characters). :func:`output_problems` lists what is wrong; the root ``conftest.py`` turns it into
test items when pytest collects the executed smoke notebooks (the nbval step of ``make test``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from atp_repro import notebook_runner

__all__ = ["outputs", "output_texts", "image_count", "missing_claims", "claims_file", "output_problems",
           "is_executed_smoke_notebook"]

TEXT_TYPES = ("text/plain", "text/markdown", "text/html")


def outputs(nb: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code":
            yield from cell.get("outputs", [])


def _text(value: Any) -> str:
    return "".join(value) if isinstance(value, list) else str(value)


def output_texts(nb: dict[str, Any]) -> list[str]:
    """Every text a reader sees in the outputs: streams, plain text, markdown and HTML."""
    texts = []
    for out in outputs(nb):
        if "text" in out:
            texts.append(_text(out["text"]))
        for kind in TEXT_TYPES:
            if kind in out.get("data", {}):
                texts.append(_text(out["data"][kind]))
    return texts


def image_count(nb: dict[str, Any]) -> int:
    return sum("image/png" in out.get("data", {}) for out in outputs(nb))


def missing_claims(nb: dict[str, Any], claims: list[str]) -> list[str]:
    """The claims that do not appear in full in any output (as text, markdown or HTML)."""
    texts = output_texts(nb)

    def shown(claim: str) -> bool:
        forms = {claim, claim.replace("|", "\\|"),
                 claim.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")}
        return any(form in text for form in forms for text in texts)

    return [c for c in claims if not shown(c)]


def claims_file(executed: Path) -> Path:
    """The claims CSV an executed notebook wrote: ``<its folder>/tables/<name>.claims.csv``."""
    return executed.parent / "tables" / f"{executed.stem}.claims.csv"


def output_problems(executed: str | os.PathLike[str]) -> list[str]:
    """What a reader of this executed notebook would miss (empty list: nothing)."""
    path = Path(executed)
    nb = json.loads(path.read_text(encoding="utf-8"))
    problems = []
    if image_count(nb) == 0:
        problems.append(f"{path.name}: no image/png output (no figure shown)")
    claims_csv = claims_file(path)
    if not claims_csv.is_file():
        problems.append(f"{path.name}: no claims file {claims_csv}")
    else:
        claims = pd.read_csv(claims_csv, dtype=str, keep_default_na=False)["claim"].tolist()
        problems += [f"{path.name}: claim not shown in full: {c!r}" for c in missing_claims(nb, claims)]
    return problems


def is_executed_smoke_notebook(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a notebook the smoke profile executed (``build/notebooks/smoke/*.ipynb``)."""
    p = Path(path)
    return p.suffix == ".ipynb" and p.resolve().parent == notebook_runner.executed_dir("smoke").resolve()
