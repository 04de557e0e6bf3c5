"""Checking and normalising the channel layout of loaded images."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform

__all__ = ["EnsureImageChannels", "EnsureImageChannelsd"]


class EnsureImageChannels(Transform):
    """Give a channel-first image the channels the network expects, or raise a clear error.

    For a 3-channel (RGB) network two conversions are unambiguous and made here: a grayscale image
    (1 channel) is repeated into 3 identical channels, and an RGBA image (4 channels) loses its alpha
    channel. Any other mismatch raises ``ValueError`` naming the file.
    A 2D NIfTI colour image loads as (1, H, W, C); it is moved to (C, H, W) here (its metadata keeps the
    file's 3-D layout, so a mask saved from it gets a trailing singleton axis, see ``SaveMaskd``).
    Non-finite pixels are left as they are (the test-time adapters report and skip such images).

    Args:
        in_channels: the number of channels the network takes.
        spatial_dims: 2 for images, 3 for volumes.
    """

    def __init__(self, in_channels: int = 3, spatial_dims: int = 2) -> None:
        self.in_channels, self.spatial_dims = in_channels, spatial_dims

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        """
        Args:
            img: a channel-first image, as ``LoadImage(ensure_channel_first=True)`` gives it.
        """
        name = (getattr(img, "meta", {}) or {}).get("filename_or_obj", "<array>")
        convertible = (self.in_channels, 4) if self.in_channels == 3 else (self.in_channels,)
        if img.ndim == self.spatial_dims + 2 and img.shape[0] == 1 and img.shape[-1] in convertible:
            img = img[0].movedim(-1, 0)
        if img.ndim != self.spatial_dims + 1:
            raise ValueError(
                f"image {name!r} has shape {tuple(img.shape)}: "
                f"expected {self.spatial_dims} spatial axes and a channel axis"
            )
        if self.in_channels == 3 and img.shape[0] == 1:  # grayscale
            img = img.repeat(3, *[1] * self.spatial_dims)
        elif self.in_channels == 3 and img.shape[0] == 4:  # RGBA: drop alpha
            img = img[:3]
        if img.shape[0] != self.in_channels:
            raise ValueError(f"image {name!r} has {img.shape[0]} channels, the network expects {self.in_channels}")
        return img


class EnsureImageChannelsd(MapTransform):
    """Dictionary version of :class:`EnsureImageChannels`.

    Args:
        keys: keys of the images to check.
        in_channels: the number of channels the network takes.
        spatial_dims: 2 for images, 3 for volumes.
        allow_missing_keys: do not raise when a key is absent.
    """

    def __init__(
        self, keys: KeysCollection, in_channels: int = 3, spatial_dims: int = 2, allow_missing_keys: bool = False
    ):
        super().__init__(keys, allow_missing_keys)
        self.check = EnsureImageChannels(in_channels, spatial_dims)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.check(d[key])
        return d
