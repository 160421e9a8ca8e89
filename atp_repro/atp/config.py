"""ATPConfig: every knob of the ATP method, validated at construction.

Defaults follow the supplementary material (S-Sec. = supplementary section) and the main paper's
Table 6 setting; choices that the paper leaves open are marked "(choice)" and documented in
docs/interpretations.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The paper's module positions for the 32-layer LLaVA-1.5-7B language model (0-based: an ATP module
# sits *after* decoder layer l).
PAPER_MODULE_LAYERS: tuple[int, ...] = (4, 14, 24)
PAPER_NUM_LAYERS = 32

SCORE_NORMALISATIONS = ("minmax", "max")
POSITION_ENCODINGS = ("original", "rope2d", "learned2d")
SCORING_BACKENDS = ("auto", "eager", "fast")
INIT_CALIBRATIONS = ("none", "target")
IMPORTANCES = ("both", "self", "cross", "last", "raters", "uniform", "random")
CRITERIA = ("both", "redundancy", "spatial")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"ATPConfig.{name}={value!r} is invalid: expected {allowed}.")


@dataclass(frozen=True)
class ATPConfig:
    """Configuration of adaptive token pruning.

    Attributes:
        module_layers: 0-based decoder layers after which an ATP module runs, strictly increasing.
            Paper: after 4, 14 and 24 of 32 layers; see :func:`proportional_module_layers`.
        temperature: T of the soft masks sigmoid(T (S - theta)); S-Sec. 4.4 fixes T = 1e6.
        ste_temperature: if set, the forward pass uses the mask at ``temperature`` while the
            backward pass uses the gradient of sigmoid(ste_temperature (S - theta)) (straight-through,
            (choice)); at T = 1e6 the plain gradient to the thresholds is almost always zero.
        score_gradient: with ``ste_temperature``, whether the straight-through surrogate also passes
            gradient to the redundancy scores (and so to the attention that produces them), not only
            to the thresholds (choice; default False, see docs/interpretations.md, Method choices #9).
        lambda_sample: maps spatial scores 1 - lambda_sample * R into [0, 1) (S-Sec. 4.4); (choice) 2.0.
        grid_strides: strides of the nested uniform sampling grids of spatial augmented pruning.
        score_normalisation: per-instance normalisation of the importance scores to [0, 1] (choice).
        position_encoding: pruning positional encoding (S-Sec. 1.2): ``original`` keeps 1-D
            position ids (frozen-LM-safe), ``rope2d`` adds (row, col) rotary sections for vision
            tokens after the first module, ``learned2d`` adds a zero-initialised learned (row, col)
            embedding to surviving vision tokens at every module (choice).
        rope2d_sections: fractions of the rotary frequency pairs used for (1-D, row, col) by rope2d.
        n_target: target average number of vision tokens over all decoder layers (main Table 6: 130).
        lambda_atp: weight of L_ATP, the depth-weighted kept fraction (main setting 0.1).
        lambda_target: weight of L_target = |N_bar - N_target| / N_0 (main setting 0.2).
        fixed_keep: optional per-module token counts; each module then keeps exactly the top-k
            tokens by redundancy score instead of thresholding (timing studies, fixed baselines).
        scoring_backend: how pruning layers obtain attention scores. ``eager`` runs the pruning
            layer with eager attention and reads its probability map (the paper's strategy (2));
            ``fast`` keeps the model's own kernel (SDPA / flash) and computes only the score blocks
            from that layer's queries and keys; ``auto`` picks ``eager`` if the model runs eager.
        threshold_hidden: width of the threshold network's shared trunk.
        threshold_quantiles: score quantiles fed to the threshold network (count-independent input).
        init_keep_threshold: initial theta_r, low so that almost all tokens survive at step 0.
        init_spatial_threshold: initial theta_s, high so that spatial keeps start near zero.
        log_mask_eps: eps in the additive attention log-mask log(D + eps).
        init_calibration: how a fine-tune starts its thresholds: ``none`` at ``init_keep_threshold``
            (almost every token kept), ``target`` calibrated on a batch of training samples so that
            step 0 already keeps N_target on average (:func:`atp_repro.atp.calibration.calibrate_thresholds`;
            the training loop applies it, :func:`apply_atp` does not) (choice).
        importance: which attention importance forms the redundancy score S_r: ``both`` (the mean of
            the normalised self- and cross-modality importances, the paper's method), ``self`` or
            ``cross`` alone (the paper's importance ablation). Baselines and controls (with
            ``fixed_keep``): ``last`` uses the attention from the last prompt token only (FastV,
            PyramidDrop); ``raters`` the mean attention from SparseVLM's text raters (prompt tokens
            chosen from the input embeddings, :func:`atp_repro.atp.language_model.text_raters`);
            ``uniform`` and ``random`` ignore attention and rank grid positions by a fixed spatially
            uniform or random order (:mod:`atp_repro.atp.controls`).
        criteria: which pruning criteria decide: ``both`` (a token survives if S_r > theta_r or
            S_s > theta_s, the paper's method), ``redundancy`` alone (no spatial augmented pruning) or
            ``spatial`` alone (only the spatial grid rule; the paper's component ablation).
    """

    module_layers: tuple[int, ...] = PAPER_MODULE_LAYERS
    temperature: float = 1e6
    ste_temperature: float | None = None
    score_gradient: bool = False
    lambda_sample: float = 2.0
    grid_strides: tuple[int, ...] = (2, 3, 4, 6, 8, 12)
    score_normalisation: str = "minmax"
    position_encoding: str = "original"
    rope2d_sections: tuple[float, float, float] = (0.25, 0.375, 0.375)
    n_target: float = 130.0
    lambda_atp: float = 0.1
    lambda_target: float = 0.2
    fixed_keep: tuple[int, ...] | None = None
    scoring_backend: str = "auto"
    threshold_hidden: int = 64
    threshold_quantiles: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 0.9)
    init_keep_threshold: float = 0.01
    init_spatial_threshold: float = 0.995
    log_mask_eps: float = 1e-6
    init_calibration: str = "none"
    importance: str = "both"
    criteria: str = "both"

    def __post_init__(self) -> None:
        # Normalise sequences given as lists (e.g. from YAML / JSON) to tuples.
        for name in ("module_layers", "grid_strides", "rope2d_sections", "threshold_quantiles"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        if isinstance(self.fixed_keep, list):
            object.__setattr__(self, "fixed_keep", tuple(self.fixed_keep))

        layers = self.module_layers
        if not layers or any(not isinstance(x, int) or isinstance(x, bool) or x < 0 for x in layers):
            _fail("module_layers", layers, "a non-empty tuple of non-negative ints")
        if any(b <= a for a, b in zip(layers, layers[1:])):
            _fail("module_layers", layers, "strictly increasing layer indices")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            _fail("temperature", self.temperature, "a float > 0 (paper: 1e6)")
        if self.ste_temperature is not None and not self.ste_temperature > 0:
            _fail("ste_temperature", self.ste_temperature, "None or a float > 0")
        if not isinstance(self.score_gradient, bool):
            _fail("score_gradient", self.score_gradient, "True or False")
        if self.score_gradient and self.ste_temperature is None:
            _fail("score_gradient", self.score_gradient, "False unless ste_temperature is set (the surrogate "
                  "is what passes the gradient)")
        if not 0 < self.lambda_sample <= 4:
            _fail("lambda_sample", self.lambda_sample, "a float in (0, 4] so that scores lie in [0, 1)")
        if not self.grid_strides or any(not isinstance(s, int) or s < 2 for s in self.grid_strides):
            _fail("grid_strides", self.grid_strides, "a non-empty tuple of ints >= 2")
        if self.score_normalisation not in SCORE_NORMALISATIONS:
            _fail("score_normalisation", self.score_normalisation, f"one of {SCORE_NORMALISATIONS}")
        if self.position_encoding not in POSITION_ENCODINGS:
            _fail("position_encoding", self.position_encoding, f"one of {POSITION_ENCODINGS}")
        sections = self.rope2d_sections
        if len(sections) != 3 or any(s < 0 for s in sections) or not math.isclose(sum(sections), 1.0):
            _fail("rope2d_sections", sections, "three non-negative fractions summing to 1")
        if not (_is_number(self.n_target) and math.isfinite(self.n_target) and self.n_target > 0):
            _fail("n_target", self.n_target, "a finite number of tokens > 0")
        for name in ("lambda_atp", "lambda_target"):
            value = getattr(self, name)
            if not (_is_number(value) and math.isfinite(value) and value >= 0):
                _fail(name, value, "a finite float >= 0")
        if self.fixed_keep is not None:
            if len(self.fixed_keep) != len(layers):
                _fail("fixed_keep", self.fixed_keep, f"one count per module ({len(layers)} values) or None")
            if any(not isinstance(k, int) or isinstance(k, bool) or k < 0 for k in self.fixed_keep):
                _fail("fixed_keep", self.fixed_keep, "non-negative ints")
            if any(b > a for a, b in zip(self.fixed_keep, self.fixed_keep[1:])):
                _fail("fixed_keep", self.fixed_keep, "non-increasing counts (a later module cannot keep tokens an "
                      "earlier one dropped)")
        if self.scoring_backend not in SCORING_BACKENDS:
            _fail("scoring_backend", self.scoring_backend, f"one of {SCORING_BACKENDS}")
        if not (isinstance(self.threshold_hidden, int) and self.threshold_hidden > 0):
            _fail("threshold_hidden", self.threshold_hidden, "an int > 0")
        if not self.threshold_quantiles or any(not 0 <= q <= 1 for q in self.threshold_quantiles):
            _fail("threshold_quantiles", self.threshold_quantiles, "a non-empty tuple of floats in [0, 1]")
        for name in ("init_keep_threshold", "init_spatial_threshold"):
            if not 0 < getattr(self, name) < 1:
                _fail(name, getattr(self, name), "a float in (0, 1)")
        if self.init_calibration not in INIT_CALIBRATIONS:
            _fail("init_calibration", self.init_calibration, f"one of {INIT_CALIBRATIONS}")
        if self.importance not in IMPORTANCES:
            _fail("importance", self.importance, f"one of {IMPORTANCES}")
        if self.criteria not in CRITERIA:
            _fail("criteria", self.criteria, f"one of {CRITERIA}")
        if self.fixed_keep is not None and self.criteria == "spatial":
            _fail("criteria", self.criteria, "'both' or 'redundancy' with fixed_keep (top-k is taken by S_r)")
        if not 0 < self.log_mask_eps < 1:
            _fail("log_mask_eps", self.log_mask_eps, "a float in (0, 1)")

    # --- convenience -------------------------------------------------------------------------
    @property
    def num_modules(self) -> int:
        return len(self.module_layers)

    def replace(self, **changes: Any) -> ATPConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ATPConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"ATPConfig got unknown key(s) {unknown}; allowed keys: {sorted(known)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        """Write as JSON, atomically."""
        from ..paths import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: str | Path) -> ATPConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


def proportional_module_layers(
    num_layers: int,
    reference_layers: tuple[int, ...] = PAPER_MODULE_LAYERS,
    reference_depth: int = PAPER_NUM_LAYERS,
) -> tuple[int, ...]:
    """Map the paper's module positions (after layers 4, 14, 24 of 32) to a model with ``num_layers``.

    A module after 0-based layer l sits at depth (l + 1) / depth; we keep that fraction, round, and
    keep the layers distinct and strictly before the last layer (a module after the last layer
    would prune nothing that is used).

    >>> proportional_module_layers(32)
    (4, 14, 24)
    >>> proportional_module_layers(8)
    (0, 3, 5)
    """
    if num_layers < len(reference_layers) + 1:
        raise ValueError(
            f"num_layers={num_layers} is too shallow for {len(reference_layers)} ATP modules; "
            f"need at least {len(reference_layers) + 1} decoder layers"
        )
    layers: list[int] = []
    for ref in reference_layers:
        depth_fraction = (ref + 1) / reference_depth
        layer = max(0, round(depth_fraction * num_layers) - 1)
        if layers and layer <= layers[-1]:
            layer = layers[-1] + 1
        layers.append(min(layer, num_layers - 2))
    if len(set(layers)) != len(layers):
        raise ValueError(f"cannot place {len(reference_layers)} distinct modules in {num_layers} layers")
    return tuple(layers)
