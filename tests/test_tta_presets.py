import pytest
from monai.networks.nets import UNet

from monai_grata.tta import PRESETS, adapter_names, build_adapter, resolve_method

KWARGS = {"grata": {"beta": 1e-4, "bn_prior": 0.0}, "norm": {"episodic": False, "bn_prior": 0.0}}


def test_presets_name_registered_methods():
    for preset in PRESETS.values():
        assert preset["method"] in adapter_names()


def test_paper_preset_is_grata_with_the_bundle_settings_and_method_names_pass_through():
    assert resolve_method("paper", KWARGS) == ("grata", {"beta": 1e-4, "bn_prior": 0.0})
    assert resolve_method("grata", KWARGS) == ("grata", {"beta": 1e-4, "bn_prior": 0.0})
    assert resolve_method("tent", KWARGS) == ("tent", {})


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_preset_fixes_its_own_options_over_the_bundle_ones(name):
    method, options = resolve_method(name, KWARGS)
    assert method == PRESETS[name]["method"]
    assert {k: options[k] for k in PRESETS[name]["options"]} == PRESETS[name]["options"]


def test_the_default_is_the_gated_grata_and_source_prior_the_statistics_alone():
    assert PRESETS["default"] == PRESETS["grata_gated"]
    assert resolve_method("source_prior", KWARGS) == ("norm", {"episodic": False, "bn_prior": 256.0})


@pytest.mark.parametrize("name", ["default", "grata_gated"])
def test_the_gated_preset_builds_a_gated_grata_over_the_bundle_settings(name):
    method, options = resolve_method(name, KWARGS)
    model = UNet(2, 3, 2, channels=(4, 8), strides=(2,), num_res_units=0, norm="batch")
    adapter = build_adapter(method, model, **options)
    assert (adapter.min_shift, adapter.steps, adapter.beta) == (0.18, 3, 1e-3)


def test_options_the_user_changed_win_over_a_preset():
    # the bundle passes every option; those left at the adapter's default give way to the preset, the others win
    kwargs = {"grata": {"beta": 1e-4, "bn_prior": 0.0, "min_shift": 0.3, "steps": 1, "seed": 5}}
    method, options = resolve_method("grata_gated", kwargs)
    assert method == "grata" and options == {"beta": 1e-3, "bn_prior": 256.0, "min_shift": 0.3, "steps": 3, "seed": 5}
    assert resolve_method("grata_gated", {"grata": {"bn_prior": 64.0}})[1]["bn_prior"] == 64.0
