import json
import logging
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from monai.data import load_decathlon_datalist
from PIL import Image

from monai_grata.data import BadInputError, fundus_preprocessing, volume_preprocessing
from monai_grata.data.prepare import (
    CropSize,
    crop_around_disc,
    main,
    parse_crop,
    prepare_drishti,
    prepare_gmchallenge,
    prepare_refuge,
    prepare_rimone,
    softmap_disc_cup,
)

CUP_RGB, RIM_RGB = (250, 250, 250), (240, 200, 40)


def _discs(shape, centre, r_disc, r_cup):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    dist = np.hypot(yy - centre[0], xx - centre[1])
    return dist <= r_disc, dist <= r_cup


def _photo(disc, cup):
    image = np.zeros(disc.shape + (3,), np.uint8)
    image[..., 0] = 120
    image[disc] = RIM_RGB
    image[cup] = CUP_RGB
    return image


def _save(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def _refuge_case(root, image_rel, mask_rel, shape=(120, 160), centre=(50, 100), with_mask=True):
    disc, cup = _discs(shape, centre, 15, 7)
    _save(os.path.join(root, image_rel), _photo(disc, cup))
    if with_mask:
        mask = np.full(shape, 255, np.uint8)
        mask[disc], mask[cup] = 128, 0
        _save(os.path.join(root, mask_rel), mask)


@pytest.fixture
def refuge_source(tmp_path):
    root = str(tmp_path / "refuge")
    train = "Annotation-Training400/Disc_Cup_Masks"
    # the training photographs unzipped with the archive's own top folder, as many unzip tools do
    _refuge_case(root, "REFUGE-Training400/Training400/Glaucoma/g0001.jpg", f"{train}/Glaucoma/g0001.bmp")
    _refuge_case(root, "REFUGE-Training400/Training400/Non-Glaucoma/n0001.jpg", f"{train}/Non-Glaucoma/n0001.bmp",
                 centre=(90, 30))  # fmt: skip
    _refuge_case(root, "REFUGE-Training400/Training400/Non-Glaucoma/n0002.jpg", "", with_mask=False)
    _refuge_case(root, "REFUGE-Validation400/V0001.jpg", "REFUGE-Validation400-GT/Disc_Cup_Masks/V0001.bmp")
    _refuge_case(root, "Test400/T0001.jpg", "REFUGE-Test-GT/Disc_Cup_Masks/G/T0001.bmp")
    return root


def _disc_box(label):
    rows, cols = np.flatnonzero((label >= 1).any(1)), np.flatnonzero((label >= 1).any(0))
    return rows[0], rows[-1], cols[0], cols[-1]


def test_refuge_disc_centred_crops_labels_and_datalist(refuge_source, tmp_path, caplog):
    out = str(tmp_path / "prepared")
    with caplog.at_level(logging.WARNING):
        entries = prepare_refuge(refuge_source, out, splits=["train", "val", "test"], size=64, crop="3x")
    assert "n0002.jpg: no mask" in caplog.text
    assert {d: [os.path.basename(i["image"]) for i in items] for d, items in entries.items()} == {
        "refuge_train": ["g0001.png", "n0001.png"], "refuge_val": ["V0001.png"], "refuge_test": ["T0001.png"]
    }  # fmt: skip
    for items in entries.values():
        for item in items:
            image = np.asarray(Image.open(os.path.join(out, item["image"])))
            label = np.asarray(Image.open(os.path.join(out, item["label"])))
            assert image.shape == (64, 64, 3) and label.shape == (64, 64) and label.dtype == np.uint8
            assert set(np.unique(label)) == {0, 1, 2}
            y0, y1, x0, x1 = _disc_box(label)
            assert abs((y0 + y1) / 2 - 31.5) <= 1 and abs((x0 + x1) / 2 - 31.5) <= 1  # centred on the disc
            assert abs((y1 - y0 + 1) - 64 / 3) <= 2  # a side of 3 disc diameters
            assert np.abs(image[32, 32].astype(int) - CUP_RGB).max() < 40  # the photograph moved with the label
    datalist = os.path.join(out, "datalist.json")
    for domain in entries:
        items = load_decathlon_datalist(datalist, data_list_key=domain, base_dir=out)
        assert all(os.path.isfile(it["image"]) and os.path.isfile(it["label"]) for it in items)
    loaded = fundus_preprocessing(image_size=64)(load_decathlon_datalist(datalist, data_list_key="refuge_val")[0])
    assert tuple(loaded["label"].shape) == (2, 64, 64) and float(loaded["label"][1].sum()) > 0


def test_crop_in_pixels_pads_outside_the_photograph():
    disc, cup = _discs((100, 100), (16, 84), 15, 7)  # 31 pixels across, 1 pixel from the top
    image, label = crop_around_disc(_photo(disc, cup), disc, cup, parse_crop("62"), size=31)
    y0, y1, x0, x1 = _disc_box(label)
    assert abs((y1 - y0 + 1) - 15.5) <= 1.5  # 31 of 62 pixels: half the crop
    assert abs((y0 + y1) / 2 - 15) <= 1 and abs((x0 + x1) / 2 - 15) <= 1
    assert image[:5, :5].max() == 0 and label[:5, :5].max() == 0  # above the photograph: black, background


def test_parse_crop():
    assert parse_crop("512") == CropSize(512.0) and parse_crop("1.6x") == CropSize(1.6, per_disc=True)
    assert CropSize(1.6, per_disc=True).side(100) == 160 and str(parse_crop("1.6X")) == "1.6x"
    for bad in ("", "x", "-3", "0x", "wide", "inf"):
        with pytest.raises(BadInputError, match="crop side"):
            parse_crop(bad)


def _drishti_case(root, split, gt, case, with_cup=True):
    disc, cup = _discs((90, 120), (45, 60), 12, 6)
    _save(os.path.join(root, split, "Images", f"{case}.png"), _photo(disc, cup))
    soft = os.path.join(root, split, gt, case, "SoftMap")
    _save(os.path.join(soft, f"{case}_ODsegSoftmap.png"), np.where(disc, 255, 0).astype(np.uint8))
    if with_cup:
        _save(os.path.join(soft, f"{case}_cupsegSoftmap.png"), np.where(cup, 255, 0).astype(np.uint8))


def test_drishti_softmaps_thresholded_and_test_ground_truth(tmp_path, caplog):
    root = str(tmp_path / "Drishti-GS1_files" / "Drishti-GS1_files")
    _drishti_case(root, "Training", "GT", "drishtiGS_002")
    _drishti_case(root, "Training", "GT", "drishtiGS_004", with_cup=False)
    _drishti_case(root, "Test", "Test_GT", "drishtiGS_001")
    out = str(tmp_path / "prepared")
    with caplog.at_level(logging.WARNING):
        entries = prepare_drishti(str(tmp_path), out, size=32, crop="48")
    assert "drishtiGS_004_cupsegSoftmap.png" in caplog.text
    assert [os.path.basename(i["label"]) for i in entries["drishti_gs"]] == ["drishtiGS_002.png", "drishtiGS_001.png"]
    # four experts: a pixel half of them marked is stored as 127 or 128 and counts; a quarter (64) does not
    soft = os.path.join(root, "Training", "GT", "drishtiGS_002", "SoftMap")
    disc_path, cup_path = (os.path.join(soft, f"drishtiGS_002_{k}segSoftmap.png") for k in ("OD", "cup"))
    _save(disc_path, np.array([[0, 64, 127, 128, 191, 255]], np.uint8))
    disc, cup = softmap_disc_cup(disc_path, cup_path)
    assert disc.tolist() == [[False, False, True, True, True, True]]
    assert softmap_disc_cup(disc_path, cup_path, threshold=1.0)[0].tolist() == [[False] * 5 + [True]]


def test_rimone_by_hospital_splits(tmp_path):
    src = tmp_path / "RIM-ONE_DL"
    images = src / "RIM-ONE_DL_images" / "partitioned_by_hospital"
    masks = src / "RIM-ONE_DL_reference_segmentations"
    for split, label, case in (("training_set", "glaucoma", "r1_Im001"), ("test_set", "normal", "r2_Im002")):
        disc, cup = _discs((80, 70), (40, 35), 20, 9)
        _save(str(images / split / label / f"{case}.png"), _photo(disc, cup))
        _save(str(masks / label / f"{case}-1-Disc-T.png"), disc.astype(np.uint8) * 255)
        _save(str(masks / label / f"{case}-1-Cup-T.png"), cup.astype(np.uint8) * 255)
    out = str(tmp_path / "prepared")
    entries = prepare_rimone(str(src), out, splits=["train", "test"], size=32)
    assert entries == {
        domain: [{"image": f"{domain}/images/{case}.png", "label": f"{domain}/labels/{case}.png"}]
        for domain, case in (("rimone_dl_train", "r1_Im001"), ("rimone_dl_test", "r2_Im002"))
    }
    label = np.asarray(Image.open(os.path.join(out, entries["rimone_dl_test"][0]["label"])))
    y0, y1, _, _ = _disc_box(label)
    assert abs((y1 - y0 + 1) - 32 / 1.6) <= 2  # the default crop: 1.6 disc diameters


def _nifti(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([0.5, 0.5, 3.0, 1.0])), path)


def _gm_subject(root, subject, masks=("seg", "gmseg")):
    anat = os.path.join(root, subject, "anat")
    image = np.random.default_rng(0).random((24, 24, 3)).astype(np.float32)
    _nifti(os.path.join(anat, f"{subject}_run-1_T2starw.nii.gz"), image)
    cord, gm = _discs((24, 24), (12, 12), 6, 3)
    labels = os.path.join(root, "derivatives", "labels", subject, "anat")
    for kind, mask in (("seg", cord), ("gmseg", gm)):
        if kind in masks:
            volume = np.repeat(mask[..., None], 3, axis=2).astype(np.uint8)
            _nifti(os.path.join(labels, f"{subject}_run-1_T2starw_{kind}-manual.nii.gz"), volume)


def test_gmchallenge_sites_copies_and_bundle_loading(tmp_path, caplog):
    src = str(tmp_path / "gm-challenge-data")
    _gm_subject(src, "sub-9604")
    _gm_subject(src, "sub-9709Ses1")
    _gm_subject(src, "sub-9605", masks=("gmseg",))
    _gm_subject(src, "sub-20210728")
    out = str(tmp_path / "spinalcord")
    with caplog.at_level(logging.WARNING):
        entries = prepare_gmchallenge(src, out)
    assert "skipped sub-9605: no derivatives" in caplog.text and "skipped sub-20210728: no site" in caplog.text
    assert entries == {
        "philips": [{"image": "philips/images/sub-9604_T2starw.nii.gz", "label_gm": "philips/labels/sub-9604_gm.nii.gz",
                     "label_cord": "philips/labels/sub-9604_cord.nii.gz"}],
        "milan": [{"image": "milan/images/sub-9709Ses1_T2starw.nii.gz",
                   "label_gm": "milan/labels/sub-9709Ses1_gm.nii.gz",
                   "label_cord": "milan/labels/sub-9709Ses1_cord.nii.gz"}],
    }  # fmt: skip
    with open(os.path.join(src, "sub-9604", "anat", "sub-9604_run-1_T2starw.nii.gz"), "rb") as f:
        assert open(os.path.join(out, entries["philips"][0]["image"]), "rb").read() == f.read()
    assert set(prepare_gmchallenge(src, out, sites={"sub-20210728": "montreal"})) == {"philips", "milan", "montreal"}
    with open(os.path.join(out, "datalist.json")) as f:
        assert sorted(json.load(f)) == ["milan", "montreal", "philips"]
    item = load_decathlon_datalist(os.path.join(out, "datalist.json"), data_list_key="philips", base_dir=out)[0]
    loaded = volume_preprocessing(pixdim=(0.5, 0.5, -1), crop_size=(16, 16, -1))(item)
    assert tuple(loaded["label"].shape) == (1, 16, 16, 3) and set(loaded["label"].unique().tolist()) == {0, 1, 2}


def test_gmchallenge_pointer_file_is_named(tmp_path):
    src = tmp_path / "gm-challenge-data"
    _gm_subject(str(src), "sub-9604")
    (src / "sub-9604" / "anat" / "sub-9604_run-1_T2starw.nii.gz").write_text("version https://git-lfs.github.com\n")
    with pytest.raises(BadInputError, match="sub-9604_run-1_T2starw.nii.gz' is not a gzipped NIfTI"):
        prepare_gmchallenge(str(src), str(tmp_path / "out"))


def test_wrong_folders_and_options_are_named(refuge_source, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BadInputError, match="no Training400/ under .*expected REFUGE's train release"):
        prepare_refuge(str(empty), str(tmp_path / "out"))
    with pytest.raises(BadInputError, match="no Training/Images/ under .*Drishti-GS1"):
        prepare_drishti(refuge_source, str(tmp_path / "out"))
    with pytest.raises(BadInputError, match="no partitioned_by_hospital/training_set/ under"):
        prepare_rimone(refuge_source, str(tmp_path / "out"))
    with pytest.raises(BadInputError, match="no derivatives/labels/"):
        prepare_gmchallenge(refuge_source, str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        prepare_refuge(str(tmp_path / "absent"), str(tmp_path / "out"))
    with pytest.raises(BadInputError, match="--domain 'mine' names one domain"):
        prepare_refuge(refuge_source, str(tmp_path / "out"), splits=["train", "val"], domain="mine")
    assert not os.path.exists(tmp_path / "out")  # nothing written before the checks


def test_datalist_is_merged_and_a_domain_replaced(refuge_source, tmp_path):
    out = str(tmp_path / "prepared")
    prepare_refuge(refuge_source, out, splits=["val"], size=32, crop="2x")
    prepare_refuge(refuge_source, out, splits=["train"], domain="zeiss", size=32, crop="2x")
    prepare_refuge(refuge_source, out, splits=["val"], size=32, crop="2x")
    with open(os.path.join(out, "datalist.json")) as f:
        datalist = json.load(f)
    assert list(datalist) == ["refuge_val", "zeiss"] and len(datalist["refuge_val"]) == 1
    assert len(datalist["zeiss"]) == 2


def test_command_line(refuge_source, tmp_path, capsys):
    out = str(tmp_path / "prepared")
    cmd = [sys.executable, "-m", "monai_grata.data.prepare", "refuge", "--source", refuge_source, "--output", out,
           "--split", "val", "--size", "32", "--crop", "2x"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert "refuge_val: 1 items" in done.stdout and "RuntimeWarning" not in done.stderr
    assert os.path.isfile(os.path.join(out, "refuge_val", "labels", "V0001.png"))
    with pytest.raises(SystemExit) as exit_info:
        main(["drishti", "--source", refuge_source, "--output", out])
    assert exit_info.value.code == 2 and "error: no Training/Images/ under" in capsys.readouterr().err
