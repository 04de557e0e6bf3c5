"""The preprocessing chain of NIfTI volumes of axial slices (the spinal-cord bundle): orientation, in-plane spacing,
a crop around the field-of-view centre, intensity scaling; every spatial step invertible for ``Invertd``."""

from __future__ import annotations

from collections.abc import Sequence

import monai.transforms as mt

from monai_grata.transforms import EnsureImageChannelsd, LabelFromMasksd, NestedChannelsFromLabeld

__all__ = ["volume_preprocessing"]


def _augmentation(patch_size: Sequence[int], num_samples: int) -> list:
    """Training augmentation: patches around the labelled structures and elsewhere, in-plane flips, quarter turns,
    rotation and scaling, and strong intensity changes (contrast differs between sites)."""
    keys = ["image", "label"]
    return [
        mt.RandCropByPosNegLabeld(
            keys=keys,
            label_key="label",
            spatial_size=tuple(patch_size),
            pos=2,
            neg=1,
            num_samples=num_samples,
            allow_smaller=True,
        ),  # fmt: skip
        mt.RandFlipd(keys=keys, prob=0.5, spatial_axis=0),
        mt.RandFlipd(keys=keys, prob=0.5, spatial_axis=1),
        mt.RandRotate90d(keys=keys, prob=0.5, max_k=3, spatial_axes=(0, 1)),
        mt.RandAffined(
            keys=keys,
            prob=0.5,
            rotate_range=(0.0, 0.0, 0.4),
            scale_range=(0.15, 0.15, 0.0),
            mode=("bilinear", "nearest"),
            padding_mode="zeros",
        ),  # fmt: skip
        mt.RandAdjustContrastd(keys="image", gamma=(0.5, 2.0), prob=0.5),
        mt.RandScaleIntensityd(keys="image", factors=0.3, prob=0.5),
        mt.RandGaussianSmoothd(keys="image", sigma_x=(0.25, 1.0), sigma_y=(0.25, 1.0), sigma_z=(0.0, 0.0), prob=0.2),
        mt.RandGaussianNoised(keys="image", std=0.05, prob=0.3),
        mt.ScaleIntensityd(keys="image", minv=0.0, maxv=1.0),
    ]


def volume_preprocessing(
    pixdim: Sequence[float] = (0.5, 0.5, -1.0),
    crop_size: Sequence[int] = (160, 160, -1),
    axcodes: str = "RAS",
    transform_label: bool = True,
    augment: bool = False,
    patch_size: Sequence[int] = (96, 96, 8),
    num_samples: int = 4,
) -> mt.Compose:
    """Load, orient, resample, crop and scale an ``{"image", "label"}`` NIfTI item (labels optional).

    The label is a label map (0 background, 1 outer structure only, 2 inner structure) or, as in the spinal-cord
    data, two nested masks ``label_cord`` and ``label_gm`` combined into one (:class:`LabelFromMasksd`).
    Steps: orientation to ``axcodes``, resampling to ``pixdim`` (a non-positive entry keeps the volume's own spacing
    along that axis, so thick slices are not interpolated), a crop of ``crop_size`` around the centre of the field of
    view padded where the volume is smaller (the spinal cord lies within 40 mm of the centre in every site of the
    shipped data), intensities scaled to [0, 1] between the 0.5th and 99.5th percentiles of the crop. The spatial
    steps are recorded, so ``monai.transforms.Invertd`` maps a prediction back to the input's grid, affine and
    orientation.

    Args:
        pixdim: the voxel size in mm after resampling.
        crop_size: the crop in voxels after resampling (non-positive: the whole axis).
        axcodes: the orientation the network sees.
        transform_label: move the label with the image (training); ``False`` keeps it on the input's grid and makes
            it two channels [outer, inner] (e.g. [cord, gray matter]) for metrics against the inverted prediction.
        augment: add the training augmentation (random patches of ``patch_size``, ``num_samples`` per volume).
        patch_size: the training patch size in voxels.
        num_samples: training patches per volume and epoch.

    Returns:
        A ``monai.transforms.Compose``.
    """
    spatial = ["image", "label"] if transform_label else ["image"]
    modes = ("bilinear", "nearest") if transform_label else ("bilinear",)
    transforms = [
        mt.LoadImaged(
            keys=["image", "label", "label_cord", "label_gm"],
            image_only=True,
            ensure_channel_first=True,
            allow_missing_keys=True,
        ),  # fmt: skip
        EnsureImageChannelsd(keys="image", in_channels=1, spatial_dims=3),
        LabelFromMasksd(keys=("label_cord", "label_gm"), label_key="label"),
        mt.Orientationd(keys=spatial, axcodes=axcodes, allow_missing_keys=True),
        mt.Spacingd(keys=spatial, pixdim=tuple(pixdim), mode=modes, allow_missing_keys=True),
        mt.CenterSpatialCropd(keys=spatial, roi_size=tuple(crop_size), allow_missing_keys=True),
        mt.SpatialPadd(keys=spatial, spatial_size=tuple(crop_size), allow_missing_keys=True),
        mt.ScaleIntensityRangePercentilesd(keys="image", lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True),
    ]
    if not transform_label:
        transforms.append(NestedChannelsFromLabeld(keys="label", allow_missing_keys=True))
    if augment:
        transforms += _augmentation(patch_size, num_samples)
    transforms.append(mt.EnsureTyped(keys=["image", "label"], dtype="float32", allow_missing_keys=True))
    return mt.Compose(transforms)
