"""Average symmetric surface distance in millimetres, each image at its own voxel spacing."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.handlers import IgniteMetricHandler
from monai.metrics import SurfaceDistanceMetric

__all__ = ["PhysicalSurfaceDistance", "voxel_spacing"]


def voxel_spacing(image: torch.Tensor) -> tuple[float, ...]:
    """The voxel size of a channel-first image (C, *spatial) from its affine (MetaTensor metadata): the length of
    each column of the affine's linear part, in the units of the affine (mm for NIfTI); 1 per axis without one."""
    n = image.ndim - 1
    affine = getattr(image, "affine", None) if hasattr(image, "meta") else None
    if affine is None:
        return (1.0,) * n
    linear = torch.as_tensor(affine, dtype=torch.float64)[:n, :n]
    return tuple(float(v) for v in linear.norm(dim=0))


class PhysicalSurfaceDistance(IgniteMetricHandler):
    """MONAI's surface-distance metric handler with every image measured at its own voxel spacing, read from the
    prediction's affine (:func:`voxel_spacing`): for NIfTI volumes on their original grid, the distance is in mm
    however anisotropic or different the sites' voxels are. MONAI's ``SurfaceDistance`` handler has no spacing
    argument, so it counts voxels.

    Args:
        include_background: include the first channel.
        symmetric: the average symmetric surface distance (ASSD) when True.
        output_transform: gives ``(y_pred, y)``, lists of channel-first tensors (``from_engine(["pred", "label"])``).
        save_details: keep per-image values in ``engine.state.metric_details`` (for ``MetricsReport``).
    """

    def __init__(
        self,
        include_background: bool = True,
        symmetric: bool = True,
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
    ) -> None:
        metric = SurfaceDistanceMetric(include_background=include_background, symmetric=symmetric, reduction="mean")
        super().__init__(metric_fn=metric, output_transform=output_transform, save_details=save_details)

    def update(self, output: Sequence) -> None:
        if len(output) != 2:
            raise ValueError(f"output must have length 2 (y_pred, y), got {len(output)}")
        y_pred, y = output
        for pred, label in zip(y_pred, y, strict=True):  # one image at a time: each has its own spacing
            self.metric_fn(pred[None], label[None], spacing=voxel_spacing(pred))
