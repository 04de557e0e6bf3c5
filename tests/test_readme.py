"""The README's commands use options the configs really have (a typo there costs a new user their first hour)."""

import json
import os
import re

import pytest

from .conftest import CONFIG_DIR, REPO_ROOT

BUNDLE_OPTIONS = {"config_file", "meta_file", "filepath", "run_id", "bundle_root", "logging_file", "args_file"}


def readme_commands(prefix: str) -> list[str]:
    """The README's shell commands that start with ``prefix`` (continuation lines joined)."""
    with open(os.path.join(REPO_ROOT, "README.md")) as f:
        text = f.read().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip().startswith(prefix)]


BUNDLE_RUNS = readme_commands("python -m monai.bundle run ")


@pytest.mark.parametrize("command", BUNDLE_RUNS, ids=lambda c: re.search(r"configs/(\w+)", c).group(1))
def test_readme_bundle_flags_are_config_keys(command):
    config = re.search(r"--config_file (\S+)", command).group(1)
    with open(os.path.join(CONFIG_DIR, os.path.basename(config))) as f:
        keys = set(json.load(f))
    flags = set(re.findall(r"--(\w+)", command)) - BUNDLE_OPTIONS
    assert flags <= keys, f"{sorted(flags - keys)} are not keys of {config}"


def test_readme_shows_the_short_run_flags_and_the_sqlite_mlflow_store():
    flags = {flag for command in BUNDLE_RUNS for flag in re.findall(r"--(\w+)", command)}
    assert {"epochs", "max_iterations", "batch_size", "max_images"} <= flags
    for command in readme_commands("mlflow ui") + readme_commands("export MLFLOW_TRACKING_URI"):
        assert "sqlite:///" in command
    assert readme_commands("mlflow runs list") and readme_commands("export MLFLOW_TRACKING_URI")


def test_ci_runs_the_readme_test_commands_and_together_they_run_every_test():
    with open(os.path.join(REPO_ROOT, ".ci", "run")) as f:
        ci = [line.strip() for line in f if line.strip().startswith("python -m pytest")]
    with open(os.path.join(REPO_ROOT, "README.md")) as f:
        readme = f.read()
    assert ci == ['python -m pytest -q tests -m "not slow"', "python -m pytest -q tests -m slow"]
    assert all(command in readme for command in ci)


def test_robustness_table_names_tests_that_exist():
    with open(os.path.join(REPO_ROOT, "docs", "robustness.md")) as f:
        named = re.findall(r"`(test_\w+\.py)::(test_\w+)", f.read())
    assert len(named) > 20
    for module, name in named:
        with open(os.path.join(REPO_ROOT, "tests", module)) as f:
            assert f"def {name}(" in f.read(), f"{module}::{name}"
