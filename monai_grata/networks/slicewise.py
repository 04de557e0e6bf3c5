"""A 2D network applied to a volume slice by slice, as one module that takes and returns volumes."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SliceWise"]


class SliceWise(nn.Module):
    """Run a 2D segmentation network on every slice of a volume: (B, C, H, W, D) in, (B, C', H, W, D) out.

    The slices are folded into the batch axis (B·D slices of (C, H, W)), so one forward covers the volume and every
    BatchNorm of the 2D network takes its batch statistics over all slices of the volume (or of the window a
    ``SlidingWindowInferer`` passes). To the test-time adapters, the evaluator and the inferer, the wrapped network
    is a 3D network: volumes in, volumes out, so every adapter, weak view and patch sampler works on it unchanged.
    The slices are ordered batch-major (slice ``d`` of sample ``b`` is row ``b·D + d``), so the groups of
    :func:`~monai_grata.tta.per_group_batch_norm` (whole samples) stay whole after folding. The adaptive BatchNorm
    layers of an adapted network count a volume's D slices as one input
    (:func:`~monai_grata.tta.normalization.samples_per_input`), so a source prior of N is N volumes, not N slices.

    Args:
        network: a 2D network taking (N, C, H, W).
        slice_axis: the spatial axis of the slices, counted from the end of (B, C, H, W, D) (default -1: D, the
            slice axis of axial NIfTI volumes in MONAI's layout).
    """

    def __init__(self, network: nn.Module, slice_axis: int = -1) -> None:
        super().__init__()
        if slice_axis not in (-3, -2, -1):
            raise ValueError(f"slice_axis must be a spatial axis of (B, C, H, W, D): -3, -2 or -1, got {slice_axis}")
        self.network, self.slice_axis = network, slice_axis
        self._batch_size = 1

    def as_volumes(self, slices: torch.Tensor) -> torch.Tensor:
        """A per-slice tensor of the latest forward (B·D, F, h, w), e.g. a feature map inside the 2D network,
        stacked back into volumes (B, F, h, w, D) (for :class:`~monai_grata.tta.FeatureTap`)."""
        b = self._batch_size
        out = slices.reshape(b, slices.shape[0] // b, *slices.shape[1:])
        return out.movedim(1, self.slice_axis)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: a batch of volumes (B, C, H, W, D), or of slices (N, C, H, W) for the 2D network as it is.

        Returns:
            The 2D network's output on every slice, stacked back into volumes (B, C', H, W, D) (slices: (N, C', H, W)).
        """
        if x.ndim == 4:  # already a batch of slices (N, C, H, W)
            return self.network(x)
        if x.ndim != 5:
            raise ValueError(f"SliceWise takes volumes (B, C, H, W, D) or slices (N, C, H, W), got {tuple(x.shape)}")
        moved = x.movedim(self.slice_axis, 1)  # (B, D, C, H', W')
        b, d = moved.shape[:2]
        self._batch_size = b
        from monai_grata.tta.normalization import samples_per_input  # monai_grata.tta imports the networks

        with samples_per_input(self.network, d):
            return self.as_volumes(self.network(moved.reshape(b * d, *moved.shape[2:])))
