"""Budget-constrained objective: L = L_ntp + lambda_ATP * L_ATP + lambda_target * L_target.

N_m is the (soft) number of vision tokens kept after module m, N_0 the number before any module.
- L_ATP = sum_m (N_m / N_0) * (l_m / L): kept fractions weighted by the module's depth, where l_m is
  the number of decoder layers before module m's output (0-based layer + 1) and L the depth (choice).
- L_target = |N_bar - N_target| / N_0, N_bar the vision-token count averaged over all decoder
  layers (the paper's "Token" definition) and over the batch (choice: the budget constrains the
  average cost, so that single instances stay free to keep more or fewer tokens).
"""

from __future__ import annotations

import torch


def per_layer_counts(stage_counts: torch.Tensor, module_layers: tuple[int, ...], num_layers: int) -> torch.Tensor:
    """Expand per-stage counts to per-decoder-layer counts.

    Args:
        stage_counts: (B, M + 1): tokens before any module, then after each of the M modules.
        module_layers: the 0-based layers after which the modules run.
    Returns:
        (B, num_layers): vision tokens entering each decoder layer.
    """
    stage_of_layer = torch.zeros(num_layers, dtype=torch.long, device=stage_counts.device)
    for layer in module_layers:
        stage_of_layer[layer + 1 :] += 1
    return stage_counts[:, stage_of_layer]


def depth_weighted_kept_fraction(
    kept_counts: torch.Tensor, initial_count: float | torch.Tensor, module_layers: tuple[int, ...], num_layers: int
) -> torch.Tensor:
    """L_ATP averaged over the batch. kept_counts: (B, M) soft counts after each module; initial_count: N_0,
    one number or (B, 1) per sample (dynamic resolution: each sample relative to its own image tokens)."""
    depth = torch.tensor([(layer + 1) / num_layers for layer in module_layers], device=kept_counts.device)
    return ((kept_counts / initial_count) * depth).sum(-1).mean()


def target_deviation(
    stage_counts: torch.Tensor, module_layers: tuple[int, ...], num_layers: int, n_target: float
) -> torch.Tensor:
    """L_target = |N_bar - N_target| / N_0 with N_bar averaged over layers and batch."""
    n_bar = per_layer_counts(stage_counts, module_layers, num_layers).mean()
    initial = stage_counts[:, 0].mean()
    return (n_bar - n_target).abs() / initial


def budget_terms(
    stage_counts: torch.Tensor,
    module_layers: tuple[int, ...],
    num_layers: int,
    n_target: float,
    lambda_atp: float,
    lambda_target: float,
) -> dict[str, torch.Tensor]:
    """All budget terms from (B, M + 1) soft stage counts (differentiable).

    Text-only samples (N_0 = 0, nothing to prune) are left out; a batch without any image has no budget
    terms (zeros)."""
    with_image = stage_counts[:, 0] > 0
    if not bool(with_image.all()):
        if not bool(with_image.any()):
            zero = stage_counts.sum() * 0.0
            return {"l_atp": zero, "l_target": zero, "budget_loss": zero}
        stage_counts = stage_counts[with_image]
    l_atp = depth_weighted_kept_fraction(stage_counts[:, 1:], stage_counts[:, :1].detach(), module_layers, num_layers)
    l_target = target_deviation(stage_counts, module_layers, num_layers, n_target)
    return {
        "l_atp": l_atp,
        "l_target": l_target,
        "budget_loss": lambda_atp * l_atp + lambda_target * l_target,
    }
