"""The language model's forward with ATP modules (the only place that touches transformers' loop).

:func:`atp_language_model_class` derives, from a Llama-style decoder class of transformers
(``LlamaModel`` and its look-alikes: a ``layers`` list, ``rotary_emb``, ``norm``), a subclass whose
forward runs the stock layers and, after each module layer, scores the vision tokens and prunes:

- ``train()``: soft path. All tokens stay; keep values D accumulate and every later layer gets an
  additive attention mask log(D_k + eps) on vision keys (self-attention exempt).
- ``eval()``: hard path. Kept tokens are gathered into a shorter, left-padded sequence; later layers
  and their KV-cache entries are shorter. Each *stage* (the layers between two modules) has its
  own 2-D padding mask, which decode steps extend with the newly generated tokens.

The returned hidden states keep the input's length: pruned positions are filled with zeros, so
``labels`` and ``logits`` stay aligned with ``input_ids``.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY, capture_outputs

from .architectures import LLAVA, decoder_positions
from .attention import ScoreRequest, resolve_scoring_backend, scoring_attention
from .clock import OverheadClock
from .config import ATPConfig
from .controls import CONTROL_IMPORTANCES, control_scores
from .loss import per_layer_counts
from .masks import (
    attention_log_bias,
    causal_mask_corner,
    causal_padding_mask,
    compaction_index,
    flat_positions,
    gather_positions,
    last_true,
)
from .positions import rope2d_cos_sin
from .spatial import spatial_scores, vision_grid


@dataclass
class ATPRecord:
    """What the ATP modules did in the last forward that contained images (one prefill)."""

    stage_counts: torch.Tensor  # (B, M + 1) vision tokens per stage; soft + differentiable in train()
    token_counts: torch.Tensor  # (B, num_layers) LongTensor, vision tokens entering each layer
    # [module][sample] -> indices of the vision tokens alive after it, among the sample's vision tokens in
    # input order (LLaVA: the row-major grid index; M-RoPE: over its images one after another)
    kept_vision_indices: list[list[torch.Tensor]]
    thresholds: list[tuple[torch.Tensor, torch.Tensor]]  # [module] -> (theta_r, theta_s), each (B,)
    redundancy: list[torch.Tensor]  # [module] -> (B, L_stage) S_r in that stage's sequence layout
    self_importance: list[torch.Tensor]  # [module] -> (B, L_stage) raw self-modality importance
    cross_importance: list[torch.Tensor]  # [module] -> (B, L_stage) raw cross-modality importance
    vision_positions: list[torch.Tensor]  # [module] -> (B, L_stage) vision index per position, -1 for text
    grid_size: int | None  # side of the square grid (LLaVA); None when every image has its own grid (M-RoPE)
    soft: bool
    clock: OverheadClock = field(repr=False)
    # M-RoPE only: [sample] -> (t, h, w) of each of its images, in order; a sample's vision index runs
    # over its images one after another (row-major in each)
    image_grids: list[list[tuple[int, int, int]]] | None = None

    @property
    def overhead_seconds(self) -> float:
        """ATP's own time in this prefill: score inputs and scores, decisions (thresholds, keep),
        record, compaction and the compacted mask, positional updates. Not the decoder layers, nor
        the pruning layers' own attention kernel. Read on demand: on CUDA this waits for the
        prefill's ATP regions to finish, so the forward itself never synchronises for it."""
        return self.clock.seconds()


@dataclass
class _PrunedCacheState:
    prefill_length: int
    stages: list[tuple[int, torch.Tensor]]  # (first layer of the stage, (B, L_stage) prefill padding mask)
    soft: bool


@dataclass
class ATPRuntime:
    """Per-model state that is not a parameter: config, pending inputs, last record, cache states."""

    config: ATPConfig
    image_token_id: int
    architecture: str = LLAVA  # see atp_repro.atp.architectures
    pending_image_mask: torch.Tensor | None = None
    pending_image_grids: list[tuple[int, int, int]] | None = None  # M-RoPE: (t, h, w) per image of the batch
    generate_image_grid_thw: torch.Tensor | None = None  # M-RoPE: image_grid_thw given to a running generate
    pending_answer_mask: torch.Tensor | None = None
    prompt_length: int | None = None
    tile_side: int | None = None  # set when the config's image spans are several G x G tiles (see vision_grid)
    record: ATPRecord | None = None
    cache_states: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)

    def __reduce__(self):
        """Deep copies and pickles of a model start without the original's last pass: the record holds
        graph tensors (which cannot be copied) and belongs to the original; pending inputs and cache
        states too."""
        return (functools.partial(ATPRuntime, tile_side=self.tile_side, architecture=self.architecture),
                (self.config, self.image_token_id))


@dataclass
class _Sequence:
    """Per-position bookkeeping that travels with the (possibly compacted) sequence, all (B, L...)."""

    hidden: torch.Tensor
    position_ids: torch.Tensor  # 1-D (text) positions, for the masks and the layers' position_ids
    cos: torch.Tensor
    sin: torch.Tensor
    valid: torch.Tensor  # not padding
    grid_index: torch.Tensor  # index among the sample's vision tokens (row-major grid index), -1 for text / padding
    is_prompt: torch.Tensor  # text after the image that is not an answer
    original_index: torch.Tensor  # position in the input sequence

    @property
    def is_vision(self) -> torch.Tensor:
        return self.grid_index >= 0

    def compact(self, keep: torch.Tensor) -> None:
        index, valid = compaction_index(keep)
        flat = flat_positions(index, keep.shape[1])
        for name in ("hidden", "position_ids", "cos", "sin", "grid_index", "is_prompt", "original_index"):
            setattr(self, name, gather_positions(getattr(self, name), index, flat))
        self.valid = valid
        self.grid_index = torch.where(valid, self.grid_index, -1)
        self.is_prompt = self.is_prompt & valid


@dataclass
class _VisionLayout:
    """Where each sample's vision tokens are and how they lie on image grids."""

    counts: torch.Tensor  # (B,) vision tokens per sample (0: text only; those pass through unpruned)
    grid_index: torch.Tensor  # (B, L) index among the sample's vision tokens, -1 for text
    first: torch.Tensor  # (B,) position of the first vision token, -1 for a text-only sample
    spatial: torch.Tensor  # (B, N) spatial score S_s of each vision index (N >= 1)
    control: torch.Tensor | None  # (B, N) control scores (uniform / random importance), else None
    grid: int | None  # side of the square grid (LLaVA), None for per-image grids
    tiles: int
    image_grids: list[list[tuple[int, int, int]]] | None  # M-RoPE: [sample] -> (t, h, w) per image


def _vision_index(image_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) index of each vision token among its sample's, -1 for text; (B,) first vision position or -1."""
    positions = torch.arange(image_mask.shape[-1], device=image_mask.device)
    grid_index = torch.where(image_mask, torch.cumsum(image_mask.long(), -1) - 1, -1)
    first = torch.where(image_mask, positions, image_mask.shape[-1]).amin(-1)
    return grid_index, torch.where(image_mask.any(-1), first, -1)


def _vision_layout(runtime: ATPRuntime, image_mask: torch.Tensor, valid: torch.Tensor,
                   image_grids: list[tuple[int, int, int]] | None) -> _VisionLayout:
    """Validate the image spans and build each sample's spatial scores.

    LLaVA: one contiguous, equally sized span per sample with an image (a square grid or tiles).
    M-RoPE: any number of spans per sample, matched in order with ``image_grids`` (one per image of
    the batch, batch-major, as ``image_grid_thw``); each is scored on its own h x w grid."""
    if bool((image_mask & ~valid).any()):
        raise ValueError("attention_mask marks image tokens as padding")
    cfg = runtime.config
    counts = image_mask.sum(-1)
    grid_index, first = _vision_index(image_mask)
    device = image_mask.device

    def tables(h: int, w: int, repeat: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        spatial = spatial_scores(h, cfg.grid_strides, cfg.lambda_sample, w).repeat(repeat)
        if cfg.importance not in CONTROL_IMPORTANCES:
            return spatial, None
        return spatial, control_scores(cfg.importance, h, cfg.grid_strides, cfg.lambda_sample, w).repeat(repeat)

    if runtime.architecture != LLAVA:
        if image_grids is None:
            raise ValueError("ATP on an M-RoPE model needs image_grid_thw with the image tokens")
        rows, per_sample, images = [], [], iter(image_grids)
        for b in range(image_mask.shape[0]):
            spans = image_spans(image_mask[b])
            grids = []
            for length in spans:
                t, h, w = next(images, (0, 0, 0))
                if t * h * w != length:
                    raise ValueError(f"sample {b}: an image span of {length} tokens does not match its "
                                     f"image_grid_thw entry (t, h, w after merging) = {(t, h, w)}")
                grids.append((t, h, w))
            per_sample.append(grids)
            rows.append([tables(h, w, t) for t, h, w in grids])
        if next(images, None) is not None:
            raise ValueError(f"image_grid_thw has {len(image_grids)} images, the input ids hold fewer image spans")
        width = max(1, int(counts.max()))
        spatial = torch.zeros(len(rows), width)
        control = torch.zeros(len(rows), width) if cfg.importance in CONTROL_IMPORTANCES else None
        for b, images_of_sample in enumerate(rows):
            if images_of_sample:
                spatial[b, : counts[b]] = torch.cat([sp for sp, _ in images_of_sample])
                if control is not None:
                    control[b, : counts[b]] = torch.cat([c for _, c in images_of_sample])
        return _VisionLayout(counts, grid_index, first, spatial.to(device),
                             None if control is None else control.to(device), None, 1, per_sample)

    with_image = counts > 0
    num_vision = int(counts.max())
    if not bool((counts[with_image] == num_vision).all()):
        raise ValueError(f"ATP needs the same number of image tokens per sample with an image; got {counts.tolist()}")
    last = torch.where(image_mask, torch.arange(image_mask.shape[-1], device=device), -1).amax(-1)
    if not bool((last - first + 1 == counts)[with_image].all()):
        raise ValueError("ATP needs one contiguous image token span per sample (multi-image inputs are not supported)")
    grid, tiles = vision_grid(num_vision, runtime.tile_side)
    # one table per tile, repeated: every tile is sampled by the same nested grids
    spatial, control = tables(grid, grid, tiles)
    batch = image_mask.shape[0]
    return _VisionLayout(counts, grid_index, first, spatial.to(device).expand(batch, -1),
                         None if control is None else control.to(device).expand(batch, -1), grid, tiles, None)


def image_spans(mask: torch.Tensor) -> list[int]:
    """Lengths of the runs of True in a 1-D bool tensor, in order."""
    padded = torch.cat([mask.new_zeros(1), mask, mask.new_zeros(1)]).long()
    edges = torch.diff(padded)
    starts, ends = torch.nonzero(edges == 1).flatten(), torch.nonzero(edges == -1).flatten()
    return (ends - starts).tolist()


def text_raters(embeds: torch.Tensor, image_mask: torch.Tensor, is_prompt: torch.Tensor) -> torch.Tensor:
    """SparseVLM's text raters, chosen once per prefill from the input embeddings: the prompt tokens t
    whose relevance r_t = mean over vision tokens v of softmax_t(x_v . x_t) exceeds the mean relevance
    of the sample's prompt tokens. A sample where none does (all equal) keeps every prompt token.

    embeds (B, L, D); image_mask, is_prompt (B, L) bool. Returns (B, L) bool.
    """
    out = torch.zeros_like(is_prompt)
    for b in range(embeds.shape[0]):  # a few samples; the prompt lengths differ
        vision, text = embeds[b, image_mask[b]].float(), embeds[b, is_prompt[b]].float()  # (V, D), (T, D)
        if vision.shape[0] == 0 or text.shape[0] == 0:
            continue
        relevance = torch.softmax(vision @ text.T, dim=-1).mean(0)  # (T,)
        chosen = relevance > relevance.mean()
        out[b, is_prompt[b]] = chosen if bool(chosen.any()) else torch.ones_like(chosen)
    return out


def _vision_columns(is_vision: torch.Tensor) -> slice:
    """Smallest slice of positions covering every sample's vision tokens (empty if none is left)."""
    positions = torch.nonzero(is_vision.any(0)).flatten()
    if positions.numel() == 0:
        return slice(0, 0)
    return slice(int(positions.min()), int(positions.max()) + 1)


def _prefill(model, runtime: ATPRuntime, embeds, attention_mask, position_ids, cache, use_cache, image_mask,
             answer_mask, image_grids, kwargs):
    cfg = runtime.config
    batch, length, _ = embeds.shape
    device = embeds.device
    if cache is not None and cache.get_seq_length() > 0:
        raise NotImplementedError("ATP prunes at prefill; an image span after cached tokens is not supported")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError("ATP needs a 2-D (batch, seq) padding attention_mask, not a custom 4-D mask")
    valid = attention_mask.bool() if attention_mask is not None else torch.ones(batch, length, dtype=torch.bool,
                                                                               device=device)
    layout = _vision_layout(runtime, image_mask, valid, image_grids)
    grid, tiles = layout.grid, layout.tiles
    if tiles > 1 and cfg.position_encoding == "learned2d":
        raise ValueError(f"position_encoding='learned2d' has one {grid} x {grid} grid of embeddings; this input has "
                         f"{tiles} tiles of image tokens; use 'original' or 'rope2d'")
    positions = torch.arange(length, device=device)[None]
    if answer_mask is None:
        answer_mask = torch.zeros_like(valid)
        if runtime.prompt_length is not None:  # generation without cache: generated tokens are answers
            answer_mask = answer_mask | (positions >= runtime.prompt_length)
    # prompt: text after the (first) image that is not an answer
    is_prompt = valid & (layout.grid_index < 0) & (positions > layout.first[:, None]) & ~answer_mask.bool()

    raters = text_raters(embeds, image_mask, is_prompt) if cfg.importance == "raters" else None

    rope_ids, position_ids = decoder_positions(runtime.architecture, position_ids, batch, length, 0, device)
    cos, sin = model.rotary_emb(embeds, position_ids=rope_ids)  # (B or 1, L, hd) each, M-RoPE included
    seq = _Sequence(embeds, position_ids, cos.expand(batch, -1, -1), sin.expand(batch, -1, -1), valid,
                    layout.grid_index, is_prompt, positions.expand(batch, -1))
    # (a text-only sample has no image start; its index is clamped, the value is never used)
    image_start = torch.gather(position_ids, 1, layout.first.clamp_min(0)[:, None]).squeeze(1)
    mask = create_causal_mask(config=model.config, inputs_embeds=embeds, attention_mask=attention_mask, cache=cache,
                              position_ids=position_ids)

    soft = model.training
    if soft and model.config._attn_implementation not in ("eager", "sdpa"):
        raise ValueError(
            "soft ATP masks (train mode) need an attention backend that accepts additive float masks "
            f"('eager' or 'sdpa'); the model uses {model.config._attn_implementation!r}"
        )
    keep_value = torch.ones(batch, length, device=device) if soft else None
    keep_surrogate = None  # straight-through only: the smooth keep values the attention bias differentiates
    use_eager = resolve_scoring_backend(cfg.scoring_backend, model.config._attn_implementation)
    module_at = {layer: m for m, layer in enumerate(cfg.module_layers)}
    stage_counts = [layout.counts.float()]  # N_0 per sample (0 for a text-only sample)
    kept, thresholds, redundancy, stages = [], [], [], []
    self_scores, cross_scores, layouts = [], [], []
    clock = OverheadClock(device)
    unpadded = bool(valid.all())  # the current stage's mask is plain causal

    for layer_idx, layer in enumerate(model.layers[: model.config.num_hidden_layers]):
        layer_kwargs = dict(attention_mask=mask, position_embeddings=(seq.cos, seq.sin), position_ids=seq.position_ids,
                            cache=cache, use_cache=use_cache, **kwargs)
        module_index = module_at.get(layer_idx)
        if module_index is None:
            seq.hidden = layer(seq.hidden, **layer_kwargs)
            continue

        module = model.atp_modules[module_index]
        with clock.region("score_inputs"):  # what the scores need
            is_vision = seq.is_vision & seq.valid
            if soft:
                alive = is_vision & (keep_value > 0.5)
                vision_weight = torch.where(is_vision, keep_value, 0.0)
            else:
                alive = is_vision
                vision_weight = is_vision.float()
            prompt_weight = seq.is_prompt.float()
            if cfg.importance == "last":  # FastV / PyramidDrop: the last prompt token's attention only
                prompt_weight = last_true(seq.is_prompt).float()
            elif raters is not None:  # SparseVLM: the attention of its text raters only
                prompt_weight = (seq.is_prompt & torch.gather(raters, 1, seq.original_index)).float()
            request = ScoreRequest(torch.stack([vision_weight, prompt_weight], -1), _vision_columns(is_vision),
                                   use_eager, clock=clock, differentiable=soft and cfg.score_gradient)
        with scoring_attention(model.config, layer, request):  # the scores themselves are timed inside
            seq.hidden = layer(seq.hidden, atp_score_request=request, **layer_kwargs)
        with clock.region("decide_and_compact"):
            index = seq.grid_index.clamp_min(0)
            spatial = torch.where(is_vision, torch.gather(layout.spatial, 1, index), 0.0)
            control = (None if layout.control is None
                       else torch.where(is_vision, torch.gather(layout.control, 1, index), 0.0))
            decision = module.decide(request.column_sums, vision_weight, prompt_weight, spatial, is_vision, alive,
                                     stage_counts[0], keep_value, keep_surrogate, control)
            thresholds.append((decision.theta_r, decision.theta_s))
            redundancy.append(decision.redundancy)
            self_scores.append(decision.self_importance)
            cross_scores.append(decision.cross_importance)
            layouts.append(torch.where(is_vision, seq.grid_index, -1))
            kept.append([seq.grid_index[b][decision.keep[b]].sort().values for b in range(batch)])

            if soft:
                keep_value, keep_surrogate = decision.keep_value, decision.keep_surrogate
                stage_counts.append(torch.where(is_vision, keep_value, 0.0).sum(-1))
                dtype = seq.hidden.dtype
                mask = (causal_padding_mask(seq.valid, dtype) + attention_log_bias(
                    keep_value, is_vision, cfg.log_mask_eps, dtype, keep_surrogate)).clamp_min(torch.finfo(dtype).min)
            else:
                stage_counts.append(decision.keep.sum(-1).float())
                keep_positions = (seq.valid & ~is_vision) | decision.keep
                if not torch.equal(keep_positions, seq.valid):
                    seq.compact(keep_positions)
                    mask, unpadded = _stage_mask(model, mask, seq, cache, layer_idx + 1, unpadded)
                stages.append((layer_idx + 1, seq.valid.clone()))

            if module.grid_embedding is not None:
                alive_after = seq.is_vision & (keep_value > 0.5 if soft else seq.valid)
                seq.hidden = seq.hidden + module.grid_embedding(torch.where(alive_after, seq.grid_index, -1)).to(
                    seq.hidden.dtype)
            if cfg.position_encoding == "rope2d" and module_index == 0:
                seq.cos, seq.sin = rope2d_cos_sin(model.rotary_emb.inv_freq, model.rotary_emb.attention_scaling,
                                                  seq.position_ids, seq.grid_index, grid, image_start,
                                                  cfg.rope2d_sections, seq.cos.dtype)

    hidden = model.norm(seq.hidden)
    if hidden.shape[1] != length or not torch.equal(seq.original_index, positions.expand(batch, -1)):
        hidden = _scatter_back(hidden, seq, length)

    counts = torch.stack(stage_counts, -1)
    runtime.record = ATPRecord(
        stage_counts=counts,
        token_counts=per_layer_counts(counts.detach(), cfg.module_layers,
                                      model.config.num_hidden_layers).round().long(),
        kept_vision_indices=kept, thresholds=thresholds, redundancy=redundancy, self_importance=self_scores,
        cross_importance=cross_scores, vision_positions=layouts, grid_size=grid, soft=soft,
        clock=clock, image_grids=layout.image_grids,
    )
    if cache is not None:
        runtime.cache_states[cache] = _PrunedCacheState(length, stages, soft)
    return hidden


def _stage_mask(model, mask, seq: _Sequence, cache, first_layer: int, unpadded: bool):
    """The attention mask of the stage that starts at ``first_layer``, after ``seq`` was compacted.

    Without padding before and after the compaction, it is the previous mask's top-left corner
    (:func:`~atp_repro.atp.masks.causal_mask_corner`); otherwise transformers builds it anew.
    Returns the mask and whether the new stage is unpadded.
    """
    now_unpadded = bool(seq.valid.all())
    if unpadded and now_unpadded:
        done, corner = causal_mask_corner(mask, seq.hidden.shape[1])
        if done:
            return corner, True
    return create_causal_mask(config=model.config, inputs_embeds=seq.hidden, attention_mask=seq.valid.long(),
                              cache=cache, position_ids=seq.position_ids, layer_idx=first_layer), now_unpadded


def _scatter_back(hidden: torch.Tensor, seq: _Sequence, length: int) -> torch.Tensor:
    """Return hidden states in the input's layout; pruned positions and padding get zeros."""
    batch, _, width = hidden.shape
    # Padding slots write to a spare column that is dropped afterwards.
    target = torch.where(seq.valid, seq.original_index, length)
    out = hidden.new_zeros(batch, length + 1, width)
    out.scatter_(1, target[..., None].expand(-1, -1, width), hidden)
    return out[:, :length]


def _decode(model, state: _PrunedCacheState, embeds, attention_mask, position_ids, cache, use_cache, kwargs):
    """Tokens after a pruned prefill (or a text-only input: no stages), through every layer's stage mask."""
    if state.soft:
        raise RuntimeError("generation after a train()-mode (soft mask) prefill is not supported; call model.eval()")
    batch, q_len, _ = embeds.shape
    past = cache.get_seq_length() if cache is not None else 0
    rope_ids, position_ids = decoder_positions(model._atp_runtime.architecture, position_ids, batch, q_len, past,
                                               embeds.device)
    cos, sin = model.rotary_emb(embeds, position_ids=rope_ids)
    masks = [create_causal_mask(config=model.config, inputs_embeds=embeds, attention_mask=attention_mask, cache=cache,
                                position_ids=position_ids)]
    first_layers = [0]
    for first_layer, prefill_valid in state.stages:
        appended = cache.get_seq_length(first_layer) - prefill_valid.shape[1] + q_len
        if attention_mask is not None:
            tail = attention_mask[:, state.prefill_length:]
            if tail.shape[1] != appended:
                raise ValueError(
                    f"attention_mask has {tail.shape[1]} positions after the prefill, the cache expects {appended}")
        else:
            tail = torch.ones(batch, appended, dtype=torch.long, device=embeds.device)
        stage_mask = torch.cat([prefill_valid.long(), tail.long()], dim=-1)
        masks.append(create_causal_mask(config=model.config, inputs_embeds=embeds, attention_mask=stage_mask,
                                        cache=cache, position_ids=position_ids, layer_idx=first_layer))
        first_layers.append(first_layer)
    hidden = embeds
    stage = 0
    for layer_idx, layer in enumerate(model.layers[: model.config.num_hidden_layers]):
        while stage + 1 < len(first_layers) and layer_idx >= first_layers[stage + 1]:
            stage += 1
        hidden = layer(hidden, attention_mask=masks[stage], position_embeddings=(cos, sin), position_ids=position_ids,
                       cache=cache, use_cache=use_cache, **kwargs)
    return model.norm(hidden)


def _atp_forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                 use_cache=None, **kwargs) -> BaseModelOutputWithPast:
    """Drop-in replacement of the decoder's forward (same arguments, same outputs)."""
    if (input_ids is None) ^ (inputs_embeds is not None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    runtime: ATPRuntime = self._atp_runtime
    if self.training and torch.is_grad_enabled():
        _reject_reentrant_checkpointing(self)
    image_mask, runtime.pending_image_mask = runtime.pending_image_mask, None
    image_grids, runtime.pending_image_grids = runtime.pending_image_grids, None
    answer_mask, runtime.pending_answer_mask = runtime.pending_answer_mask, None
    if image_mask is None and input_ids is not None:
        image_mask = input_ids == runtime.image_token_id
    if inputs_embeds is None:
        inputs_embeds = self.embed_tokens(input_ids)
    if use_cache and cache is None:
        cache = DynamicCache(config=self.config)
    if cache is not None and not isinstance(cache, DynamicCache):
        raise TypeError(f"ATP shrinks the KV cache per layer and needs a DynamicCache; got {type(cache).__name__}")
    continuing = cache is not None and cache.get_seq_length() > 0
    if image_mask is not None and bool(image_mask.any()):
        if answer_mask is None and self.training and torch.is_grad_enabled():
            raise ValueError(
                "ATP's training pass needs to know the answer tokens, which must not vote in the cross-modality "
                "score: pass labels= (answers are the tokens with labels != -100) or atp_answer_mask= (bool, "
                "shaped like input_ids, True at answer tokens; all False if a sample has no answer). HF Trainer "
                "drops labels from the forward with label smoothing or a custom loss: add atp_answer_mask in the "
                "data collator")
        hidden = _prefill(self, runtime, inputs_embeds, attention_mask, position_ids, cache, use_cache, image_mask,
                          answer_mask, image_grids, kwargs)
    else:
        # No image in this input: decoding after a prefill (a generated token equal to the image-token id is
        # text, as in the stock model: images come with pixel values), or a text-only input, which runs as
        # the stock decoder would (nothing to prune).
        state = runtime.cache_states.get(cache) if continuing else None
        if state is None:
            if continuing:
                raise ValueError("ATP continues only a cache it filled itself (from a prefill of this model)")
            state = _PrunedCacheState(prefill_length=0, stages=[], soft=False)
            runtime.record = None  # nothing was pruned: no record of a pass with images
            if cache is not None:
                runtime.cache_states[cache] = state
        hidden = _decode(self, state, inputs_embeds, attention_mask, position_ids, cache, use_cache, kwargs)
    return BaseModelOutputWithPast(last_hidden_state=hidden, cache=cache)


def _reject_reentrant_checkpointing(model) -> None:
    """Reentrant gradient checkpointing re-runs a layer's forward inside backward, where the soft
    path's keep values (computed once, shared by every later layer) are backpropagated a second time;
    it fails deep in autograd. Fail before any work with what to do instead."""
    for layer in model.layers:
        func = getattr(layer, "_gradient_checkpointing_func", None)
        if getattr(layer, "gradient_checkpointing", False) and getattr(func, "keywords", {}).get("use_reentrant"):
            raise ValueError(
                "gradient checkpointing with use_reentrant=True is not supported by ATP's training (soft) path; "
                "enable it with model.gradient_checkpointing_enable(gradient_checkpointing_kwargs="
                "{'use_reentrant': False}) (the transformers default), which gives the same gradients")


_CLASS_CACHE: dict[type, type] = {}


def _restore_atp_language_model(base: type):
    """Unpickling: an empty instance of the ATP subclass of ``base`` (pickle sets its state next)."""
    cls = atp_language_model_class(base)
    model = cls.__new__(cls)
    _CAN_RECORD_REGISTRY[model] = cls._can_record_outputs  # keyed by class name; a new process lacks it
    return model


def _reduce_ex(self, protocol: int):
    """The ATP subclass is made at run time and cannot be found by name: pickle it through its base."""
    return _restore_atp_language_model, (type(self).__bases__[0],), self.__getstate__()


def atp_language_model_class(base: type) -> type:
    """The ATP subclass of a Llama-style decoder class (created once per base class)."""
    if base not in _CLASS_CACHE:
        forward = deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")(
            merge_with_config_defaults(capture_outputs(_atp_forward)))
        _CLASS_CACHE[base] = type(f"ATP{base.__name__}", (base,),
                                  {"forward": forward, "__doc__": __doc__, "__reduce_ex__": _reduce_ex})
    return _CLASS_CACHE[base]
