"""Do fast-kernel ATP scores equal the scores read from an explicit attention map?

Both strategies run on the same weights and inputs with every vision token kept (so each module
sees identical hidden states). The raw column sums each pruning layer hands to its ATP module
(attention received by every vision token from vision queries and from prompt queries, summed
over queries and averaged over heads) are captured and compared element-wise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pandas as pd
import torch
from transformers import AttentionInterface

from atp_repro.atp import ATPConfig, apply_atp
from atp_repro.atp import attention as atp_attention

__all__ = ["capture_column_sums", "scoring_agreement"]


@contextlib.contextmanager
def capture_column_sums() -> Iterator[list[torch.Tensor]]:
    """Collect ``column_sums`` of every ATP scoring call made inside the block, in order."""
    captured: list[torch.Tensor] = []
    original = atp_attention.atp_scoring_attention

    def recording(module, query, key, value, attention_mask, **kwargs):
        request = kwargs.get("atp_score_request")
        out = original(module, query, key, value, attention_mask, **kwargs)
        if request is not None and request.column_sums is not None:
            captured.append(request.column_sums.detach().clone())
        return out

    AttentionInterface.register(atp_attention.SCORING_IMPLEMENTATION, recording)
    try:
        yield captured
    finally:
        AttentionInterface.register(atp_attention.SCORING_IMPLEMENTATION, original)


def _shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model, {id(p): p for p in model.parameters()})


def scoring_agreement(model: torch.nn.Module, inputs: dict[str, torch.Tensor],
                      module_layers: tuple[int, ...]) -> pd.DataFrame:
    """Max relative error of fast (q/k) vs eager (map) column sums per module.

    Args:
        model: a stock LLaVA (not modified; ATP is applied to weight-sharing copies).
        inputs: one prefill's inputs with a single image span.
        module_layers: where the modules sit.
    Returns:
        One row per module: ``module, layer, dtype, max_rel_error_self, max_rel_error_cross``.
    """
    num_vision = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    keep_all = tuple([num_vision] * len(module_layers))
    sums = {}
    for backend, impl in (("eager", "eager"), ("fast", "sdpa")):
        atp = apply_atp(_shared_copy(model), ATPConfig(module_layers=module_layers, fixed_keep=keep_all,
                                                       scoring_backend=backend)).eval()
        atp.set_attn_implementation(impl)
        with capture_column_sums() as captured, torch.inference_mode():
            atp(**inputs, logits_to_keep=1)
        sums[backend] = captured
    vision = (inputs["input_ids"] == model.config.image_token_id)
    rows = []
    for m, (eager, fast) in enumerate(zip(sums["eager"], sums["fast"])):
        errors = []
        for w in range(eager.shape[-1]):
            ref, got = eager[..., w][vision].double(), fast[..., w][vision].double()
            errors.append(float(((got - ref).abs() / ref.abs().clamp_min(1e-30)).max()))
        rows.append({"module": m, "layer": module_layers[m], "dtype": str(eager.dtype).removeprefix("torch."),
                     "max_rel_error_self": errors[0], "max_rel_error_cross": errors[1]})
    return pd.DataFrame(rows)
