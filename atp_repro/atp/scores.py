"""Self- and cross-modality importance scores (pure tensor functions).

All tensors use the *sequence layout*: a score tensor has shape (batch, seq) and is meaningful only
at vision positions. Queries are weighted rather than selected, which serves both paths:

- hard path: weight 1 for every live query of the right kind, 0 otherwise;
- soft path: weight D_q, the cumulative keep value, so that tokens pruned earlier (still present in
  the sequence but invisible) stop voting, exactly as if they had been removed.

Attention probabilities are (batch, heads, queries, keys) and are averaged over heads.
"""

from __future__ import annotations

import torch

_NEG = torch.finfo(torch.float32).min


def weighted_column_sums(attn_probs: torch.Tensor, query_weight: torch.Tensor) -> torch.Tensor:
    """Head-averaged attention received by every key, summed over queries with weights.

    Args:
        attn_probs: (B, H, Q, K) attention probabilities (rows sum to one).
        query_weight: (B, Q, W): W weightings of the query rows (e.g. vision and prompt queries).
    Returns:
        (B, K, W) sum_q w_q * mean_h attn_probs[b, h, q, k] for every weighting.
    """
    # (B, H, Q, K) x (B, Q, W) -> (B, K, W)
    return torch.einsum("bhqk,bqw->bkw", attn_probs.float(), query_weight.float()) / attn_probs.shape[1]


def weighted_column_sums_from_qk(
    query: torch.Tensor,
    key: torch.Tensor,
    additive_mask: torch.Tensor | None,
    scaling: float,
    query_weight: torch.Tensor,
    key_columns: slice,
    head_chunk: int = 8,
) -> torch.Tensor:
    """Same as :func:`weighted_column_sums`, computed from a layer's queries and keys.

    Only the blocks the scores need are formed: query rows that carry weight (from the first such
    row on) against all keys for the softmax normaliser, and only the ``key_columns`` block of the
    probabilities is kept. Heads are processed in chunks, so the full (B, H, L, L) map is never
    materialised. This lets a pruning layer run its own attention with a fused kernel (SDPA,
    flash) while the scores still equal those of an explicit attention map.

    Args:
        query: (B, H, Q, hd) queries with RoPE applied.
        key: (B, H_kv, K, hd) keys with RoPE applied (GQA is expanded here).
        additive_mask: (B, 1 or H, Q, K) float mask added to the logits, or None for plain causal.
        scaling: logit scale (1 / sqrt(hd)).
        query_weight: (B, Q, W): W weightings of the query rows.
        key_columns: the key positions whose received attention is wanted.
    Returns:
        (B, K, W) weighted column sums, zero outside ``key_columns``.
    """
    batch, heads, q_len, _ = query.shape
    k_len = key.shape[2]
    groups = heads // key.shape[1]
    num_weightings = query_weight.shape[-1]
    rows = torch.nonzero(query_weight.sum((0, 2)) > 0)
    first_row = int(rows.min()) if rows.numel() else q_len
    acc = torch.zeros((batch, k_len, num_weightings), dtype=torch.float32, device=query.device)
    if first_row >= q_len:
        return acc

    q_rows = query[:, :, first_row:].float()  # (B, H, R, hd)
    weights = query_weight[:, first_row:].float()  # (B, R, W)
    if additive_mask is not None:
        mask_rows = additive_mask[:, :, first_row:].float()  # (B, 1|H, R, K)
    else:  # causal; keys may be preceded by a cache prefix of k_len - q_len positions
        row_idx = torch.arange(first_row, q_len, device=query.device)[:, None] + (k_len - q_len)
        col_idx = torch.arange(k_len, device=query.device)[None, :]
        mask_rows = torch.where(col_idx <= row_idx, 0.0, _NEG)[None, None]
    key_f = key.float()
    if groups > 1:  # grouped-query attention: every key head serves `groups` query heads
        key_f = key_f.repeat_interleave(groups, dim=1)
    for h0 in range(0, heads, head_chunk):
        h1 = min(h0 + head_chunk, heads)
        logits = torch.matmul(q_rows[:, h0:h1], key_f[:, h0:h1].transpose(-1, -2)) * scaling  # (B, h, R, K)
        logits = logits + (mask_rows if mask_rows.shape[1] == 1 else mask_rows[:, h0:h1])
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (B, h, R, 1)
        block = torch.exp(logits[..., key_columns] - lse)  # (B, h, R, Kv)
        acc[:, key_columns] += torch.einsum("bhrk,brw->bkw", block, weights)
    return acc / heads


def weighted_column_sums_from_lse(
    query: torch.Tensor,
    key: torch.Tensor,
    logsumexp: torch.Tensor,
    additive_mask: torch.Tensor | None,
    scaling: float,
    query_weight: torch.Tensor,
    key_columns: slice,
    head_chunk: int = 8,
) -> torch.Tensor:
    """:func:`weighted_column_sums_from_qk` when the fused kernel also returned each row's log-sum-exp.

    Flash-style kernels compute ``lse[q] = log sum_k exp(logit[q, k])`` anyway; with it, the
    probabilities of the wanted block are ``exp(logit - lse)`` and only the weighted rows against
    the ``key_columns`` are formed: no pass over the full rows.

    Args:
        logsumexp: (B, H, Q) natural-log normalisers of the masked, scaled logits.
        (others as in :func:`weighted_column_sums_from_qk`)
    """
    batch, heads, q_len, _ = query.shape
    k_len = key.shape[2]
    groups = heads // key.shape[1]
    num_weightings = query_weight.shape[-1]
    rows = torch.nonzero(query_weight.sum((0, 2)) > 0)
    first_row = int(rows.min()) if rows.numel() else q_len
    acc = torch.zeros((batch, k_len, num_weightings), dtype=torch.float32, device=query.device)
    if first_row >= q_len:
        return acc
    q_rows = query[:, :, first_row:].float()
    weights = query_weight[:, first_row:].float()
    lse = logsumexp[:, :, first_row:, None].float()  # (B, H, R, 1)
    key_block = key[:, :, key_columns].float()
    if groups > 1:
        key_block = key_block.repeat_interleave(groups, dim=1)
    if additive_mask is not None:
        mask_block = additive_mask[:, :, first_row:, key_columns].float()
    else:  # causal with a cache prefix of k_len - q_len positions
        row_idx = torch.arange(first_row, q_len, device=query.device)[:, None] + (k_len - q_len)
        col_idx = torch.arange(k_len, device=query.device)[key_columns][None, :]
        mask_block = torch.where(col_idx <= row_idx, 0.0, _NEG)[None, None]
    for h0 in range(0, heads, head_chunk):
        h1 = min(h0 + head_chunk, heads)
        logits = torch.matmul(q_rows[:, h0:h1], key_block[:, h0:h1].transpose(-1, -2)) * scaling  # (B, h, R, Kv)
        logits = logits + (mask_block if mask_block.shape[1] == 1 else mask_block[:, h0:h1])
        block = torch.exp(logits - lse[:, h0:h1])
        acc[:, key_columns] += torch.einsum("bhrk,brw->bkw", block, weights)
    return acc / heads


def self_modality_importance(column_sums: torch.Tensor, vision_weight: torch.Tensor) -> torch.Tensor:
    """Attention a vision token receives from vision queries, averaged over the queries that see it.

    Args:
        column_sums: (B, L) weighted column sums with the vision queries' weights.
        vision_weight: (B, L) weight of each position as a vision query (0 for text / padding).
    Returns:
        (B, L) mean attention from the (causally) visible vision queries; 0 where no query sees it.
    """
    # Under causal attention key k is seen by queries q >= k: a reverse cumulative sum counts them.
    visible_queries = torch.flip(torch.cumsum(torch.flip(vision_weight.float(), [1]), 1), [1])
    return torch.where(visible_queries > 0, column_sums / visible_queries.clamp_min(1e-12), 0.0)


def cross_modality_importance(column_sums: torch.Tensor, prompt_weight: torch.Tensor) -> torch.Tensor:
    """Attention a vision token receives from prompt text queries, averaged over those queries.

    Args:
        column_sums: (B, L) weighted column sums with the prompt queries' weights.
        prompt_weight: (B, L) 1 for prompt text after the image (answers and padding excluded).
    Returns:
        (B, L) mean attention from prompt queries (0 for a sample without prompt tokens).
    """
    count = prompt_weight.float().sum(-1, keepdim=True)
    return torch.where(count > 0, column_sums / count.clamp_min(1e-12), 0.0)


def normalise_scores(scores: torch.Tensor, valid: torch.Tensor, method: str = "minmax") -> torch.Tensor:
    """Per-instance normalisation to [0, 1] over the valid (live vision) positions.

    ``minmax``: (s - min) / (max - min); ``max``: s / max. Invalid positions are set to 0; a
    constant score vector maps to 1 (nothing distinguishes the tokens, so nothing looks redundant).
    """
    valid = valid.bool()
    big = torch.finfo(scores.dtype).max
    s_max = torch.where(valid, scores, -big).amax(-1, keepdim=True)
    if method == "minmax":
        s_min = torch.where(valid, scores, big).amin(-1, keepdim=True)
        span = s_max - s_min
        out = torch.where(span > 0, (scores - s_min) / span.clamp_min(1e-30), torch.ones_like(scores))
    elif method == "max":
        out = torch.where(s_max > 0, scores / s_max.clamp_min(1e-30), torch.ones_like(scores))
    else:
        raise ValueError(f"score normalisation {method!r} is not one of ('minmax', 'max')")
    return torch.where(valid, out, torch.zeros_like(out))


def redundancy_score(self_norm: torch.Tensor, cross_norm: torch.Tensor) -> torch.Tensor:
    """S_r: the mean of the two normalised importances (high = important, kept)."""
    return 0.5 * (self_norm + cross_norm)


def masked_quantiles(values: torch.Tensor, valid: torch.Tensor, quantiles: tuple[float, ...]) -> torch.Tensor:
    """Nearest-rank quantiles of each row over its valid entries.

    Args:
        values: (B, L); valid: (B, L) bool.
    Returns:
        (B, len(quantiles)); rows without valid entries give zeros.
    """
    big = torch.finfo(values.dtype).max
    sorted_vals, _ = torch.sort(torch.where(valid, values, big), dim=-1)
    count = valid.sum(-1, keepdim=True)  # (B, 1)
    q = torch.tensor(quantiles, device=values.device, dtype=torch.float32)[None]  # (1, Q)
    idx = torch.round((count.clamp_min(1) - 1).float() * q).long()
    out = torch.gather(sorted_vals, -1, idx)
    return torch.where(count > 0, out, torch.zeros_like(out))
