"""Every ``_target_`` of the shipped bundle configs names one callable on every Python version."""

import glob
import importlib.util
import json
import os
import pydoc

import pytest
from monai.bundle.config_item import ComponentLocator

from .conftest import REPO_ROOT

CONFIGS = sorted(glob.glob(os.path.join(REPO_ROOT, "bundles", "*", "configs", "*.json")))


def targets(node: object) -> list[str]:
    """The literal ``_target_`` strings in a parsed config (expressions and references left out)."""
    if isinstance(node, dict):
        found = [node["_target_"]] if isinstance(node.get("_target_"), str) else []
        return found + [t for value in node.values() for t in targets(value)]
    if isinstance(node, list):
        return [t for value in node for t in targets(value)]
    return []


def is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # its parent is a module, not a package
        return False


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_targets_are_callables_and_never_also_a_module(path):
    # MONAI locates a target with pydoc.locate; when a package exports a function under its submodule's name,
    # Python 3.11 returns the function and 3.12 the submodule (which the bundle then fails to call)
    with open(path) as f:
        names = {t for t in targets(json.load(f)) if not t.startswith(("$", "@", "%"))}
    for name in names:
        if "." not in name:  # a MONAI component by its short name
            assert ComponentLocator().get_component_module_name(name) is not None, name
            continue
        assert not is_module(name), f"{name} is also a module: ambiguous on Python >= 3.12"
        assert callable(pydoc.locate(name)), name
