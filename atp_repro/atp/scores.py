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


def weighted_column_sums(attn_probs: torch.Tensor, query_weight: torch.Tensor) -> torch.Tensor:
    """Head-averaged attention received by every key, summed over queries with weights.

    Args:
        attn_probs: (B, H, Q, K) attention probabilities (rows sum to one).
        query_weight: (B, Q, W): W weightings of the query rows (e.g. vision and prompt queries).
    Returns:
        (B, K, W) sum_q w_q * mean_h attn_probs[b, h, q, k] for every weighting.
    """
    # Head average first, then one batched matmul: (B, K, Q) @ (B, Q, W) -> (B, K, W).
    head_mean = attn_probs.float().mean(1)
    return torch.bmm(head_mean.transpose(1, 2), query_weight.float())


def weighted_column_sums_from_qk(
    query: torch.Tensor,
    key: torch.Tensor,
    additive_mask: torch.Tensor | None,
    scaling: float,
    query_weight: torch.Tensor,
    key_columns: slice,
    logsumexp: torch.Tensor | None = None,
    head_chunk: int = 8,
    row_chunk: int = 128,
) -> torch.Tensor:
    """Same as :func:`weighted_column_sums`, computed from a layer's queries and keys.

    Only the blocks the scores need are formed: the weighted query rows (from the first one on),
    in chunks of rows and heads, so the full (B, H, L, L) map is never materialised. This lets a
    pruning layer run its own attention with a fused kernel (SDPA, flash) while the scores still
    equal those of an explicit attention map.

    - With ``logsumexp`` (the per-row normaliser that flash-style kernels compute anyway) only the
      rows x ``key_columns`` block of logits is formed: P = exp(logit - lse).
    - Without it, the rows' logits against all visible keys are formed for the normaliser.
    - With a causal mask (``additive_mask`` None), keys after a row chunk's last query are skipped,
      and no (R, K) float mask is added: with ``logsumexp`` the block's upper triangle is zeroed
      after ``exp`` (``tril``), without it future keys are filled with -inf before the normaliser.

    Each block costs one (h*R, hd) x (hd, K) matmul, two or three elementwise passes (in place
    unless autograd records them), a sum over heads and one (W, R) x (R, K) matmul with the query
    weights (the FLOPs :func:`atp_repro.efficiency.flops.atp_scoring_flops` counts).

    Args:
        query: (B, H, Q, hd) queries with RoPE applied.
        key: (B, H_kv, K, hd) keys with RoPE applied (GQA is expanded here).
        additive_mask: (B, 1 or H, Q, K) float mask added to the logits, or None for plain causal
            (keys may be preceded by a cache prefix of K - Q positions).
        scaling: logit scale (1 / sqrt(hd)).
        query_weight: (B, Q, W): W weightings of the query rows.
        key_columns: the key positions whose received attention is wanted.
        logsumexp: optional (B, H, Q) natural-log normalisers of the masked, scaled logits.
    Returns:
        (B, K, W) weighted column sums, zero outside ``key_columns``.
    """
    batch, heads, q_len, _ = query.shape
    k_len = key.shape[2]
    offset = k_len - q_len
    groups = heads // key.shape[1]
    col_start, col_stop = key_columns.start, key_columns.stop
    acc = torch.zeros((batch, query_weight.shape[-1], k_len), dtype=torch.float32, device=query.device)  # (B, W, K)
    rows = torch.nonzero(query_weight.sum((0, 2)) > 0)
    if rows.numel() == 0:
        return acc.transpose(1, 2).contiguous()
    key_f = key.float()
    if groups > 1:  # grouped-query attention: every key head serves `groups` query heads
        key_f = key_f.repeat_interleave(groups, dim=1)
    weights_t = query_weight.float().transpose(1, 2)  # (B, W, Q)
    # In place on the block's own buffers unless autograd records them (soft path with a trainable LM).
    in_place = not (torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (query, key, additive_mask, query_weight)))

    for r0 in range(int(rows.min()), q_len, row_chunk):
        r1 = min(r0 + row_chunk, q_len)
        visible = min(k_len, r1 + offset) if additive_mask is None else k_len  # keys any row here can see
        stop = min(col_stop, visible)
        if stop <= col_start:
            continue
        first_key = col_start if logsumexp is not None else 0  # the normaliser needs every visible key
        last_key = stop if logsumexp is not None else visible
        # Row i of the block is query r0 + i (key position r0 + i + offset), column j is key first_key + j:
        # under the causal mask it is visible iff j - i <= diagonal.
        diagonal = r0 + offset - first_key
        future = None
        if additive_mask is None and logsumexp is None:  # the normaliser must not see future keys
            future = torch.ones(r1 - r0, last_key - first_key, dtype=torch.bool, device=query.device).triu_(
                diagonal + 1)
        for h0 in range(0, heads, head_chunk):
            h1 = min(h0 + head_chunk, heads)
            q_rows = query[:, h0:h1, r0:r1].float() * scaling  # (B, h, R, hd)
            logits = torch.matmul(q_rows, key_f[:, h0:h1, first_key:last_key].transpose(-1, -2))  # (B, h, R, K')
            if additive_mask is not None:
                mask = additive_mask[:, :, r0:r1, first_key:last_key]
                logits = logits + (mask if mask.shape[1] == 1 else mask[:, h0:h1])
            elif future is not None:
                logits = logits.masked_fill(future, float("-inf"))
            if logsumexp is not None:
                lse = logsumexp[:, h0:h1, r0:r1, None].float()
            else:
                lse = torch.logsumexp(logits, dim=-1, keepdim=True)
            probs = logits.sub_(lse).exp_() if in_place else torch.exp(logits - lse)  # (B, h, R, K')
            if additive_mask is None and logsumexp is not None:  # zero the keys after each query
                probs = probs.tril_(diagonal) if in_place else probs.tril(diagonal)
            block = probs[..., col_start - first_key : stop - first_key]  # (B, h, R, Kv)
            # Every head shares the query weights: sum the heads, then (B, W, R) @ (B, R, Kv).
            acc[:, :, col_start:stop] += torch.bmm(weights_t[:, :, r0:r1], block.sum(1))
    return (acc / heads).transpose(1, 2).contiguous()


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


def modality_importances(
    column_sums: torch.Tensor, vision_weight: torch.Tensor, prompt_weight: torch.Tensor
) -> torch.Tensor:
    """Self- and cross-modality importance in one pass, stacked.

    Equal to ``stack([self_modality_importance(column_sums[..., 0], vision_weight),
    cross_modality_importance(column_sums[..., 1], prompt_weight)], 1)`` with half the ops.

    Args:
        column_sums: (B, L, 2) weighted column sums (vision queries, prompt queries).
        vision_weight, prompt_weight: (B, L) query weights used for them.
    Returns:
        (B, 2, L): [:, 0] self-modality, [:, 1] cross-modality importance.
    """
    visible_queries = torch.flip(torch.cumsum(torch.flip(vision_weight.float(), [1]), 1), [1])  # (B, L)
    prompt_count = prompt_weight.float().sum(-1, keepdim=True).expand_as(visible_queries)  # (B, L)
    divisor = torch.stack([visible_queries, prompt_count], 1)  # (B, 2, L)
    return torch.where(divisor > 0, column_sums.transpose(1, 2) / divisor.clamp_min(1e-12), 0.0)


def normalise_scores(scores: torch.Tensor, valid: torch.Tensor, method: str = "minmax") -> torch.Tensor:
    """Per-instance normalisation to [0, 1] over the valid (live vision) positions of the last axis.

    ``scores`` is (..., L) and ``valid`` broadcasts to it (e.g. (B, S, L) scores, (B, 1, L) valid).
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


def redundancy_score(self_norm: torch.Tensor, cross_norm: torch.Tensor, importance: str = "both") -> torch.Tensor:
    """S_r (high = important, kept): the mean of the two normalised importances, or one of them alone
    (``importance`` = ``self`` / ``cross``, the importance ablation; ``last`` and ``raters`` are
    cross-modality importances from the last prompt token or from SparseVLM's text raters only)."""
    if importance == "both":
        return 0.5 * (self_norm + cross_norm)
    if importance == "self":
        return self_norm
    if importance in ("cross", "last", "raters"):
        return cross_norm
    raise ValueError(f"importance must be one of ('both', 'self', 'cross', 'last', 'raters'), got {importance!r}")


def masked_quantiles(values: torch.Tensor, valid: torch.Tensor, quantiles: tuple[float, ...]) -> torch.Tensor:
    """Nearest-rank quantiles of each row over its valid entries.

    Args:
        values: (..., L); valid: bool, broadcastable to ``values`` (e.g. (B, 1, L) for (B, S, L)).
    Returns:
        (..., len(quantiles)); rows without valid entries give zeros.
    """
    big = torch.finfo(values.dtype).max
    sorted_vals, _ = torch.sort(torch.where(valid, values, big), dim=-1)
    count = valid.sum(-1, keepdim=True)  # (..., 1) over valid's leading shape
    q = torch.tensor(quantiles, device=values.device, dtype=torch.float32)
    idx = torch.round((count.clamp_min(1) - 1).float() * q).long()  # (..., Q)
    out = torch.gather(sorted_vals, -1, idx.expand(*sorted_vals.shape[:-1], len(quantiles)))
    return torch.where(count > 0, out, torch.zeros_like(out))
