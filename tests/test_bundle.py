"""The bundle configs, run through ``python -m monai.bundle`` from the repo root as a user runs them."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from monai_grata.tta import read_shift_threshold
from monai_grata.utils import best_checkpoint, export_source_model, latest_checkpoint
from monai_grata.utils.compare_runs import collect_runs, format_table

from .conftest import CONFIG_DIR, REPO_ROOT

pytestmark = pytest.mark.slow  # each test runs `python -m monai.bundle` in a subprocess


def bundle(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600
    )


def config(name: str) -> str:
    return os.path.join(CONFIG_DIR, name)


def run_config(name: str, config_dir: str = CONFIG_DIR, **overrides) -> subprocess.CompletedProcess:
    """``monai.bundle run`` of ``config_dir/name`` with ``--key value`` overrides (CPU unless overridden)."""
    overrides.setdefault("device", "cpu")
    args = [item for key, value in overrides.items() for item in (f"--{key}", str(value))]
    return bundle("run", "--config_file", os.path.join(config_dir, name), *args)


def assert_ok(run: subprocess.CompletedProcess) -> str:
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout + run.stderr


def read_json(*parts: str) -> dict:
    with open(os.path.join(*parts)) as f:
        return json.load(f)


def mlflow_runs(output_dir: str, experiment: str):
    """The runs of ``experiment`` in ``output_dir/mlflow.db`` and a client bound to that store."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{output_dir}/mlflow.db")
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r} in {output_dir}"
    return client.search_runs([found.experiment_id]), client


SMALL = {"image_size": 64}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two iterations of train.json on the shipped sample, then one more epoch resumed from its checkpoint
    with another batch size."""
    out = str(tmp_path_factory.mktemp("train"))
    common = {"source": "drishti_gs", "output_dir": out, "max_iterations": 2, **SMALL}
    first = assert_ok(run_config("train.json", epochs=1, batch_size=2, **common))
    resumed = assert_ok(run_config("train.json", epochs=2, batch_size=3, **common))
    return out, first, resumed


@pytest.fixture(scope="module")
def source_model(trained, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("model") / "source.pt")
    export_source_model(trained[0], path)
    return path


def test_train_runs_validates_and_resumes(trained):
    out, first_log, resumed_log = trained
    assert "Epoch[1] Metrics" in first_log and "val_mean_dice" in first_log
    assert "Restored all variables from" in resumed_log and "Epoch[2] Metrics" in resumed_log
    assert "continues with batch_size=3 (logged as 2)" in resumed_log  # one MLflow run across the resume
    assert latest_checkpoint(out).endswith("epoch=2.pt")
    assert best_checkpoint(out) is not None
    runs, _ = mlflow_runs(out, "grata_source_training")
    assert [r.info.status for r in runs] == ["FINISHED"]  # one run across the resume, ended


def test_evaluate_on_sample(source_model, tmp_path):
    out = str(tmp_path / "eval")
    assert_ok(run_config("evaluate.json", target="refuge_val", ckpt_path=source_model, output_dir=out, **SMALL))
    metrics = read_json(out, "metrics.json")
    assert {"dice_od", "dice_oc", "dice_mean", "assd_od", "assd_oc", "n_images"} <= set(metrics)
    assert metrics["n_images"] == 8
    assert 0.0 <= metrics["dice_od"] <= 1.0 and 0.0 <= metrics["dice_oc"] <= 1.0
    with open(os.path.join(out, "per_image.csv")) as f:
        rows = f.read().strip().splitlines()
    assert rows[0].startswith("filename,dice_od,dice_oc") and len(rows) == 9
    assert [r.info.status for r in mlflow_runs(out, "grata_evaluate")[0]] == ["FINISHED"]


def assert_one_line_error(run: subprocess.CompletedProcess, *parts: str) -> str:
    """The run failed with one line ``error: ...`` naming ``parts`` last on stderr, and no traceback."""
    last = run.stderr.strip().splitlines()[-1]
    assert run.returncode != 0 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert last.startswith("error: ") and all(part in last for part in parts), last
    return last


def test_evaluate_missing_checkpoint_is_named(tmp_path):
    run = run_config("evaluate.json", ckpt_path=tmp_path / "nothing.pt", output_dir=tmp_path / "eval")
    assert_one_line_error(run, "checkpoint not found", "nothing.pt")


def test_train_empty_dataset_is_reported(tmp_path):
    (tmp_path / "site" / "images").mkdir(parents=True)
    run = run_config("train.json", dataset_dir=tmp_path, source="site", output_dir=tmp_path / "out")
    assert_one_line_error(run, "empty dataset")


def test_train_uda_bad_input_is_one_line(tmp_path):
    (tmp_path / "site" / "images").mkdir(parents=True)
    overrides = {"dataset_dir": tmp_path, "source": "site", "target": "site", "output_dir": tmp_path / "out"}
    run = run_config("train_uda.json", ckpt_path=tmp_path / "nothing.pt", **overrides)
    assert_one_line_error(run, "empty dataset", "site")


@pytest.mark.parametrize(
    "name,overrides,message",
    [
        ("train.json", {}, "the training split of 'refuge_train' has 6 images, fewer than one batch (--batch_size 8"),
        ("train_uda.json", {"batch_size": 8}, "the adaptation split of 'drishti_gs' has 4 images"),
    ],
)
def test_a_split_smaller_than_one_batch_is_a_one_line_error(tmp_path, name, overrides, message):
    run = run_config(name, output_dir=tmp_path / "out", epochs=1, **overrides, **SMALL)
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert message in run.stderr.strip().splitlines()[-1] and "or less" in run.stderr


def test_metadata_verifies_offline():
    schema = os.path.join(REPO_ROOT, "bundles", "grata", "docs", "metadata_schema.json")
    run = bundle("verify_metadata", "--meta_file", config("metadata.json"), "--filepath", schema)
    assert run.returncode == 0 and "metadata is verified with no error" in run.stdout + run.stderr


def test_network_in_out_verifies():
    run = bundle(
        "verify_net_in_out", "network_def", "--meta_file", config("metadata.json"),
        "--config_file", config("evaluate.json"), "--device", "cpu",
    )  # fmt: skip
    assert run.returncode == 0 and "data shape of network is verified with no error" in run.stdout + run.stderr


def test_inference_adapts_writes_masks_metrics_and_mlflow(source_model, tmp_path):
    out = str(tmp_path / "inference")
    overrides = {"target": "drishti_gs", "output_dir": out, "beta": 0.001, "method": "paper", **SMALL}
    run = run_config("inference.json", ckpt_path=source_model, **overrides)
    assert_ok(run)
    metrics = read_json(out, "metrics.json")
    assert {"dice_od", "dice_oc", "dice_mean", "assd_od", "assd_oc", "n_images", "no_adapt_dice_mean"} <= set(metrics)
    # the console ends with one short summary; no metrics dicts, no warnings a user cannot act on
    summary = run.stdout[run.stdout.index("Done: ") :].splitlines()
    method = read_json(out, "config.json")["method"]
    assert summary[0] == f"Done: source model 'refuge_train', adapted with {method}, 8 images in 1 domain."
    no_adapt, adapted = (float(v) for v in summary[2].split()[1:])
    assert summary[2].startswith("  all") and (no_adapt, adapted) == (
        pytest.approx(metrics["no_adapt_dice_mean"], abs=5e-4), pytest.approx(metrics["dice_mean"], abs=5e-4)
    )
    assert summary[3] == "Adaptation updated the weights on 8 of 8 batches."  # GraTa's paper lr is never 0
    assert summary[4].startswith(f"Outputs in {out}: masks/") and "overlays/" in summary[4]
    assert "mlflow ui --backend-store-uri sqlite:///" in summary[5] and len(summary) == 7
    # MONAI's own notice that a config runs code ("parsing config_file ...") is MONAI's to print (docs/install.md)
    noises = ("get_mask_edges", "resuming from iteration", "new best metric", "metrics: ")
    for noise in (*noises, "is all 0", "dice: "):
        assert noise not in run.stdout + run.stderr, noise
    overlays = sorted(os.listdir(os.path.join(out, "overlays")))
    assert overlays == [m.replace("_mask.png", "_overlay.png") for m in sorted(os.listdir(os.path.join(out, "masks")))]
    assert metrics["n_images"] == 8 and 0 <= metrics["dice_mean"] <= 1
    masks = sorted(os.listdir(os.path.join(out, "masks")))
    assert len(masks) == 8 and all(m.endswith("_mask.png") for m in masks)
    mask = np.asarray(Image.open(os.path.join(out, "masks", masks[0])))
    assert mask.shape == (256, 256) and set(np.unique(mask)) <= {0, 1, 2}
    for name in ("config.json", "per_image.csv", "stream.png", "no_adapt_metrics.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert read_json(out, "config.json")["target"] == "drishti_gs"

    runs, client = mlflow_runs(out, "grata_inference")
    assert len(runs) == 1
    run_id, params = runs[0].info.run_id, runs[0].data.params
    assert params["method"] == "paper" and params["adapter"] == "grata"  # the paper preset runs GraTa
    assert params["target"] == "drishti_gs" and params["beta"] == "0.001"
    assert params["bn_prior"] == "0.0" and params["steps"] == "1"  # every option as it ran, one param each
    assert runs[0].data.metrics["dice_mean"] == pytest.approx(metrics["dice_mean"])
    assert len(client.get_metric_history(run_id, "cos")) == 8
    assert len(client.get_metric_history(run_id, "stream/dice_od")) == 8
    assert not client.get_metric_history(run_id, "stream/cos")  # logged once, as "cos"
    table = format_table(collect_runs([out], "grata_inference"), ["method", "target"], ["dice_mean"])
    assert "| paper | drishti_gs |" in table and f"{metrics['dice_mean']:.4g}" in table
    cos = sorted(m.value for m in client.get_metric_history(run_id, "cos"))
    (row,) = collect_runs([out], "grata_inference", history=["cos"])
    assert (row["metrics.cos_min"], row["metrics.cos_median"], row["metrics.cos_max"]) == (cos[0], cos[3], cos[-1])
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.json", "metrics.json", "per_image.csv", "stream.png"} <= artifacts


@pytest.mark.parametrize("overrides,beta", [({"beta": 1e-4}, "0.0001"), ({}, "0.001")])
def test_inference_logs_the_options_that_ran(overrides, beta, tmp_path):
    # preset < bundle config < command line: `--method grata_calibrated --beta 1e-4` runs (and logs) 1e-4, although
    # 1e-4 is also GraTa's own default; without --beta the preset's 1e-3 runs
    out = str(tmp_path / "out")
    method = "grata_calibrated"
    assert_ok(run_config("inference.json", method=method, max_images=2, output_dir=out, **overrides, **SMALL))
    runs, _ = mlflow_runs(out, "grata_inference")
    params = runs[0].data.params
    assert params["method"] == method and params["adapter"] == "grata" and params["beta"] == beta
    # the gate's threshold as calibrated for the shipped refuge_train model, not a hand-set number
    calibrated = read_shift_threshold(os.path.join(REPO_ROOT, "bundles", "grata", "models", "source_refuge_train.pt"))
    assert (params["steps"], float(params["min_shift"]), params["bn_prior"]) == ("3", calibrated, "256.0")
    assert "tent_lr" not in params and "lr" not in params  # nothing that did not run


def test_inference_on_unlabelled_nifti_folder(source_model, tmp_path):
    import nibabel as nib

    folder = tmp_path / "scans"
    folder.mkdir()
    for i in range(2):
        image = np.random.default_rng(i).random((50, 60, 3)).astype(np.float32)
        nib.save(nib.Nifti1Image(image, np.eye(4)), str(folder / f"scan{i}.nii.gz"))
    out = str(tmp_path / "out")
    overrides = {"ckpt_path": source_model, "dataset_dir": folder, "output_dir": out}
    # a model trained without the source data at hand has no gate calibration: the default says how to make it, and
    # the ungated stem needs none
    missing = run_config("inference.json", **overrides, **SMALL)
    assert_one_line_error(missing, "no shift calibration beside", "python -m monai_grata.utils.calibrate_shift")
    assert_ok(run_config("inference.json", method="stem_statistics", **overrides, **SMALL))
    masks = sorted(os.listdir(os.path.join(out, "masks")))
    assert masks == ["scan0_mask.nii.gz", "scan1_mask.nii.gz"]
    assert nib.load(os.path.join(out, "masks", masks[0])).shape[:2] == (50, 60)
    assert not os.path.exists(os.path.join(out, "metrics.json"))


def test_inference_on_a_folder_mixing_nifti_and_png(tmp_path):
    import nibabel as nib

    folder = tmp_path / "scans"
    folder.mkdir()
    scan = np.random.default_rng(0).random((50, 60, 3)).astype(np.float32)
    nib.save(nib.Nifti1Image(scan, np.eye(4)), str(folder / "a.nii.gz"))
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(folder / "b.png")
    out = tmp_path / "out"
    assert_ok(run_config("inference.json", dataset_dir=folder, output_dir=out, **SMALL))
    assert sorted(os.listdir(out / "masks")) == ["a_mask.nii.gz", "b_mask.png"]
    assert nib.load(str(out / "masks" / "a_mask.nii.gz")).shape[:2] == (50, 60)
    assert np.asarray(Image.open(out / "masks" / "b_mask.png")).shape == (40, 30)


@pytest.fixture
def mixed_folder(tmp_path):
    """A labelled folder: an RGB, a grayscale and an RGBA image (all usable) and a file that is no image."""
    rng = np.random.default_rng(0)
    for sub in ("images", "labels"):
        (tmp_path / "mixed" / sub).mkdir(parents=True)
    for name, channels in (("a_rgb", 3), ("b_gray", 1), ("c_rgba", 4)):
        image = rng.integers(0, 255, (48, 56, channels), dtype=np.uint8)
        path = tmp_path / "mixed" / "images" / f"{name}.png"
        Image.fromarray(image[..., 0] if channels == 1 else image).save(path)
        label = np.zeros((48, 56), np.uint8)
        label[10:30, 10:30], label[15:25, 15:25] = 1, 2
        Image.fromarray(label).save(tmp_path / "mixed" / "labels" / f"{name}.png")
    (tmp_path / "mixed" / "images" / "d_broken.png").write_text("not an image")
    return tmp_path / "mixed"


def test_inference_refuses_a_bad_file_before_adapting(mixed_folder, tmp_path):
    out = tmp_path / "out"
    run = run_config("inference.json", dataset_dir=mixed_folder, output_dir=out, **SMALL)
    assert run.returncode != 0 and "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 1 bad input: image ") and "d_broken.png' cannot be read" in last
    assert "--on_bad_input skip" in last and not (out / "masks").exists()


def test_inference_skips_a_bad_file_and_lists_it(mixed_folder, tmp_path):
    out = tmp_path / "out"
    overrides = {"dataset_dir": mixed_folder, "output_dir": out, "on_bad_input": "skip", **SMALL}
    log = assert_ok(run_config("inference.json", **overrides))
    assert "skipping image" in log and "d_broken.png" in log
    assert sorted(os.listdir(out / "masks")) == ["a_rgb_mask.png", "b_gray_mask.png", "c_rgba_mask.png"]
    metrics = read_json(str(out), "metrics.json")
    assert metrics["n_images"] == 3 and metrics["n_skipped"] == 1
    (skipped,) = metrics["skipped"]
    assert skipped["image"].endswith("d_broken.png") and "cannot be read" in skipped["reason"]


def test_inference_that_fails_mid_stream_ends_its_mlflow_run_failed(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "masks").write_text("a file where the masks folder should be: writing the first mask fails")
    run = run_config("inference.json", output_dir=out, method="none", **SMALL)
    assert run.returncode != 0
    runs, _ = mlflow_runs(str(out), "grata_inference")
    assert [r.info.status for r in runs] == ["FAILED"] and "masks" in runs[0].data.tags["error"]
    assert not (out / "metrics.json").exists()


def test_ctrl_c_leaves_no_running_run_and_no_partial_file(tmp_path):
    import re
    import signal
    import threading

    out = tmp_path / "out"
    # GraTa at 256 px takes seconds per image, so the interrupt lands mid-stream (with 'none' at 64 px the run
    # could finish before the signal arrived)
    args = ["--output_dir", str(out), "--device", "cpu", "--method", "paper"]
    process = subprocess.Popen(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", config("inference.json"), *args],
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        # the job must see Ctrl-C as a user's shell delivers it, whatever SIGINT handling this process inherited
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    stderr, started = [], threading.Event()

    def read():  # the progress bar shows an iteration once the engine (and its MLflow run) has started
        while char := process.stderr.read(1):
            stderr.append(char)
            if not started.is_set() and re.search(r"adapting \(paper\)\S* \[1/", "".join(stderr[-200:])):
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert started.wait(timeout=300), "".join(stderr)[-3000:]
    process.send_signal(signal.SIGINT)
    process.wait(timeout=300)  # run_interruptibly stops after the image in flight (seconds)
    reader.join(timeout=10)
    runs, _ = mlflow_runs(str(out), "grata_inference")
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    assert process.returncode != 0 and "KeyboardInterrupt" in "".join(stderr)
    assert "stopping after the current iteration" in "".join(stderr)
    assert [r.info.status for r in runs] == ["FAILED"] and runs[0].data.tags["error"] == "KeyboardInterrupt"
    assert not (out / "metrics.json").exists()


def test_inference_sweep_of_odd_images(tmp_path):
    """A constant and a 5000 x 5000 image are segmented; a 1 x 1 image and a NIfTI with NaN pixels are skipped."""
    import nibabel as nib

    folder = tmp_path / "odd"
    folder.mkdir()
    Image.fromarray(np.full((50, 60, 3), 90, np.uint8)).save(folder / "constant.png")
    ramp = np.tile(np.linspace(0, 255, 5000).astype(np.uint8), (5000, 1))
    Image.fromarray(np.stack([ramp] * 3, -1)).save(folder / "huge.png")
    Image.fromarray(np.full((1, 1, 3), 90, np.uint8)).save(folder / "dot.png")
    nan = np.random.default_rng(0).random((40, 50, 3)).astype(np.float32)
    nan[:5, :5] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), str(folder / "nan.nii.gz"))
    out = tmp_path / "out"
    log = assert_ok(run_config("inference.json", dataset_dir=folder, output_dir=out, on_bad_input="skip", **SMALL))
    assert sorted(os.listdir(out / "masks")) == ["constant_mask.png", "huge_mask.png"]
    assert np.asarray(Image.open(out / "masks" / "huge_mask.png")).shape == (5000, 5000)
    assert sorted(os.listdir(out / "overlays")) == ["constant_overlay.png", "huge_overlay.png"]
    assert "Skipped 2 bad input(s)" in log and "is 1x1: too small" in log and "has 75 NaN/Inf pixels" in log


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"ckpt_path": "README.md"}, "cannot read checkpoint 'README.md' (truncated or not a torch file?)"),
        ({"output_dir": "README.md"}, "output folder 'README.md' cannot be written: File exists"),
        ({"datalist": "absent.json", "target": "x"}, "datalist not found: 'absent.json'"),
        ({"on_bad_input": "ignore"}, "--on_bad_input must be one of error|skip, got 'ignore'"),
    ],
)
def test_inference_bad_options_are_one_line_errors(overrides, message, tmp_path):
    run = run_config("inference.json", **{"output_dir": str(tmp_path / "out"), **overrides})
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith(f"error: {message}")


@pytest.mark.parametrize("alignment,harmonization", [("adversarial", "gh++"), ("entropy", "gh")])
def test_train_uda_few_iterations(source_model, tmp_path, alignment, harmonization):
    out = str(tmp_path / "uda")
    log = assert_ok(
        run_config(
            "train_uda.json", ckpt_path=source_model, source="refuge_train", target="drishti_gs", alignment=alignment,
            harmonization=harmonization, lam=0.5, epochs=1, max_iterations=3, batch_size=2, output_dir=out, **SMALL,
        )
    )  # fmt: skip
    assert "tau1:" in log and "conflict:" in log and "val_mean_dice" in log
    assert read_json(out, "harmonization.json")["iterations"] == 3
    assert os.path.isfile(os.path.join(out, "inner_products.png"))
    runs, client = mlflow_runs(out, "grata_uda")
    params = runs[0].data.params
    assert params["harmonization"] == harmonization and params["alignment"] == alignment
    assert len(client.get_metric_history(runs[0].info.run_id, "tau1")) == 3
    assert len(client.get_metric_history(runs[0].info.run_id, "val_mean_dice")) == 1
    metrics = read_json(out, "metrics.json")
    assert metrics["iterations"] == 3 and metrics["n_images"] == 4  # half of the 8 sample images is held out
    assert 0.0 <= metrics["dice_mean"] <= 1.0
    assert metrics["dice_mean"] == read_json(out, "target_metrics.json")["dice_mean"]


def test_train_uda_resume_keeps_the_inner_product_history(source_model, tmp_path):
    out = str(tmp_path / "uda")
    common = {"ckpt_path": source_model, "alignment": "entropy", "max_iterations": 2, "batch_size": 2, **SMALL}
    assert_ok(run_config("train_uda.json", epochs=1, output_dir=out, **common))
    assert_ok(run_config("train_uda.json", epochs=2, output_dir=out, **common))
    assert read_json(out, "harmonization.json")["iterations"] == 4
    assert read_json(out, "metrics.json")["iterations"] == 4


def test_train_uda_evaluate_source_scores_the_held_out_split_without_training(source_model, tmp_path):
    out = str(tmp_path / "source_only")
    assert_ok(run_config("train_uda.json", run_id="evaluate_source", ckpt_path=source_model, output_dir=out, **SMALL))
    metrics = read_json(out, "metrics.json")
    assert metrics["iterations"] == 0 and metrics["conflict_fraction"] is None and metrics["n_images"] == 4
    assert 0.0 <= metrics["dice_mean"] <= 1.0
    assert not [f for f in os.listdir(out) if f.startswith("last_checkpoint")]
    assert [r.info.status for r in mlflow_runs(out, "grata_uda")[0]] == ["FINISHED"]


def test_train_uda_rejects_unknown_alignment(source_model, tmp_path):
    run = run_config("train_uda.json", ckpt_path=source_model, alignment="mmd", output_dir=tmp_path / "uda")
    assert run.returncode != 0 and "alignment must be adversarial or entropy" in run.stderr


@pytest.mark.parametrize("name", ["train.json", "train_uda.json"])
def test_training_loss_is_sigmoid_dice_plus_per_channel_bce(name):
    import torch
    import torch.nn.functional as F
    from monai.bundle import ConfigParser
    from monai.losses import DiceLoss

    parser = ConfigParser()
    parser.read_config(config(name))
    loss = parser.get_parsed_content("loss")
    logits, target = torch.randn(2, 2, 8, 8), (torch.rand(2, 2, 8, 8) > 0.5).float()
    target[:, 1] *= target[:, 0]  # nested: the cup lies inside the disc
    expected = DiceLoss(sigmoid=True)(logits, target) + F.binary_cross_entropy_with_logits(logits, target)
    torch.testing.assert_close(loss(logits, target), expected)
