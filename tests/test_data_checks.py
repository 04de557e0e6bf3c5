import os
import re

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from monai_grata.data import (
    BadInputError,
    MissingInputError,
    check_inputs,
    check_loader,
    domain_datalist,
    exit_on_bad_input,
)


def test_check_loader_names_the_numbers_and_the_option():
    loader = DataLoader(list(range(6)), batch_size=8, drop_last=True)
    with pytest.raises(BadInputError, match=r"the training split has 6 images.*pass --batch_size 6 or less"):
        check_loader(loader, "the training split")
    fits = DataLoader(list(range(6)), batch_size=8)
    assert check_loader(fits, "the training split") is fits
    with pytest.raises(BadInputError, match="no images in the target domain"):
        check_loader(DataLoader([], batch_size=1), "the target domain")


def test_missing_input_is_a_file_not_found_error(tmp_path):
    with pytest.raises(MissingInputError) as info:
        domain_datalist(str(tmp_path), "site", str(tmp_path / "absent.json"))
    assert isinstance(info.value, FileNotFoundError)


def test_exit_on_bad_input_ends_with_one_line_and_lets_other_errors_pass():
    @exit_on_bad_input()
    def step(error):
        try:  # a bundle config wraps the error of an expression in its own
            raise error
        except Exception as err:
            raise RuntimeError("Failed to evaluate") from err

    with pytest.raises(SystemExit) as info:
        step(BadInputError("image a.png: unreadable"))
    assert info.value.code == "error: image a.png: unreadable" and info.value.__cause__ is None
    with pytest.raises(RuntimeError):
        step(KeyError("x"))


def _png(path, array) -> str:
    Image.fromarray(np.asarray(array, np.uint8)).save(path)
    return str(path)


@pytest.fixture
def folder(tmp_path):
    """One good labelled image and one of each kind of bad input the checks must name."""
    rgb = np.zeros((32, 40, 3))
    label = np.zeros((32, 40))
    items = [{"image": _png(tmp_path / "good.png", rgb), "label": _png(tmp_path / "good_label.png", label)}]
    items.append({"image": _png(tmp_path / "gray.png", rgb[..., 0])})  # converted, not bad
    items.append({"image": _png(tmp_path / "rgba.png", np.zeros((32, 40, 4)))})  # converted, not bad
    (tmp_path / "text.png").write_text("not an image")
    items.append({"image": str(tmp_path / "text.png")})
    whole = (tmp_path / "good.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(whole[: len(whole) // 2])
    items.append({"image": str(tmp_path / "truncated.png")})
    items.append({"image": _png(tmp_path / "two.png", np.zeros((32, 40, 2)))})
    items.append({"image": _png(tmp_path / "small.png", rgb), "label": _png(tmp_path / "small_l.png", label[:16])})
    items.append({"image": _png(tmp_path / "odd.png", rgb), "label": _png(tmp_path / "odd_l.png", label + 255)})
    items.append({"image": _png(tmp_path / "dot.png", rgb[:1, :1])})
    nan = np.random.default_rng(0).random((32, 40, 3)).astype(np.float32)
    nan[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), str(tmp_path / "nan.nii.gz"))
    items.append({"image": str(tmp_path / "nan.nii.gz")})
    items.append({"image": _png(tmp_path / "flat.png", rgb + 90)})  # constant: usable
    return items


BAD = {
    "text.png": r"image '.*text.png' cannot be read \(UnidentifiedImageError",
    "truncated.png": r"image '.*truncated.png' cannot be read \(",
    "two.png": r"image '.*two.png' has 2 channels, the network expects 3",
    "small.png": r"label '.*small_l.png' is 40x16, its image '.*small.png' is 40x32",
    "odd.png": r"label values \[255.0\] outside \[0, 1, 2\] in '.*odd_l.png'",
    "dot.png": r"image '.*dot.png' is 1x1: too small to segment \(the least is 16x16\)",
    "nan.nii.gz": r"image '.*nan.nii.gz' has 1 NaN/Inf pixels",
}


def test_check_inputs_error_names_every_bad_file_in_one_line(folder):
    with pytest.raises(BadInputError) as info:
        check_inputs(folder)
    message = str(info.value)
    assert "\n" not in message and message.startswith("7 bad inputs: ") and "--on_bad_input skip" in message
    for pattern in BAD.values():
        assert re.search(pattern, message), pattern


@pytest.mark.parametrize(
    "task,names",
    [(None, "1 outer structure, 2 inner structure"), ("fundus", "1 optic disc rim, 2 optic cup"),
     ("spinalcord", "1 white matter, 2 gray matter")],
)  # fmt: skip
def test_a_bad_label_is_explained_in_the_tasks_words(folder, task, names):
    odd = [item for item in folder if item["image"].endswith("odd.png")]
    with pytest.raises(BadInputError, match=f"expected 0 background, {names}"):
        check_inputs(odd, task=task)


def test_check_inputs_skip_keeps_the_good_and_lists_the_bad(folder, caplog):
    kept, skipped = check_inputs(folder, on_bad_input="skip")
    assert [os.path.basename(it["image"]) for it in kept] == ["good.png", "gray.png", "rgba.png", "flat.png"]
    assert [os.path.basename(s["image"]) for s in skipped] == list(BAD)
    for entry, pattern in zip(skipped, BAD.values(), strict=True):
        assert re.search(pattern, entry["reason"])
    assert sum("skipping" in r.message for r in caplog.records) == 7


def test_check_inputs_min_size_per_axis_lets_a_thin_volume_through(tmp_path):
    path = str(tmp_path / "thin.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 3), np.float32), np.eye(4)), path)
    assert check_inputs([{"image": path}], in_channels=1, spatial_dims=3, min_size=(8, 8, 1))[1] == []
    with pytest.raises(BadInputError, match=r"thin.nii.gz' is 32x32x3: too small to segment \(the least is 8x8x8\)"):
        check_inputs([{"image": path}], in_channels=1, spatial_dims=3, min_size=8)
    with pytest.raises(ValueError, match="one side per spatial axis"):
        check_inputs([{"image": path}], in_channels=1, spatial_dims=3, min_size=(8, 8))


def test_check_inputs_nothing_usable_or_unknown_mode(folder):
    with pytest.raises(BadInputError, match="no usable input: all 1 images are bad"):
        check_inputs(folder[3:4], on_bad_input="skip")
    with pytest.raises(BadInputError, match="--on_bad_input must be one of error|skip"):
        check_inputs(folder, on_bad_input="ignore")
