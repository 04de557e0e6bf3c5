import json
import os

import torch

from monai_grata.networks import resunet
from monai_grata.utils import (
    best_checkpoint,
    export_run_config,
    export_source_model,
    latest_checkpoint,
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
    assert config["beta"] == 0.001 and config["target"] == "drishti_gs" and config["method"] == "grata"


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


def test_write_metrics_merges_in_order_and_writes_nonfinite_as_null(tmp_path):
    path = tmp_path / "sub" / "metrics.json"
    written = write_metrics(str(path), {"dice_mean": 0.5, "n_images": 4}, {"dice_mean": 0.75, "conflict": float("nan")})
    assert written == {"dice_mean": 0.75, "n_images": 4, "conflict": None}
    assert json.loads(path.read_text()) == written
