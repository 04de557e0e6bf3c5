"""How far a test batch is from the source domain, read off the inputs of the BatchNorm layers.

A BatchNorm layer keeps the source domain's per-channel mean and variance (its running statistics). For a test
batch, the shift of one layer is the Kullback-Leibler divergence of the Gaussian of its input channels (the
batch's mean and variance) from the source Gaussian, averaged over channels; the batch's shift is the mean over
layers. In-domain images score low (their statistics are what the running statistics average), shifted ones
high; ``scripts/bn_shift_scores.py`` measures both on the fundus domains (``docs/results.md``).
"""

from __future__ import annotations

import torch
from torch import nn

from .batchnorm import _batch_norms

__all__ = ["batch_norm_shift"]


def _gaussian_kl(h: torch.Tensor, layer: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """Mean over channels of KL(N(batch mean, batch variance) ‖ N(running mean, running variance))."""
    var, mean = torch.var_mean(h, dim=[0, *range(2, h.ndim)], correction=0)
    ref_mean, ref_var = layer.running_mean.float(), layer.running_var.float() + layer.eps
    ratio = (var + layer.eps) / ref_var
    return 0.5 * ((mean - ref_mean) ** 2 / ref_var + ratio - 1 - torch.log(ratio)).mean()


@torch.no_grad()
def batch_norm_shift(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The shift of batch ``x`` from the source domain: one forward of ``model`` (in its current mode), and the
    mean over its BatchNorm layers of the channel-averaged Gaussian KL divergence of each layer's input from the
    layer's running statistics. A 0-dim tensor on ``x``'s device (no host read).

    Args:
        model: a network with BatchNorm layers that keep running statistics (the source statistics).
        x: the batch, (B, C, *spatial).

    Raises:
        ValueError: ``model`` has no BatchNorm layer with running statistics.
    """
    layers = [m for m in _batch_norms(model) if m.running_mean is not None and m.running_var is not None]
    if not layers:
        raise ValueError("the shift is read off BatchNorm running statistics, and the model has none")
    divergences: list[torch.Tensor] = []

    def record(layer: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        divergences.append(_gaussian_kl(inputs[0].detach().float(), layer))

    handles = [layer.register_forward_hook(record) for layer in layers]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(divergences).mean()
