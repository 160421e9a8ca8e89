"""Vision-side token reduction rules (before the language model), as pure tensor functions.

Shapes: B images, S = 1 + N tokens of the vision encoder (CLS first, then N patches in row-major
order), C feature channels, H heads. Scores and indices refer to patches (0..N-1) unless a function
says it includes the CLS token.

* PruMerge+ (Shang et al. 2024, "LLaVA-PruMerge", public code ``token_prune_merge_advanced_plus``):
  CLS attention from the last encoder layer's queries and keys (one head over all channels);
  *outliers* of it by the interquartile range rule (> Q3 + 1.5 IQR) are kept, most attended first;
  spatially uniform patches are added (a stride of ``int(1 / r) / 3`` patches for an outlier ratio r,
  skipping those already kept); each kept token then absorbs its most key-similar other tokens,
  weighted by their CLS attention; one extra token sums every pruned token weighted likewise.
* VisionZip (Yang et al. 2024): *dominant* tokens are the CLS token plus the patches with the most
  CLS attention (summed over heads) in the feature layer, in their original order; the remaining
  tokens are split into evenly spaced *targets* and the rest, each of which is averaged into its
  most key-similar target (keys averaged over heads), giving the *contextual* tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "cls_attention_single_head",
    "cls_attention_heads",
    "iqr_outliers",
    "prumerge_plus_indices",
    "prumerge_merge",
    "visionzip_reduce",
    "visionzip_split",
]


def cls_attention_single_head(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """PruMerge's CLS attention: softmax(q k^T / sqrt(C)) over all S keys with the full C-channel
    projections as one head; the CLS row, patch columns. q, k: (B, S, C) -> (B, N)."""
    attn = torch.softmax((q[:, :1].float() @ k.float().transpose(1, 2)) * q.shape[-1] ** -0.5, dim=-1)  # (B, 1, S)
    return attn[:, 0, 1:]


def cls_attention_heads(q: torch.Tensor, k: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The encoder's own multi-head CLS attention summed over heads (VisionZip). q, k: (B, S, C) -> (B, N)."""
    b, s, c = q.shape
    d = c // num_heads
    qh = q[:, :1].float().view(b, 1, num_heads, d).transpose(1, 2)  # (B, H, 1, d)
    kh = k.float().view(b, s, num_heads, d).transpose(1, 2)  # (B, H, S, d)
    attn = torch.softmax(qh @ kh.transpose(-1, -2) * d**-0.5, dim=-1)  # (B, H, 1, S)
    return attn.sum(1)[:, 0, 1:]


def iqr_outliers(scores: torch.Tensor) -> torch.Tensor:
    """Per image, the scores above Q3 + 1.5 (Q3 - Q1) (quartiles with linear interpolation, as
    ``numpy.percentile``). scores: (B, N) -> bool (B, N)."""
    q1, q3 = torch.quantile(scores.float(), torch.tensor([0.25, 0.75], device=scores.device), dim=-1)  # (B,) each
    return scores > (q3 + 1.5 * (q3 - q1))[:, None]


def prumerge_plus_indices(cls_attn: torch.Tensor, stride_divisor: float = 3.0) -> list[torch.Tensor]:
    """PruMerge+'s kept patches per image, in its order: outliers by descending attention, then the
    uniform patches ``0, s, 2s, ... < N - 1`` not already kept, s = ``int(1 / r) / stride_divisor``
    (at least 1) for the image's outlier ratio r.

    The public code takes ``int(int(1 / r) / 3)``; ``stride_divisor`` (3 there) is the knob that
    sets the average count, and the stride is not rounded so that the count varies smoothly with it.
    An image without outliers (r = 0) gets r = 1 / N (one patch's worth).
    """
    if not (isinstance(stride_divisor, (int, float)) and math.isfinite(stride_divisor) and stride_divisor > 0):
        raise ValueError(f"stride_divisor must be a finite number > 0, got {stride_divisor!r}")
    b, n = cls_attn.shape
    outliers = iqr_outliers(cls_attn)
    out = []
    for i in range(b):
        count = int(outliers[i].sum())
        ordered = torch.topk(cls_attn[i], count).indices if count else cls_attn.new_zeros(0, dtype=torch.long)
        ratio = max(count, 1) / n
        stride = max(1.0, int(1 / ratio) / stride_divisor)
        uniform = torch.floor(torch.arange(0, n - 1, stride, dtype=torch.float64)).long().unique().to(cls_attn.device)
        uniform = uniform[~torch.isin(uniform, ordered)]
        out.append(torch.cat([ordered, uniform]))
    return out


def prumerge_merge(features: torch.Tensor, keys: torch.Tensor, cls_attn: torch.Tensor, kept: torch.Tensor,
                   neighbours: int) -> torch.Tensor:
    """PruMerge's merge for one image: each kept patch i becomes x_i + sum_j a_j x_j over the
    ``neighbours`` other patches j (kept or not) whose keys are most cosine-similar to its key (a_j:
    CLS attention, not renormalised); then one extra token sum_j a_j x_j over the pruned patches.

    features (N, C) patch features; keys (N, Ck) patch keys; cls_attn (N,); kept (K,) patch indices.
    Returns (K + 1, C), or (N, C) when every patch is kept (nothing to sum into an extra token).
    """
    n = features.shape[0]
    knorm = F.normalize(keys.float(), dim=-1)
    sim = knorm[kept] @ knorm.T  # (K, N)
    sim[torch.arange(len(kept)), kept] = -math.inf  # never a token's own neighbour
    k = min(neighbours, n - 1)
    nearest = torch.topk(sim, k, dim=-1).indices  # (K, k)
    weights = cls_attn[nearest].to(features.dtype)  # (K, k)
    merged = features[kept] + (weights[..., None] * features[nearest]).sum(1)
    pruned = torch.ones(n, dtype=torch.bool, device=features.device)
    pruned[kept] = False
    if not bool(pruned.any()):  # every patch kept: no pruned token to sum, no extra token
        return merged
    extra = (cls_attn[pruned].to(features.dtype)[:, None] * features[pruned]).sum(0, keepdim=True)
    return torch.cat([merged, extra])


def visionzip_split(total: int) -> tuple[int, int]:
    """(dominant, contextual) for ``total`` tokens: VisionZip's published settings keep about
    54 + 10, 108 + 20 and 162 + 30 (contextual = total x 20 / 128, at least 1 when total >= 2)."""
    if not (isinstance(total, int) and total >= 2):
        raise ValueError(f"VisionZip needs at least 2 tokens (one dominant, one contextual), got {total!r}")
    contextual = max(1, round(total * 20 / 128))
    return total - contextual, contextual


def visionzip_reduce(features: torch.Tensor, keys: torch.Tensor, cls_attn: torch.Tensor, dominant: int,
                     contextual: int) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip for a batch. features (B, S, C) with the CLS token first; keys (B, S, Ck) (averaged over
    heads); cls_attn (B, N). Returns ((B, dominant + contextual, C), (B, dominant) kept indices into S,
    CLS = 0, in original order)."""
    b, s, c = features.shape
    if not (dominant >= 1 and contextual >= 1 and dominant + contextual <= s):
        raise ValueError(f"dominant + contextual must be in [2, {s}], got {dominant} + {contextual}")
    top = torch.topk(cls_attn, dominant - 1, dim=-1).indices + 1  # (B, dominant - 1), into S
    keep = torch.cat([torch.zeros(b, 1, dtype=torch.long, device=features.device), top], 1).sort(-1).values
    is_dominant = torch.zeros(b, s, dtype=torch.bool, device=features.device).scatter_(1, keep, True)
    dom = torch.gather(features, 1, keep[..., None].expand(-1, -1, c))
    rest = s - dominant
    rest_features = features[~is_dominant].view(b, rest, c)
    rest_keys = F.normalize(keys[~is_dominant].view(b, rest, -1).float(), dim=-1)
    step = max(1, rest // contextual)
    targets = torch.arange(0, rest, step, device=features.device)[:contextual]
    is_target = torch.zeros(rest, dtype=torch.bool, device=features.device)
    is_target[targets] = True
    sim = rest_keys[:, ~is_target] @ rest_keys[:, is_target].transpose(1, 2)  # (B, others, targets)
    assign = F.one_hot(sim.argmax(-1), int(is_target.sum())).to(features.dtype)  # (B, others, targets)
    counts = 1 + assign.sum(1)[..., None]  # (B, targets, 1)
    ctx = (assign.transpose(1, 2) @ rest_features[:, ~is_target] + rest_features[:, is_target]) / counts
    return torch.cat([dom, ctx], 1), keep
