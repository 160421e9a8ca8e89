"""Check that a run reproduced the committed results: ``atp-repro verify`` / ``make verify``.

The committed manifest (``tables/MANIFEST.json``) holds, for every result table, its reproducible
content: every cell except those that measure time on this machine (wall-times, step costs, prefill
timings, and the claims and evidence built on them). With the pinned CPU numerics
(:mod:`atp_repro.numerics`) a fresh ``make reproduce`` on any Intel x86-64 CPU with AVX2 gives
exactly that content (on other vendors' CPUs MKL does not take the pin, and verify says so
first); ``verify`` compares the files on disk with it and lists each file and cell that differs,
with the committed and the new value. ``verify --update`` rewrites the manifest from the files on
disk (the maintainer does this after a ``make reproduce`` whose changes are intended).

What counts as timing is decided by names, listed below, so that it is visible and testable.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from . import claims_summary, paths

MANIFEST_NAME = "MANIFEST.json"
MANIFEST_VERSION = 1

# Whole files that record timings only (Table 3's timing study: per-run times, per-layer times,
# the metrics and claims derived from them).
TIMING_FILES = re.compile(r"^supp_table3_flash_attention_timing\.(runs|layers|metrics)\.csv$")
# Row or column labels (long tables) and column names (wide tables) of timed quantities.
TIMING_LABEL = re.compile(
    r"wall[-_ ]?time|cuda time|\btime\b|seconds|_time_s$|_step_s$|_question_s$|\((?:s|ms|min)\)|^Δ$",
    re.IGNORECASE,
)
# Claims whose verdict is decided by a timing (their evidence quotes seconds or minutes).
TIMING_CLAIM = re.compile(r"wall-time|cheaper|faster|as fast|speeds? up|prefill time|saving|reduction|overhead|"
                          r"t\(atp|train within", re.IGNORECASE)
# Columns of a claims file that are compared (for the claims not decided by a timing).
CLAIM_COLUMNS = ("claim", "verdict", "evidence")
# Generated from the claims files (atp_repro.claims_summary): not listed in the manifest; verify
# checks instead that they match the claims files on disk.
DERIVED_FILES = frozenset({claims_summary.SUMMARY_CSV, claims_summary.SUMMARY_MD})


@dataclass
class Difference:
    file: str
    where: str
    committed: Any
    now: Any

    def __str__(self) -> str:
        return f"{self.file}: {self.where}: committed {self.committed!r}, now {self.now!r}"


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def reproducible_content(path: Path) -> pd.DataFrame | None:
    """The cells of a result CSV that do not depend on timing (None for a timing-only file)."""
    if TIMING_FILES.match(path.name):
        return None
    df = _read(path)
    if path.name.endswith(".claims.csv"):
        keep = ~df["claim"].str.contains(TIMING_CLAIM)
        return df.loc[keep, [c for c in CLAIM_COLUMNS if c in df.columns]].reset_index(drop=True)
    if {"row", "column"} <= set(df.columns):  # long paper-vs-run table
        timed = df["row"].str.contains(TIMING_LABEL) | df["column"].str.contains(TIMING_LABEL)
        return df.loc[~timed].reset_index(drop=True)
    return df[[c for c in df.columns if not TIMING_LABEL.search(c)]]


def _digest(df: pd.DataFrame) -> str:
    buf = io.StringIO()
    df.to_csv(buf, index=False, lineterminator="\n")
    return hashlib.sha256(buf.getvalue().encode()).hexdigest()


def result_files(root: Path) -> list[Path]:
    """The result CSVs the manifest covers: every ``tables/*.csv`` but the claims summary, which
    only collects the claims files (checked against them instead, see :func:`verify`)."""
    return sorted(p for p in (root / "tables").glob("*.csv") if p.name not in DERIVED_FILES)


def build_manifest(root: Path | None = None) -> dict[str, Any]:
    """The manifest of the result files under ``root`` (default: the repository)."""
    root = root or paths.repo_root()
    files: dict[str, Any] = {}
    for path in result_files(root):
        rel = path.relative_to(root).as_posix()
        content = reproducible_content(path)
        if content is None:
            files[rel] = {"timing_only": True}
            continue
        files[rel] = {"sha256": _digest(content), "columns": list(content.columns),
                      "rows": content.to_numpy().tolist()}
    artifacts, conflicts = recorded_artifacts(root)
    if conflicts:
        raise ValueError("the result files were computed from different weights under one artifact name; "
                         "re-run the notebooks that used the older ones first:\n" + "\n".join(map(str, conflicts)))
    return {"version": MANIFEST_VERSION, "numerics": sorted(recorded_numerics(root)), "artifacts": artifacts,
            "files": files}


def recorded_numerics(root: Path) -> set[str]:
    """The numerics modes the result files' provenance sidecars record (e.g. {"pinned"}); a pinned run
    in which the pin did not hold is its own mode, naming the code paths it ran."""
    modes = set()
    for sidecar in (root / "tables").glob("*.provenance.json"):
        state = json.loads(sidecar.read_text()).get("device", {}).get("numerics", {})
        mode = state.get("mode", "unrecorded")
        if mode == "pinned" and state.get("in_effect") is False:  # e.g. MKL ignored the pin (non-Intel CPU)
            mkl = state.get("mkl", {}).get("branch", "unknown")
            mode = f"pinned, not in effect (ATen {state.get('cpu_capability')}, MKL branch {mkl})"
        modes.add(mode)
    return modes


def recorded_artifacts(root: Path) -> tuple[dict[str, dict[str, str]], list[Difference]]:
    """The trained artifacts the provenance sidecars name (folder name -> {weights file: SHA-256}), and
    one :class:`Difference` per artifact that two sidecars name with different weights."""
    found: dict[str, dict[str, str]] = {}
    seen_in: dict[str, str] = {}
    conflicts = []
    for sidecar in sorted((root / "tables").glob("*.provenance.json")):
        for name, files in json.loads(sidecar.read_text()).get("artifacts", {}).items():
            if name in found and found[name] != files:
                conflicts.append(Difference(f"tables/{sidecar.name}", f"weights of {name}",
                                            f"{_short(found[name])} (tables/{seen_in[name]})", _short(files)))
                continue
            found.setdefault(name, files)
            seen_in.setdefault(name, sidecar.name)
    return dict(sorted(found.items())), conflicts


def _short(files: dict[str, str]) -> str:
    return ", ".join(f"{rel} {digest[:12]}" for rel, digest in files.items())


def write_manifest(root: Path | None = None) -> Path:
    root = root or paths.repo_root()
    manifest = build_manifest(root)
    return paths.atomic_write_text(root / "tables" / MANIFEST_NAME,
                                   json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")


def _cell_differences(rel: str, committed: dict[str, Any], now: pd.DataFrame) -> list[Difference]:
    old = pd.DataFrame(committed["rows"], columns=committed["columns"])
    if list(old.columns) != list(now.columns):
        return [Difference(rel, "columns", list(old.columns), list(now.columns))]
    out = []
    key = old.columns[0]
    for i in range(max(len(old), len(now))):
        if i >= len(old) or i >= len(now):
            where = f"row {i + 1}"
            out.append(Difference(rel, where, None if i >= len(old) else old.iloc[i].tolist(),
                                  None if i >= len(now) else now.iloc[i].tolist()))
            continue
        for col in old.columns:
            a, b = old.at[i, col], now.at[i, col]
            if a != b:
                label = " / ".join(str(now.at[i, c]) for c in ("row", "column") if c in now.columns) or \
                    f"{key}={now.at[i, key]}"
                out.append(Difference(rel, f"line {i + 2} ({label}), column {col!r}", a, b))
    return out


def verify(root: Path | None = None, manifest_path: Path | None = None) -> list[Difference]:
    """Differences between the result files under ``root`` and the committed manifest (empty: reproduced)."""
    root = root or paths.repo_root()
    manifest_path = manifest_path or root / "tables" / MANIFEST_NAME
    if not manifest_path.is_file():
        raise FileNotFoundError(f"no manifest at {manifest_path}: run 'atp-repro verify --update' after make reproduce")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{manifest_path}: manifest version {manifest.get('version')!r}, expected {MANIFEST_VERSION}")
    out: list[Difference] = []
    made_with, now = manifest.get("numerics", []), sorted(recorded_numerics(root))
    if made_with != now:  # not itself a difference of results, but it explains any that follow
        out.append(Difference("tables/*.provenance.json", "numerics mode", made_with, now))
    # Other weights under the same artifact name (training did not reproduce) also explain the cell
    # differences that follow; an artifact a run did not use again is not compared.
    artifacts, conflicts = recorded_artifacts(root)
    out.extend(conflicts)
    for name, committed in manifest.get("artifacts", {}).items():
        if name in artifacts and artifacts[name] != committed:
            out.append(Difference("tables/*.provenance.json", f"weights of {name}", _short(committed),
                                  _short(artifacts[name])))
    for rel, entry in manifest["files"].items():
        path = root / rel
        if not path.is_file():
            out.append(Difference(rel, "file", "present", "missing"))
            continue
        if entry.get("timing_only"):
            continue
        content = reproducible_content(path)
        if content is None or _digest(content) != entry["sha256"]:
            out.extend(_cell_differences(rel, entry, content if content is not None else pd.DataFrame()))
    for path in result_files(root):
        rel = path.relative_to(root).as_posix()
        if rel not in manifest["files"]:
            out.append(Difference(rel, "file", "absent from the manifest", "present"))
    try:
        stale = claims_summary.stale_files(root / "tables")
    except claims_summary.ClaimsFileError as err:
        stale, out = [], [*out, Difference("tables/*.claims.csv", "format", "valid claims files", str(err))]
    for name in stale:
        out.append(Difference(f"tables/{name}", "content", "generated from the claims files",
                              "stale (run 'atp-repro claims-summary')"))
    return out
