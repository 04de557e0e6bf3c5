"""Test-time adaptation of volumes in bounded memory: adapt on a few patches of each volume, then let a sliding-window
inferer predict every window with the adapted weights and the patches' BatchNorm statistics."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from monai.data.utils import dense_patch_slices
from monai.inferers.utils import _get_scan_interval
from monai.utils import ensure_tuple_rep, fall_back_tuple

from .base import TTAdapter
from .normalization import frozen_statistics, normalisation_statistics
from .steps import AdaptationStep

__all__ = ["PatchAdaptation", "patch_positions", "sample_patches"]


def patch_positions(
    spatial_shape: Sequence[int], roi_size: Sequence[int], num_patches: int, overlap: float = 0.25
) -> list[tuple[slice, ...]]:
    """Where the patches are: ``num_patches`` windows of the sliding-window grid (the grid MONAI's
    ``SlidingWindowInferer`` scans with ``roi_size`` and ``overlap``), evenly spaced in scan order; all of them when
    the grid has no more.

    Args:
        spatial_shape: the volume's spatial shape.
        roi_size: the window size; a non-positive or missing side takes the volume's side; sides are clipped to it.
        num_patches: how many windows to pick (at least 1).
        overlap: the windows' overlap, as the inferer's.

    Returns:
        One tuple of spatial slices per patch.
    """
    if int(num_patches) < 1:
        raise ValueError(f"num_patches must be at least 1, got {num_patches}")
    shape = tuple(int(s) for s in spatial_shape)
    roi = tuple(min(r, s) for r, s in zip(fall_back_tuple(roi_size, shape), shape, strict=True))
    interval = _get_scan_interval(shape, roi, len(shape), ensure_tuple_rep(overlap, len(shape)))
    grid = dense_patch_slices(shape, roi, interval)
    if len(grid) <= num_patches:
        return list(grid)
    picks = torch.linspace(0, len(grid) - 1, int(num_patches)).round().long().tolist()
    return [grid[i] for i in dict.fromkeys(picks)]


def sample_patches(x: torch.Tensor, positions: Sequence[tuple[slice, ...]]) -> torch.Tensor:
    """The patches of a batch ``x`` (B, C, *spatial) at ``positions``, stacked patch-major: (P·B, C, *roi)."""
    return torch.cat([x[(slice(None), slice(None), *where)] for where in positions])


class PatchAdaptation:
    """Adapt on patches of a volume, then predict the whole volume window by window with the adapted model.

    Per volume (batch ``x`` of shape (B, C, *spatial)):

    1. **Which patches, how many:** ``num_patches`` windows of the sliding-window grid of ``roi_size`` and
       ``overlap``, evenly spaced in scan order (:func:`patch_positions`); they form one batch of P·B patches.
    2. **Adapt:** one call of the adapter's :meth:`~monai_grata.tta.TTAdapter.adapt_batch` on that batch, so every
       BatchNorm takes its batch statistics over all P patches at once: the statistics of (a sample of) the volume,
       which is what "batch statistics" means for a one-volume batch.
    3. **Statistics:** one more no-grad forward of the patches with the updated weights records what every BatchNorm
       normalised with (:func:`~monai_grata.tta.normalisation_statistics`).
    4. **Predict:** inside :meth:`frozen`, every BatchNorm normalises with those statistics, so all windows of a
       sliding-window forward see the same normalisation, not each window batch's own.

    Memory: at most the adapter's working set for P patches (for GraTa, the V weak views of P patches in one
    forward); never the whole volume with gradients. Cost per volume: the adapter's step on P patches, one forward of
    P patches, and the inferer's forward of every window.

    Instance, group and layer normalisation are per sample already and are left as they are.

    Args:
        adapter: the test-time adapter; its ``model`` is the network the inferer runs.
        roi_size: the window size (the inferer's ``roi_size``).
        num_patches: patches per volume.
        overlap: the window overlap (the inferer's).
    """

    def __init__(self, adapter: TTAdapter, roi_size: Sequence[int], num_patches: int = 4, overlap: float = 0.25):
        if int(num_patches) < 1:
            raise ValueError(f"num_patches must be at least 1, got {num_patches}")
        self.adapter, self.roi_size, self.num_patches, self.overlap = (
            adapter,
            tuple(roi_size),
            int(num_patches),
            overlap,
        )
        self.statistics: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.positions: list[tuple[slice, ...]] = []

    def adapt(self, x: torch.Tensor) -> AdaptationStep:
        """Adapt on the patches of ``x`` (their positions in :attr:`positions`) and record their BatchNorm statistics;
        return the adapter's step."""
        self.positions = patch_positions(x.shape[2:], self.roi_size, self.num_patches, self.overlap)
        patches = sample_patches(x, self.positions)
        step = self.adapter.adapt_batch(patches)
        self.statistics = normalisation_statistics(self.adapter.model, patches)
        return step

    @contextlib.contextmanager
    def frozen(self) -> Iterator[torch.nn.Module]:
        """Inside the context the model normalises with the statistics recorded by the last :meth:`adapt`."""
        if self.statistics is None:
            raise RuntimeError("no statistics yet: call adapt(x) first")
        with frozen_statistics(self.adapter.model, self.statistics) as model:
            yield model

    def __call__(
        self, x: torch.Tensor, inferer: Callable[[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]], torch.Tensor]
    ) -> torch.Tensor:
        """Adapt on ``x``'s patches, then return ``inferer(x, adapter.predict)`` under their statistics: every window
        is predicted by the adapter's :meth:`~monai_grata.tta.TTAdapter.predict` (for a user's own loop; inside a
        MONAI evaluator :class:`~monai_grata.handlers.TTAHandler` does the same around the evaluator's forward)."""
        self.adapt(x)
        with torch.no_grad(), self.frozen():
            return inferer(x, self.adapter.predict)
