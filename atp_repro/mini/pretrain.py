"""Vision-tower pretraining: the mini world's stand-in for LLaVA's pretrained CLIP encoder.

LLaVA-1.5 never trains its vision tower: it starts from CLIP ViT-L/14, pretrained on 400M image-text
pairs, and keeps it frozen. The mini world cannot download CLIP, so it pretrains its own small CLIP
vision tower on a dense perception task over the same procedural scenes (a different seed stream
from every VQA split):

* per patch: the colour, shape and size of the object covering most of it (or none), whether the
  object's centre lies in it, the text glyph covering it (or none) and that glyph's place in the
  label (first, second, ...), and the patch's own row and column (CLIP features keep where a patch
  is; without these targets the small tower loses it and spatial questions become unlearnable);
* per image (mean-pooled patches): the background texture and tone.

The heads read the hidden state LLaVA feeds to its projector (``vision_feature_layer``), and are
discarded afterwards. The upper bound then trains projector + LM on the VQA task with this tower
frozen, as LLaVA does.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .data import image_to_tensor
from .scenes import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    SIZES,
    TEXT_ALPHABET,
    SceneConfig,
    generate_scene,
    glyph_slot_map,
    label_maps,
    patch_labels,
)
from .train import cosine_with_warmup

MAX_TEXT_LENGTH = 4  # SceneConfig.text_length is at most 4
MAX_GRID = 48  # finest grid of the 96 px canvas (patch 2); row/col heads have this many classes
PRETRAIN_SEED = 44  # scene stream of the pretraining images (the VQA splits use 11, 22, 33)
HEADS: dict[str, int] = {  # per-patch classification heads: classes including "none" (0)
    "colour": len(COLOURS) + 1,
    "shape": len(SHAPES) + 1,
    "size": len(SIZES) + 1,
    "centre": 2,
    "glyph": len(TEXT_ALPHABET) + 1,
    "glyph_slot": MAX_TEXT_LENGTH + 1,
    "row": MAX_GRID,
    "col": MAX_GRID,
}
GLOBAL_HEADS: dict[str, int] = {"background": len(BACKGROUNDS), "tone": 2}
FOREGROUND_HEADS = ("colour", "shape", "size", "centre", "glyph", "glyph_slot")  # class 0 is "none"
PRETRAIN_LOSS = "balanced-v1"  # part of the cached tower's key: a new loss gives a new artifact


@dataclass(frozen=True)
class PretrainConfig:
    # Linear probes on object/glyph patches of held-out scenes (balanced loss): 400 steps at 2e-3 give
    # shape 0.33 (of 4) and glyph 0.27 (of 10); 1200 at 5e-3 give shape 0.75 (small objects 0.60),
    # glyph 0.81, size 0.93, colour 1.00, with the loss still falling fast (shape part 0.62); 3000 at
    # 5e-3 give shape 0.98 (small 0.96), size 0.99, colour 1.00 (shape part 0.07, glyph part 0.02).
    # With the 3000-step tower an upper-bound probe reads text at 1.00 after 450 steps, against 0.71
    # after 600 with the 1200-step tower (measured; the other families did not move).
    steps: int = 3000
    batch_size: int = 32
    lr: float = 5e-3
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    seed: int = 0
    num_threads: int = 2  # torch threads; fixed (not the core count) so a run is the same on every machine

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "num_threads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"PretrainConfig.{name} must be > 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"PretrainConfig.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"PretrainConfig.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")

    def replace(self, **changes) -> PretrainConfig:
        return dataclasses.replace(self, **changes)


def scene_targets(index: int, grid: int, scene_cfg: SceneConfig, world_seed: int = 0) -> tuple[torch.Tensor, dict]:
    """Pixel tensor and dense targets of pretraining image ``index``."""
    rng = np.random.default_rng([world_seed, PRETRAIN_SEED, index])
    scene = generate_scene(rng, scene_cfg)
    objects, glyphs = label_maps(scene)
    obj = patch_labels(objects, grid).reshape(-1)
    colour_ids = {c: i + 1 for i, c in enumerate(COLOURS)}
    shape_ids = {s: i + 1 for i, s in enumerate(SHAPES)}
    size_ids = {s: i + 1 for i, s in enumerate(SIZES)}
    lut = {k: np.zeros(len(scene.objects) + 1, dtype=np.int64) for k in ("colour", "shape", "size")}
    centre = np.zeros(grid * grid, dtype=np.int64)
    p = scene.image.shape[0] / grid
    for i, o in enumerate(scene.objects):
        lut["colour"][i + 1] = colour_ids[o.colour]
        lut["shape"][i + 1] = shape_ids[o.shape]
        lut["size"][i + 1] = size_ids[o.size]
        centre[min(int(o.y // p), grid - 1) * grid + min(int(o.x // p), grid - 1)] = 1
    targets = {k: torch.from_numpy(lut[k][obj]) for k in lut}
    targets["centre"] = torch.from_numpy(centre)
    targets["glyph"] = torch.from_numpy(patch_labels(glyphs, grid).reshape(-1))
    targets["glyph_slot"] = torch.from_numpy(patch_labels(glyph_slot_map(scene), grid).reshape(-1))
    rows, cols = np.divmod(np.arange(grid * grid), grid)  # raster order, as the LM sees the patches
    targets["row"], targets["col"] = torch.from_numpy(rows), torch.from_numpy(cols)
    targets["background"] = torch.tensor(BACKGROUNDS.index(scene.background))
    targets["tone"] = torch.tensor(0 if scene.tone == "dark" else 1)
    return image_to_tensor(scene.image), targets


def balanced_cross_entropy(logits: torch.Tensor, target: torch.Tensor, *, has_none: bool) -> torch.Tensor:
    """Cross-entropy with labelled patches weighted like all "none" patches together.

    Most patches show background, so a plain mean is dominated by the easy "none" class: a tower
    trained that way reaches a low loss while telling shapes and glyphs apart barely better than
    chance (measured by a linear probe on object patches: shape 0.31 of 4 classes, glyph 0.16 of 10).
    Averaging the labelled patches separately gives them half the weight whatever their share.
    """
    if not has_none:
        return nn.functional.cross_entropy(logits, target)
    fg = target > 0
    loss = nn.functional.cross_entropy(logits, target, reduction="none")
    bg_part = loss[~fg].mean() if (~fg).any() else loss.new_zeros(())
    fg_part = loss[fg].mean() if fg.any() else loss.new_zeros(())
    return bg_part + fg_part


class PerceptionHeads(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.patch = nn.Linear(hidden, sum(HEADS.values()))
        self.image = nn.Linear(hidden, sum(GLOBAL_HEADS.values()))

    def loss(self, feats: torch.Tensor, targets: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        logits = self.patch(feats)  # (B, N, C)
        out, parts, start = 0.0, {}, 0
        for name, n in HEADS.items():
            part = balanced_cross_entropy(logits[..., start : start + n].flatten(0, 1), targets[name].flatten(),
                                          has_none=name in FOREGROUND_HEADS)
            out, parts[name], start = out + part, float(part.detach()), start + n
        g = self.image(feats.mean(1))
        start = 0
        for name, n in GLOBAL_HEADS.items():
            part = nn.functional.cross_entropy(g[:, start : start + n], targets[name])
            out, parts[name], start = out + part, float(part.detach()), start + n
        return out, parts


def pretrain_vision_tower(model, grid: int, scene_cfg: SceneConfig, cfg: PretrainConfig, *,
                          world_seed: int = 0, progress: bool = True, checkpoint_path: Path | None = None,
                          run_hash: str = "", checkpoint_every: int = 250,
                          on_step: Callable[[int], None] | None = None) -> dict:
    """Train ``model.model.vision_tower`` in place on dense perception targets; returns a summary.

    With ``checkpoint_path``, the state (tower, heads, optimizer, schedule, RNG, losses) is saved every
    ``checkpoint_every`` steps and at the end; a later call with the same ``run_hash`` resumes from it
    and ends with the same weights as an uninterrupted run. ``on_step(done)`` runs after each step.
    """
    from .train import _load_checkpoint, _save_checkpoint

    torch.set_num_threads(cfg.num_threads)
    tower = model.model.vision_tower
    layer = model.config.vision_feature_layer
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        heads = PerceptionHeads(tower.config.hidden_size)
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(1, int(round(cfg.warmup_ratio * cfg.steps))) if cfg.warmup_ratio > 0 else 0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_with_warmup(s, cfg.steps, warm))
    start, wall, losses, parts = 0, 0.0, [], {}
    state = _load_checkpoint(checkpoint_path, run_hash) if checkpoint_path is not None else None
    if state is not None:
        tower.load_state_dict(state["tower"])
        heads.load_state_dict(state["heads"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        start, wall, losses, parts = state["step"], state["wall_time_s"], state["losses"], state["parts"]
    tower.train()
    for step in tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress,
                     desc="pretrain vision"):
        t0 = time.perf_counter()
        items = [scene_targets(step * cfg.batch_size + b, grid, scene_cfg, world_seed) for b in range(cfg.batch_size)]
        pixels = torch.stack([x for x, _ in items])
        targets = {k: torch.stack([t[k] for _, t in items]) for k in items[0][1]}
        hidden = tower(pixels, output_hidden_states=True).hidden_states[layer][:, 1:]
        loss, parts = heads.loss(hidden, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        wall += time.perf_counter() - t0
        done = step + 1
        if checkpoint_path is not None and (done % checkpoint_every == 0 or done == cfg.steps):
            checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
            _save_checkpoint(checkpoint_path, {
                "step": done, "tower": tower.state_dict(), "heads": heads.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state(), "wall_time_s": wall,
                "losses": losses, "parts": parts}, run_hash)
        if on_step is not None:
            on_step(done)
    tower.eval()
    return {"pretrain_wall_time_s": wall, "pretrain_losses": losses, "pretrain_final_parts": parts,
            "resumed_from": start}
