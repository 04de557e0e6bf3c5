import csv
import json
import math
import os

import pytest
import torch

from monai_grata.networks import resunet
from monai_grata.utils import (
    best_checkpoint,
    export_run_config,
    export_source_model,
    latest_checkpoint,
    mean_dice_of_rows,
    prune_checkpoints,
    read_per_image_csv,
    write_metrics,
)

from .conftest import CONFIG_DIR


def test_export_run_config_applies_overrides(tmp_path):
    path = str(tmp_path / "config.json")
    argv = [
        "run",
        "--config_file",
        os.path.join(CONFIG_DIR, "inference.json"),
        "--beta",
        "0.001",
        "--target=drishti_gs",
    ]
    export_run_config(path, argv=argv)
    with open(path) as f:
        config = json.load(f)
    assert config["beta"] == 0.001 and config["target"] == "drishti_gs" and config["method"] == "default"


def test_export_run_config_without_config_file(tmp_path):
    path = str(tmp_path / "config.json")
    export_run_config(path, argv=["--foo", "1"])
    with open(path) as f:
        assert json.load(f) == {"argv": ["--foo", "1"]}


def test_checkpoint_discovery_and_export(tmp_path):
    net = resunet(backbone="resnet18")
    for name in ("last_checkpoint_epoch=2.pt", "last_checkpoint_epoch=10.pt"):
        torch.save({"network": net.state_dict()}, tmp_path / name)
    for score in ("0.7", "0.85", "0.8"):
        torch.save(net.state_dict(), tmp_path / f"network_key_metric={score}.pt")
    assert latest_checkpoint(str(tmp_path)).endswith("epoch=10.pt")
    assert best_checkpoint(str(tmp_path)).endswith("key_metric=0.85.pt")
    assert export_source_model(str(tmp_path), str(tmp_path / "out" / "model.pt")).endswith("0.85.pt")
    assert latest_checkpoint(str(tmp_path / "out")) is None
    (tmp_path / "notes.pt").write_bytes(b"")  # not a checkpoint name: never touched
    removed = prune_checkpoints(str(tmp_path))
    assert sorted(os.path.basename(p) for p in removed) == [
        "last_checkpoint_epoch=2.pt",
        "network_key_metric=0.7.pt",
        "network_key_metric=0.8.pt",
    ]
    assert sorted(os.listdir(tmp_path)) == [
        "last_checkpoint_epoch=10.pt",
        "network_key_metric=0.85.pt",
        "notes.pt",
        "out",
    ]
    assert prune_checkpoints(str(tmp_path)) == []


def test_write_metrics_merges_in_order_and_writes_nonfinite_as_null(tmp_path):
    path = tmp_path / "sub" / "metrics.json"
    written = write_metrics(str(path), {"dice_mean": 0.5, "n_images": 4}, {"dice_mean": 0.75, "conflict": float("nan")})
    assert written == {"dice_mean": 0.75, "n_images": 4, "conflict": None}
    assert json.loads(path.read_text()) == written


def test_per_image_csv_dice_means_skip_undefined_values(tmp_path):
    path = str(tmp_path / "per_image.csv")
    with open(path, "w", newline="") as f:  # as MetricsReport writes it: f"{v:.6f}" gives "nan" and "inf"
        writer = csv.writer(f)
        writer.writerow(["filename", "group", "dice_od", "dice_oc", "assd_od", "assd_oc"])
        writer.writerow(["a.png", "d1", "0.900000", "nan", "1.0", "inf"])
        writer.writerow(["b.png", "d1", "0.700000", "0.600000", "2.0", "3.0"])
        writer.writerow(["c.png", "d2", "inf", "0.400000", "2.0", "3.0"])
    rows = read_per_image_csv(path)
    assert [r["filename"] for r in rows] == ["a.png", "b.png", "c.png"]
    summary = mean_dice_of_rows(rows)
    assert math.isclose(summary["dice_od"], 0.8) and math.isclose(summary["dice_oc"], 0.5)
    assert math.isclose(summary["dice_mean"], 0.65)
    first = mean_dice_of_rows(rows[:1])
    assert first["dice_od"] == 0.9 and math.isnan(first["dice_oc"]) and math.isnan(first["dice_mean"])
    assert mean_dice_of_rows(rows, channel_names=("od",)) == {
        "dice_od": summary["dice_od"],
        "dice_mean": summary["dice_od"],
    }
    with pytest.raises(KeyError, match="dice_rim"):
        mean_dice_of_rows(rows, channel_names=("rim",))
