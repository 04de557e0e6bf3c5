"""How far a test batch is from the source domain, read off the inputs of the BatchNorm layers, and when a stream
of such batches has settled.

A BatchNorm layer keeps the source domain's per-channel mean and variance (its running statistics). For a test
batch, the shift of one layer is the Kullback-Leibler divergence of the Gaussian of its input channels (the
batch's mean and variance) from the source Gaussian, averaged over channels; the batch's shift is the mean over
layers. In-domain images score low (their statistics are what the running statistics average), shifted ones
high; ``scripts/bn_shift_scores.py`` measures both on the fundus domains (``docs/results.md``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .normalization import batch_norm_layers, source_divergence

__all__ = ["BatchNormShiftRecord", "SettleSchedule", "batch_norm_shift", "record_batch_norm_shift"]


def _gaussian_kl(h: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """Mean over channels of KL(N(batch mean, batch variance) ‖ N(running mean, running variance))."""
    var, mean = torch.var_mean(h, dim=[0, *range(2, h.ndim)], correction=0)
    return source_divergence(mean, var, layer.running_mean.float(), layer.running_var.float(), layer.eps).mean()


class BatchNormShiftRecord:
    """The per-layer divergences one forward recorded (filled by :func:`record_batch_norm_shift`).

    Args:
        n_layers: the number of BatchNorm layers with running statistics that each forward passes.
    """

    def __init__(self, n_layers: int) -> None:
        self.n_layers = n_layers
        #: one 0-dim tensor per BatchNorm layer the forward passed, in the order it passed them
        self.divergences: list[torch.Tensor] = []

    def shift(self) -> torch.Tensor:
        """The batch's shift: the mean of the recorded layers' divergences, a 0-dim tensor (no host read).

        Raises:
            RuntimeError: no forward was recorded.
        """
        if not self.divergences:
            raise RuntimeError("no BatchNorm input was recorded: run a forward of the model inside the context")
        return torch.stack(self.divergences).mean()


@contextlib.contextmanager
def record_batch_norm_shift(model: nn.Module) -> Iterator[BatchNormShiftRecord]:
    """Inside the context, every forward of ``model`` records the Gaussian KL divergence of each BatchNorm layer's
    input from the layer's running statistics; the yielded record's :meth:`~BatchNormShiftRecord.shift` is the
    batch's shift. The forward itself is unchanged (a forward with gradients, e.g. an adapter's loss forward, serves
    as well as a plain one: the record is detached), and the divergence is read before the layer runs, so against the
    running statistics the forward started with.

    Args:
        model: a network with BatchNorm layers that keep running statistics (the source statistics).

    Raises:
        ValueError: ``model`` has no BatchNorm layer with running statistics.
    """
    layers = [m for _, m in batch_norm_layers(model) if m.running_mean is not None and m.running_var is not None]
    if not layers:
        raise ValueError("the shift is read off BatchNorm running statistics, and the model has none")
    record = BatchNormShiftRecord(len(layers))

    def hook(layer: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        with torch.no_grad():
            record.divergences.append(_gaussian_kl(inputs[0].detach().float(), layer))

    handles = [layer.register_forward_pre_hook(hook) for layer in layers]
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()


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
    with record_batch_norm_shift(model) as record:
        model(x)
    return record.shift()


class SettleSchedule:
    """Which batches of a stream to update on, once the stream has settled: every batch until ``after`` updates
    since the (re)start, then every ``every``-th batch while each batch's shift stays within ``tolerance`` of the
    mean shift since the (re)start; a batch further away (a new site, say) restarts the schedule and is updated on,
    and so is the first batch after :meth:`reset`.

    Per-image shifts spread widely within one site (fundus, :func:`batch_norm_shift` at 256 px of the REFUGE-trained
    source model: standard deviation 0.08-0.13 around site means of 0.25-0.29), so a tolerance much below about
    twice that spread restarts on ordinary images.

    Args:
        after: updated batches before the stream counts as settled (>= 1).
        every: once settled, update on every ``every``-th batch (>= 1; 1 updates on all).
        tolerance: the largest distance of a batch's shift from the running mean that still counts as settled.

    Raises:
        ValueError: a non-positive ``after``, ``every`` or ``tolerance``.
    """

    def __init__(self, after: int, every: int = 4, tolerance: float = 0.25) -> None:
        if int(after) != after or after < 1:
            raise ValueError(f"settle (updates before the stream counts as settled) must be an integer >= 1: {after}")
        if int(every) != every or every < 1:
            raise ValueError(f"settle_every must be an integer >= 1, got {every}")
        if not tolerance > 0:
            raise ValueError(f"settle_tolerance must be positive, got {tolerance}")
        self.after, self.every, self.tolerance = int(after), int(every), float(tolerance)
        self.reset()

    def reset(self) -> None:
        """Start over: the next batches are updated on until ``after`` updates."""
        self.updates, self.since_settled = 0, 0
        self._shift_sum, self._shift_count = 0.0, 0

    @property
    def mean_shift(self) -> float | None:
        """The mean shift of the batches since the (re)start (None before the first)."""
        return self._shift_sum / self._shift_count if self._shift_count else None

    @property
    def settled(self) -> bool:
        """Whether ``after`` batches have been updated on since the (re)start."""
        return self.updates >= self.after

    def wants_update(self, shift: float) -> bool:
        """Take a batch's shift into account; return whether to update on that batch (the caller reports an update
        it then takes with :meth:`record_update`)."""
        if self.settled and abs(shift - self.mean_shift) > self.tolerance:
            self.reset()  # the stream moved: resume updating on every batch
        self._shift_sum += shift
        self._shift_count += 1
        if not self.settled:
            return True
        self.since_settled += 1
        return self.since_settled % self.every == 0

    def record_update(self) -> None:
        """Count an update taken on the last batch (towards ``after``)."""
        self.updates += 1
