"""What the mini world's vision grid costs: one step of each stage at its grid vs LLaVA-1.5's 24x24.

Training the 24x24 upper bound takes several times the cold ``make reproduce`` budget, so instead of
training it, this measures in one process what one step of each stage costs at each grid, on freshly
initialised models (the cost of a step does not depend on the weights), and predicts each stage's
time from the step counts of the world config:

* vision-tower pretraining: forward + backward of the dense perception heads on one batch;
* upper bound: forward + backward of projector + LM on one batch of multi-turn conversations
  (and the single questions mixed in), tower frozen (LLaVA stage 2);
* evaluation: greedy generation on test questions (an untrained model rarely stops early, so this is
  the longest answers' cost).

Each time is the median of ``repeats`` runs after one warm-up run. The grid is ``image_size //
patch_size`` of the 96 px canvas: 12 -> patch 8 (144 tokens), 24 -> patch 4 (576 tokens).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from .data import Collator
from .evaluate import evaluate
from .model import build_model
from .pretrain import PerceptionHeads, scene_targets
from .runs import MiniWorldConfig
from .tokenizer import build_tokenizer


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` calls after ``warmup`` untimed calls."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def grid_world(world: MiniWorldConfig, grid: int) -> MiniWorldConfig:
    """``world`` with a ``grid`` x ``grid`` vision grid (same canvas, patch size ``image_size // grid``)."""
    size = world.model.image_size
    if grid < 1 or size % grid:
        allowed = [g for g in range(1, size + 1) if size % g == 0]
        raise ValueError(f"grid must divide the {size} px canvas, one of {allowed}; got {grid}")
    return world.replace(model=world.model.replace(patch_size=size // grid))


def grid_step_costs(world: MiniWorldConfig, grids: Sequence[int] | None = None, *, repeats: int = 3,
                    eval_questions: int = 32) -> pd.DataFrame:
    """Seconds per step of each mini-world stage at each grid, and the stage times they predict.

    ``grids`` defaults to the world's own grid and LLaVA-1.5's 24.

    Returns one row per grid: ``grid, vision_tokens, tower_step_s, ub_step_s, eval_question_s`` and
    the predicted ``tower_min`` / ``ub_min`` (step time x the config's steps) and ``eval_min`` (per
    question x ``world.n_test``, for one model).
    """
    torch.set_num_threads(world.train.num_threads)
    tok = build_tokenizer()
    grids = (world.grid, 24) if grids is None else grids
    return pd.DataFrame([_grid_costs(grid_world(world, g), tok, repeats, eval_questions) for g in grids])


def _grid_costs(w: MiniWorldConfig, tok, repeats: int, eval_questions: int) -> dict[str, float]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(w.model.seed)
        model = build_model(w.model, tok)
        heads = PerceptionHeads(w.model.vision_hidden)
    tower, layer = model.model.vision_tower, model.config.vision_feature_layer

    items = [scene_targets(i, w.grid, w.scene, w.world_seed) for i in range(w.pretrain.batch_size)]
    pixels = torch.stack([x for x, _ in items])  # (B, 3, H, W)
    targets = {k: torch.stack([t[k] for _, t in items]) for k in items[0][1]}

    def tower_step() -> None:
        hidden = tower(pixels, output_hidden_states=True).hidden_states[layer][:, 1:]  # (B, grid^2, D)
        heads.loss(hidden, targets)[0].backward()
        model.zero_grad(set_to_none=True)
        heads.zero_grad(set_to_none=True)

    model.train()
    tower_s = median_seconds(tower_step, repeats)

    convs = w.dataset("train", n=w.train.batch_size, tokenizer=tok, turns=w.ub_turns)
    batch = Collator(tok.pad_token_id)([convs[i] for i in range(len(convs))])
    tower.requires_grad_(False)  # frozen in the upper bound's training, as in LLaVA-1.5 stage 2

    def ub_step() -> None:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"], labels=batch["labels"])
        out.loss.backward()
        model.zero_grad(set_to_none=True)

    ub_s = median_seconds(ub_step, repeats)

    test = w.dataset("test", n=eval_questions, tokenizer=tok)
    eval_s = median_seconds(lambda: evaluate(model, test), repeats) / eval_questions
    return {
        "grid": w.grid,
        "vision_tokens": w.grid * w.grid,
        "tower_step_s": tower_s,
        "ub_step_s": ub_s,
        "eval_question_s": eval_s,
        "tower_min": tower_s * w.pretrain.steps / 60,
        "ub_min": ub_s * w.train.steps / 60,
        "eval_min": eval_s * w.n_test / 60,
    }
