"""The preprocessing chains shared by training, evaluation and test-time adaptation."""

from __future__ import annotations

import monai.transforms as mt

from monai_grata.transforms import DiscCupFromLabeld, EnsureImageChannelsd

__all__ = ["AUGMENTATIONS", "check_image_size", "fundus_preprocessing"]

AUGMENTATIONS = ("none", "standard", "strong")


def _strong_augmentation(keys: list[str]) -> list:
    """Spatial and intensity augmentation in the spirit of the authors' batchgenerators recipe (elastic
    deformation, rotation, scaling, mirroring, brightness / contrast / gamma), with MONAI transforms."""
    modes = ("bilinear", "nearest")
    return [
        mt.RandFlipd(keys=keys, prob=0.5, spatial_axis=0, allow_missing_keys=True),
        mt.RandFlipd(keys=keys, prob=0.5, spatial_axis=1, allow_missing_keys=True),
        mt.Rand2DElasticd(
            keys=keys, spacing=(32, 32), magnitude_range=(0.0, 2.0), prob=0.2, rotate_range=3.1416,
            scale_range=(0.15, 0.15), mode=modes, padding_mode="zeros", allow_missing_keys=True,
        ),  # fmt: skip
        mt.RandAffined(
            keys=keys, prob=0.3, rotate_range=3.1416, scale_range=(0.15, 0.15), mode=modes, padding_mode="zeros",
            allow_missing_keys=True,
        ),  # fmt: skip
        mt.RandScaleIntensityd(keys="image", factors=0.25, prob=0.3),
        mt.RandAdjustContrastd(keys="image", gamma=(0.7, 1.5), prob=0.3),
        mt.RandStdShiftIntensityd(keys="image", factors=0.25, prob=0.3),
        mt.RandGaussianNoised(keys="image", std=0.03, prob=0.15),
        mt.ScaleIntensityd(keys="image", minv=0.0, maxv=1.0),
    ]


def check_image_size(image_size: int) -> int:
    """Return ``image_size`` as an int, or raise when the network cannot take it (a multiple of 32)."""
    size = int(image_size)
    if size <= 0 or size % 32:
        raise ValueError(f"image_size must be a positive multiple of 32, got {image_size}")
    return size


def fundus_preprocessing(
    image_size: int = 256,
    in_channels: int = 3,
    spatial_dims: int = 2,
    resize_label: bool = True,
    augment: bool | str = False,
) -> mt.Compose:
    """Load, check, min-max scale and resize an ``{"image", "label"}`` item (the label is optional).

    Images are resized to ``image_size`` per side (bilinear), then min-max scaled to [0, 1] per image;
    labels (0 background, 1 disc rim, 2 cup) become [optic disc, optic cup] channels. The resize is
    recorded in the image's metadata so ``monai.transforms.Invertd`` maps predictions back to the
    original size.

    Args:
        image_size: the network's input side, a multiple of 32.
        in_channels: channels the network expects; other images raise ``ValueError``.
        spatial_dims: 2 for images, 3 for volumes.
        resize_label: resize the label with the image (training); ``False`` keeps the label at the
            original size, for metrics on the original grid after inverting the prediction.
        augment: the training augmentation: ``False``/``"none"``; ``True``/``"standard"`` (random flips,
            90-degree rotations, mild intensity); ``"strong"`` (the kind of the authors' source training: flips,
            rotation by any angle, scaling 0.85–1.15, elastic deformation, brightness, contrast, gamma, noise).

    Returns:
        A ``monai.transforms.Compose``.
    """
    size = [check_image_size(image_size)] * spatial_dims
    label_keys = ["label"]
    transforms = [
        mt.LoadImaged(keys=["image", "label"], image_only=True, ensure_channel_first=True, allow_missing_keys=True),
        EnsureImageChannelsd(keys="image", in_channels=in_channels, spatial_dims=spatial_dims),
        mt.Resized(keys="image", spatial_size=size, mode="bilinear", align_corners=False),
        mt.ScaleIntensityd(keys="image", minv=0.0, maxv=1.0),
    ]
    if resize_label:
        transforms.append(mt.Resized(keys=label_keys, spatial_size=size, mode="nearest", allow_missing_keys=True))
    transforms.append(DiscCupFromLabeld(keys=label_keys, allow_missing_keys=True))
    if augment not in AUGMENTATIONS + (True, False):
        raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}")
    if augment == "strong":
        transforms += _strong_augmentation(["image", "label"])
    elif augment in (True, "standard"):
        transforms += [
            mt.RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0, allow_missing_keys=True),
            mt.RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=1, allow_missing_keys=True),
            mt.RandRotate90d(keys=["image", "label"], prob=0.5, max_k=3, allow_missing_keys=True),
            mt.RandScaleIntensityd(keys="image", factors=0.1, prob=0.3),
            mt.RandAdjustContrastd(keys="image", gamma=(0.8, 1.25), prob=0.3),
        ]
    transforms.append(mt.EnsureTyped(keys=["image", "label"], dtype="float32", allow_missing_keys=True))
    return mt.Compose(transforms)
