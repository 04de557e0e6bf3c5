"""How BatchNorm normalises during test-time adaptation: the test batch's statistics, optionally mixed with the
source statistics (a prior), and several views in one batched forward with per-view statistics."""

from __future__ import annotations

import contextlib
import math
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "batch_statistics_weight",
    "median_batch_norm",
    "per_group_batch_norm",
    "set_prior_strength",
    "source_prior_batch_norm",
    "track_test_statistics",
    "update_running_statistics",
]


def _named_batch_norms(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for _, m in _named_batch_norms(model)]


def batch_statistics_weight(batch_size: int, prior: float) -> float:
    """The weight n / (N + n) of the test batch's statistics when a source prior of strength N is mixed in.

    Args:
        batch_size: n, the number of samples whose statistics are taken together.
        prior: N, the strength of the source statistics counted in samples (0: test statistics only;
            ``math.inf``: source statistics only).
    """
    return 0.0 if math.isinf(prior) else batch_size / (batch_size + prior)


def _group_statistics(grouped: torch.Tensor, statistic: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group, per-channel (variance, centre) of ``grouped`` (G, B, C, *spatial), kept as (G, 1, C, 1, ...):
    the mean and variance, or (``"median"``, MedBN) the median and the mean squared deviation from it."""
    dims = (1, *range(3, grouped.ndim))
    if statistic == "mean":
        return torch.var_mean(grouped, dim=dims, correction=0, keepdim=True)
    g, c = grouped.shape[0], grouped.shape[2]
    centre = grouped.transpose(1, 2).reshape(g, c, -1).median(dim=-1).values
    centre = centre.reshape(g, 1, c, *(1,) * (grouped.ndim - 3))
    return (grouped - centre).square().mean(dim=dims, keepdim=True), centre


def _tta_forward(self: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm forward with ``self._tta_groups`` groups, each normalised by its own statistics mixed with the
    source running statistics with prior strength ``self._tta_prior``."""
    groups, prior = getattr(self, "_tta_groups", 1), getattr(self, "_tta_prior", 0.0)
    statistic = getattr(self, "_tta_statistic", "mean")
    n, c = x.shape[:2]
    if n % groups:
        raise ValueError(f"batch of {n} cannot be split into {groups} groups")
    per_group = n // groups
    if prior == 0.0 and statistic == "mean":
        # (G*B, C, ...) -> (B, G*C, ...): batch_norm over it gives every (group, channel) its own statistics
        folded = x.reshape(groups, per_group, c, *x.shape[2:]).transpose(0, 1)
        folded = folded.reshape(per_group, groups * c, *x.shape[2:])
        weight = self.weight.repeat(groups) if self.weight is not None else None
        bias = self.bias.repeat(groups) if self.bias is not None else None
        out = F.batch_norm(folded, None, None, weight, bias, True, 0.0, self.eps)
        return out.reshape(per_group, groups, c, *x.shape[2:]).transpose(0, 1).reshape(x.shape)
    if math.isinf(prior):
        if getattr(self, "_tta_track", False):
            with torch.no_grad():
                var, mean = torch.var_mean(x, dim=(0, *range(2, x.ndim)), correction=0)
                self.running_mean.lerp_(mean, self._tta_momentum)
                self.running_var.lerp_(var, self._tta_momentum)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
    grouped = x.reshape(groups, per_group, c, *x.shape[2:])
    batch_var, batch_mean = _group_statistics(grouped, statistic)
    shape = (1, 1, c) + (1,) * (x.ndim - 2)
    w = batch_statistics_weight(per_group, prior)
    if w == 1.0:  # no prior (median statistics)
        mean, var = batch_mean, batch_var
    else:
        mean = w * batch_mean + (1 - w) * self.running_mean.view(shape)
        var = w * batch_var + (1 - w) * self.running_var.view(shape)
    if getattr(self, "_tta_track", False):
        # the prior follows the test stream: an exponential moving average of the test statistics
        momentum = self._tta_momentum
        with torch.no_grad():
            self.running_mean.lerp_(batch_mean.detach().mean(dim=0).reshape(c), momentum)
            self.running_var.lerp_(batch_var.detach().mean(dim=0).reshape(c), momentum)
    out = (grouped - mean) * torch.rsqrt(var + self.eps)
    if self.weight is not None:
        out = out * self.weight.view(shape) + self.bias.view(shape)
    return out.reshape(x.shape)


def source_prior_batch_norm(model: nn.Module, prior: float, momentum: float = 0.0) -> nn.Module:
    """Make every BatchNorm of ``model`` normalise with the test batch's statistics mixed with its source running
    statistics, in train and eval mode alike (Schneider et al., NeurIPS 2020):

        mean = n/(N+n) · mean_test + N/(N+n) · mean_source,   var = n/(N+n) · var_test + N/(N+n) · var_source

    where n is the batch size and N the prior strength. The running statistics are kept (so a reset restores
    them). With ``momentum`` m > 0 the prior follows the test stream: inside :func:`track_test_statistics`, each
    forward moves the running statistics towards the batch's, ``running = (1 - m) · running + m · batch``, so the
    prior pools the recent test images (about 1/m of them). Gradients flow through the batch statistics as in
    train-mode BatchNorm.

    Args:
        model: the network, changed in place.
        prior: N > 0 (``math.inf``: the running statistics alone, as in eval mode).
        momentum: m in [0, 1), how fast the prior follows the test statistics (0: it stays the source's).

    Raises:
        ValueError: for a negative prior, or a BatchNorm without running statistics.
    """
    if not prior > 0:
        raise ValueError(f"the prior strength must be positive (0 means test statistics only), got {prior}")
    if not 0 <= momentum < 1:
        raise ValueError(f"the momentum of the prior must be in [0, 1), got {momentum}")
    for module in _batch_norms(model):
        if module.running_mean is None or module.running_var is None:
            raise ValueError(f"{type(module).__name__} has no running statistics to use as the source prior")
        module._tta_prior = float(prior)
        module._tta_momentum = float(momentum)
        module.forward = types.MethodType(_tta_forward, module)
    return model


def median_batch_norm(model: nn.Module, prior: float = 0.0, momentum: float = 0.0) -> nn.Module:
    """Make every BatchNorm of ``model`` normalise with robust statistics of the test batch, in train and eval mode
    alike (MedBN, Park et al., CVPR 2024): per channel, the median over batch and space instead of the mean, and
    the mean squared deviation from that median instead of the variance.

    With ``prior`` N > 0 these statistics are mixed with the source running statistics as in
    :func:`source_prior_batch_norm` (the median taking the mean's place), and ``momentum`` makes that prior follow
    the stream. Gradients flow through the statistics (the median's to the median element). Composes with
    :func:`per_group_batch_norm`.

    Args:
        model: the network, changed in place.
        prior: N ≥ 0 (0: the batch's statistics alone, the paper's setting).
        momentum: as in :func:`source_prior_batch_norm` (needs ``prior`` > 0).

    Raises:
        ValueError: a negative or infinite prior, a momentum without a prior, or (with a prior) a BatchNorm
            without running statistics.
    """
    if not 0 <= prior < math.inf:
        raise ValueError(f"the prior strength of median statistics must be finite and >= 0, got {prior}")
    if prior > 0:
        source_prior_batch_norm(model, prior, momentum)
    elif momentum:
        raise ValueError("a momentum needs a source prior (prior > 0): with prior 0 there is none to update")
    for module in _batch_norms(model):
        module._tta_statistic = "median"
        module._tta_prior = float(prior)
        module._tta_momentum = float(momentum)
        module.forward = types.MethodType(_tta_forward, module)
    return model


def set_prior_strength(model: nn.Module, prior: float) -> None:
    """Change the prior strength N of a model configured by :func:`source_prior_batch_norm` (0 allowed here:
    the batch's own statistics alone).

    Raises:
        ValueError: a model not configured by :func:`source_prior_batch_norm`.
    """
    layers = _batch_norms(model)
    if not all(hasattr(m, "_tta_prior") for m in layers):
        raise ValueError("the model's BatchNorm layers have no source prior: configure it with source_prior_batch_norm")
    for module in layers:
        module._tta_prior = float(prior)


@contextlib.contextmanager
def track_test_statistics(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the context, the forwards of a model configured by :func:`source_prior_batch_norm` with a momentum
    move its prior towards the batch statistics (an adapter predicts each test batch once inside it)."""
    tracking = [m for m in _batch_norms(model) if getattr(m, "_tta_momentum", 0.0) > 0]
    for module in tracking:
        module._tta_track = True
    try:
        yield model
    finally:
        for module in tracking:
            module._tta_track = False


@contextlib.contextmanager
def per_group_batch_norm(model: nn.Module, groups: int) -> Iterator[nn.Module]:
    """Inside the context, every BatchNorm of ``model`` splits its batch into ``groups`` equal consecutive
    groups and normalises each with that group's own batch statistics (mixed with the source prior when
    :func:`source_prior_batch_norm` configured one).

    So a forward of the stacked views (V*B, C, ...) equals V separate forwards of (B, C, ...) in train-mode
    BatchNorm, in one batched pass. Running statistics are not updated.

    Args:
        model: the network.
        groups: the number of groups (views) in each batch.
    """
    patched = _batch_norms(model)
    if groups == 1 or not patched:
        yield model
        return
    had_forward = [hasattr(m, "_tta_prior") for m in patched]
    for module, has in zip(patched, had_forward, strict=True):
        module._tta_groups = groups
        if not has:
            module.forward = types.MethodType(_tta_forward, module)
    try:
        yield model
    finally:
        for module, has in zip(patched, had_forward, strict=True):
            del module._tta_groups
            if not has:
                del module.forward


@contextlib.contextmanager
def update_running_statistics(model: nn.Module, momentum: float) -> Iterator[nn.Module]:
    """Inside the context, every BatchNorm of ``model`` runs as PyTorch's train-mode BatchNorm with ``momentum``:
    it normalises with the batch's own statistics and moves its running statistics by ``momentum`` towards them
    (``running = (1 - m) · running + m · batch``, the variance unbiased). On leaving, each layer's mode and
    momentum are restored, so an eval-mode model predicts with the updated running statistics.

    DUA (Mirza et al., CVPR 2022) adapts this way, on augmented copies of each test image with a decaying
    momentum. Layers configured by :func:`source_prior_batch_norm` or :func:`median_batch_norm` ignore it.

    Args:
        model: the network (its plain BatchNorm layers keep running statistics).
        momentum: m in (0, 1].

    Raises:
        ValueError: a momentum outside (0, 1], or a BatchNorm without running statistics.
    """
    if not 0 < momentum <= 1:
        raise ValueError(f"the momentum of the running statistics must be in (0, 1], got {momentum}")
    layers = _batch_norms(model)
    if any(m.running_mean is None or m.running_var is None for m in layers):
        raise ValueError("every BatchNorm needs running statistics to update")
    saved = [(m.training, m.momentum) for m in layers]
    for module in layers:
        module.train()
        module.momentum = float(momentum)
    try:
        yield model
    finally:
        for module, (training, old) in zip(layers, saved, strict=True):
            module.train(training)
            module.momentum = old
