"""atp-repro: a reproducibility package for ATP-LLaVA (adaptive visual-token pruning).

The method's public API lives in :mod:`atp_repro.atp` and is re-exported here.
"""

from .atp import (
    ATPConfig,
    ATPRecord,
    apply_atp,
    atp_config,
    atp_parameters,
    budget_breakdown,
    budget_loss,
    last_atp_record,
    load_atp,
    load_atp_pretrained,
    proportional_module_layers,
    save_atp,
    save_atp_pretrained,
    token_counts,
)

__version__ = "0.1.0"

__all__ = [
    "ATPConfig",
    "ATPRecord",
    "apply_atp",
    "atp_config",
    "atp_parameters",
    "budget_breakdown",
    "budget_loss",
    "last_atp_record",
    "load_atp",
    "load_atp_pretrained",
    "proportional_module_layers",
    "save_atp",
    "save_atp_pretrained",
    "token_counts",
]
