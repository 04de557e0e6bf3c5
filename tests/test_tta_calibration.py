from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from monai_grata.data import BadInputError, MissingInputError
from monai_grata.networks import save_half_precision
from monai_grata.tta import AdaptiveBatchNorm, BatchNormPolicy, GraTa, batch_norm_shift, convert_to_adaptive_batch_norm
from monai_grata.tta.calibration import (
    first_layer_calibration,
    first_layer_divergences,
    first_shift_threshold,
    load_shift_calibration,
    per_batch_shifts,
    read_first_shift_threshold,
    read_shift_threshold,
    save_shift_calibration,
    shift_calibration,
    shift_calibration_path,
    shift_threshold,
)
from monai_grata.utils import export_source_model
from monai_grata.utils.calibrate_shift import _batches, calibration_items, config_overrides, default_config_path, main


def _tiny_net(seed: int = 0) -> nn.Module:
    """A small conv net whose BatchNorm running statistics are those of 'in-domain' images (mean 0.5, std 0.1)."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4),
        nn.ReLU(), nn.Conv2d(4, 2, 1),
    )  # fmt: skip
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # a cumulative average: the running statistics are the in-domain ones
    net.train()
    with torch.no_grad():
        for _ in range(20):
            net(0.5 + 0.1 * torch.randn(4, 3, 16, 16))
    return net.eval()


def _images(n: int, mean: float, std: float, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [mean + std * torch.randn(1, 3, 16, 16, generator=g) for _ in range(n)]


def test_rule_puts_threshold_between_in_domain_and_shifted_images():
    net = _tiny_net()
    in_domain = per_batch_shifts(net, _images(12, 0.5, 0.1, seed=1), bn_prior=256)
    shifted = per_batch_shifts(net, _images(12, 0.9, 0.3, seed=2), bn_prior=256)
    threshold = shift_threshold(in_domain)
    assert np.mean(in_domain) < threshold < np.mean(shifted)
    assert threshold == pytest.approx(np.mean(in_domain) + 2 * np.std(in_domain, ddof=1) / math.sqrt(10))


def test_shifts_are_measured_as_the_gate_measures_them_and_leave_the_model_alone():
    net, x = _tiny_net(), _images(1, 0.8, 0.2, seed=3)[0]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    (shift,) = per_batch_shifts(net, [x], bn_prior=256)
    assert not any(isinstance(m, AdaptiveBatchNorm) for m in net.modules())  # a copy was configured, not the model
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    reference = batch_norm_shift(convert_to_adaptive_batch_norm(_tiny_net().eval(), BatchNormPolicy(prior=256.0)), x)
    assert shift == pytest.approx(float(reference), rel=1e-6)
    gate = GraTa(_tiny_net(), normalization=BatchNormPolicy(prior=256), min_shift=0.0, seed=0, multilabel=True)
    gate(x)
    assert float(gate.last_step.stream_shift) == pytest.approx(shift, rel=1e-5)


def test_threshold_rule_formula_and_bad_input():
    assert shift_threshold([0.1, 0.2, 0.3]) == pytest.approx(0.2 + 2 * 0.1 / math.sqrt(10))
    assert shift_threshold([0.1, 0.3], z=1.0, n_stream=1) == pytest.approx(0.2 + math.sqrt(0.02))
    with pytest.raises(BadInputError, match="at least 2"):
        shift_threshold([0.1])
    with pytest.raises(BadInputError, match="non-finite"):
        shift_threshold([0.1, float("nan")])


def test_first_layer_rule_gauges_the_stem_as_the_gate_does():
    net = _tiny_net()
    in_domain = first_layer_divergences(net, _images(12, 0.5, 0.1, seed=1))
    shifted = first_layer_divergences(net, _images(12, 0.9, 0.3, seed=2))
    threshold = first_shift_threshold(in_domain)
    assert threshold == pytest.approx(1.5 * float(np.quantile(in_domain, 0.9)))
    assert np.mean(in_domain) < threshold < min(shifted)
    x = _images(1, 0.8, 0.2, seed=3)[0]
    (divergence,) = first_layer_divergences(net, [x])
    stem = convert_to_adaptive_batch_norm(_tiny_net(), BatchNormPolicy(prior=math.inf, first_layers=1))
    with torch.no_grad():  # the divergence measured is the one the gate compares: just above it shut, below open
        for factor, expected in ((1.01, _tiny_net()(x)), (0.99, stem(x))):
            policy = BatchNormPolicy(prior=math.inf, first_layers=1, first_min_shift=factor * divergence)
            torch.testing.assert_close(convert_to_adaptive_batch_norm(_tiny_net(), policy)(x), expected)
        assert not torch.allclose(_tiny_net()(x), stem(x), atol=1e-3)
    with pytest.raises(BadInputError, match="at least 2"):
        first_shift_threshold([0.1])
    with pytest.raises(BadInputError, match="non-finite"):
        first_shift_threshold([0.1, float("inf")])


def _checkpoint(tmp_path, name: str = "source_x.pt") -> str:
    path = str(tmp_path / name)
    save_half_precision(_tiny_net(), path)
    return path


def test_calibration_file_round_trip(tmp_path):
    ckpt = _checkpoint(tmp_path)
    assert shift_calibration_path(ckpt) == str(tmp_path / "source_x.shift.json")
    calibration = shift_calibration([0.05, 0.1, 0.15, 0.4], bn_prior=256, split="x: held-out validation split")
    assert save_shift_calibration(ckpt, calibration) == shift_calibration_path(ckpt)
    stored = load_shift_calibration(ckpt)
    assert stored["images"] == 4 and stored["bn_prior"] == 256.0 and "rule" in stored
    assert stored["per_image"]["max"] == pytest.approx(0.4) and stored["per_image"]["q50"] == pytest.approx(0.125)
    assert read_shift_threshold(ckpt) == pytest.approx(shift_threshold([0.05, 0.1, 0.15, 0.4]), abs=1e-6)
    assert read_shift_threshold(ckpt, bn_prior=256) == read_shift_threshold(ckpt)
    with pytest.raises(BadInputError, match="bn_prior 256.*with 64"):
        read_shift_threshold(ckpt, bn_prior=64)
    with pytest.raises(MissingInputError, match="no first-layer threshold: run python -m"):
        read_first_shift_threshold(ckpt)
    first = first_layer_calibration([0.1, 0.2, 0.3, 0.4, 0.5], split="x: training split")
    save_shift_calibration(ckpt, {**calibration, "first_layer": first})
    assert read_first_shift_threshold(ckpt) == pytest.approx(1.5 * 0.46) and first["images"] == 5
    assert read_first_shift_threshold(ckpt, site=True) == pytest.approx(0.46)  # the 90th percentile itself
    del first["site_min_shift"]  # a calibration written before the site gate
    save_shift_calibration(ckpt, {**calibration, "first_layer": first})
    with pytest.raises(MissingInputError, match="no first-layer site gate: run python -m"):
        read_first_shift_threshold(ckpt, site=True)


def test_stale_or_foreign_calibration_is_refused(tmp_path):
    ckpt = _checkpoint(tmp_path)
    save_shift_calibration(ckpt, shift_calibration([0.1, 0.2], bn_prior=256, split="x"))
    save_half_precision(_tiny_net(seed=1), ckpt)  # new weights, old calibration
    with pytest.raises(BadInputError, match="other weights"):
        read_shift_threshold(ckpt)
    with open(shift_calibration_path(ckpt), "w") as f:
        json.dump({"threshold": 0.2}, f)
    with pytest.raises(BadInputError, match="not a shift calibration"):
        read_shift_threshold(ckpt)


def test_missing_calibration_says_how_in_one_line(tmp_path):
    ckpt = _checkpoint(tmp_path, "model.pt")
    with pytest.raises(MissingInputError) as err:
        read_shift_threshold(ckpt)
    message = str(err.value)
    assert "\n" not in message
    assert message == (
        f"no shift calibration beside {ckpt}: run python -m monai_grata.utils.calibrate_shift --ckpt_path {ckpt} "
        "--dataset_dir DIR --source DOMAIN"
    )


def _bundle(tmp_path, n_images: int = 10) -> tuple[str, str]:
    """A dataset of synthetic PNGs in the folder layout (``site_a/images``) and a bundle with a tiny U-Net."""
    rng = np.random.default_rng(0)
    images = tmp_path / "data" / "site_a" / "images"
    images.mkdir(parents=True)
    for i in range(n_images):
        pixels = (rng.random((40, 36, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(images / f"img_{i:02d}.png")
    (tmp_path / "bundle" / "configs").mkdir(parents=True)
    config = {
        "image_size": 32,
        "network_def": {
            "_target_": "monai.networks.nets.UNet", "spatial_dims": 2, "in_channels": 3, "out_channels": 2,
            "channels": [4, 8], "strides": [2], "num_res_units": 0, "norm": "batch",
        },
        "preprocessing": {"_target_": "monai_grata.data.fundus_preprocessing", "image_size": "@image_size"},
    }  # fmt: skip
    with open(tmp_path / "bundle" / "configs" / "inference.json", "w") as f:
        json.dump(config, f)
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(
        spatial_dims=2, in_channels=3, out_channels=2, channels=[4, 8], strides=[2], num_res_units=0, norm="batch"
    )
    with torch.no_grad():
        net.train()(torch.rand(4, 3, 32, 32))  # non-trivial running statistics
    ckpt = str(tmp_path / "bundle" / "models" / "source_site_a.pt")
    save_half_precision(net, ckpt)
    return str(tmp_path / "data"), ckpt


def test_command_calibrates_a_model_on_its_validation_split(tmp_path, capsys):
    dataset_dir, ckpt = _bundle(tmp_path)
    assert default_config_path(ckpt) == str(tmp_path / "bundle" / "configs" / "inference.json")
    calibration = main(["--ckpt_path", ckpt, "--dataset_dir", dataset_dir, "--source", "site_a"])
    assert calibration["path"] == shift_calibration_path(ckpt) and os.path.isfile(calibration["path"])
    assert calibration["images"] == 2  # the 20 % train.json holds out of 10 images
    assert calibration["split"] == "site_a: held-out validation split (val_fraction 0.2, seed 0)"
    assert read_shift_threshold(ckpt, bn_prior=256) == pytest.approx(calibration["min_shift"])
    assert calibration["first_layer"]["images"] == 8  # the training split: the other 80 %
    assert calibration["first_layer"]["split"] == "site_a: training split (val_fraction 0.2 held out, seed 0)"
    assert read_first_shift_threshold(ckpt) == pytest.approx(calibration["first_layer"]["min_shift"])
    assert read_first_shift_threshold(ckpt, site=True) == pytest.approx(calibration["first_layer"]["site_min_shift"])
    assert "first-layer min_shift" in capsys.readouterr().out
    everything = main(["--ckpt_path", ckpt, "--dataset_dir", dataset_dir, "--source", "site_a", "--split", "all",
                       "--image_size", "64"])  # fmt: skip
    assert everything["images"] == 10 and everything["split"] == "site_a: all images"
    os.remove(calibration["path"])
    first = main(["--ckpt_path", ckpt, "--dataset_dir", dataset_dir, "--source", "site_a", "--split", "all",
                  "--max_images", "3", "--dry_run"])  # fmt: skip
    assert first["images"] == 3 and first["split"] == "site_a: all images, first 3" and first["path"] is None
    assert not os.path.exists(shift_calibration_path(ckpt))
    printed = capsys.readouterr().out.splitlines()[-3:]  # the dry run shows where each image falls
    assert [line.split()[1] for line in printed] == [m["image"] for m in first["shifts"]]
    shifts = [m["shift"] for m in first["shifts"]]
    assert [float(line.split()[0]) for line in printed] == pytest.approx(shifts, abs=1e-4)


def test_command_refuses_a_missing_config_and_bad_overrides(tmp_path):
    dataset_dir, ckpt = _bundle(tmp_path, n_images=3)
    with pytest.raises(MissingInputError, match="bundle config not found"):
        main(["--ckpt_path", ckpt, "--dataset_dir", dataset_dir, "--source", "site_a", "--config", "nope.json"])
    with pytest.raises(BadInputError, match="--decodr: not a key of config"):
        main(["--ckpt_path", ckpt, "--dataset_dir", dataset_dir, "--source", "site_a", "--decodr", "authors"])
    with pytest.raises(BadInputError, match="--key value pairs"):
        config_overrides(["--decoder"])
    assert config_overrides(["--decoder", "authors", "--image_size", "64"]) == {"decoder": "authors", "image_size": 64}
    with pytest.raises(BadInputError, match="--split"):
        calibration_items(dataset_dir, ["site_a"], split="test")


def test_volumes_are_measured_on_the_patches_the_adapter_takes():
    volume = torch.rand(1, 20, 20, 5)
    batches = list(
        _batches([{"image": "v"}], lambda item: {"image": volume}, ((8, 8, -1), 3, 0.25), torch.device("cpu"))
    )
    assert len(batches) == 1 and tuple(batches[0].shape) == (3, 1, 8, 8, 5)


def test_export_writes_the_calibration_when_given_the_data(tmp_path):
    dataset_dir, ckpt = _bundle(tmp_path)
    train_dir = tmp_path / "train"
    train_dir.mkdir()
    torch.save(torch.load(ckpt, weights_only=True), train_dir / "network_key_metric=0.9.pt")
    out = str(tmp_path / "bundle" / "models" / "source_new.pt")
    export_source_model(str(train_dir), out, calibrate={"dataset_dir": dataset_dir, "sources": ["site_a"]})
    assert load_shift_calibration(out)["images"] == 2
    plain = str(tmp_path / "bundle" / "models" / "source_plain.pt")
    export_source_model(str(train_dir), plain)
    assert not os.path.exists(shift_calibration_path(plain))


def test_export_command_calibrates_with_the_data_and_overrides(tmp_path, capsys):
    from monai_grata.utils.export_source import main as export_main

    dataset_dir, ckpt = _bundle(tmp_path)
    train_dir = tmp_path / "train"
    train_dir.mkdir()
    torch.save(torch.load(ckpt, weights_only=True), train_dir / "network_key_metric=0.9.pt")
    out = str(tmp_path / "bundle" / "models" / "source_cli.pt")
    export_main([str(train_dir), out, "--dataset_dir", dataset_dir, "--source", "site_a", "--image_size", "64"])
    assert load_shift_calibration(out)["images"] == 2
    with pytest.raises(SystemExit):
        export_main([str(train_dir), out, "--dataset_dir", dataset_dir])  # no --source
    export_main([str(train_dir), str(tmp_path / "bundle" / "models" / "source_plain.pt")])
    assert "no shift calibration: run python -m monai_grata.utils.calibrate_shift" in capsys.readouterr().out
