import math

import pytest
import torch

from monai_grata.benchmark import Cell, load_target, parse_method, predict_stream, run_cell, summarise, target_items
from monai_grata.benchmark.__main__ import main as benchmark_main
from monai_grata.benchmark.compare import main as compare_main
from monai_grata.benchmark.compare import records_from_store

SAMPLE = "bundles/grata/sample"
MODELS = "bundles/grata/models"


def test_parse_method_options_and_label():
    spec = parse_method("grata:beta=0.001,bn_prior=inf,align=false,aux=entropy")
    assert spec.name == "grata"
    assert spec.options == {"beta": 0.001, "bn_prior": math.inf, "align": False, "aux": "entropy"}
    assert spec.label == "grata:align=false,aux=entropy,beta=0.001,bn_prior=inf"
    assert parse_method("none").label == "none"
    # a preset name is its spelled-out spec (same cells, same store rows); written options win over the preset's
    assert parse_method("default").label == "grata:beta=0.001,bn_prior=256,min_shift=calibrated,steps=3"
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
