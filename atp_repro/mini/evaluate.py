"""Evaluation of mini-world models: generation, exact match, per-family accuracy, tokens.

Definitions (README, "Interpretations"):

* accuracy per family: greedy ``generate`` on the prompt, exact match of the decoded answer words;
* chance per family: a *blind* baseline that answers every question with the most common answer
  to that exact question text in the same split (question-aware prior; an upper bound on what a
  model that ignores the image can score);
* Avg. Rate: mean over families of accuracy / upper-bound accuracy (the paper's retention rate);
* Token: vision tokens averaged over all decoder layers and all samples (the paper's definition),
  also given as a fraction of the grid and as its 576-equivalent (LLaVA-1.5's 24x24 grid);
* per-sample kept counts per decoder layer (prefill), for instance-adaptivity studies.
"""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .data import Collator, MiniVQA
from .image_inputs import model_inputs
from .questions import FAMILIES
from .scenes import COLOURS, SHAPE_PLURALS, SHAPES
from .tokenizer import decode_answer

LLAVA_TOKENS = 576


def has_atp(model: torch.nn.Module) -> bool:
    try:
        from atp_repro import atp_parameters  # type: ignore

        return len(atp_parameters(model)) > 0 or getattr(model, "atp_config", None) is not None
    except Exception:
        return False


def _kept_counts(model: torch.nn.Module, batch_size: int, n_layers: int, n_vision: int) -> np.ndarray:
    from atp_repro.baselines import baseline_token_counts
    from atp_repro.prellm import has_reduction

    if has_reduction(model) or has_atp(model):  # ATP, an in-LLM baseline, or a vision-side reduction
        return baseline_token_counts(model).detach().cpu().numpy().astype(np.int64)
    return np.full((batch_size, n_layers), n_vision, dtype=np.int64)


@dataclass
class EvalResult:
    records: pd.DataFrame  # one row per sample: meta, prediction, correct, mean_tokens
    kept: np.ndarray  # (n_samples, n_decoder_layers) vision tokens per layer
    grid: int
    seconds: float

    @property
    def n_vision(self) -> int:
        return self.grid * self.grid

    def by_family(self) -> pd.DataFrame:
        return accuracy_by_family(self.records)

    def tokens(self) -> dict[str, float]:
        return token_summary(self.kept, self.grid)


@torch.inference_mode()
def evaluate(
    model: torch.nn.Module,
    dataset: MiniVQA,
    *,
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    progress: bool = False,
) -> EvalResult:
    """Greedy generation on every sample of ``dataset``; returns per-sample records and kept counts."""
    model.eval()
    tok = dataset.tokenizer
    collate = Collator(tok.pad_token_id, mode="generate")
    max_new = max_new_tokens or dataset.scene_cfg.text_length + 1
    n_layers = model.config.text_config.num_hidden_layers
    grid = int(round(dataset.n_image_tokens**0.5))
    rows, kept = [], []
    t0 = time.perf_counter()
    starts = range(0, len(dataset), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="eval")
    for s in starts:
        batch = collate([dataset[i] for i in range(s, min(s + batch_size, len(dataset)))])
        out = model.generate(
            **model_inputs(model, batch, ("input_ids", "attention_mask", "pixel_values")),
            max_new_tokens=max_new,
            do_sample=False,
        )
        counts = _kept_counts(model, len(batch["meta"]), n_layers, dataset.n_image_tokens)
        gen = out[:, batch["input_ids"].shape[1] :].tolist()
        for b, meta in enumerate(batch["meta"]):
            pred = decode_answer(tok, gen[b])
            rows.append({**meta, "prediction": pred, "correct": pred == meta["answer"],
                         "mean_tokens": float(counts[b].mean())})
        kept.append(counts)
    records = pd.DataFrame(rows)
    return EvalResult(records, np.concatenate(kept, axis=0), grid, time.perf_counter() - t0)


def question_template(question: str) -> str:
    """The question with colour and shape words replaced by placeholders (its "type")."""
    colours, shapes = set(COLOURS), set(SHAPES) | set(SHAPE_PLURALS.values())
    return " ".join("<c>" if w in colours else "<s>" if w in shapes else w for w in question.split())


def blind_chance(records: pd.DataFrame) -> pd.Series:
    """Per family: accuracy of the best constant answer per question template (an image-blind
    prior that knows the answer distribution of each question type in this split)."""
    def family_chance(df: pd.DataFrame) -> float:
        tmpl = df["question"].map(question_template)
        top = df.groupby(tmpl)["answer"].agg(lambda a: a.value_counts().iloc[0])
        return float(top.sum() / len(df))

    return records.groupby("family")[["question", "answer"]].apply(family_chance)


def accuracy_by_family(records: pd.DataFrame) -> pd.DataFrame:
    fams = [f for f in FAMILIES if f in set(records["family"])]
    g = records.groupby("family")
    df = pd.DataFrame(
        {
            "n": g.size(),
            "accuracy": g["correct"].mean(),
            "chance": blind_chance(records),
        }
    ).loc[fams]
    df.index.name = "family"
    return df


# Scene sizes (number of objects) for per-complexity breakdowns: one object (nothing to search),
# a few, several, crowded. SceneConfig allows at most 10 objects.
OBJECT_BUCKETS: tuple[tuple[int, int], ...] = ((1, 1), (2, 3), (4, 5), (6, 10))


def _bucket_label(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo}-{hi}"


def accuracy_by_objects(records: pd.DataFrame,
                        buckets: tuple[tuple[int, int], ...] = OBJECT_BUCKETS) -> pd.DataFrame:
    """Accuracy, image-blind chance and mean kept vision tokens per family and scene size.

    ``buckets`` are inclusive ``(low, high)`` object counts, in increasing, non-overlapping order;
    every record's ``n_objects`` must fall in one. Empty (family, bucket) cells are left out.
    ``chance`` is :func:`blind_chance` fitted on the cell itself, so on small cells it is an
    optimistic prior. Returns ``family, objects, n, accuracy, chance, mean_tokens`` (tokens in grid
    units, averaged over decoder layers and the cell's samples).
    """
    if not buckets:
        raise ValueError("buckets must hold at least one (low, high) pair, got ()")
    for (lo, hi), nxt in zip(buckets, list(buckets[1:]) + [None]):
        if not 0 <= lo <= hi or (nxt is not None and nxt[0] <= hi):
            raise ValueError(f"buckets must be increasing, non-overlapping (low, high) pairs with 0 <= low <= high, "
                             f"got {buckets}")
    label = pd.Series(None, index=records.index, dtype=object)
    for lo, hi in buckets:
        label[records["n_objects"].between(lo, hi)] = _bucket_label(lo, hi)
    if label.isna().any():
        odd = sorted(set(records.loc[label.isna(), "n_objects"]))
        raise ValueError(f"buckets {buckets} do not cover n_objects {odd}")
    rows = []
    for family in [f for f in FAMILIES if f in set(records["family"])]:
        for lo, hi in buckets:
            cell = records[(records["family"] == family) & (label == _bucket_label(lo, hi))]
            if cell.empty:
                continue
            rows.append({"family": family, "objects": _bucket_label(lo, hi), "n": len(cell),
                         "accuracy": float(cell["correct"].mean()), "chance": float(blind_chance(cell).iloc[0]),
                         "mean_tokens": float(cell["mean_tokens"].mean())})
    return pd.DataFrame(rows, columns=["family", "objects", "n", "accuracy", "chance", "mean_tokens"])


def pope_metrics(records: pd.DataFrame) -> pd.DataFrame:
    """POPE's metrics on the existence family, one row per negative-sampling setting.

    As in POPE, each setting pairs all positive questions with that setting's negatives (``random``:
    an object category absent from the scene, the mini world's only kind; ``adversarial``: POPE's
    co-occurring absent objects, scored when records have them; ``all``: every negative), "yes" is
    the positive class, and ``yes_ratio`` is the share of "yes" answers. A model that answers
    without looking at the image shows equal recall and false-positive rate (``yes_gap`` = 0).
    Returns ``setting, n, accuracy, precision, recall, f1, yes_ratio, fpr, yes_gap``.
    """
    ex = records[records["family"] == "existence"]
    positives = ex[ex["subtype"] == "positive"]
    rows = []
    for setting in ("random", "adversarial", "all"):
        negatives = ex[ex["subtype"] != "positive"] if setting == "all" else ex[ex["subtype"] == setting]
        if positives.empty or negatives.empty:
            continue
        said_yes_pos = positives["prediction"].eq("yes")
        said_yes_neg = negatives["prediction"].eq("yes")
        tp, fp = int(said_yes_pos.sum()), int(said_yes_neg.sum())
        recall, fpr = tp / len(positives), fp / len(negatives)
        precision = tp / (tp + fp) if tp + fp else float("nan")
        f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
        n = len(positives) + len(negatives)
        rows.append({"setting": setting, "n": n, "accuracy": (tp + len(negatives) - fp) / n, "precision": precision,
                     "recall": recall, "f1": f1, "yes_ratio": (tp + fp) / n, "fpr": fpr, "yes_gap": recall - fpr})
    return pd.DataFrame(rows, columns=["setting", "n", "accuracy", "precision", "recall", "f1", "yes_ratio", "fpr",
                                       "yes_gap"])


def avg_rate(acc: pd.Series, upper_bound: pd.Series) -> float:
    """Mean over families of ``acc / upper_bound`` (families present in both; a family the upper
    bound scores 0 on has no defined rate and is skipped; NaN if none is left)."""
    common = [f for f in acc.index if f in upper_bound.index and upper_bound[f] > 0]
    return float(np.mean([acc[f] / upper_bound[f] for f in common])) if common else float("nan")


def check_bootstrap(level: float, n_boot: int) -> None:
    """Reject a confidence ``level`` outside (0, 1) or fewer than one bootstrap replicate."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")


def family_accuracy(records: pd.DataFrame) -> pd.Series:
    """Accuracy per family in FAMILIES order (as :func:`accuracy_by_family`, without the chance level)."""
    acc = records.groupby("family")["correct"].mean()
    return acc.loc[[f for f in FAMILIES if f in acc.index]]


def avg_rate_interval(records: pd.DataFrame, upper_bound: pd.DataFrame, families: list[str] | None = None, *,
                      level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Paired bootstrap interval of :func:`avg_rate` over the test questions.

    Both models answer the same questions, so each replicate redraws question ids (with replacement,
    within each family, keeping the family sizes) and scores *both* models on the redrawn ids: the
    interval reflects which questions happen to be in the test set, the noise that separates two
    runs of the same model on different test sets. ``families`` restricts the rate (default: all
    families both record sets have). Returns the ``(low, high)`` percentile interval at ``level``.
    """
    check_bootstrap(level, n_boot)
    (per_replicate,) = _family_rate_replicates(records, upper_bound, families, n_boot, np.random.default_rng(seed))
    if np.isnan(per_replicate).all():
        return float("nan"), float("nan")
    tail = 100 * (1 - level) / 2
    low, high = np.nanpercentile(per_replicate, [tail, 100 - tail])
    return float(low), float(high)


def _family_rate_replicates(records: pd.DataFrame, upper_bound: pd.DataFrame, families: list[str] | None,
                            n_boot: int, rng: np.random.Generator, others: tuple[pd.DataFrame, ...] = ()
                            ) -> list[np.ndarray]:
    """Bootstrap replicates of the Avg. Rate of ``records`` and each of ``others`` (same redrawn question
    ids for all of them and the upper bound): a list of (n_boot,) arrays, one per record set."""
    sets = [r.set_index("index") for r in (records, *others)]
    ub = upper_bound.set_index("index")
    fams = [f for f in FAMILIES if all(f in set(s["family"]) for s in sets) and f in set(ub["family"])]
    if families is not None:
        fams = [f for f in fams if f in families]
    if not fams:
        return [np.full(n_boot, np.nan) for _ in sets]
    rates: list[list[np.ndarray]] = [[] for _ in sets]
    for f in fams:
        ids = ub.index[ub["family"] == f]
        for s in sets:
            missing = ids.difference(s.index)
            if len(missing):
                raise ValueError(f"records lack {len(missing)} of the upper bound's {f!r} questions (e.g. index "
                                 f"{missing[0]}): all must be evaluated on the same test set")
        b = ub.loc[ids, "correct"].to_numpy(dtype=float)
        draw = rng.integers(0, len(ids), size=(n_boot, len(ids)))  # (n_boot, n_f) resampled question ids
        acc_b = b[draw].mean(1)
        for k, s in enumerate(sets):
            acc_a = s.loc[ids, "correct"].to_numpy(dtype=float)[draw].mean(1)
            with np.errstate(divide="ignore", invalid="ignore"):
                rates[k].append(np.where(acc_b > 0, acc_a / acc_b, np.nan))
    with _all_nan_replicates_allowed():
        return [np.nanmean(np.stack(r), axis=0) for r in rates]


@contextmanager
def _all_nan_replicates_allowed():
    """A replicate in which the upper bound gets no redrawn question of any family right has no rate
    (NaN, left out of the interval). numpy warns about it ("Mean of empty slice", "All-NaN slice
    encountered"; np.errstate does not cover these); only these two warnings are silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"Mean of empty slice|All-NaN slice encountered", RuntimeWarning)
        yield


def rate_difference_interval(records: pd.DataFrame, other: pd.DataFrame, upper_bound: pd.DataFrame,
                             families: list[str] | None = None, *, level: float = 0.95, n_boot: int = 2000,
                             seed: int = 0) -> tuple[float, float, float]:
    """Avg. Rate of ``records`` minus that of ``other``, with a paired bootstrap interval.

    Both runs and the upper bound answered the same test questions; each replicate redraws question
    ids (within families) once and scores all three on them, so the interval is that of the
    *difference*, which is much narrower than the two rates' own intervals would suggest (the two
    runs get mostly the same questions right). Returns ``(difference, low, high)``.
    """
    check_bootstrap(level, n_boot)
    ub_acc = family_accuracy(upper_bound)
    if families is not None:
        ub_acc = ub_acc[[f for f in ub_acc.index if f in families]]
    diff = avg_rate(family_accuracy(records), ub_acc) - avg_rate(family_accuracy(other), ub_acc)
    a, b = _family_rate_replicates(records, upper_bound, families, n_boot, np.random.default_rng(seed), (other,))
    tail = 100 * (1 - level) / 2
    with _all_nan_replicates_allowed():
        low, high = np.nanpercentile(a - b, [tail, 100 - tail])
    return float(diff), float(low), float(high)


def token_summary(kept: np.ndarray, grid: int) -> dict[str, float]:
    n0 = grid * grid
    mean = float(kept.mean())
    return {
        "tokens": mean,
        "grid_tokens": float(n0),
        "fraction_of_grid": mean / n0,
        "tokens_576_equiv": mean / n0 * LLAVA_TOKENS,
        "per_sample_std": float(kept.mean(axis=1).std()),
    }


def spearman(x: np.ndarray | pd.Series, y: np.ndarray | pd.Series) -> float:
    """Spearman rank correlation (average ranks for ties); NaN if either side is constant."""
    rx = pd.Series(np.asarray(x, dtype=float)).rank().to_numpy()
    ry = pd.Series(np.asarray(y, dtype=float)).rank().to_numpy()
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def complexity_correlation(result: EvalResult) -> dict[str, float]:
    """Rank correlation of per-sample mean kept tokens with scene-complexity measures."""
    r = result.records
    return {col: spearman(r["mean_tokens"], r[col]) for col in ("complexity", "n_elements", "busy_fraction")}
