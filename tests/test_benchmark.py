import csv
import math

import pytest
import torch

from monai_grata.benchmark import Cell, load_target, parse_method, predict_stream, run_cell, summarise, target_items
from monai_grata.benchmark.__main__ import main as benchmark_main
from monai_grata.benchmark.compare import main as compare_main
from monai_grata.benchmark.compare import records_from_store
from monai_grata.benchmark.store import BenchmarkStore

SAMPLE = "bundles/grata/sample"
MODELS = "bundles/grata/models"


def test_parse_method_options_and_label():
    spec = parse_method("grata:beta=0.001,bn_prior=inf,align=false,aux=entropy")
    assert spec.name == "grata"
    assert spec.options == {"beta": 0.001, "bn_prior": math.inf, "align": False, "aux": "entropy"}
    assert spec.label == "grata:align=false,aux=entropy,beta=0.001,bn_prior=inf"
    assert parse_method("none").label == "none"
    # a preset name is its spelled-out spec (same cells, same store rows); written options win over the preset's
    assert parse_method("stem_statistics").label == "norm:bn_first_layers=1,bn_prior=inf"
    gated = "norm:bn_first_layers=1,bn_first_min_shift=calibrated,bn_prior=inf"
    assert parse_method("default").label == parse_method("stem_gated").label == gated
    assert parse_method("grata_calibrated").label == (
        "grata:beta=0.001,bn_prior=256,min_shift=calibrated,reuse_teacher=true,steps=3,teacher_channels_last=true"
    )
    assert parse_method("source_prior").label == "norm:bn_prior=256"
    assert parse_method("paper").label == "grata"
    assert parse_method("grata_gated").label == "grata:beta=0.001,bn_prior=256,min_shift=0.18,steps=3"
    assert parse_method("grata_gated:min_shift=0.3").options["min_shift"] == 0.3
    with pytest.raises(ValueError, match="key=value"):
        parse_method("grata:beta")


def test_held_out_split_target_is_the_source_validation_split():
    val = target_items(SAMPLE, "refuge_train:val")
    assert len(val) == 2 and all("refuge_train" in item["image"] for item in val)


def test_adapters_never_read_the_label():
    images = load_target(target_items(SAMPLE, "drishti_gs")[:2], 256)
    poisoned = [dict(item, label=torch.full_like(item["label"], float("nan"))) for item in images]
    cell = Cell(parse_method("grata"), "refuge_train", "drishti_gs", 0)
    clean = predict_stream(cell, images, f"{MODELS}/source_refuge_train.pt")[0]
    dirty = predict_stream(cell, [{"image": item["image"]} for item in poisoned], f"{MODELS}/source_refuge_train.pt")[0]
    for a, b in zip(clean, dirty, strict=True):
        assert torch.equal(a, b)


def test_per_image_rows_carry_what_the_adapter_reported():
    images = load_target(target_items(SAMPLE, "drishti_gs")[:2], 64)
    cell = Cell(parse_method("grata:bn_prior=256,min_shift=1000"), "refuge_train", "drishti_gs", 0)
    summary, rows = run_cell(cell, images, f"{MODELS}/source_refuge_train.pt")
    assert [row["adapt_lr"] for row in rows] == [0.0, 0.0]  # the gate stays shut below a shift of 1000
    assert all(0 < row["adapt_stream_shift"] < 1000 and row["adapt_gate_open"] == 0 for row in rows)
    assert summary["n_images"] == 2
    none_cell = Cell(parse_method("none"), "refuge_train", "drishti_gs", 0)
    none_rows = run_cell(none_cell, images, f"{MODELS}/source_refuge_train.pt")[1]
    assert not any(key.startswith("adapt_") for key in none_rows[0])


def test_benchmark_end_to_end_resumes_and_compare_reads_back(tmp_path):
    args = ["--dataset_dir", SAMPLE, "--sources", "refuge_train", "--targets", "drishti_gs", "refuge_val",
            "--max_images", "2", "--output_dir", str(tmp_path), "--device", "cpu"]  # fmt: skip
    first = benchmark_main(args + ["--methods", "none"])
    assert set(first["methods"]) == {"none"}
    # an interrupted grid run again: the finished 'none' cells are not repeated
    summary = benchmark_main(args + ["--methods", "none", "norm:bn_prior=4"])
    records = records_from_store(str(tmp_path))
    assert len(records) == 4  # no cell ran twice
    assert {r["method"] for r in records} == {"none", "norm:bn_prior=4"}
    for ext in ("md", "csv", "png"):
        assert (tmp_path / f"table.{ext}").stat().st_size > 0
    rebuilt = compare_main([str(tmp_path), "--output_dir", str(tmp_path / "rebuilt")])
    for key, stats in summary["cells"].items():
        assert rebuilt["cells"][key]["dice_mean"] == pytest.approx(stats["dice_mean"], nan_ok=True)
    assert (tmp_path / "rebuilt" / "table.md").read_text() == (tmp_path / "table.md").read_text()
    # methods are named as the benchmark takes them: the options of a spec normalised to its label
    assert compare_main([str(tmp_path), "--methods", "norm:bn_prior=4.0"])["methods"] == ["norm:bn_prior=4"]
    # two stores in one table, rows in the order asked for
    other = tmp_path / "other"
    norm = benchmark_main([*args[:-4], "--output_dir", str(other), "--device", "cpu", "--methods", "norm"])
    both = compare_main([str(tmp_path), str(other), "--methods", "norm", "none"])
    assert list(both["methods"]) == ["norm", "none"]
    for method, alone in (("norm", norm), ("none", summary)):
        key = (method, "refuge_train→drishti_gs")
        assert both["cells"][key]["dice_mean"][0] == pytest.approx(alone["cells"][key]["dice_mean"][0])


def test_summary_means_and_stds_over_seeds():
    records = [
        {"method": "m", "source": "a", "target": "b", "seed": s, "dice_mean": v, "images_per_s": 1.0}
        for s, v in ((0, 0.5), (1, 0.7))
    ]
    summary = summarise(records)
    mean, std, n = summary["cells"][("m", "a→b")]["dice_mean"]
    assert (n, mean) == (2, pytest.approx(0.6)) and std == pytest.approx(0.1414, abs=1e-4)
    assert summary["average"]["m"][0] == pytest.approx(0.6)


def test_methods_all_is_no_adapt_every_baseline_and_the_shipped_presets():
    from monai_grata.benchmark.__main__ import all_methods
    from monai_grata.benchmark.cells import parse_method
    from monai_grata.tta import adapter_names

    methods = all_methods()
    assert methods[0] == "none" and "norm_select" not in methods
    assert methods[-2:] == ["default", "source_prior"]
    assert set(methods[1:-2]) == set(adapter_names()) - {"norm_select"}
    # the presets are cells of their own, not repeats of the plain methods
    labels = [parse_method(m).label for m in methods]
    assert len(set(labels)) == len(labels)


def test_chart_gives_each_of_the_eleven_methods_its_own_colour():
    from monai_grata.benchmark.table import method_colours

    assert len(set(method_colours(11))) == 11  # tab10 alone would repeat its first colour
    assert len(set(method_colours(4))) == 4
    assert len(method_colours(25)) == 25


def log_per_image_cells(location, cells: dict[tuple[str, int], dict[str, float]]) -> None:
    """Log one benchmark cell per (method, seed) of pair a→b into the store at ``location``: its ``dice_gm`` per
    image (by file name) and an ``assd_gm`` column."""
    store = BenchmarkStore(f"sqlite:///{location}/mlflow.db")
    for (method, seed), dice in cells.items():
        cell = Cell(parse_method(method), "a", "b", seed)
        rows = [{"filename": name, "dice_gm": value, "assd_gm": 1.0} for name, value in dice.items()]
        mean = sum(dice.values()) / len(dice)
        summary = {"dice_gm": mean, "dice_mean": mean, "assd_gm": 1.0, "images_per_s": 1.0}
        store.log_cell(cell.key, cell, {"channels": "gm"}, summary, rows)


PER_IMAGE_CELLS = {
    ("none", 0): {"site/images/sub-1_T2starw.nii.gz": 0.5, "site/images/sub-2_T2starw.nii.gz": 0.6, "c/sub-3.png": 0.7},
    ("grata", 0): {"site/images/sub-1_T2starw.nii.gz": 0.6, "site/images/sub-2_T2starw.nii.gz": 0.4},
    ("grata", 1): {
        "site/images/sub-1_T2starw.nii.gz": 0.8,
        "site/images/sub-2_T2starw.nii.gz": 0.5,
        "c/sub-3.png": 0.9,
    },
    ("norm", 0): {"site/images/sub-1_T2starw.nii.gz": 0.45, "site/images/sub-2_T2starw.nii.gz": 0.65},
}


def test_compare_per_image_pivots_images_by_method_over_seeds(tmp_path, capsys):
    log_per_image_cells(tmp_path, PER_IMAGE_CELLS)
    out = tmp_path / "tables"
    compare_main(
        [str(tmp_path), "--methods", "none", "grata", "norm", "--per_image", "dice_gm", "--output_dir", str(out)]
    )
    assert (out / "table.md").stat().st_size > 0  # the usual table too
    with open(out / "per_image_dice_gm.csv", newline="") as f:
        rows = {(r["pair"], r["image"]): r for r in csv.DictReader(f)}
    assert list(rows) == [("a→b", "sub-1_T2starw"), ("a→b", "sub-2_T2starw"), ("a→b", "sub-3")]
    sub1, sub2, sub3 = rows.values()
    assert float(sub1["none_mean"]) == pytest.approx(0.5) and float(sub1["norm_mean"]) == pytest.approx(0.45)
    assert float(sub1["grata_mean"]) == pytest.approx(0.7) and float(sub1["grata_std"]) == pytest.approx(0.1414, 1e-3)
    assert float(sub2["grata_mean"]) == pytest.approx(0.45)
    assert float(sub3["grata_mean"]) == pytest.approx(0.9)  # the one seed that has it
    assert sub3["norm_mean"] == sub3["norm_std"] == ""  # missing in norm's run: blank, not dropped
    markdown = (out / "per_image_dice_gm.md").read_text()
    assert markdown.splitlines()[0] == "| pair | image | none | grata | norm |"
    assert "| a→b | sub-1_T2starw | 0.5000 | 0.7000 ± 0.1414 | 0.4500 |" in markdown
    assert "| a→b | sub-3 | 0.7000 | 0.9000 |  |" in markdown
    assert "worst per-image Δ dice_gm vs none: grata: -0.1500 (sub-2_T2starw, a→b)" in markdown
    assert "worst per-image Δ dice_gm vs none: norm: -0.0500 (sub-1_T2starw, a→b)" in markdown
    # another baseline; without --output_dir the per-image table is printed
    capsys.readouterr()
    compare_main([str(tmp_path), "--methods", "none", "grata", "norm", "--per_image", "dice_gm", "--baseline", "norm"])
    printed = capsys.readouterr().out
    assert "worst per-image Δ dice_gm vs norm: none: -0.0500 (sub-2_T2starw, a→b)" in printed
    assert "vs norm: norm" not in printed


def test_compare_per_image_unknown_metric_names_the_columns(tmp_path, capsys):
    log_per_image_cells(tmp_path, {("none", 0): {"x.png": 0.5}})
    with pytest.raises(SystemExit):
        compare_main([str(tmp_path), "--per_image", "dice_cord", "--output_dir", str(tmp_path / "tables")])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "'dice_cord'" in error and error.endswith("columns: dice_gm, assd_gm")
    assert not (tmp_path / "tables").exists()  # nothing written
