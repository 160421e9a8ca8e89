"""Training loop for the mini world: the structure of supplementary Table 1, scaled down.

AdamW, cosine decay with linear warm-up, weight decay, separate learning rates for the language
model (plus projector) and the ATP modules, an optional frozen LM (only ATP modules train), autocast
(bf16 optional; fp32 is the default because bf16 is emulated, ~10x slower, on CPUs without
AVX512-BF16), gradient clipping, a tqdm progress bar, and resumable checkpoints written atomically.

Determinism: batch ``s`` is a pure function of ``(seed, s)`` (a per-epoch permutation), the model
has no dropout, and the optimizer/scheduler/RNG states are checkpointed, so a run killed at any
point and restarted ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .cache import atomic_torch_save, canonical_json, file_sha256, spec_hash
from .data import Collator, MiniVQA
from .image_inputs import model_inputs
from .model import vision_tower_parameters

TRAINABLE = ("all", "lm", "atp")
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class TrainConfig:
    """``trainable``: ``all`` (upper bound from scratch), ``lm`` (projector + LM + ATP; the vision
    tower is frozen as in LLaVA-1.5 stage 2) or ``atp`` (frozen LM: only the ATP modules)."""

    steps: int = 600
    batch_size: int = 16
    n_train: int = 9600
    lr_lm: float = 1.5e-3
    lr_atp: float = 1e-3
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    trainable: str = "all"
    precision: str = "fp32"
    checkpoint_every: int = 50
    seed: int = 0
    world_seed: int = 0
    num_threads: int = 2  # torch threads; fixed (not the core count) so a run is the same on every machine

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "n_train", "checkpoint_every", "num_threads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name} must be > 0, got {getattr(self, name)}")
        for name in ("lr_lm", "lr_atp"):
            if not getattr(self, name) > 0:
                raise ValueError(f"TrainConfig.{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"TrainConfig.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.weight_decay < 0:
            raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay}")
        if self.trainable not in TRAINABLE:
            raise ValueError(f"TrainConfig.trainable must be one of {TRAINABLE}, got {self.trainable!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainConfig.precision must be one of {PRECISIONS}, got {self.precision!r}")

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    @property
    def warmup_steps(self) -> int:
        return max(1, int(round(self.warmup_ratio * self.steps))) if self.warmup_ratio > 0 else 0


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to 0 (HF ``get_cosine_schedule_with_warmup``)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Sample indices of batch ``step``: consecutive slices of per-epoch permutations."""
    out: list[int] = []
    pos = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        take = min(batch_size - len(out), n - offset)
        out.extend(int(i) for i in perm[offset : offset + take])
        pos += take
    return out


def param_groups(model: torch.nn.Module, cfg: TrainConfig, atp_params: list[torch.nn.Parameter]) -> list[dict]:
    """Set ``requires_grad`` per ``cfg.trainable`` and return AdamW groups (LM lr, ATP lr)."""
    atp_ids = {id(p) for p in atp_params}
    vision_ids = {id(p) for p in vision_tower_parameters(model)}
    lm: list[torch.nn.Parameter] = []
    for p in model.parameters():
        if id(p) in atp_ids:
            p.requires_grad_(True)
            continue
        train = cfg.trainable == "all" or (cfg.trainable == "lm" and id(p) not in vision_ids)
        p.requires_grad_(train)
        if train:
            lm.append(p)
    groups = []
    if lm:
        groups.append({"params": lm, "lr": cfg.lr_lm, "name": "lm"})
    if atp_params:
        groups.append({"params": list(atp_params), "lr": cfg.lr_atp, "name": "atp"})
    if not groups:
        raise ValueError(f"nothing to train: trainable={cfg.trainable!r} and the model has no ATP parameters")
    return groups


@dataclass
class TrainResult:
    steps: int
    wall_time_s: float  # summed over all (resumed) sessions, checkpoint I/O excluded
    losses: list[float]
    resumed_from: int
    tracked: list[float] = dataclasses.field(default_factory=list)  # ``track(model)`` after each forward


def _save_checkpoint(path: Path, state: dict, run_hash: str) -> None:
    atomic_torch_save(state, path)
    meta = {"run_hash": run_hash, "step": state["step"], "sha256": file_sha256(path)}
    atomic_torch_save(meta, path.with_suffix(".meta"))


def _load_checkpoint(path: Path, run_hash: str) -> dict | None:
    """A verified checkpoint, or ``None`` (with a warning) if it is absent, corrupted or foreign."""
    meta_path = path.with_suffix(".meta")
    if not path.exists() or not meta_path.exists():
        return None
    import warnings

    try:
        meta = torch.load(meta_path, weights_only=True)
        if meta.get("run_hash") != run_hash:
            warnings.warn(f"{path}: checkpoint belongs to another config; starting from scratch", stacklevel=3)
            return None
        if file_sha256(path) != meta.get("sha256"):
            warnings.warn(f"{path}: checkpoint checksum mismatch (corrupted); starting from scratch", stacklevel=3)
            return None
        return torch.load(path, weights_only=False)
    except Exception as e:  # unreadable pickle etc.
        warnings.warn(f"{path}: unreadable checkpoint ({e}); starting from scratch", stacklevel=3)
        return None


def train(
    model: torch.nn.Module,
    dataset: MiniVQA,
    cfg: TrainConfig,
    *,
    checkpoint_path: Path | None = None,
    run_spec: dict | None = None,
    extra_loss: Callable[[torch.nn.Module], torch.Tensor] | None = None,
    atp_params: list[torch.nn.Parameter] | None = None,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    track: Callable[[torch.nn.Module], float] | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``cfg.steps`` steps, resuming from ``checkpoint_path`` if valid.

    ``extra_loss(model)`` is added to the LM loss after each forward (the ATP budget loss).
    ``on_step(step, loss)`` is called after each optimizer step (tests use it to interrupt).
    ``track(model)`` is read after each forward (e.g. the batch's mean vision-token count) and kept,
    like the losses, in checkpoints and the result.
    """
    if len(dataset) < cfg.n_train:
        raise ValueError(f"dataset has {len(dataset)} samples but TrainConfig.n_train={cfg.n_train}")
    torch.set_num_threads(cfg.num_threads)
    run_hash = spec_hash(json.loads(canonical_json({"train": dataclasses.asdict(cfg), "run": run_spec or {}})))
    groups = param_groups(model, cfg, atp_params or [])
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: cosine_with_warmup(s, cfg.steps, cfg.warmup_steps)
    )
    collate = Collator(dataset.tokenizer.pad_token_id, mode="train")
    start, wall, losses, tracked = 0, 0.0, [], []
    state = _load_checkpoint(checkpoint_path, run_hash) if checkpoint_path else None
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        start, wall, losses = state["step"], state["wall_time_s"], state["losses"]
        tracked = state.get("tracked", [])
    resumed_from = start
    model.train()
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    bar = tqdm(total=cfg.steps, initial=start, disable=not progress, desc="train", dynamic_ncols=True)
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        batch = collate([dataset[i] for i in batch_indices(step, cfg.batch_size, cfg.n_train, cfg.seed)])
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            out = model(**model_inputs(model, batch))
            loss = out.loss + (extra_loss(model) if extra_loss is not None else 0.0)
        if track is not None:
            tracked.append(float(track(model)))
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        wall += time.perf_counter() - t0
        losses.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        done = step + 1
        if checkpoint_path is not None and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            state = {
                "step": done,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "wall_time_s": wall,
                "losses": losses,
                "tracked": tracked,
            }
            _save_checkpoint(checkpoint_path, state, run_hash)
        if on_step is not None:
            on_step(done, losses[-1])
    bar.close()
    model.eval()
    return TrainResult(steps=cfg.steps, wall_time_s=wall, losses=losses, resumed_from=resumed_from, tracked=tracked)
