"""Writing predicted masks in the format of the image each one was predicted from."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import LoadImage, MapTransform, SaveImage, ScaleIntensity
from monai.visualize.utils import blend_images

from .channels import EnsureImageChannels

__all__ = ["NIFTI_SUFFIXES", "SaveMaskd", "SaveOverlayd", "is_nifti"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: str) -> bool:
    """Whether ``path`` names a NIfTI file."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def _writer(output_dir: str, postfix: str, ext: str, dtype, scale: int | None = None) -> SaveImage:
    """MONAI's ``SaveImage`` writing ``<output_dir>/<name>_<postfix><ext>`` as it is (no resampling)."""
    return SaveImage(
        output_dir=output_dir, output_postfix=postfix, output_ext=ext, output_dtype=dtype, scale=scale,
        resample=False, separate_folder=False, print_log=False,
    )  # fmt: skip


class SaveMaskd(MapTransform):
    """Save label maps next to each other, each in its own input image's format: a NIfTI input gives
    ``<name>_<postfix>.nii.gz``, any other (PNG, JPG) gives a lossless ``<name>_<postfix>.png``.

    The format is decided per item from the ``filename_or_obj`` of the mask's metadata (copied from its
    image), so a folder that mixes NIfTI and PNG images gets one mask of the right kind per image. A 2-D
    NIfTI mask gets a trailing singleton axis, the file layout of a 2-D NIfTI colour image (H, W, 1, C).
    Writing is MONAI's ``SaveImage`` (one instance per format); values are written unscaled as uint8.

    Args:
        keys: keys of the (1, *spatial) label maps to save.
        output_dir: the folder to write into.
        output_postfix: appended to the image's file name.
        output_dtype: the data type written.
        allow_missing_keys: do not raise when a key is absent.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str,
        output_postfix: str = "mask",
        output_dtype=np.uint8,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.nifti = _writer(output_dir, output_postfix, ".nii.gz", output_dtype)
        self.image = _writer(output_dir, output_postfix, ".png", output_dtype)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            mask = d[key]
            if is_nifti((getattr(mask, "meta", None) or {}).get("filename_or_obj", "")):
                self.nifti(mask[..., None] if mask.ndim == 3 else mask)
            else:
                self.image(mask)
        return d


class SaveOverlayd(MapTransform):
    """Save each 2-D label map drawn in colour over its original image, as ``<name>_<postfix>.png``: a mask
    of 0/1/2 values looks black in every image viewer, the overlay shows what was segmented.

    The image is read again from the mask's ``filename_or_obj`` (at its original size, grayscale made RGB),
    min-max scaled, and blended with MONAI's ``blend_images``: disc rim (1) green, cup (2) blue (the ``hsv``
    colour map at 1/3 and 2/3), background left as it is. Volumes (3-D) are not drawn.

    Args:
        keys: keys of the (1, H, W) label maps (values 0, 1, 2).
        output_dir: the folder to write into.
        output_postfix: appended to the image's file name.
        alpha: the opacity of the colours.
        allow_missing_keys: do not raise when a key is absent.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str,
        output_postfix: str = "overlay",
        alpha: float = 0.4,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.alpha = alpha
        self.load = LoadImage(image_only=True, ensure_channel_first=True)
        self.rgb, self.scale = EnsureImageChannels(in_channels=3, spatial_dims=2), ScaleIntensity(0.0, 1.0)
        self.save = _writer(output_dir, output_postfix, ".png", np.uint8, scale=255)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            mask = d[key]
            if mask.ndim != 3:
                continue
            image = self.scale(self.rgb(self.load((mask.meta or {})["filename_or_obj"])))
            blended = blend_images(image, mask / 3, alpha=self.alpha, cmap="hsv", rescale_arrays=False)
            blended.meta = {**image.meta, "spatial_shape": tuple(image.shape[1:])}  # a NIfTI's is (H, W, C)
            self.save.set_options(data_kwargs={"channel_dim": 0})  # SaveImage drops it after a NIfTI's shape
            self.save(blended)
        return d
