"""ATP-LLaVA's adaptive token pruning on Hugging Face LLaVA models."""

from .api import (
    apply_atp,
    atp_config,
    atp_parameters,
    budget_breakdown,
    budget_loss,
    has_atp,
    last_atp_record,
    load_atp,
    load_atp_pretrained,
    save_atp,
    save_atp_pretrained,
    token_counts,
)
from .config import ATPConfig, proportional_module_layers
from .language_model import ATPRecord

__all__ = [
    "ATPConfig",
    "ATPRecord",
    "apply_atp",
    "atp_config",
    "atp_parameters",
    "budget_breakdown",
    "budget_loss",
    "has_atp",
    "last_atp_record",
    "load_atp",
    "load_atp_pretrained",
    "proportional_module_layers",
    "save_atp",
    "save_atp_pretrained",
    "token_counts",
]
