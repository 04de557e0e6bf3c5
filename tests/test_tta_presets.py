import math
import os

import pytest
from monai.networks.nets import UNet

from monai_grata.data.checks import MissingInputError
from monai_grata.tta import CALIBRATED, PRESETS, adapter_names, build_adapter, effective_options, resolve_method
from monai_grata.tta.normalization import adaptive_batch_norms

from .conftest import REPO_ROOT

#: a shipped model with its calibration file (``source_refuge_train.shift.json``: min_shift 0.152551, and the
#: first layer's FIRST_THRESHOLD)
CKPT = os.path.join(REPO_ROOT, "bundles", "grata", "models", "source_refuge_train.pt")
FIRST_THRESHOLD = 0.248279
#: its first layer's site gate (the 90th percentile of the training images' divergences)
FIRST_SITE = 0.165519
KWARGS = {"grata": {"beta": 1e-4, "bn_prior": 0.0}, "norm": {"episodic": False}}


def test_presets_name_registered_methods():
    for preset in PRESETS.values():
        assert preset["method"] in adapter_names()


def test_paper_preset_is_grata_with_the_bundle_settings_and_method_names_pass_through():
    assert resolve_method("paper", KWARGS) == ("grata", {"beta": 1e-4, "bn_prior": 0.0})
    assert resolve_method("grata", KWARGS) == ("grata", {"beta": 1e-4, "bn_prior": 0.0})
    assert resolve_method("tent", KWARGS) == ("tent", {})


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_preset_sets_its_own_options(name):
    method, options = resolve_method(name, ckpt_path=CKPT)
    assert method == PRESETS[name]["method"]
    preset = {k: v for k, v in PRESETS[name]["options"].items() if v != CALIBRATED}
    assert {k: options[k] for k in preset} == preset


def test_stem_statistics_puts_the_stem_on_test_statistics_and_source_prior_the_statistics_alone():
    stem = {"method": "norm", "options": {"bn_prior": math.inf, "bn_first_layers": 1}}
    assert PRESETS["stem_statistics"] == stem
    model = UNet(2, 3, 2, channels=(4, 8), strides=(2,), num_res_units=0, norm="batch")
    method, options = resolve_method("stem_statistics", task="fundus")
    adapter = build_adapter(method, model, **options)
    priors = [layer.policy.prior for layer in adaptive_batch_norms(adapter.model)]
    assert priors == [0.0, math.inf]  # no calibration file needed
    assert resolve_method("source_prior", KWARGS) == ("norm", {"bn_prior": 256.0, "episodic": False})


def test_grata_calibrated_is_the_gated_grata_on_the_model_calibration():
    assert PRESETS["grata_calibrated"]["options"] == {
        **PRESETS["grata_gated"]["options"],
        "min_shift": CALIBRATED,
        "reuse_teacher": True,
        "teacher_channels_last": True,
    }
    assert resolve_method("grata_calibrated", ckpt_path=CKPT)[1]["min_shift"] == 0.152551
    with pytest.raises(ValueError, match="ckpt_path"):
        resolve_method("grata_calibrated")
    with pytest.raises(MissingInputError, match="calibrate_shift"):
        resolve_method("grata_calibrated", ckpt_path=os.path.join(REPO_ROOT, "no_such_model.pt"))


def test_the_default_gates_the_stem_by_the_model_first_layer_calibration():
    assert PRESETS["default"] == PRESETS["stem_gated"] == {
        "method": "norm",
        "options": {**PRESETS["stem_statistics"]["options"], "bn_first_min_shift": CALIBRATED},
    }
    method, options = resolve_method("default", ckpt_path=CKPT)
    assert options["bn_first_min_shift"] == FIRST_THRESHOLD
    model = UNet(2, 3, 2, channels=(4, 8), strides=(2,), num_res_units=0, norm="batch")
    layers = adaptive_batch_norms(build_adapter(method, model, task="fundus", **options).model)
    assert [(m.policy.prior, m.policy.min_shift) for m in layers] == [(0.0, FIRST_THRESHOLD), (math.inf, 0.0)]
    with pytest.raises(ValueError, match="ckpt_path"):
        resolve_method("stem_gated")
    with pytest.raises(ValueError, match="bn_first_layers 1, got 2"):
        resolve_method("stem_gated", overrides={"bn_first_layers": 2}, ckpt_path=CKPT)


def test_stem_site_gated_adds_the_model_site_gate_to_the_gated_stem():
    assert PRESETS["stem_site_gated"]["options"] == {
        **PRESETS["stem_gated"]["options"],
        "bn_first_site_min_shift": CALIBRATED,
    }
    method, options = resolve_method("stem_site_gated", ckpt_path=CKPT)
    assert (options["bn_first_min_shift"], options["bn_first_site_min_shift"]) == (FIRST_THRESHOLD, FIRST_SITE)
    model = UNet(2, 3, 2, channels=(4, 8), strides=(2,), num_res_units=0, norm="batch")
    first = adaptive_batch_norms(build_adapter(method, model, task="fundus", **options).model)[0]
    assert (first.policy.min_shift, first.policy.site_min_shift) == (FIRST_THRESHOLD, FIRST_SITE)
    with pytest.raises(ValueError, match="bn_first_site_min_shift='calibrated' .* bn_first_layers 1, got 2"):
        resolve_method("stem_site_gated", overrides={"bn_first_layers": 2, "bn_first_min_shift": 0.1}, ckpt_path=CKPT)


@pytest.mark.parametrize("name, threshold", [("grata_calibrated", 0.152551), ("grata_gated", 0.18)])
def test_the_gated_preset_builds_a_gated_grata(name, threshold):
    method, options = resolve_method(name, {"grata": {"seed": 1}}, task="fundus", ckpt_path=CKPT)
    model = UNet(2, 3, 2, channels=(4, 8), strides=(2,), num_res_units=0, norm="batch")
    adapter = build_adapter(method, model, **options)
    assert (adapter.min_shift, adapter.steps, adapter.beta, adapter.multilabel) == (threshold, 3, 1e-3, True)
    assert adapter.reuse_teacher == (name == "grata_calibrated")


def test_precedence_is_defaults_then_preset_then_bundle_then_command_line():
    # the bundle's explicit choice beats the preset; what the user passed beats both; None means "not set"
    bundle = {"grata": {"seed": 5, "bn_prior": 64.0}}
    command_line = {"beta": 1e-4, "steps": None, "min_shift": 0.3}
    method, options = resolve_method("grata_calibrated", bundle, command_line)
    assert method == "grata"
    cuts = {"reuse_teacher": True, "teacher_channels_last": True}
    assert options == {"beta": 1e-4, "bn_prior": 64.0, "steps": 3, "min_shift": 0.3, "seed": 5, **cuts}


def test_the_task_sits_just_above_the_constructor_defaults():
    # the task decides multilabel and a volume's in-plane views; every other layer still wins over it
    method, options = resolve_method("grata", {"grata": {"seed": 3}}, task="spinalcord")
    assert options["multilabel"] is False and options["seed"] == 3
    assert options["strong_transform"].blur_axes == (-3, -2) and options["strong_transform"].seed == 3
    assert all(flip in ((), (-3,), (-2,)) and plane == (-3, -2) for flip, _, plane in options["views"])
    assert resolve_method("grata", {"grata": {"multilabel": True}}, task="spinalcord")[1]["multilabel"] is True
    assert resolve_method("tent", {}, {"multilabel": True}, task="spinalcord")[1] == {"multilabel": True}
    assert resolve_method("dua", task="spinalcord")[1] == {"plane": (-3, -2)}
    assert resolve_method("none", task="fundus") == ("none", {})  # no adaptation, no options
    assert resolve_method("tent", task="fundus") == ("tent", {"multilabel": True})


def test_a_value_equal_to_the_constructor_default_still_wins_over_the_preset():
    # --method grata_calibrated --beta 1e-4: 1e-4 is GraTa's own default, and still what runs
    assert resolve_method("grata_calibrated", {}, {"beta": 1e-4}, ckpt_path=CKPT)[1]["beta"] == 1e-4
    assert resolve_method("grata_calibrated", {}, {"beta": None}, ckpt_path=CKPT)[1]["beta"] == 1e-3
    bundle = {"grata": {"min_shift": None}}
    assert resolve_method("grata_calibrated", bundle)[1]["min_shift"] is None  # the bundle's choice


def test_effective_options_are_the_constructor_defaults_updated():
    options = effective_options("grata", resolve_method("grata_calibrated", ckpt_path=CKPT)[1])
    assert options["beta"] == 1e-3 and options["steps"] == 3 and options["aux"] == "entropy"
    assert effective_options("grata", {})["beta"] == 1e-4 and "model" not in options
