import inspect
import json
import logging
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.networks.nets import UNet
from PIL import Image

from monai_grata.data import fundus_preprocessing, split_train_val, volume_preprocessing
from monai_grata.data.datalist import domain_datalist
from monai_grata.networks.slicewise import SliceWise
from monai_grata.tta.dltta import DLTTA, FeatureAutoencoders, load_autoencoders, save_autoencoders
from monai_grata.utils.train_dltta import main, source_images, source_network

from .conftest import REPO_ROOT

SPINALCORD = os.path.join(REPO_ROOT, "bundles", "spinalcord_gm")


def write_volumes(root, depths: dict[str, int]) -> str:
    """One tiny NIfTI volume per site (1 mm voxels, ``depth`` slices), each slice of its own brightness pattern,
    and a datalist of them."""
    rng = np.random.default_rng(0)
    datalist = {}
    for site, depth in depths.items():
        os.makedirs(root / site, exist_ok=True)
        data = (rng.random((12, 10, depth)) * 1000).astype(np.int16)
        nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 3.0, 1.0])), str(root / site / "image.nii.gz"))
        datalist[site] = [{"image": f"{site}/image.nii.gz"}]
    (root / "datalist.json").write_text(json.dumps(datalist))
    return str(root)


def write_photographs(root, n: int) -> str:
    """``n`` random RGB photographs of the domain ``fundus`` (folders, no datalist)."""
    rng = np.random.default_rng(0)
    os.makedirs(root / "fundus" / "images")
    for i in range(n):
        pixels = (rng.random((40, 48, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "fundus" / "images" / f"img_{i}.png")
    return str(root)


def small_slicewise_checkpoint(folder) -> str:
    """A randomly initialised network of the spinal-cord bundle, saved as ``models/source.pt`` in ``folder``."""
    unet = UNet(2, 1, 3, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2, norm="batch")
    path = folder / "models" / "source.pt"
    os.makedirs(path.parent)
    torch.save(SliceWise(unet).state_dict(), path)
    return str(path)


def test_volumes_become_their_axial_slices_preprocessed_as_at_inference(tmp_path):
    root = write_volumes(tmp_path, {"a": 3, "b": 2})
    slices = source_images("spinalcord_gm", root, ["a", "b"])
    assert slices.shape == (5, 1, 160, 160)
    transform = volume_preprocessing(transform_label=False)
    second = transform({"image": os.path.join(root, "b", "image.nii.gz")})["image"].as_tensor()
    torch.testing.assert_close(slices[3:], second.movedim(-1, 0))


def test_photographs_are_the_training_split_as_train_json_makes_it(tmp_path):
    root = write_photographs(tmp_path, 5)
    images = source_images("grata", root, ["fundus"], image_size=32)
    train = split_train_val(domain_datalist(root, "fundus"), 0.2, seed=0)[0]
    expected = [fundus_preprocessing(image_size=32)({"image": item["image"]})["image"] for item in train]
    assert images.shape == (4, 3, 32, 32)
    torch.testing.assert_close(images, torch.stack([e.as_tensor() for e in expected]))


def test_command_logs_every_epoch_and_dltta_finds_the_file_beside_the_checkpoint(tmp_path, capsys, caplog):
    root = write_volumes(tmp_path / "data", {"a": 2, "b": 2})
    ckpt = small_slicewise_checkpoint(tmp_path)
    argv = ["--bundle", "spinalcord_gm", "--ckpt_path", ckpt, "--dataset_dir", root, "--source", "a+b"]
    written = main([*argv, "--epochs", "2", "--max_iterations", "1"])
    assert written == str(tmp_path / "models" / "dltta_source.pt")
    epochs = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [e["epoch"] for e in epochs] == [1, 2] and all(np.isfinite(e["loss"]) for e in epochs)
    assert sorted(os.listdir(tmp_path / "models")) == ["dltta_source.pt", "source.pt"]  # no temporary file left
    with caplog.at_level(logging.WARNING, logger="monai_grata.tta.dltta"):
        adapter = DLTTA(source_network("spinalcord_gm", ckpt), multilabel=False)
    assert "without trained autoencoders" not in caplog.text
    saved = load_autoencoders(written).state_dict()
    for name, value in adapter.autoencoders.state_dict().items():
        torch.testing.assert_close(value, saved[name])


def test_network_and_preprocessing_are_the_spinalcord_bundles():
    parser = ConfigParser()
    parser.read_config(os.path.join(SPINALCORD, "configs", "inference.json"))
    bundle_network = parser.get_parsed_content("network_def")
    ours = source_network("spinalcord_gm", os.path.join(SPINALCORD, "models", "source.pt"))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in bundle_network.state_dict().items()
    }
    defaults = inspect.signature(volume_preprocessing).parameters
    assert list(defaults["pixdim"].default) == parser.get_parsed_content("preprocessing#pixdim")
    assert list(defaults["crop_size"].default) == parser.get_parsed_content("preprocessing#crop_size")


def test_an_interrupted_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "dltta_source.pt"
    path.write_bytes(b"previous")

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(KeyboardInterrupt):
        save_autoencoders(FeatureAutoencoders([]), str(path))
    assert path.read_bytes() == b"previous" and os.listdir(tmp_path) == ["dltta_source.pt"]


def test_bad_input_raises(tmp_path):
    with pytest.raises(ValueError, match="unknown bundle"):
        source_images("nope", str(tmp_path), ["a"])
    with pytest.raises(ValueError, match="no source domain"):
        source_images("grata", str(tmp_path), [])
    with pytest.raises(SystemExit):
        main(["--bundle", "nope", "--ckpt_path", "x", "--dataset_dir", "y", "--source", "a"])
