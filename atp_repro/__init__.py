"""atp-repro: a reproducibility package for ATP-LLaVA (adaptive visual-token pruning).

The method's public API lives in :mod:`atp_repro.atp` and is re-exported here. It is imported on
first use, so that ``atp-repro --help`` and the configuration tools start without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

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


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module(".atp", __name__), name)
    raise AttributeError(f"module 'atp_repro' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
