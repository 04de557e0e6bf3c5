import os

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import LoadImage
from PIL import Image

from monai_grata.transforms import SaveMaskd


def test_each_mask_is_written_in_its_own_images_format(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((12, 10), np.float32), np.eye(4)), str(inputs / "scan.nii.gz"))
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(inputs / "photo.png")
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(inputs / "photo2.jpg")
    save = SaveMaskd(keys="mask", output_dir=str(tmp_path / "out"))
    load = LoadImage(image_only=True, ensure_channel_first=True)
    for name in ("scan.nii.gz", "photo.png", "photo2.jpg"):
        image = load(str(inputs / name))
        save({"mask": MetaTensor(torch.randint(0, 3, (1, 12, 10)), meta=image.meta)})
    assert sorted(os.listdir(tmp_path / "out")) == ["photo2_mask.png", "photo_mask.png", "scan_mask.nii.gz"]
    nifti = nib.load(str(tmp_path / "out" / "scan_mask.nii.gz"))
    assert nifti.shape[:2] == (12, 10) and nifti.get_data_dtype() == np.uint8
    png = np.asarray(Image.open(tmp_path / "out" / "photo_mask.png"))
    assert png.shape == (10, 12) and set(np.unique(png)) <= {0, 1, 2} and png.max() == 2
