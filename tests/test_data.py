import os
import re

import numpy as np
import pytest
import torch
from monai.transforms import Invertd
from PIL import Image

from monai_grata.data import check_image_size, domain_datalist, folder_datalist, fundus_preprocessing, split_train_val


def _write_png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def test_sample_datalist_domains(sample_dir):
    for domain in ("drishti_gs", "refuge_train", "refuge_val"):
        items = domain_datalist(sample_dir, domain)
        assert 1 <= len(items) <= 12
        assert all(os.path.isfile(it["image"]) and os.path.isfile(it["label"]) for it in items)


def test_unknown_domain_and_missing_datalist(sample_dir, tmp_path):
    with pytest.raises(ValueError, match="'nowhere'"):
        domain_datalist(sample_dir, "nowhere")
    with pytest.raises(FileNotFoundError, match="absent.json"):
        domain_datalist(sample_dir, "drishti_gs", str(tmp_path / "absent.json"))


def test_folder_datalist_with_partial_labels(tmp_path):
    rgb = np.zeros((40, 48, 3), np.uint8)
    _write_png(str(tmp_path / "images" / "a.png"), rgb)
    _write_png(str(tmp_path / "images" / "b.png"), rgb)
    _write_png(str(tmp_path / "labels" / "a.png"), np.zeros((40, 48), np.uint8))
    items = domain_datalist(str(tmp_path))
    assert [os.path.basename(it["image"]) for it in items] == ["a.png", "b.png"]
    assert "label" in items[0] and "label" not in items[1]


def test_empty_dataset_and_missing_image(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty dataset"):
        folder_datalist(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        folder_datalist(str(tmp_path / "none"))
    datalist = tmp_path / "datalist.json"
    datalist.write_text('{"site": [{"image": "gone.png", "label": "gone_label.png"}], "empty": []}')
    with pytest.raises(FileNotFoundError, match="gone.png"):
        domain_datalist(str(tmp_path), "site")
    with pytest.raises(ValueError, match="empty dataset"):
        domain_datalist(str(tmp_path), "empty")


def test_split_is_deterministic_80_20():
    items = [{"image": str(i)} for i in range(101)]
    train, val = split_train_val(items, 0.2, seed=0)
    assert (len(train), len(val)) == (81, 20)
    assert split_train_val(items, 0.2, seed=0) == (train, val)
    assert not {it["image"] for it in train} & {it["image"] for it in val}
    assert split_train_val(items, 0.2, seed=1)[1] != val


def test_preprocessing_scales_resizes_and_inverts(sample_dir):
    item = domain_datalist(sample_dir, "drishti_gs")[0]
    preprocessing = fundus_preprocessing(image_size=128)
    out = preprocessing(item)
    assert out["image"].shape == (3, 128, 128) and out["label"].shape == (2, 128, 128)
    assert float(out["image"].min()) == 0.0 and float(out["image"].max()) == pytest.approx(1.0, abs=1e-6)
    kept = fundus_preprocessing(image_size=128, resize_label=False)(item)
    assert kept["label"].shape == (2, 256, 256)
    pred = {"image": out["image"], "pred": out["image"][:2]}
    inverted = Invertd("pred", transform=preprocessing, orig_keys="image")(pred)["pred"]
    assert inverted.shape == (2, 256, 256)


def _error_chain(call) -> str:
    """Run ``call`` and return the messages of the raised exception and all its causes."""
    with pytest.raises(Exception) as info:
        call()
    messages, err = [], info.value
    while err is not None:
        messages.append(str(err))
        err = err.__cause__
    return " | ".join(messages)


def test_bad_inputs_name_the_file(tmp_path):
    two = str(tmp_path / "two.png")
    _write_png(two, np.zeros((32, 32, 2), np.uint8))  # grayscale + alpha: not converted
    assert re.search(
        r"two.png' has 2 channels, the network expects 3",
        _error_chain(lambda: fundus_preprocessing()({"image": two})),
    )
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    assert "broken.png" in _error_chain(lambda: fundus_preprocessing()({"image": str(broken)}))
    rgb, label = str(tmp_path / "rgb.png"), str(tmp_path / "label.png")
    _write_png(rgb, np.zeros((32, 32, 3), np.uint8))
    _write_png(label, np.full((32, 32), 255, np.uint8))
    chain = _error_chain(lambda: fundus_preprocessing()({"image": rgb, "label": label}))
    assert re.search(r"label values \[255\.0\] outside \[0, 1, 2\] in '.*label.png'", chain)


def test_nifti_colour_image_is_channel_first(tmp_path):
    import nibabel as nib

    path = str(tmp_path / "img.nii.gz")
    nib.save(nib.Nifti1Image(np.random.rand(40, 40, 3).astype(np.float32), np.eye(4)), path)
    out = fundus_preprocessing(image_size=64)({"image": path})
    assert out["image"].shape == (3, 64, 64)
    assert torch.isfinite(out["image"]).all()


@pytest.mark.parametrize("size", [0, 100, -32])
def test_image_size_must_be_multiple_of_32(size):
    with pytest.raises(ValueError, match="multiple of 32"):
        check_image_size(size)
