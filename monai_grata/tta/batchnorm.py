"""Batched forward of several views with each view normalised by its own batch statistics."""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["per_group_batch_norm"]


def _grouped_forward(self: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    groups = self._tta_groups
    n, c = x.shape[:2]
    if n % groups:
        raise ValueError(f"batch of {n} cannot be split into {groups} groups")
    per_group = n // groups
    # (G*B, C, ...) -> (B, G*C, ...): batch_norm over it gives every (group, channel) its own statistics
    folded = x.reshape(groups, per_group, c, *x.shape[2:]).transpose(0, 1).reshape(per_group, groups * c, *x.shape[2:])
    weight = self.weight.repeat(groups) if self.weight is not None else None
    bias = self.bias.repeat(groups) if self.bias is not None else None
    out = F.batch_norm(folded, None, None, weight, bias, True, 0.0, self.eps)
    return out.reshape(per_group, groups, c, *x.shape[2:]).transpose(0, 1).reshape(x.shape)


@contextlib.contextmanager
def per_group_batch_norm(model: nn.Module, groups: int) -> Iterator[nn.Module]:
    """Inside the context, every BatchNorm of ``model`` splits its batch into ``groups`` equal consecutive
    groups and normalises each with that group's own batch statistics.

    So a forward of the stacked views (V*B, C, ...) equals V separate forwards of (B, C, ...) in train-mode
    BatchNorm, in one batched pass. Running statistics are neither used nor updated.

    Args:
        model: the network.
        groups: the number of groups (views) in each batch.
    """
    patched = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if groups == 1 or not patched:
        yield model
        return
    for module in patched:
        module._tta_groups = groups
        module.forward = types.MethodType(_grouped_forward, module)
    try:
        yield model
    finally:
        for module in patched:
            del module.forward
            del module._tta_groups
