"""Test-time normalisation (Schneider et al., NeurIPS 2020; TENT's "BN" baseline): batch statistics, no update."""

from __future__ import annotations

import torch

from .base import TTAdapter, register_adapter

__all__ = ["BatchNormStatistics"]


@register_adapter("norm")
class BatchNormStatistics(TTAdapter):
    """Baseline that only normalises with the test batch's statistics in every BatchNorm; no weight changes.

    It separates what TENT and GraTa gain from their gradient steps from what batch statistics alone give.
    With ``bn_prior`` N > 0 the test statistics are mixed with the source statistics, the source counted as N
    samples (Schneider et al. 2020's prior).

    Args:
        model: the source network (configured in place).
        episodic: accepted for a uniform interface; there is no state to reset.
        bn_prior: 0 (test statistics only), N > 0 (source prior of strength N), ``math.inf`` (source statistics).
    """

    def adapt(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}
