"""``scripts/gate_report.py``: per cell, the images on which the gate let GraTa update and the stream shift."""

import pytest

from monai_grata.benchmark import parse_method
from monai_grata.benchmark.cells import Cell
from monai_grata.benchmark.store import BenchmarkStore

from .conftest import load_script


@pytest.fixture(scope="module")
def script():
    return load_script("gate_report")


def log(store: BenchmarkStore, method: str, source: str, target: str, rows: list[dict]) -> None:
    cell = Cell(parse_method(method), source, target, 0)
    store.log_cell(cell.key, cell, {"n_images": len(rows)}, {"dice_mean": 0.5}, rows)


def test_updated_images_and_lowest_and_last_shift_per_cell(tmp_path, script):
    store = BenchmarkStore(f"sqlite:///{tmp_path}/mlflow.db")
    gated = [
        {"case": "x1", "adapt_lr": 0.0, "adapt_stream_shift": 0.30},
        {"case": "x2", "adapt_lr": 1e-3, "adapt_stream_shift": 0.12},
        {"case": "x3", "adapt_lr": 1e-3, "adapt_stream_shift": 0.25},
    ]
    log(store, "grata_gated", "b", "a", gated)
    log(store, "grata_gated", "a", "b", [{"case": "y1"}])  # run before the benchmark kept the statistics
    log(store, "tent", "a", "b", gated)  # another method: not reported

    rows = script.gate_rows(str(tmp_path), "grata_gated")
    assert [(r["source"], r["target"]) for r in rows] == [("b", "a"), ("a", "b")]
    assert rows[0]["images"] == 3 and rows[0]["updated"] == 2
    assert rows[0]["lowest_shift"] == pytest.approx(0.12) and rows[0]["last_shift"] == pytest.approx(0.25)
    assert rows[1] == {"source": "a", "target": "b", "seed": "0", "images": 1, "updated": None,
                       "lowest_shift": None, "last_shift": None}  # fmt: skip
    assert script.gate_rows(str(tmp_path), "dua") == []
