import csv

import pytest

from monai_grata.benchmark import bundle_setup
from monai_grata.benchmark.__main__ import main as benchmark_main
from monai_grata.benchmark.compare import records_from_store

SPINAL = "bundles/spinalcord_gm"
# per-volume Dice (cord, gm) of the sample's milan volume as the bundle's inference.json scores it
# (`python -m monai.bundle run --config_file bundles/spinalcord_gm/configs/inference.json --method norm`:
# no_adapt_per_image.csv and per_image.csv)
BUNDLE_DICE = {"none": (0.916999, 0.740577), "norm": (0.863271, 0.691145)}


def test_a_bundle_setup_reads_network_checkpoint_and_inferer():
    fundus = bundle_setup("bundles/grata")
    assert fundus.checkpoint == "bundles/grata/models/source_{source}.pt" and not fundus.sliding_window
    spinal = bundle_setup(SPINAL)
    assert spinal.checkpoint == f"{SPINAL}/models/source.pt" and spinal.sliding_window
    assert spinal.task.channels == ("cord", "gm") and spinal.num_patches == 4
    with pytest.raises(FileNotFoundError, match="no bundle"):
        bundle_setup("bundles/none_here")


def test_spinal_cord_bundle_runs_in_process_and_scores_as_the_bundle(tmp_path):
    summary = benchmark_main(
        ["--bundle", SPINAL, "--dataset_dir", f"{SPINAL}/sample", "--sources", "ucl+nwu+juntendo", "--targets",
         "milan", "--methods", "none", "norm", "--output_dir", str(tmp_path), "--device", "cpu"]
    )  # fmt: skip
    assert set(summary["metrics"]) >= {"dice_cord", "dice_gm", "assd_cord", "assd_gm"}
    records = {r["method"]: r for r in records_from_store(str(tmp_path))}
    assert {r["channels"] for r in records.values()} == {"cord,gm"}
    for method, (cord, gm) in BUNDLE_DICE.items():
        assert records[method]["dice_cord"] == pytest.approx(cord, abs=1e-4)
        assert records[method]["dice_gm"] == pytest.approx(gm, abs=1e-4)
        assert records[method]["dice_mean"] == pytest.approx((cord + gm) / 2, abs=1e-4)
    header = (tmp_path / "table.csv").read_text().splitlines()[0]
    assert "dice_cord_mean" in header and "dice_od" not in header
    artifacts = list(tmp_path.glob("mlartifacts/*/artifacts/per_image.csv"))
    assert artifacts and all(next(csv.reader(p.open()))[1:3] == ["dice_cord", "dice_gm"] for p in artifacts)
