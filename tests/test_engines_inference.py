import json
import os

import numpy as np
import pytest
from monai.networks.nets import UNet
from PIL import Image

from monai_grata.engines import (
    JOB_OPTIONS,
    JobInputs,
    check_job_options,
    inference_handlers,
    job_adapter,
    job_inputs,
    job_method,
    prepare_output_dir,
    run_name,
    run_params,
    source_network,
)
from monai_grata.tta import Tent, adapter_defaults, adapter_names, read_shift_threshold, resolve_method

from .conftest import REPO_ROOT


def small_unet():
    return UNet(2, 3, 2, channels=(4, 8), strides=(2,), num_res_units=0, norm="batch")


def write_domain(root, domain, names, broken=()):
    (root / domain / "images").mkdir(parents=True)
    (root / domain / "labels").mkdir()
    for name in names:
        Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(root / domain / "images" / f"{name}.png")
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / domain / "labels" / f"{name}.png")
    for name in broken:
        (root / domain / "images" / f"{name}.png").write_text("not an image")


def test_job_inputs_keep_the_first_images_of_the_targets(tmp_path):
    write_domain(tmp_path, "src", ["s"])
    write_domain(tmp_path, "a", ["a1", "a2", "a3"])
    write_domain(tmp_path, "b", ["b1"])
    inputs = job_inputs(str(tmp_path), ["a", "b"], "src", max_images=2)
    assert [os.path.basename(i["image"]) for i in inputs.items] == ["a1.png", "a2.png"]
    assert inputs.has_labels and inputs.targets == "a" and inputs.skipped == []
    assert job_inputs(str(tmp_path), ["a", "b"], exclude_domains=["a"]).targets == "b"


def test_job_inputs_end_the_program_with_one_line_on_bad_input(tmp_path):
    write_domain(tmp_path, "a", ["a1"], broken=["bad"])
    with pytest.raises(SystemExit) as info:
        job_inputs(str(tmp_path), "a")
    assert str(info.value.code).startswith("error: 1 bad input: image ") and "--on_bad_input skip" in info.value.code
    inputs = job_inputs(str(tmp_path), "a", on_bad_input="skip")
    assert len(inputs.items) == 1 and inputs.skipped[0]["image"].endswith("bad.png")
    with pytest.raises(SystemExit, match="error: datalist not found"):
        job_inputs(str(tmp_path), "a", datalist=str(tmp_path / "absent.json"))


def test_labels_may_live_under_several_keys():
    inputs = JobInputs([{"image": "x", "label_cord": "y", "domain": "d"}], label_keys=("label", "label_cord"))
    assert inputs.has_labels and not JobInputs([{"image": "x", "domain": "d"}]).has_labels


def test_source_network_loads_the_checkpoint_or_exits_with_one_line(tmp_path):
    import torch

    model = small_unet()
    torch.save(model.state_dict(), tmp_path / "source.pt")
    loaded = source_network(small_unet(), str(tmp_path / "source.pt"), "cpu")
    pairs = zip(loaded.state_dict().values(), model.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    with pytest.raises(SystemExit, match="^error: .*absent.pt"):
        source_network(small_unet(), str(tmp_path / "absent.pt"))


def test_prepare_output_dir_saves_the_config_or_exits_with_one_line(tmp_path):
    out = tmp_path / "out"
    path = prepare_output_dir(str(out))
    assert os.path.isfile(path) and path == str(out / "config.json")
    json.loads(open(path).read())
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="^error: output folder .* cannot be written"):
        prepare_output_dir(str(tmp_path / "file"))


def test_job_adapter_builds_the_resolved_method_or_none():
    assert job_adapter(("none", {}), small_unet()) is None
    adapter = job_adapter(resolve_method("tent", {}, {"lr": 1e-3}, task="fundus"), small_unet())
    assert isinstance(adapter, Tent) and adapter.multilabel
    assert not job_adapter(resolve_method("tent", {}, task="spinalcord"), small_unet()).multilabel
    with pytest.raises(SystemExit, match="^error: --beta does not apply to the method 'tent'"):
        job_adapter(resolve_method("tent", {}, {"beta": 1e-4}, task="fundus"), small_unet())


def test_job_method_reads_the_models_gate_or_exits_with_one_line(tmp_path):
    shipped = os.path.join(REPO_ROOT, "bundles", "grata", "models", "source_refuge_train.pt")
    name, options = job_method("grata_calibrated", {}, {}, "fundus", shipped)
    assert name == "grata" and options["min_shift"] == read_shift_threshold(shipped)
    assert job_method("grata_calibrated", {}, {"min_shift": 0.3}, "fundus", shipped)[1]["min_shift"] == 0.3
    bare = tmp_path / "own_model.pt"  # a model trained elsewhere, never calibrated
    bare.write_bytes(open(shipped, "rb").read())
    with pytest.raises(SystemExit, match=r"^error: no shift calibration beside .*own_model.pt: run python -m "):
        job_method("grata_calibrated", {}, {}, "fundus", str(bare))


def test_run_params_are_what_ran():
    params = run_params("grata_gated", resolve_method("grata_gated", {}, {"beta": 1e-4}), source="s", seed=3)
    assert params["method"] == "grata_gated" and params["adapter"] == "grata"
    assert params["beta"] == 1e-4 and params["steps"] == 3 and params["min_shift"] == 0.18
    assert params["aux"] == "entropy" and params["seed"] == 3 and params["source"] == "s"
    assert run_params("grata_gated", resolve_method("grata_gated"))["beta"] == 1e-3
    none = run_params("none", resolve_method("none"), source="s")
    assert none == {"method": "none", "adapter": "none", "source": "s"}
    objects = run_params("grata", ("grata", {"views": [(abs, abs)], "radius": None}))
    assert objects["views"] == "list" and objects["radius"] is None


def test_run_name_names_method_source_and_targets():
    inputs = JobInputs([{"image": "x", "domain": "a"}, {"image": "y", "domain": "b"}])
    assert run_name("paper", "src", inputs).startswith("paper_src_to_a+b_")


class Stub:
    def __init__(self):
        self.report = self.reference = self.tta_handler = self.extra = "unset"


@pytest.mark.parametrize(
    "method,has_labels,expected",
    [
        ("default", True, ["progress", "no_adapt", "tta", "report", "stream", "mlflow", "summary"]),
        ("none", True, ["progress", "report", "stream", "mlflow", "summary"]),
        ("default", False, ["progress", "tta", "stream", "mlflow", "summary"]),
    ],
)
def test_inference_handlers_leave_out_what_does_not_apply(method, has_labels, expected):
    named = {name: Stub() for name in ("progress", "no_adapt", "tta", "report", "stream", "mlflow", "summary")}
    handlers = inference_handlers(
        method, has_labels, named["tta"], named["report"], named["stream"], named["mlflow"], named["summary"],
        no_adapt=named["no_adapt"], progress_bar=named["progress"],
    )  # fmt: skip
    assert handlers == [named[name] for name in expected]
    reference = named["no_adapt"] if "no_adapt" in expected else None
    for handler in (named["stream"], named["summary"]):
        assert handler.report is (named["report"] if has_labels else None)
        assert handler.tta_handler is (named["tta"] if method != "none" else None)
        assert handler.reference is (reference.report if reference else None)
    assert named["report"].extra == (reference.extra if reference else None)


def test_job_options_are_adapter_options_documented_for_the_bundles():
    taken = set().union(*(adapter_defaults(name) for name in adapter_names()))
    with open(os.path.join(REPO_ROOT, "docs", "bundle.md"), encoding="utf-8") as f:
        documented = f.read()
    for key, option in JOB_OPTIONS.items():
        assert option in taken, f"--{key} sets {option!r}, which no adapter takes"
        assert f"--{key}" in documented, f"docs/bundle.md does not document --{key}"


def test_check_job_options_names_what_departs():
    config = {key: None for key in JOB_OPTIONS} | {"options": {o: f"@{k}" for k, o in JOB_OPTIONS.items()}}
    assert check_job_options(config) == []
    config["beta"] = 1e-3  # a value in place of "not set" would beat every preset
    config["options"]["radius"] = "@beta"
    config["options"]["extra"] = "@extra"
    problems = check_job_options(config)
    assert problems[0].startswith("option 'beta' must be declared") and "wrong: ['extra', 'radius']" in problems[1]
