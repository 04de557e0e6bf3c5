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


def test_overlay_draws_rim_and_cup_in_colour_over_the_original_image(tmp_path):
    from monai_grata.transforms import SaveOverlayd

    gray = np.tile(np.linspace(0, 255, 40, dtype=np.uint8), (30, 1))  # a grayscale image, 30 x 40
    Image.fromarray(gray).save(tmp_path / "eye.png")
    image = LoadImage(image_only=True, ensure_channel_first=True)(str(tmp_path / "eye.png"))
    mask = torch.zeros(1, *image.shape[1:])
    mask[0, 10:30, 5:25], mask[0, 15:25, 10:20] = 1, 2
    SaveOverlayd(keys="mask", output_dir=str(tmp_path / "out"))({"mask": MetaTensor(mask, meta=image.meta)})
    overlay = np.asarray(Image.open(tmp_path / "out" / "eye_overlay.png")).astype(int)
    assert overlay.shape == (30, 40, 3)
    assert overlay[0, 39].tolist() == [255, 255, 255] and overlay[0, 0].tolist() == [0, 0, 0]  # background: image
    rim, cup = overlay[7, 12], overlay[12, 17]  # (row, column) of a rim and a cup pixel
    assert rim[1] > rim[0] + 50 and rim[1] > rim[2] + 50  # green
    assert cup[2] > cup[0] + 50 and cup[2] > cup[1] + 50  # blue
