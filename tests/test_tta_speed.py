import importlib.util
import json
import os

import pytest

from .conftest import REPO_ROOT


def load_benchmark():
    """``benchmarks/tta_speed.py`` as a module (``benchmarks/`` is no package)."""
    spec = importlib.util.spec_from_file_location("tta_speed", os.path.join(REPO_ROOT, "benchmarks", "tta_speed.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stream_mode_times_each_method_over_the_stream_and_counts_updates(tmp_path):
    output = tmp_path / "stream.json"
    methods = ["grata_calibrated", "grata:bn_prior=16,steps=2,reuse_teacher=true,settle=1,settle_every=2", "norm"]
    argv = ["--stream", "--device", "cpu", "--max_images", "3", "--image_size", "64", "--ckpt", "none"]
    results = load_benchmark().main([*argv, "--methods", *methods, "--json", str(output)])
    assert json.loads(output.read_text()) == results
    assert results["images"] == 3 and results["stream"] == "random"
    rows = results["methods"]
    assert list(rows) == ["plain inference", *methods]
    assert all(row["ms_per_image"] > 0 for row in rows.values())
    assert rows["grata_calibrated"]["spec"] == (
        "grata:beta=0.001,bn_prior=256,min_shift=calibrated,reuse_teacher=true,steps=3,teacher_channels_last=true"
    )
    assert 0 <= rows["grata_calibrated"]["updated_images"] <= 3
    assert rows[methods[1]]["updated_images"] == 2  # settled after the first update: images 1 and 3
    assert rows["norm"]["updated_images"] is None  # no update to count


def test_stream_mode_refuses_the_breakdown():
    with pytest.raises(SystemExit):
        load_benchmark().main(["--stream", "--breakdown", "--device", "cpu"])
