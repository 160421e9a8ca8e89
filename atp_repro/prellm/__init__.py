"""Vision-side token reduction before the language model: PruMerge+ and VisionZip on transformers' LLaVA."""

from .llava import (
    METHODS,
    ReductionConfig,
    apply_reduction,
    has_reduction,
    reduction_counts,
    reduction_for_budget,
)

__all__ = ["METHODS", "ReductionConfig", "apply_reduction", "has_reduction", "reduction_counts",
           "reduction_for_budget"]
