import csv
import json
from types import SimpleNamespace

import pytest
import torch

from monai_grata.data import SPINALCORD
from monai_grata.handlers import MetricsReport
from monai_grata.utils import mean_dice_of_rows, read_per_image_csv


def finish(report: MetricsReport, names: list[str], dice: list[list[float]], assd: list[list[float]]):
    """End an epoch of an evaluator that scored ``names`` (the per-image details of its metric handlers)."""
    report.filenames, report.groups = list(names), [""] * len(names)
    state = SimpleNamespace(metric_details={"dice": torch.tensor(dice), "assd": torch.tensor(assd)}, metrics={})
    report(SimpleNamespace(state=state))
    return state


def test_the_report_writes_the_task_channel_names(tmp_path):
    report = MetricsReport(str(tmp_path), task=SPINALCORD)
    assert report.channel_names == ("cord", "gm")
    state = finish(report, ["a.nii.gz", "b.nii.gz"], [[0.9, 0.7], [0.8, float("nan")]], [[1.0, 2.0], [3.0, 4.0]])
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["dice_cord"] == pytest.approx(0.85) and summary["dice_gm"] == pytest.approx(0.7)
    assert summary["dice_mean"] == pytest.approx(0.775) and state.metrics["assd_gm"] == pytest.approx(3.0)
    with open(tmp_path / "per_image.csv") as f:
        assert next(csv.reader(f)) == ["filename", "dice_cord", "dice_gm", "assd_cord", "assd_gm"]
    # the CSV read back: its channels from its columns
    assert mean_dice_of_rows(read_per_image_csv(str(tmp_path / "per_image.csv"))) == pytest.approx(
        {"dice_cord": 0.85, "dice_gm": 0.7, "dice_mean": 0.775}
    )


def test_explicit_channel_names_win_and_no_names_is_an_error(tmp_path):
    assert MetricsReport(str(tmp_path), channel_names=["a", "b", "c"], task="fundus").channel_names == ("a", "b", "c")
    with pytest.raises(ValueError, match="pass task=.*or channel_names="):  # no task is assumed
        MetricsReport(str(tmp_path))
    with pytest.raises(KeyError, match="unknown task"):
        MetricsReport(str(tmp_path), task="retina")
