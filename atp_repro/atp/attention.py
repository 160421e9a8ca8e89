"""Reading attention scores out of a pruning layer, with any attention backend.

transformers dispatches attention through ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``
and forwards extra keyword arguments from the decoder layer to that function. We register one
function, ``atp_scoring``, that wraps a base implementation and, while it runs, hands the scores
to a :class:`ScoreRequest` passed along as the keyword ``atp_score_request``:

- ``eager`` base (the paper's strategy (2): no flash at pruning layers): the explicit probability
  map returned by eager attention is reduced to column sums;
- ``fast`` base (SDPA / flash): the layer's own fused kernel computes its output, and the column
  sums are formed from the same queries and keys (RoPE applied) for only the blocks they need.

The language model's forward switches a pruning layer to ``atp_scoring`` for exactly one call
(:func:`scoring_attention`), so the model's configuration is untouched outside that call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

from .clock import OverheadClock
from .scores import weighted_column_sums, weighted_column_sums_from_qk

SCORING_IMPLEMENTATION = "atp_scoring"
# Attention implementations whose masks ATP can read (flex attention's BlockMask is not one of them).
SUPPORTED_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4")


def to_additive_mask(
    mask: torch.Tensor | None, q_len: int, k_len: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Any mask format transformers hands to an attention function -> (B|1, 1, Q, K) additive float.

    None means plain causal (prefill of an empty cache); bool 4-D means True = attend; a 2-D
    (B, K) mask is a padding mask on top of causal (flash-attention format); float 4-D is additive.
    """
    neg = torch.finfo(dtype).min
    if mask is None or mask.dim() == 2:
        rows = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
        allowed = (torch.arange(k_len, device=device)[None, :] <= rows)[None, None]
        if mask is not None:
            allowed = allowed & mask.bool()[:, None, None, :]
        return torch.where(allowed, 0.0, neg).to(dtype)
    if mask.dtype == torch.bool:
        return torch.where(mask, 0.0, neg).to(dtype)
    return mask.to(dtype)


@dataclass
class ScoreRequest:
    """Asks one attention call for head-averaged column sums.

    Attributes:
        query_weight: (B, L, 2) weights of the query rows: vision queries, prompt queries.
        key_columns: slice of key positions holding (all samples') vision tokens.
        use_eager: run the layer with eager attention and reduce its probability map.
        column_sums: filled by the call: (B, L, 2).
        clock: if given, times the extra score computation (not the layer's own attention kernel,
            nor, with ``use_eager``, its conversion of the mask to the additive form eager needs).
        differentiable: the scores must carry the gradient of the attention map (``score_gradient``
            training). The fused kernel's log-sum-exp has no gradient, so the fast path then forms each
            row's normaliser from the logits itself, as eager attention's softmax does.
    """

    query_weight: torch.Tensor
    key_columns: slice
    use_eager: bool
    column_sums: torch.Tensor | None = None
    clock: OverheadClock | None = field(default=None, repr=False)
    base_name: str = field(default="", repr=False)
    differentiable: bool = False

    def timed(self) -> contextlib.AbstractContextManager:
        return self.clock.region("scores") if self.clock is not None else contextlib.nullcontext()


def atp_scoring_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention function registered as ``atp_scoring`` (see module docstring)."""
    request: ScoreRequest | None = kwargs.pop("atp_score_request", None)
    if request is None:
        raise RuntimeError(
            "the 'atp_scoring' attention implementation only runs inside an ATP pruning layer; "
            "do not set it as a model's attn_implementation"
        )
    if request.use_eager:
        additive = to_additive_mask(attention_mask, query.shape[2], key.shape[2], query.dtype, query.device)
        kwargs.pop("is_causal", None)
        output, probs = eager_attention_forward(module, query, key, value, additive, **kwargs)
        with request.timed():
            request.column_sums = weighted_column_sums(probs, request.query_weight)
        return output, probs

    # The fast kernel computes the layer's output; on CPU SDPA we also keep its per-row
    # log-sum-exp, so that the scores need only the (rows x vision columns) block of logits.
    fused = _cpu_flash_with_lse(module, query, key, value, attention_mask, **kwargs) \
        if request.base_name == "sdpa" else None
    if fused is not None:
        (output, lse), probs = fused, None
    else:
        base: Callable = ALL_ATTENTION_FUNCTIONS[request.base_name]
        (output, probs), lse = base(module, query, key, value, attention_mask, **kwargs), None
    with request.timed():
        additive = None
        if attention_mask is not None:
            additive = to_additive_mask(attention_mask, query.shape[2], key.shape[2], torch.float32, query.device)
        if request.differentiable and torch.is_grad_enabled():
            lse = None  # the kernel's normaliser is a constant to autograd: recompute it from the logits
        request.column_sums = weighted_column_sums_from_qk(
            query, key, additive, module.scaling, request.query_weight, request.key_columns, logsumexp=lse
        )
    return output, probs


def _cpu_flash_with_lse(module, query, key, value, attention_mask, **kwargs):
    """Run the CPU flash-attention kernel that SDPA dispatches to, keeping its log-sum-exp.

    Only in the plain case (CPU, fp32/bf16, no dropout, softcap or position bias); the output is
    the same kernel's, laid out like transformers' ``sdpa_attention_forward``. Returns None when
    the case does not apply, and the caller falls back to the base kernel plus recomputed
    normalisers.
    """
    if (query.device.type != "cpu" or query.dtype not in (torch.float32, torch.bfloat16)
            or kwargs.get("dropout", 0.0) or kwargs.get("softcap") is not None
            or kwargs.get("position_bias") is not None or query.shape[2] < 2):
        return None
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    mask = attention_mask
    if mask is not None:
        if mask.dim() != 4 or mask.dtype == torch.bool or mask.requires_grad:
            return None  # bool masks: SDPA converts them itself; a soft (trainable) mask: no gradient here
        mask = mask[:, :, :, : key.shape[2]]
    is_causal = mask is None and getattr(module, "is_causal", True)
    scaling = kwargs.get("scaling", getattr(module, "scaling", None))
    output, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, 0.0, is_causal, attn_mask=mask, scale=scaling)
    return output.transpose(1, 2).contiguous(), lse


AttentionInterface.register(SCORING_IMPLEMENTATION, atp_scoring_attention)


def resolve_scoring_backend(choice: str, model_implementation: str | None) -> bool:
    """True if pruning layers should run eager attention (and read its map), False for fast scoring.

    ``auto`` reads the map when the model already runs eager, and otherwise keeps its fast kernel.
    """
    impl = model_implementation or "eager"
    if impl not in SUPPORTED_IMPLEMENTATIONS:
        raise ValueError(
            f"ATP scoring supports models whose attn_implementation is one of {SUPPORTED_IMPLEMENTATIONS}; "
            f"got {impl!r}"
        )
    if choice not in ("auto", "eager", "fast"):
        raise ValueError(f"scoring_backend={choice!r} is not one of ('auto', 'eager', 'fast')")
    return choice == "eager" or (choice == "auto" and impl == "eager")


@contextlib.contextmanager
def scoring_attention(config, layer: torch.nn.Module, request: ScoreRequest) -> Iterator[None]:
    """Route one decoder layer's attention through ``atp_scoring`` and restore the config after.

    The pruning layer is not gradient-checkpointed: a recomputation in the backward pass would run
    outside this context, with a different attention function (3 layers of a deep model, so the
    memory cost is small).
    """
    previous = config._attn_implementation
    checkpointing = getattr(layer, "gradient_checkpointing", False)
    request.base_name = previous if previous in ALL_ATTENTION_FUNCTIONS else "sdpa"
    if previous in (None, "eager"):
        request.use_eager = True
    config._attn_implementation = SCORING_IMPLEMENTATION
    layer.gradient_checkpointing = False
    try:
        yield
    finally:
        config._attn_implementation = previous
        layer.gradient_checkpointing = checkpointing
