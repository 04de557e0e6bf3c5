"""Writing predicted masks in the format of the image each one was predicted from."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, SaveImage

__all__ = ["NIFTI_SUFFIXES", "SaveMaskd", "is_nifti"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: str) -> bool:
    """Whether ``path`` names a NIfTI file."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


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
        common = {
            "output_dir": output_dir,
            "output_postfix": output_postfix,
            "output_dtype": output_dtype,
            "scale": None,
            "resample": False,
            "separate_folder": False,
            "print_log": False,
        }
        self.nifti = SaveImage(output_ext=".nii.gz", **common)
        self.image = SaveImage(output_ext=".png", **common)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            mask = d[key]
            if is_nifti((getattr(mask, "meta", None) or {}).get("filename_or_obj", "")):
                self.nifti(mask[..., None] if mask.ndim == 3 else mask)
            else:
                self.image(mask)
        return d
