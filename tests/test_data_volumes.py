import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import decollate_batch, list_data_collate
from monai.inferers import SlidingWindowInferer
from monai.transforms import AsDiscreted, Compose, Invertd

from monai_grata.data import volume_preprocessing
from monai_grata.transforms import LabelFromMasksd, SaveMaskd

# the ground truth drawn in voxel space: a cord (label 1, intensity 500) with a gray-matter core (label 2, 1000),
# off-centre so that a flip of any axis would move it
CORD = (slice(18, 30), slice(8, 20))
CORE = (slice(22, 26), slice(12, 16))


def write_case(folder, axcodes: str, zooms: tuple[float, float, float]) -> dict:
    shape = (40, 36, 5)
    data = np.zeros(shape, np.int16)
    label = np.zeros(shape, np.uint8)
    data[CORD] = 500
    label[CORD] = 1
    data[CORE] = 1000
    label[CORE] = 2
    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = (-12.0, 7.5, 40.0)
    if axcodes == "LPS":  # the philips site: y runs posterior
        affine[1, 1] *= -1
    else:  # LAS
        pass
    affine[0, 0] *= -1  # both are L along x
    paths = {}
    for key, array in (("image", data), ("label_cord", (label > 0).astype(np.uint8)), ("label_gm", label == 2)):
        paths[key] = str(folder / f"{axcodes}_{key}.nii.gz")
        nib.save(nib.Nifti1Image(array.astype(np.uint8 if key != "image" else np.int16), affine), paths[key])
    assert "".join(nib.aff2axcodes(affine)) == axcodes
    return paths | {"truth": label}


class ThresholdNet(torch.nn.Module):
    """Logits (background, white matter, gray matter) from the intensity alone: 0 -> 0, 0.5 -> 1, 1 -> 2."""

    def forward(self, x):
        return torch.cat([torch.zeros_like(x), 20 * (x - 0.25), 60 * (x - 0.7)], dim=1)


def predict_and_save(item: dict, out_dir: str, pixdim) -> str:
    pre = volume_preprocessing(pixdim=pixdim, crop_size=(32, 32, -1), transform_label=False)
    data = pre({k: v for k, v in item.items() if k != "truth"})
    batch = list_data_collate([data])
    inferer = SlidingWindowInferer(roi_size=(16, 16, -1), sw_batch_size=2, overlap=0.25)
    batch["pred"] = inferer(batch["image"], ThresholdNet())
    post = Compose(
        [
            Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False),
            AsDiscreted(keys="pred", argmax=True),
            SaveMaskd(keys="pred", output_dir=out_dir),
        ]
    )
    for out in decollate_batch(batch):
        post(out)
    return f"{out_dir}/{axcodes_of(item)}_image_mask.nii.gz"


def axcodes_of(item: dict) -> str:
    return item["image"].rsplit("/", 1)[1].split("_")[0]


@pytest.mark.parametrize("axcodes", ["LPS", "LAS"])
def test_masks_are_written_on_the_input_grid_with_its_affine(tmp_path, axcodes):
    item = write_case(tmp_path, axcodes, (0.5, 0.5, 3.0))
    mask_path = predict_and_save(item, str(tmp_path / "masks"), pixdim=(0.5, 0.5, -1))
    mask, image = nib.load(mask_path), nib.load(item["image"])
    assert mask.shape == image.shape
    np.testing.assert_allclose(mask.affine, image.affine, atol=1e-6)
    assert nib.aff2axcodes(mask.affine) == nib.aff2axcodes(image.affine) == tuple(axcodes)
    assert mask.get_data_dtype() == np.uint8
    # no resampling needed (0.5 mm in-plane already): orientation and crop undone voxel for voxel
    np.testing.assert_array_equal(np.asarray(mask.dataobj), item["truth"])


def test_resampled_masks_come_back_on_the_input_grid(tmp_path):
    item = write_case(tmp_path, "LPS", (0.6, 0.6, 3.0))
    mask_path = predict_and_save(item, str(tmp_path / "masks"), pixdim=(0.5, 0.5, -1))
    mask = nib.load(mask_path)
    assert mask.shape == (40, 36, 5)
    np.testing.assert_allclose(mask.affine, nib.load(item["image"]).affine, atol=1e-6)
    got, truth = np.asarray(mask.dataobj), item["truth"]
    for value in (1, 2):  # resampled there and back (partial volume at the edges): the structures stay in place
        a, b = got == value, truth == value
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.7
        np.testing.assert_allclose(np.argwhere(a).mean(axis=0), np.argwhere(b).mean(axis=0), atol=0.5)


def test_two_masks_become_one_label_map_and_metrics_channels(tmp_path):
    item = write_case(tmp_path, "LAS", (0.5, 0.5, 3.0))
    training = volume_preprocessing(crop_size=(32, 32, -1))({k: v for k, v in item.items() if k != "truth"})
    assert training["label"].shape == (1, 32, 32, 5) and set(torch.unique(training["label"]).tolist()) == {0, 1, 2}
    assert "label_cord" not in training and "label_gm" not in training
    metrics = volume_preprocessing(crop_size=(32, 32, -1), transform_label=False)(
        {k: v for k, v in item.items() if k != "truth"}
    )
    assert metrics["label"].shape == (2, 40, 36, 5)  # [cord, gray matter] on the input grid
    assert torch.equal(metrics["label"][0].bool(), torch.as_tensor(item["truth"] > 0))
    assert torch.equal(metrics["label"][1].bool(), torch.as_tensor(item["truth"] == 2))
    with pytest.raises(ValueError, match="without its pair"):
        LabelFromMasksd()({"label_cord": torch.ones(1, 4, 4, 2)})
    assert LabelFromMasksd()({"label": torch.ones(1, 4, 4, 2)})["label"].shape == (1, 4, 4, 2)  # a label map stays
