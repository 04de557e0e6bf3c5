"""Test-time normalisation (Schneider et al., NeurIPS 2020; TENT's "BN" baseline): batch statistics, no update."""

from __future__ import annotations

import torch

from .base import TTAdapter, register_adapter

__all__ = ["BatchNormStatistics"]


@register_adapter("norm")
class BatchNormStatistics(TTAdapter):
    """Baseline that only normalises with the test batch's statistics in every BatchNorm; no weight changes.

    It separates what TENT and GraTa gain from their gradient steps from what batch statistics alone give.

    Args:
        model: the source network (configured in place).
        episodic: accepted for a uniform interface; there is no state to reset.
    """

    def adapt(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}
