"""How BatchNorm normalises during test-time adaptation, as one module with public fields.

:func:`convert_to_adaptive_batch_norm` swaps every BatchNorm of a model for an :class:`AdaptiveBatchNorm` that
reuses the layer's ``weight``/``bias`` parameters and running buffers under the same names (so ``state_dict`` keys,
checkpoints, optimizers and an adapter's reset keep working); :func:`convert_to_batch_norm` swaps plain BatchNorm
layers back in. Where the statistics come from is said by the layer's fields:

- ``policy`` (:class:`BatchNormPolicy`): the batch's own statistics (``prior`` 0), the source running statistics
  (``prior`` ``math.inf``), or the batch's mixed with the source's counted as ``prior`` samples; the mean or the
  median (MedBN) as the centre; and ``momentum``, how fast the source prior follows the test stream;
- ``groups``: the batch splits into this many equal groups (views), each normalised by its own statistics
  (:func:`per_group_batch_norm`);
- ``tracking``: the forward moves the prior towards the batch's statistics by ``policy.momentum``, and records the
  batch's divergence for the site gate ``policy.site_min_shift`` (:func:`track_test_statistics`);
- ``frozen``: fixed (mean, var) used whatever the batch (:func:`frozen_statistics`);
- ``running_update``: PyTorch's train-mode BatchNorm with that momentum, moving the running statistics
  (:func:`update_running_statistics`, DUA).

DomainAdaptor's AdaMixBN, whose rule rewrites the affine parameters once per batch, is a layer of its own
(:class:`~monai_grata.tta.domainadaptor.AdaMixBatchNorm`), swapped in by the same :func:`replace_batch_norms`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from monai.networks.utils import replace_modules
from torch import nn

__all__ = [
    "STATISTICS",
    "AdaptiveBatchNorm",
    "BatchNormPolicy",
    "Statistics",
    "adaptive_batch_norms",
    "batch_norm_layers",
    "batch_statistics_weight",
    "convert_to_adaptive_batch_norm",
    "convert_to_batch_norm",
    "frozen_statistics",
    "normalisation_statistics",
    "per_group_batch_norm",
    "samples_per_input",
    "replace_batch_norms",
    "source_divergence",
    "track_test_statistics",
    "update_running_statistics",
]

#: the site gate's median runs over at most this many of the latest predicted batches (a bounded cost per batch)
SITE_WINDOW = 1024
#: the per-channel centre a layer normalises around: the mean, or (MedBN) the median
STATISTICS = ("mean", "median")
#: ``{layer name: (mean, var)}``, per-channel tensors
Statistics = dict[str, tuple[torch.Tensor, torch.Tensor]]


def batch_statistics_weight(batch_size: int, prior: float, samples_per_input: int = 1) -> float:
    """The weight n / (N·s + n) of the test batch's statistics when a source prior of N inputs is mixed in.

    Args:
        batch_size: n, the number of samples whose statistics are taken together.
        prior: N, the strength of the source statistics counted in inputs (0: test statistics only;
            ``math.inf``: source statistics only).
        samples_per_input: s, the samples one input puts into the batch (1 for an image; a volume's slices for a
            2D network run slice by slice).
    """
    return 0.0 if math.isinf(prior) else batch_size / (batch_size + prior * samples_per_input)


@dataclasses.dataclass(frozen=True)
class BatchNormPolicy:
    """Where an :class:`AdaptiveBatchNorm` takes its statistics from (Schneider et al., NeurIPS 2020; MedBN, Park et
    al., CVPR 2024):

        mean = n/(N+n) · centre_test + N/(N+n) · mean_source,   var = n/(N+n) · var_test + N/(N+n) · var_source

    with n the batch (or group) size, N the ``prior``; ``centre_test`` is the batch's mean, or its median
    (``statistic="median"``, with ``var_test`` the mean squared deviation from it). Gradients flow through the batch
    statistics as in train-mode BatchNorm. The flat options ``bn_prior`` and ``bn_momentum`` of
    :func:`~monai_grata.tta.build_adapter` set ``prior`` and ``momentum``.

    Args:
        prior: N ≥ 0; 0: the batch's statistics alone (the papers' setting); ``math.inf``: the source running
            statistics alone (eval-mode BatchNorm).
        momentum: m in [0, 1): inside :func:`track_test_statistics` each forward moves the running statistics
            (the prior) towards the batch's, ``running = (1 - m) · running + m · batch``, so the prior pools the
            recent test batches (about 1/m of them). 0: the prior stays the source's. Needs ``prior`` > 0.
        statistic: ``"mean"`` or ``"median"`` (needs a finite ``prior``).
        first_layers: the first this many BatchNorm layers of the network (in module order) take ``first_prior``
            in place of ``prior`` (and no momentum): the layers that see the image's colour and contrast, which its
            own statistics undo, while the deeper layers, whose statistics also depend on what the image shows,
            keep theirs (``docs/results.md``, "The stem on the test image's statistics"). 0: every layer as
            ``prior`` says. A network-level field: :func:`convert_to_adaptive_batch_norm` gives each layer its
            own policy (:meth:`for_layer`).
        first_prior: the source prior N of the first ``first_layers`` layers (0: the batch's statistics alone).
        min_shift: a layer takes the batch's statistics (mixed as ``prior`` says) only when they are this far from
            its source statistics, by :func:`source_divergence` (the Kullback-Leibler divergence of the batch's
            per-channel Gaussian from the source's, averaged over channels, as
            :func:`~monai_grata.tta.batch_norm_shift` measures a layer); a batch closer to the source is
            normalised with the source statistics alone. Decided per batch (per group) on the device, no host
            read. 0: no gate. Needs a finite ``prior``.
        first_min_shift: ``min_shift`` of the first ``first_layers`` layers (needs a finite ``first_prior``).
        site_min_shift: a gate for the stream as a whole: once the median divergence of the batches the layer has
            predicted (at least ``site_min_batches`` of them, the latest :data:`SITE_WINDOW` at most, recorded
            inside :func:`track_test_statistics`, the current one included) exceeds it, every batch takes its own
            statistics, however close to the source: a site judged shifted as a whole, whose images the per-batch
            ``min_shift`` lets through only in part.
            0: no site gate. Needs a ``min_shift`` (without one every batch takes its statistics anyway). The record
            is the layer's (each process of a distributed run keeps its own share of the stream) and the adapter's
            :meth:`~monai_grata.tta.TTAdapter.reset` clears it.
        first_site_min_shift: ``site_min_shift`` of the first ``first_layers`` layers (needs ``first_min_shift``).
        site_min_batches: how many batches of the stream the site gate waits for before it may open (≥ 1).

    Raises:
        ValueError: a negative or NaN prior, a momentum outside [0, 1) or without a prior, an unknown statistic,
            median statistics with an infinite prior, a negative or fractional ``first_layers``, a negative
            ``first_prior``, a negative gate or one on an infinite prior, or a site gate without a per-batch gate.
    """

    prior: float = 0.0
    momentum: float = 0.0
    statistic: str = "mean"
    first_layers: int = 0
    first_prior: float = 0.0
    min_shift: float = 0.0
    first_min_shift: float = 0.0
    site_min_shift: float = 0.0
    first_site_min_shift: float = 0.0
    site_min_batches: int = 5

    def __post_init__(self) -> None:
        if not float(self.prior) >= 0:
            raise ValueError(
                f"the prior strength (bn_prior) must be >= 0 (0: test statistics only, inf: source statistics), "
                f"got {self.prior}"
            )
        if not 0 <= float(self.momentum) < 1:
            raise ValueError(f"the momentum of the prior (bn_momentum) must be in [0, 1), got {self.momentum}")
        if self.momentum and not self.prior:
            raise ValueError("bn_momentum needs a source prior (bn_prior > 0): with bn_prior 0 there is none to update")
        if self.statistic not in STATISTICS:
            raise ValueError(f"statistic must be one of {STATISTICS}, got {self.statistic!r}")
        if self.statistic == "median" and math.isinf(self.prior):
            raise ValueError("median statistics need a finite prior (bn_prior): inf leaves no test statistics")
        if not (float(self.first_layers) >= 0 and float(self.first_layers) == int(self.first_layers)):
            raise ValueError(f"first_layers (bn_first_layers) must be a whole number >= 0, got {self.first_layers}")
        if not float(self.first_prior) >= 0:
            raise ValueError(f"the first layers' prior (bn_first_prior) must be >= 0, got {self.first_prior}")
        for name, gate, prior in (
            ("bn_min_shift", self.min_shift, self.prior),
            ("bn_first_min_shift", self.first_min_shift, self.first_prior),
        ):
            if not float(gate) >= 0:
                raise ValueError(f"the gate ({name}) must be >= 0 (0: no gate), got {gate}")
            if gate and math.isinf(prior):
                raise ValueError(f"{name} gates the batch's statistics: an infinite prior leaves none to gate")
        for name, site, gate in (
            ("bn_site_min_shift", self.site_min_shift, self.min_shift),
            ("bn_first_site_min_shift", self.first_site_min_shift, self.first_min_shift),
        ):
            if not float(site) >= 0:
                raise ValueError(f"the site gate ({name}) must be >= 0 (0: no site gate), got {site}")
            if site and not gate:
                raise ValueError(
                    f"{name} opens a per-batch gate for the whole stream: set the gate it opens "
                    f"({name.replace('site_', '')} > 0)"
                )
        if not (float(self.site_min_batches) >= 1 and float(self.site_min_batches) == int(self.site_min_batches)):
            raise ValueError(f"site_min_batches must be a whole number >= 1, got {self.site_min_batches}")
        for name in ("prior", "min_shift", "first_min_shift", "site_min_shift", "first_site_min_shift"):
            object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, "site_min_batches", int(self.site_min_batches))
        object.__setattr__(self, "momentum", float(self.momentum))
        object.__setattr__(self, "first_layers", int(self.first_layers))
        object.__setattr__(self, "first_prior", float(self.first_prior))

    def for_layer(self, index: int) -> BatchNormPolicy:
        """The policy of the network's ``index``-th BatchNorm layer (0 first, in module order): the prior
        :attr:`first_prior` and gates :attr:`first_min_shift`, :attr:`first_site_min_shift` without momentum for the
        first :attr:`first_layers`, this policy otherwise; a layer's policy has no first layers of its own."""
        own = {"first_layers": 0, "first_prior": 0.0, "first_min_shift": 0.0, "first_site_min_shift": 0.0}
        if index < self.first_layers:
            first = {"min_shift": self.first_min_shift, "site_min_shift": self.first_site_min_shift}
            return dataclasses.replace(self, prior=self.first_prior, momentum=0.0, **first, **own)
        return dataclasses.replace(self, **own)

    @property
    def uses_source_statistics(self) -> bool:
        """Whether the source running statistics enter the normalisation (``prior`` or ``min_shift`` > 0)."""
        return self.prior > 0 or self.min_shift > 0


def batch_norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (name, layer) of every BatchNorm of ``model``: PyTorch's and :class:`AdaptiveBatchNorm`."""
    kinds = (nn.modules.batchnorm._BatchNorm, AdaptiveBatchNorm)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]


def adaptive_batch_norms(model: nn.Module) -> list[AdaptiveBatchNorm]:
    """The :class:`AdaptiveBatchNorm` layers of ``model``."""
    return [m for m in model.modules() if isinstance(m, AdaptiveBatchNorm)]


def source_divergence(
    mean: torch.Tensor, var: torch.Tensor, source_mean: torch.Tensor, source_var: torch.Tensor, eps: float
) -> torch.Tensor:
    """KL(N(mean, var) ‖ N(source_mean, source_var)) per channel, with ``eps`` added to both variances as BatchNorm
    adds it; all arguments broadcast together (average the result over the channel dimension for a layer's value).

    Args:
        mean: the batch's per-channel mean.
        var: the batch's per-channel (biased) variance.
        source_mean: the layer's running mean.
        source_var: the layer's running variance.
        eps: the layer's ``eps``.
    """
    ref_var = source_var + eps
    ratio = (var + eps) / ref_var
    return 0.5 * ((mean - source_mean) ** 2 / ref_var + ratio - 1 - torch.log(ratio))


def _group_statistics(grouped: torch.Tensor, statistic: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group, per-channel (variance, centre) of ``grouped`` (G, B, C, *spatial), kept as (G, 1, C, 1, ...):
    the mean and variance, or (``"median"``) the median and the mean squared deviation from it."""
    dims = (1, *range(3, grouped.ndim))
    if statistic == "mean":
        return torch.var_mean(grouped, dim=dims, correction=0, keepdim=True)
    g, c = grouped.shape[0], grouped.shape[2]
    centre = grouped.transpose(1, 2).reshape(g, c, -1).median(dim=-1).values
    centre = centre.reshape(g, 1, c, *(1,) * (grouped.ndim - 3))
    return (grouped - centre).square().mean(dim=dims, keepdim=True), centre


class AdaptiveBatchNorm(nn.Module):
    """A BatchNorm layer for test-time adaptation whose public fields say where its statistics come from (module
    docstring); the same in train and eval mode.

    Args:
        source: the BatchNorm layer it replaces. Its ``weight``/``bias`` parameters and its ``running_mean``,
            ``running_var`` and ``num_batches_tracked`` buffers are reused (the same objects, the same names).
        policy: where the statistics come from.

    Raises:
        ValueError: a policy that mixes in source statistics for a layer that keeps none.
    """

    def __init__(self, source: nn.modules.batchnorm._BatchNorm, policy: BatchNormPolicy | None = None) -> None:
        super().__init__()
        self.num_features, self.eps = source.num_features, source.eps
        self.register_parameter("weight", source.weight)
        self.register_parameter("bias", source.bias)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            self.register_buffer(name, getattr(source, name))
        #: how to build the plain layer again (:func:`convert_to_batch_norm`)
        self.source_type, self.source_momentum = type(source), source.momentum
        self.source_tracks_running_stats = source.track_running_stats
        self.train(source.training)
        self.configure(policy or BatchNormPolicy())
        #: the number of equal consecutive groups (views) of a batch, each normalised by its own statistics
        self.groups = 1
        #: the batch samples one input makes (a volume's slices, :func:`samples_per_input`): the prior counts inputs
        self.samples_per_input = 1
        #: whether the forward moves the running statistics towards the batch's by ``policy.momentum``
        self.tracking = False
        #: fixed (mean, var) to normalise every batch with, or None
        self.frozen: tuple[torch.Tensor, torch.Tensor] | None = None
        #: PyTorch's train-mode BatchNorm with this momentum (moving the running statistics), or None
        self.running_update: float | None = None
        #: the site gate's record: a ring of the latest :data:`SITE_WINDOW` predicted batches' divergences (a
        #: buffer outside the state dict, so it moves with the layer; allocated at the first record)
        self.register_buffer("stream_record", None, persistent=False)
        #: how many batches the stream has predicted since its start (a host count: no device read)
        self.stream_batches = 0

    @property
    def has_source_statistics(self) -> bool:
        """Whether the layer keeps running (source) statistics."""
        return self.running_mean is not None and self.running_var is not None

    def configure(self, policy: BatchNormPolicy) -> None:
        """Normalise as ``policy`` says from now on.

        Raises:
            ValueError: a policy that needs source statistics this layer does not keep.
        """
        if policy.uses_source_statistics and not self.has_source_statistics:
            raise ValueError(f"{self.source_type.__name__} has no running statistics to use as the source prior")
        self.policy = policy

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, policy={self.policy}"

    def _mixed_statistics(self, grouped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean, var, batch mean, batch var) of ``grouped`` (G, B, C, *spatial), each (G, 1, C, 1, ...): the
        batch's statistics mixed with the source prior as the policy says."""
        batch_var, batch_mean = _group_statistics(grouped, self.policy.statistic)
        w = batch_statistics_weight(grouped.shape[1], self.policy.prior, self.samples_per_input)
        if w == 1.0 and not self.policy.min_shift:  # no prior, no gate
            return batch_mean, batch_var, batch_mean, batch_var
        shape = (1, 1, grouped.shape[2]) + (1,) * (grouped.ndim - 3)
        source_mean, source_var = self.running_mean.view(shape), self.running_var.view(shape)
        mean = w * batch_mean + (1 - w) * source_mean
        var = w * batch_var + (1 - w) * source_var
        if self.policy.min_shift:  # far enough from the source (per group), or the source's statistics alone
            divergence = source_divergence(batch_mean, batch_var, source_mean.float(), source_var.float(), self.eps)
            divergence = divergence.mean(dim=2, keepdim=True)
            shifted = divergence > self.policy.min_shift
            if self.policy.site_min_shift:
                shifted = shifted | self._site_shifted(divergence)
            mean, var = torch.where(shifted, mean, source_mean), torch.where(shifted, var, source_var)
        return mean, var, batch_mean, batch_var

    def _site_shifted(self, divergence: torch.Tensor) -> torch.Tensor:
        """Whether the stream as a whole is shifted (a 0-dim bool on the device): the median of the recorded batch
        divergences above ``policy.site_min_shift``, once ``policy.site_min_batches`` are recorded. A forward inside
        :func:`track_test_statistics` first records its own (the mean over its groups)."""
        if self.tracking:
            if self.stream_record is None:
                self.stream_record = torch.zeros(SITE_WINDOW, dtype=torch.float32, device=divergence.device)
            self.stream_record[self.stream_batches % SITE_WINDOW] = divergence.detach().mean()
            self.stream_batches += 1
        if self.stream_batches < self.policy.site_min_batches:
            return torch.zeros((), dtype=torch.bool, device=divergence.device)
        return self.recorded_divergences().median() > self.policy.site_min_shift

    def recorded_divergences(self) -> torch.Tensor:
        """The divergences the site gate's median runs over (the latest :data:`SITE_WINDOW` predicted batches', in
        ring order; empty before the first record)."""
        if self.stream_record is None:
            return torch.zeros(0)
        return self.stream_record[: min(self.stream_batches, SITE_WINDOW)]

    def reset_stream(self) -> None:
        """Forget the batches recorded for the site gate (a new stream, e.g. a new site, starts)."""
        self.stream_batches = 0

    def _follow_stream(self, batch_mean: torch.Tensor, batch_var: torch.Tensor) -> None:
        """Move the running statistics towards the batch's (``tracking``, ``policy.momentum`` > 0)."""
        with torch.no_grad():
            self.running_mean.lerp_(batch_mean.detach().reshape(-1), self.policy.momentum)
            self.running_var.lerp_(batch_var.detach().reshape(-1), self.policy.momentum)

    @torch.no_grad()
    def statistics(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-channel (mean, var) the forward normalises ``x`` (one group) with, as new tensors.

        Raises:
            ValueError: inside :func:`per_group_batch_norm` (a set per group, not one per layer).
        """
        if self.groups != 1:
            raise ValueError("statistics of a per-group forward are not one set per layer: record them outside it")
        if self.frozen is not None:
            return self.frozen[0].clone(), self.frozen[1].clone()
        if self.running_update is not None:  # train-mode BatchNorm: the batch's mean and (biased) variance
            var, mean = _group_statistics(x[None], "mean")
        elif math.isinf(self.policy.prior):
            return self.running_mean.clone(), self.running_var.clone()
        else:
            mean, var, _, _ = self._mixed_statistics(x[None])
        return mean.reshape(-1), var.reshape(-1)

    def _batch_statistics_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Each group normalised by its own mean and variance, in one ``F.batch_norm`` call."""
        if self.groups == 1:
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        n, c = x.shape[:2]
        # (G*B, C, ...) -> (B, G*C, ...): batch_norm over it gives every (group, channel) its own statistics
        folded = x.reshape(self.groups, n // self.groups, c, *x.shape[2:]).transpose(0, 1)
        folded = folded.reshape(n // self.groups, self.groups * c, *x.shape[2:])
        weight = self.weight.repeat(self.groups) if self.weight is not None else None
        bias = self.bias.repeat(self.groups) if self.bias is not None else None
        out = F.batch_norm(folded, None, None, weight, bias, True, 0.0, self.eps)
        return out.reshape(n // self.groups, self.groups, c, *x.shape[2:]).transpose(0, 1).reshape(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.frozen is not None:
            mean, var = self.frozen
            return F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)
        if self.running_update is not None:
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, True, self.running_update, self.eps
            )
        n, c = x.shape[:2]
        if n % self.groups:
            raise ValueError(f"batch of {n} cannot be split into {self.groups} groups")
        policy, follows = self.policy, self.tracking and self.policy.momentum > 0
        if policy.prior == 0 and policy.statistic == "mean" and not policy.min_shift:
            return self._batch_statistics_forward(x)
        if math.isinf(policy.prior):
            if follows:
                self._follow_stream(*reversed(torch.var_mean(x, dim=(0, *range(2, x.ndim)), correction=0)))
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        grouped = x.reshape(self.groups, n // self.groups, c, *x.shape[2:])
        mean, var, batch_mean, batch_var = self._mixed_statistics(grouped)
        if follows:  # the prior follows the test stream: an exponential moving average of the test statistics
            self._follow_stream(batch_mean.mean(dim=0), batch_var.mean(dim=0))
        differentiable = torch.is_grad_enabled() and (mean.requires_grad or var.requires_grad)
        if self.groups == 1 and not differentiable:  # one fused pass (eval-mode batch_norm takes no grad to mean, var)
            return F.batch_norm(x, mean.reshape(c), var.reshape(c), self.weight, self.bias, False, 0.0, self.eps)
        out = (grouped - mean) * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            shape = (1, 1, c) + (1,) * (x.ndim - 2)
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.reshape(x.shape)


def replace_batch_norms(model: nn.Module, replacement: Callable[[nn.Module], nn.Module | None]) -> list[nn.Module]:
    """Swap every BatchNorm layer of ``model`` (in place, by MONAI's ``replace_modules``) for ``replacement(layer)``.

    Args:
        model: the network (not itself a BatchNorm layer).
        replacement: the layer to put in a BatchNorm's place; None or the layer itself keeps it.

    Returns:
        The layers put in.

    Raises:
        ValueError: ``model`` is a BatchNorm layer.
    """
    if isinstance(model, (nn.modules.batchnorm._BatchNorm, AdaptiveBatchNorm)):
        raise ValueError("the BatchNorm layers swapped are those inside a network: wrap the layer in one")
    replaced = []
    for name, layer in batch_norm_layers(model):
        new = replacement(layer)
        if new is not None and new is not layer:
            replace_modules(model, name, new, strict_match=True, match_device=False)
            replaced.append(new)
    return replaced


def convert_to_adaptive_batch_norm(model: nn.Module, policy: BatchNormPolicy | None = None) -> nn.Module:
    """Swap every BatchNorm of ``model`` (in place) for an :class:`AdaptiveBatchNorm` that normalises as ``policy``
    says (the first ``policy.first_layers`` on ``policy.first_prior``, :meth:`BatchNormPolicy.for_layer`);
    layers already swapped take the new policy. The parameters and running buffers are the layers' own, so
    ``state_dict`` keys, optimizers and checkpoints are unchanged.

    Args:
        model: the network (not itself a BatchNorm layer).
        policy: where the statistics come from (default: the batch's own statistics).

    Returns:
        ``model``.

    Raises:
        ValueError: a policy with a source prior on a BatchNorm that keeps no running statistics, or
            ``first_layers`` beyond the network's BatchNorm layers.
    """
    policy = policy or BatchNormPolicy()
    n_layers = len(batch_norm_layers(model))
    if policy.first_layers > n_layers:
        raise ValueError(
            f"first_layers={policy.first_layers}, but {type(model).__name__} has {n_layers} BatchNorm layers"
        )
    index = iter(range(n_layers))

    def adaptive(layer: nn.Module) -> AdaptiveBatchNorm:
        own = policy.for_layer(next(index))
        if isinstance(layer, AdaptiveBatchNorm):
            layer.configure(own)
            return layer
        return AdaptiveBatchNorm(layer, own)

    replace_batch_norms(model, adaptive)
    return model


def _plain_batch_norm(layer: AdaptiveBatchNorm) -> nn.modules.batchnorm._BatchNorm:
    """The plain BatchNorm layer ``layer`` replaced, with its (possibly updated) parameters and buffers."""
    plain = layer.source_type(
        layer.num_features,
        eps=layer.eps,
        momentum=layer.source_momentum,
        affine=layer.weight is not None,
        track_running_stats=layer.source_tracks_running_stats,
    )
    plain.register_parameter("weight", layer.weight)
    plain.register_parameter("bias", layer.bias)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        plain.register_buffer(name, getattr(layer, name))
    return plain.train(layer.training)


def convert_to_batch_norm(model: nn.Module) -> nn.Module:
    """Swap every :class:`AdaptiveBatchNorm` of ``model`` (in place) back for a plain BatchNorm of the class it
    replaced, with the same (possibly adapted) parameters and running buffers.

    Args:
        model: the network (not itself a BatchNorm layer).

    Returns:
        ``model``.
    """
    replace_batch_norms(model, lambda m: _plain_batch_norm(m) if isinstance(m, AdaptiveBatchNorm) else None)
    return model


def _configured(model: nn.Module, what: str) -> list[AdaptiveBatchNorm]:
    """The :class:`AdaptiveBatchNorm` layers of ``model``; a plain BatchNorm left among them is an error."""
    plain = [n for n, m in batch_norm_layers(model) if not isinstance(m, AdaptiveBatchNorm)]
    if plain:
        raise ValueError(
            f"{what} needs every BatchNorm converted by convert_to_adaptive_batch_norm; {plain[:5]} are plain"
        )
    return adaptive_batch_norms(model)


@contextlib.contextmanager
def _setting(layers: list[AdaptiveBatchNorm], field: str, value: object) -> Iterator[None]:
    """Inside the context, ``field`` of every layer is ``value``; on leaving, what it was."""
    saved = [getattr(m, field) for m in layers]
    for layer in layers:
        setattr(layer, field, value)
    try:
        yield
    finally:
        for layer, old in zip(layers, saved, strict=True):
            setattr(layer, field, old)


@contextlib.contextmanager
def per_group_batch_norm(model: nn.Module, groups: int) -> Iterator[nn.Module]:
    """Inside the context, every :class:`AdaptiveBatchNorm` of ``model`` splits its batch into ``groups`` equal
    consecutive groups and normalises each as its policy says, with that group's own statistics.

    So a forward of the stacked views (V*B, C, ...) equals V separate forwards of (B, C, ...), in one batched pass.

    Args:
        model: a network converted by :func:`convert_to_adaptive_batch_norm`.
        groups: the number of groups (views) in each batch (>= 1).

    Raises:
        ValueError: ``groups`` < 1, or a plain BatchNorm layer in ``model``.
    """
    if int(groups) != groups or groups < 1:
        raise ValueError(f"groups must be a positive integer, got {groups}")
    with _setting(_configured(model, "per_group_batch_norm"), "groups", int(groups)):
        yield model


@contextlib.contextmanager
def samples_per_input(model: nn.Module, samples: int) -> Iterator[nn.Module]:
    """Inside the context, every :class:`AdaptiveBatchNorm` of ``model`` counts ``samples`` batch samples as one
    input, so a source prior of N inputs weighs N·``samples`` samples against the batch. A 2D network run slice by
    slice (:class:`~monai_grata.networks.slicewise.SliceWise`) feeds every slice of a volume as one sample: without
    this, a prior of 256 would weigh about as much as three volumes of 80 slices, where on images it weighs 256
    images. Plain BatchNorm layers are left as they are.

    Args:
        model: the network.
        samples: the samples per input (>= 1).

    Raises:
        ValueError: ``samples`` < 1.
    """
    if int(samples) != samples or samples < 1:
        raise ValueError(f"samples per input must be a positive integer, got {samples}")
    with _setting(adaptive_batch_norms(model), "samples_per_input", int(samples)):
        yield model


@contextlib.contextmanager
def track_test_statistics(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the context, the forwards of every :class:`AdaptiveBatchNorm` whose policy has a momentum move its
    prior towards the batch statistics, and those with a site gate record the batch's divergence (an adapter
    predicts each test batch once inside it). Plain BatchNorm layers are left as they are.

    Args:
        model: the network.
    """
    with _setting(adaptive_batch_norms(model), "tracking", True):
        yield model


@contextlib.contextmanager
def update_running_statistics(model: nn.Module, momentum: float) -> Iterator[nn.Module]:
    """Inside the context, every :class:`AdaptiveBatchNorm` of ``model`` runs as PyTorch's train-mode BatchNorm with
    ``momentum``: it normalises with the batch's own statistics and moves its running statistics by ``momentum``
    towards them (``running = (1 - m) · running + m · batch``, the variance unbiased). Outside, the layers normalise
    as their policy says (e.g. with the updated running statistics, ``prior`` ``math.inf``).

    DUA (Mirza et al., CVPR 2022) adapts this way, on augmented copies of each test image with a decaying momentum.

    Args:
        model: a network converted by :func:`convert_to_adaptive_batch_norm` whose layers keep running statistics.
        momentum: m in (0, 1].

    Raises:
        ValueError: a momentum outside (0, 1], a plain BatchNorm, or one without running statistics.
    """
    if not 0 < momentum <= 1:
        raise ValueError(f"the momentum of the running statistics must be in (0, 1], got {momentum}")
    layers = _configured(model, "update_running_statistics")
    if not all(m.has_source_statistics for m in layers):
        raise ValueError("every BatchNorm needs running statistics to update")
    with _setting(layers, "running_update", float(momentum)):
        yield model


def _plain_statistics(layer: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What a PyTorch BatchNorm normalises ``x`` with: the batch's statistics in train mode or without running
    statistics, the running statistics otherwise."""
    if layer.training or layer.running_mean is None:
        var, mean = torch.var_mean(x, dim=(0, *range(2, x.ndim)), correction=0)
        return mean, var
    return layer.running_mean.clone(), layer.running_var.clone()


@torch.no_grad()
def normalisation_statistics(model: nn.Module, x: torch.Tensor) -> Statistics:
    """Run ``model`` on ``x`` once and return, per BatchNorm layer, the (mean, var) it normalised with: what each
    :class:`AdaptiveBatchNorm` reports (:meth:`AdaptiveBatchNorm.statistics`), and for a plain BatchNorm the batch's
    (train mode, or no running statistics) or its running statistics. The forward itself is unchanged; hooks only
    read each layer's input.

    Args:
        model: the network.
        x: the batch whose statistics are taken (e.g. the patches a volume was adapted on).

    Returns:
        ``{layer name: (mean, var)}``, per-channel tensors, for :func:`frozen_statistics`.
    """
    recorded: Statistics = {}
    handles = []
    for name, layer in batch_norm_layers(model):
        read = layer.statistics if isinstance(layer, AdaptiveBatchNorm) else lambda h, m=layer: _plain_statistics(m, h)

        def record(module: nn.Module, args: tuple, name: str = name, read: Callable = read) -> None:
            recorded[name] = tuple(s.detach() for s in read(args[0]))

        handles.append(layer.register_forward_pre_hook(record))
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return recorded


@contextlib.contextmanager
def frozen_statistics(model: nn.Module, statistics: Statistics) -> Iterator[nn.Module]:
    """Inside the context, every BatchNorm of ``model`` normalises with the fixed ``statistics`` (from
    :func:`normalisation_statistics`) and its current affine weights, whatever the batch, in train and eval mode.

    So a ``SlidingWindowInferer`` predicts every window of a volume with the same statistics (those of the patches
    the volume was adapted on) instead of each window batch's own. An :class:`AdaptiveBatchNorm` holds them in its
    ``frozen`` field; a plain BatchNorm is swapped for one for the duration and put back on leaving.

    Args:
        model: the network.
        statistics: ``{layer name: (mean, var)}`` for every BatchNorm layer of ``model``.

    Raises:
        ValueError: a BatchNorm layer without statistics.
    """
    layers = batch_norm_layers(model)
    missing = [name for name, _ in layers if name not in statistics]
    if missing:
        raise ValueError(f"no frozen statistics for BatchNorm layers {missing[:5]}")
    plain = [(name, layer) for name, layer in layers if not isinstance(layer, AdaptiveBatchNorm)]
    for name, layer in plain:
        replace_modules(model, name, AdaptiveBatchNorm(layer), strict_match=True, match_device=False)
    named = dict(batch_norm_layers(model))
    try:
        for name, layer in named.items():
            layer.frozen = statistics[name]
        yield model
    finally:
        for layer in named.values():
            layer.frozen = None
        for name, layer in plain:
            replace_modules(model, name, layer, strict_match=True, match_device=False)
