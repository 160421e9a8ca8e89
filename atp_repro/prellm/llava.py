"""Vision-side token reduction (PruMerge+, VisionZip) on transformers' own LLaVA, by hooks only.

The reduced image of sample i has K_i tokens (PruMerge+: adaptive; VisionZip: fixed), so the language
model sees a prompt with K_i image placeholders instead of N, at consecutive positions, exactly as
the methods' public code splices features into LLaVA's input. A caller keeps passing the processor's
N placeholders:

- ``model(...)`` with ``pixel_values``: a pre-hook computes the reduced features once (the hooks below
  fire inside transformers' ``get_image_features``), rewrites ``input_ids`` / ``attention_mask`` /
  ``labels`` / ``position_ids`` to K_i placeholders per sample (left padding kept), and hands the
  features to LLaVA as ``mm_encoder_outputs``; a post-hook puts the logits back at the input's length
  (zeros at the removed placeholders), so ``labels`` and logits stay aligned with ``input_ids``.
- ``model.generate(...)``: the prompt is rewritten *before* generation (the KV cache is the short
  one), and the returned sequences are the caller's ``input_ids`` followed by the new tokens.

Hooks on the vision encoder capture the normalised input of one layer's attention (queries and keys
are recomputed from it, so any attention kernel works) and the feature layer's output with the CLS
token; a pre-hook on the projector swaps its input for the reduced features (padded), and a hook on
its output unpads them into the per-image list LLaVA concatenates.

Token accounting: K_i vision tokens enter every decoder layer (:func:`reduction_counts`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from . import rules

__all__ = ["METHODS", "ReductionConfig", "TokenReducer", "apply_reduction", "has_reduction", "reduction_counts",
           "prumerge_attention", "prumerge_count_range", "prumerge_divisor_for", "prumerge_neighbours",
           "reduction_for_budget"]

METHODS = ("prumerge+", "visionzip")
PRUMERGE_NEIGHBOURS_576 = 32  # the public code's cluster size on 576 patches


def prumerge_neighbours(num_patches: int) -> int:
    """PruMerge's 32 merge neighbours on 576 patches, scaled to ``num_patches`` (at least 1)."""
    return max(1, round(PRUMERGE_NEIGHBOURS_576 * num_patches / 576))


@dataclass(frozen=True)
class ReductionConfig:
    method: str
    tokens: int | None = None  # VisionZip: tokens per image (dominant + contextual); None = every patch
    stride_divisor: float | None = 3.0  # PruMerge+: its uniform-stride divisor; None = every patch
    neighbours: int = PRUMERGE_NEIGHBOURS_576

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")

    @property
    def keeps_all(self) -> bool:
        return (self.tokens if self.method == "visionzip" else self.stride_divisor) is None


def _encoder_layers(model: nn.Module) -> nn.ModuleList:
    tower = model.model.vision_tower
    return getattr(tower, "vision_model", tower).encoder.layers  # CLIPVisionModel, or its inner transformer


def _feature_and_score_layers(model: nn.Module, method: str) -> tuple[int, int]:
    """(encoder layer whose output is the features, encoder layer whose queries / keys score them).

    PruMerge+ scores with the layer that reads the features (its code: layer 23 for features of layer
    22); VisionZip with the feature layer's own attention.
    """
    n_layers = len(_encoder_layers(model))
    layer = model.config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"vision_feature_layer must be one layer (an int), got {layer!r}")
    feature = layer % (n_layers + 1) - 1
    if feature < 0:
        raise ValueError("vision_feature_layer selects the embeddings; nothing to score them with")
    return feature, (min(feature + 1, n_layers - 1) if method == "prumerge+" else feature)


class TokenReducer(nn.Module):
    """Registered as ``model.model.token_reducer``; holds the config, the hooks' captures and the counts."""

    def __init__(self, model: nn.Module, config: ReductionConfig) -> None:
        super().__init__()
        self.config = config
        self.feature_layer, self.score_layer = _feature_and_score_layers(model, config.method)
        self.num_heads = _encoder_layers(model)[self.score_layer].self_attn.num_heads
        self.num_patches = int(model.config.image_seq_length)
        self._captured: dict[str, torch.Tensor] = {}
        self.counts: torch.Tensor | None = None  # (B,) tokens per image of the last forward with images
        self._padded = False  # the projector's input was swapped for padded reduced features
        self._expand: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._pending: tuple[torch.Tensor, BaseModelOutputWithPooling] | None = None

    # ----- hooks ------------------------------------------------------------------------------------
    def capture_attention_input(self, module, args, kwargs) -> None:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self._captured["q"], self._captured["k"] = module.q_proj(hidden), module.k_proj(hidden)

    def capture_features(self, module, args, output) -> None:
        self._captured["features"] = output  # (B, S, C), CLS first

    def reduce_projector_input(self, module, args):
        features = self._captured.pop("features")
        q, k = self._captured.pop("q"), self._captured.pop("k")
        self._padded = not self.config.keeps_all
        if not self._padded:  # the method at "every token": nothing pruned, nothing merged
            self.counts = torch.full((features.shape[0],), args[0].shape[1], device=features.device)
            return None
        reduced = self.reduce(features, q, k)
        self.counts = torch.tensor([r.shape[0] for r in reduced], device=features.device)
        return (torch.nn.utils.rnn.pad_sequence(reduced, batch_first=True),)

    def unpad_projector_output(self, module, args, output):
        if not self._padded:
            return None
        return [output[i, : int(c)] for i, c in enumerate(self.counts)]

    # ----- the rules --------------------------------------------------------------------------------
    @torch.no_grad()
    def selection(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(CLS attention (B, N), kept patch indices per image) of the configured method."""
        if self.config.method == "prumerge+":
            attn = rules.cls_attention_single_head(q, k)
            return attn, rules.prumerge_plus_indices(attn, self.config.stride_divisor)
        attn = rules.cls_attention_heads(q, k, self.num_heads)
        dominant, _ = rules.visionzip_split(self.config.tokens)
        top = torch.topk(attn, dominant - 1, dim=-1).indices
        return attn, [t.sort().values for t in top]

    def reduce(self, features: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> list[torch.Tensor]:
        """Reduced features per image, each (K_i, C)."""
        if self.config.method == "prumerge+":
            attn, kept = self.selection(q, k)
            patches, keys = features[:, 1:], k[:, 1:]
            return [rules.prumerge_merge(patches[i], keys[i], attn[i], kept[i], self.config.neighbours)
                    for i in range(features.shape[0])]
        attn = rules.cls_attention_heads(q, k, self.num_heads)  # VisionZip selects its dominant tokens itself
        b, s, _ = k.shape
        keys = k.view(b, s, self.num_heads, -1).mean(2)  # VisionZip's metric: keys averaged over heads
        dominant, contextual = rules.visionzip_split(self.config.tokens)
        out, _ = rules.visionzip_reduce(features, keys, attn, dominant, contextual)
        return list(out)

    # ----- inputs of the language model ---------------------------------------------------------------
    def image_outputs(self, model: nn.Module, pixel_values: torch.Tensor) -> BaseModelOutputWithPooling:
        if self._pending is not None and self._pending[0] is pixel_values:
            return self._pending[1]
        return model.model.get_image_features(pixel_values=pixel_values, return_dict=True)

    def rewrite(self, model: nn.Module, kwargs: dict) -> None:
        """Replace N image placeholders by K_i per sample in ``kwargs`` (in place) and hand LLaVA the
        reduced features; remembers where each kept token went (``_expand``) when the prompt shrank."""
        self._expand = None
        pixel_values, input_ids = kwargs.get("pixel_values"), kwargs.get("input_ids")
        if pixel_values is None or input_ids is None:
            return
        outputs = self.image_outputs(model, pixel_values)
        kwargs["pixel_values"] = None
        kwargs["mm_encoder_outputs"] = {"image": outputs}
        is_image = input_ids == model.config.image_token_id
        counts = torch.tensor([f.shape[0] for f in outputs.pooler_output], device=input_ids.device)
        placeholders = is_image.sum(-1)
        if torch.equal(placeholders, counts):  # already K_i placeholders (generate's rewritten prompt)
            return
        if not bool((placeholders == self.num_patches).all()):
            raise ValueError(f"each sample needs {self.num_patches} image placeholders (or the reduced counts "
                             f"{counts.tolist()}), got {placeholders.tolist()}")
        rank = torch.cumsum(is_image.long(), -1)  # 1.. within the image span
        keep = ~is_image | (rank <= counts[:, None])
        mask = kwargs.get("attention_mask")
        valid = keep & (mask.bool() if mask is not None else torch.ones_like(keep))
        length = int(valid.sum(-1).max())
        # new position of each kept, valid token: left padding to the longest sample
        new_pos = torch.cumsum(valid.long(), -1) - 1 + (length - valid.sum(-1, keepdim=True))
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(valid)

        def compact(x: torch.Tensor, fill) -> torch.Tensor:
            out = torch.full((x.shape[0], length, *x.shape[2:]), fill, dtype=x.dtype, device=x.device)
            out[rows[valid], new_pos[valid]] = x[valid]
            return out

        pad_id = model.generation_config.pad_token_id
        kwargs["input_ids"] = compact(input_ids, 0 if pad_id is None else pad_id)
        kwargs["attention_mask"] = compact(torch.ones_like(input_ids), 0)
        if kwargs.get("labels") is not None:
            kwargs["labels"] = compact(kwargs["labels"], -100)
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = (kwargs["attention_mask"].cumsum(-1) - 1).clamp_min(0)
        self._expand = (valid, new_pos, rows)


def _pre_forward(model: nn.Module, args, kwargs):
    if args:
        raise TypeError("pass the inputs of a model with vision-side token reduction by keyword")
    model.model.token_reducer.rewrite(model, kwargs)
    return args, kwargs


def _post_forward(model: nn.Module, args, kwargs, output):
    reducer = model.model.token_reducer
    if reducer._expand is None or getattr(output, "logits", None) is None:
        return output
    valid, new_pos, rows = reducer._expand
    reducer._expand = None
    if output.logits.shape[1] <= int(new_pos[valid].max()):
        # logits_to_keep: the last k positions, which are the same in both layouts when they are text
        k = kwargs.get("logits_to_keep", 0)
        ids = kwargs.get("input_ids")
        if not isinstance(k, int) or (ids is not None and bool((ids[:, -k:] == model.config.image_token_id).any())):
            raise ValueError(f"logits_to_keep={k!r}: with vision-side token reduction pass an int no larger than "
                             "the text tokens after the image")
        return output
    logits = output.logits.new_zeros(*valid.shape, output.logits.shape[-1])
    logits[valid] = output.logits[rows[valid], new_pos[valid]]
    output.logits = logits
    return output


class ReducedGenerate:
    """``model.generate`` for vision-side reduction: shortens the prompt first, then generates, and
    returns the caller's ``input_ids`` followed by the new tokens."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.original = type(model).generate.__get__(model)

    def __call__(self, input_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, **kwargs):
        reducer = self.model.model.token_reducer
        if pixel_values is None or input_ids is None:
            return self.original(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                                 **kwargs)
        inputs = {"input_ids": input_ids, "pixel_values": pixel_values, "attention_mask": attention_mask}
        with torch.no_grad():
            outputs = reducer.image_outputs(self.model, pixel_values)
        reducer._pending = (pixel_values, outputs)
        try:
            reducer.rewrite(self.model, inputs)
            out = self.original(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                pixel_values=pixel_values, **kwargs)
        finally:
            reducer._pending = None
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        new = sequences[:, inputs["input_ids"].shape[1]:]
        full = torch.cat([input_ids, new], 1)
        if isinstance(out, torch.Tensor):
            return full
        out.sequences = full
        return out


def apply_reduction(model: nn.Module, config: ReductionConfig) -> nn.Module:
    """Install ``config``'s vision-side reduction on a transformers LLaVA, in place; returns it."""
    if hasattr(model.model, "token_reducer"):
        raise ValueError("this model already has a vision-side token reducer")
    if getattr(model, "atp_config", None) is not None or hasattr(model, "atp_runtime"):
        raise ValueError("vision-side reduction cannot be combined with ATP modules on one model")
    reducer = TokenReducer(model, config)
    model.model.add_module("token_reducer", reducer)
    layers = _encoder_layers(model)
    layers[reducer.score_layer].self_attn.register_forward_pre_hook(reducer.capture_attention_input, with_kwargs=True)
    layers[reducer.feature_layer].register_forward_hook(reducer.capture_features)
    model.model.multi_modal_projector.register_forward_pre_hook(reducer.reduce_projector_input)
    model.model.multi_modal_projector.register_forward_hook(reducer.unpad_projector_output)
    model.register_forward_pre_hook(_pre_forward, with_kwargs=True)
    model.register_forward_hook(_post_forward, with_kwargs=True)
    model.generate = ReducedGenerate(model)
    return model


def has_reduction(model: nn.Module) -> bool:
    return hasattr(getattr(model, "model", None), "token_reducer")


def reduction_counts(model: nn.Module) -> torch.Tensor:
    """(B, num_layers) vision tokens entering each decoder layer in the last forward with images."""
    reducer = model.model.token_reducer
    if reducer.counts is None:
        raise ValueError("no forward with images yet")
    n_layers = model.config.get_text_config().num_hidden_layers
    return reducer.counts.long()[:, None].expand(-1, n_layers).clone()


@torch.no_grad()
def prumerge_attention(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """PruMerge+'s CLS attention (B, N) of ``pixel_values``, from the tower's hidden states (no hooks)."""
    _, layer = _feature_and_score_layers(model, "prumerge+")
    score = _encoder_layers(model)[layer]
    hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[layer]  # its input
    normed = score.layer_norm1(hidden)
    return rules.cls_attention_single_head(score.self_attn.q_proj(normed), score.self_attn.k_proj(normed))


def _divisor_range(num_patches: int) -> tuple[float, float]:
    """PruMerge+'s stride divisor: from one uniform patch to a stride of 1."""
    return 1e-3, float(max(576, num_patches))


def _mean_count(attention: torch.Tensor, divisor: float) -> float:
    """PruMerge+'s mean tokens per image (the merged extra token included, unless every patch is kept)
    over ``attention`` (B, N)."""
    n = attention.shape[1]
    return sum(min(len(k) + 1, n) for k in rules.prumerge_plus_indices(attention, divisor)) / attention.shape[0]


def prumerge_count_range(attention: torch.Tensor) -> tuple[float, float]:
    """The fewest and most tokens per image (on average over ``attention``) PruMerge+'s divisor can give."""
    lo, hi = _divisor_range(attention.shape[1])
    return _mean_count(attention, lo), _mean_count(attention, hi)


def prumerge_divisor_for(attention: torch.Tensor, budget: float, *, iterations: int = 50) -> float:
    """The uniform-stride divisor at which PruMerge+ keeps ``budget`` tokens per image on average over
    ``attention`` (B, N) (merged extra token included), by bisection (the count grows with the divisor)."""
    lo, hi = _divisor_range(attention.shape[1])
    low_count, high_count = prumerge_count_range(attention)
    if not (isinstance(budget, (int, float)) and low_count <= budget <= high_count):
        raise ValueError(f"budget must be within what PruMerge+ keeps on these images, [{low_count:.1f}, "
                         f"{high_count:.1f}] tokens per image; got {budget!r}")
    for _ in range(iterations):
        mid = (lo * hi) ** 0.5  # the count moves with the stride 1 / divisor: bisect on a log scale
        lo, hi = (mid, hi) if _mean_count(attention, mid) < budget else (lo, mid)
    return lo if abs(_mean_count(attention, lo) - budget) <= abs(_mean_count(attention, hi) - budget) else hi


def reduction_for_budget(model: nn.Module, method: str, budget: float,
                         calibration: torch.Tensor | None = None) -> ReductionConfig:
    """``method``'s config keeping ``budget`` vision tokens per image on average (every decoder layer
    sees them, so this is also the layer average). VisionZip keeps round(budget) tokens in every image;
    PruMerge+ stays adaptive and its stride divisor is set on ``calibration`` images (pixel values,
    required). ``budget`` equal to the number of patches keeps every token unchanged."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    num_patches = int(model.config.image_seq_length)
    if not (isinstance(budget, (int, float)) and 2 <= budget <= num_patches):
        raise ValueError(f"budget must be a number of vision tokens in [2, {num_patches}], got {budget!r}")
    if budget == num_patches:
        return ReductionConfig(method, tokens=None, stride_divisor=None, neighbours=prumerge_neighbours(num_patches))
    if method == "visionzip":
        return ReductionConfig(method, tokens=int(round(budget)))
    if calibration is None:
        raise ValueError("calibration: PruMerge+ needs calibration images (pixel values) to set its stride for "
                         "a budget")
    divisor = prumerge_divisor_for(prumerge_attention(model, calibration), float(budget))
    return ReductionConfig(method, stride_divisor=divisor, neighbours=prumerge_neighbours(num_patches))
