"""The per-pixel feature map a segmentation network classifies, read from its latest forward (for the methods that
work on features: DIGA's prototypes)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FeatureTap"]


class FeatureTap:
    """Keeps the input of one layer of ``model`` from the model's latest forward.

    By default the layer is the last convolution (in ``model.modules()`` order): in a segmentation network such as
    MONAI's ``FlexibleUNet`` that is the head, whose input is the decoder's per-pixel feature map. For a 2D network
    run slice by slice (:class:`~monai_grata.networks.slicewise.SliceWise`) the slices are stacked back into volumes.

    Args:
        model: the network.
        layer: the name of the layer (as in ``model.named_modules()``); ``None``: the last convolution.

    Raises:
        ValueError: an unknown layer name, or a model without convolution.
    """

    def __init__(self, model: nn.Module, layer: str | None = None) -> None:
        modules = dict(model.named_modules())
        if layer is None:
            convs = [n for n, m in modules.items() if isinstance(m, nn.modules.conv._ConvNd)]
            if not convs:
                raise ValueError(f"{type(model).__name__} has no convolution: name the feature layer")
            layer = convs[-1]
        if layer not in modules:
            raise ValueError(f"{type(model).__name__} has no layer {layer!r}")
        self.layer = layer
        self._as_volumes = getattr(model, "as_volumes", None)  # a 2D network run slice by slice (SliceWise)
        self._features: torch.Tensor | None = None
        self._handle = modules[layer].register_forward_pre_hook(self._keep)

    @property
    def features(self) -> torch.Tensor | None:
        """The layer's input in the latest forward (for a network run slice by slice, stacked back into volumes)."""
        if self._features is None or self._as_volumes is None:
            return self._features
        return self._as_volumes(self._features)

    def _keep(self, module: nn.Module, args: tuple) -> None:
        self._features = args[0]

    def remove(self) -> None:
        """Stop reading the layer's input."""
        self._handle.remove()
