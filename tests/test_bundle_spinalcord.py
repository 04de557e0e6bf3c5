"""The spinal-cord bundle's configs, run through ``python -m monai.bundle`` from the repo root as a user runs them."""

import glob
import json
import os

import nibabel as nib
import numpy as np
import pytest

from .conftest import REPO_ROOT
from .test_bundle import assert_ok, assert_one_line_error, bundle, mlflow_runs
from .test_bundle import run_config as run_bundle_config

pytestmark = pytest.mark.slow  # each test runs `python -m monai.bundle` in a subprocess

BUNDLE = os.path.join(REPO_ROOT, "bundles", "spinalcord_gm")


def run_config(name: str, **overrides):
    return run_bundle_config(name, os.path.join(BUNDLE, "configs"), **overrides)


def test_metadata_verifies_offline():
    schema = os.path.join(BUNDLE, "docs", "metadata_schema.json")
    run = bundle(
        "verify_metadata", "--meta_file", os.path.join(BUNDLE, "configs", "metadata.json"), "--filepath", schema
    )
    assert run.returncode == 0 and "metadata is verified with no error" in run.stdout + run.stderr


def test_main_job_adapts_the_sample_and_writes_nifti_on_each_input_grid(tmp_path):
    out = tmp_path / "inference"
    printed = assert_ok(run_config("inference.json", output_dir=out))
    assert "adapted with default, 2 images in 2 domains" in printed and "Dice (cord, GM mean)" in printed
    images = sorted(glob.glob(os.path.join(BUNDLE, "sample", "*", "images", "*.nii.gz")))
    assert len(images) == 2
    codes = set()
    for image_path in images:
        name = os.path.basename(image_path).replace(".nii.gz", "_mask.nii.gz")
        mask, image = nib.load(str(out / "masks" / name)), nib.load(image_path)
        assert mask.shape == image.shape
        np.testing.assert_allclose(mask.affine, image.affine, atol=1e-5)
        assert nib.aff2axcodes(mask.affine) == nib.aff2axcodes(image.affine)
        codes.add("".join(nib.aff2axcodes(image.affine)))
        assert set(np.unique(np.asarray(mask.dataobj)).tolist()) <= {0, 1, 2}
    assert codes == {"LPS", "LAS"}  # the philips sample is LPS
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("dice_cord", "dice_gm", "assd_cord", "assd_gm", "no_adapt_dice_cord", "no_adapt_dice_gm"):
        assert key in metrics, key
    assert metrics["n_images"] == 2 and {"philips/dice_gm", "milan/dice_cord"} <= set(metrics)
    runs, _ = mlflow_runs(str(out), "spinalcord_inference")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    params = runs[0].data.params
    assert params["method"] == "default" and params["num_patches"] == "4"
    assert params["adapter"] == "norm" and params["bn_prior"] == "inf"  # as it ran
    assert (params["bn_first_layers"], params["bn_first_prior"]) == ("1", "0.0")
    assert "dice_mean" in runs[0].data.metrics


def test_train_and_evaluate_report_a_bad_input_in_one_line(tmp_path):
    run = run_config("train.json", dataset_dir=tmp_path, output_dir=tmp_path / "train")
    assert_one_line_error(run, "image folder not found", str(tmp_path))
    run = run_config("evaluate.json", ckpt_path=tmp_path / "nothing.pt", output_dir=tmp_path / "eval")
    assert_one_line_error(run, "checkpoint not found", "nothing.pt")


def test_train_then_evaluate_on_the_sample(tmp_path):
    train_dir = tmp_path / "train"
    assert_ok(run_config("train.json", output_dir=train_dir, sources="['philips']", epochs=1))
    checkpoint = train_dir / "source.pt"
    assert checkpoint.is_file()
    out = tmp_path / "evaluate"
    printed = assert_ok(run_config("evaluate.json", output_dir=out, ckpt_path=checkpoint))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_images"] == 2 and "assd_gm" in metrics and '"dice_cord"' in printed
    assert len(list((out / "masks").glob("*_mask.nii.gz"))) == 2
