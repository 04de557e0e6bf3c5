"""BatchNorm statistics taken on one batch and then held fixed: the statistics of a volume's adaptation patches,
reused for every window of a sliding-window prediction."""

from __future__ import annotations

import contextlib
import math
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .batchnorm import _group_statistics, _named_batch_norms, batch_statistics_weight

__all__ = ["frozen_statistics", "normalisation_statistics"]

Statistics = dict[str, tuple[torch.Tensor, torch.Tensor]]


def _statistics_used(module: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel (mean, var) ``module`` normalises ``x`` with, as its forward does: the batch's, the batch's
    mixed with a source prior or median statistics (:mod:`~monai_grata.tta.batchnorm`), or the running ones."""
    if getattr(module, "_tta_groups", 1) != 1:
        raise ValueError("statistics of a per-group forward are not one set per layer: record them outside it")
    c = x.shape[1]
    configured = hasattr(module, "_tta_prior") or hasattr(module, "_tta_statistic")
    prior = getattr(module, "_tta_prior", 0.0) if configured else None
    if prior is not None and math.isinf(prior):
        return module.running_mean.clone(), module.running_var.clone()
    if prior is not None:
        var, mean = (s.reshape(c) for s in _group_statistics(x[None], getattr(module, "_tta_statistic", "mean")))
        w = batch_statistics_weight(x.shape[0], prior)
        if w < 1.0:
            mean = w * mean + (1 - w) * module.running_mean
            var = w * var + (1 - w) * module.running_var
        return mean, var
    if module.training or module.running_mean is None:
        var, mean = torch.var_mean(x, dim=(0, *range(2, x.ndim)), correction=0)
        return mean, var
    return module.running_mean.clone(), module.running_var.clone()


@torch.no_grad()
def normalisation_statistics(model: nn.Module, x: torch.Tensor) -> Statistics:
    """Run ``model`` on ``x`` once and return, per BatchNorm layer, the (mean, var) it normalised with.

    Every layer is recorded as it is configured: with the batch's own statistics (train mode, or an adapter's
    :func:`~monai_grata.tta.configure_batch_statistics`), mixed with a source prior
    (:func:`~monai_grata.tta.source_prior_batch_norm`), median statistics (:func:`~monai_grata.tta.median_batch_norm`)
    or its running statistics (eval mode). The forward itself is unchanged; hooks only read each layer's input.

    Args:
        model: the network.
        x: the batch whose statistics are taken (e.g. the patches a volume was adapted on).

    Returns:
        ``{layer name: (mean, var)}``, per-channel tensors, for :func:`frozen_statistics`.
    """
    recorded: Statistics = {}
    handles = []
    for name, module in _named_batch_norms(model):

        def record(module: nn.Module, args: tuple, name: str = name) -> None:
            recorded[name] = tuple(s.detach() for s in _statistics_used(module, args[0]))

        handles.append(module.register_forward_pre_hook(record))
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return recorded


def _frozen_forward(self: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    mean, var = self._tta_frozen
    return F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)


@contextlib.contextmanager
def frozen_statistics(model: nn.Module, statistics: Statistics) -> Iterator[nn.Module]:
    """Inside the context, every BatchNorm of ``model`` normalises with the fixed ``statistics`` (from
    :func:`normalisation_statistics`) and its current affine weights, whatever the batch, in train and eval mode.

    So a ``SlidingWindowInferer`` predicts every window of a volume with the same statistics (those of the patches
    the volume was adapted on) instead of each window batch's own. On leaving, each layer's forward is restored.

    Args:
        model: the network.
        statistics: ``{layer name: (mean, var)}`` for every BatchNorm layer of ``model``.

    Raises:
        ValueError: a BatchNorm layer without statistics.
    """
    layers = _named_batch_norms(model)
    missing = [name for name, _ in layers if name not in statistics]
    if missing:
        raise ValueError(f"no frozen statistics for BatchNorm layers {missing[:5]}")
    saved = [vars(m).get("forward") for _, m in layers]
    for name, module in layers:
        module._tta_frozen = statistics[name]
        module.forward = types.MethodType(_frozen_forward, module)
    try:
        yield model
    finally:
        for (_, module), forward in zip(layers, saved, strict=True):
            del module._tta_frozen
            if forward is None:
                del module.forward
            else:
                module.forward = forward
