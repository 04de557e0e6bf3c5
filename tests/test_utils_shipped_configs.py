"""MONAI's config notice is left out for the shipped bundles' configs only, and the installed ``.pth`` does it."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from monai.bundle import scripts as bundle_scripts

from monai_grata.utils.shipped_configs import PTH_NAME, SHIPPED_CONFIG_NOTICE, ignore_shipped_config_notice

MONAI_NOTICE_START = 'parsing config_file {config_file}: any `"_target_"` value'

SHIPPED = [
    "bundles/grata/configs/inference.json",
    "/home/user/monai-grata/bundles/grata/configs/train_uda.json",
    "bundles/spinalcord_gm/configs/inference.json",
    "C:\\work\\monai-grata\\bundles\\grata\\configs\\evaluate.json",
    ["bundles/grata/configs/train.json", "bundles/grata/configs/multi_gpu_train.json"],
]
FOREIGN = [
    "configs/inference.json",
    "bundles/other_bundle/configs/inference.json",
    "bundles/grata/configs/inference.py",
    "bundles/grata/configs/../../../evil/x.json",
    ["bundles/grata/configs/train.json", "/tmp/evil.json"],
    ["/tmp/evil.json", "bundles/grata/configs/train.json"],
]


def monai_notice(config_file) -> str:
    """The notice as ``monai.bundle.scripts.run`` formats it (its f-string, start of the message)."""
    return f'parsing config_file {config_file}: any `"_target_"` value in it is resolved to an importable callable'


def test_monai_still_prints_the_notice_this_filter_is_written_for():
    source = inspect.getsource(bundle_scripts)
    assert "f'" + MONAI_NOTICE_START in source, "MONAI changed its config notice: update SHIPPED_CONFIG_NOTICE"


@pytest.mark.parametrize("config_file", SHIPPED, ids=str)
def test_notice_of_a_shipped_config_is_matched(config_file):
    assert re.match(SHIPPED_CONFIG_NOTICE, monai_notice(config_file), re.IGNORECASE)


@pytest.mark.parametrize("config_file", FOREIGN, ids=str)
def test_notice_of_any_other_config_still_shows(config_file):
    assert not re.match(SHIPPED_CONFIG_NOTICE, monai_notice(config_file), re.IGNORECASE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ignore_shipped_config_notice()
        warnings.warn(monai_notice(config_file), UserWarning, stacklevel=1)
    assert len(caught) == 1


def test_ignore_filter_drops_only_the_shipped_notice():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ignore_shipped_config_notice()
        warnings.warn(monai_notice(SHIPPED[0]), UserWarning, stacklevel=1)
        warnings.warn("another warning", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["another warning"]


def test_installed_pth_silences_the_notice_at_interpreter_start():
    site_dirs = [Path(path) for path in sys.path if path and Path(path).is_dir()]
    assert any((site_dir / PTH_NAME).is_file() for site_dir in site_dirs), f"no {PTH_NAME}: pip install -e . again"
    emit = "import sys, warnings; warnings.warn(sys.argv[1], UserWarning)"
    for config_file, shown in ((SHIPPED[0], False), (FOREIGN[0], True)):
        result = subprocess.run(
            [sys.executable, "-W", "default", "-c", emit, monai_notice(config_file)],
            capture_output=True,
            text=True,
            check=True,
        )
        assert ("parsing config_file" in result.stderr) is shown, result.stderr
