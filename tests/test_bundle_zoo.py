"""The bundles pass the MONAI model zoo's offline checks (``monai_grata.utils.verify_bundle``), and broken copies fail
them with a message that names the problem."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable

import pytest

from monai_grata.utils.verify_bundle import (
    BundleCheckError,
    check_version,
    main,
    read_large_files,
    verify_bundle,
)

from .conftest import REPO_ROOT

BUNDLES = ["bundles/grata", "bundles/spinalcord_gm"]
BUNDLE_OPTIONS = {"config_file", "meta_file", "filepath", "run_id", "bundle_root", "logging_file", "args_file"}


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.parametrize("bundle", BUNDLES)
def test_shipped_bundle_passes(bundle):
    assert "large files" in verify_bundle(os.path.join(REPO_ROOT, bundle))


@pytest.mark.parametrize("bundle", BUNDLES)
def test_large_files_list_every_weight_file_with_its_sha256(bundle):
    root = os.path.join(REPO_ROOT, bundle)
    entries = read_large_files(root)
    weights = sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, "models", "*.pt")))
    assert weights and sorted(entry["path"] for entry in entries) == weights
    for entry in entries:
        assert entry["hash_type"] == "sha256"
        assert entry["hash_val"] == _sha256(os.path.join(root, entry["path"])), entry["path"]
        assert entry["url"] == f"{bundle}/{entry['path']}"  # the file's path in this repository


@pytest.mark.parametrize("bundle", BUNDLES)
def test_metadata_version_is_the_newest_changelog_entry(bundle):
    with open(os.path.join(REPO_ROOT, bundle, "configs", "metadata.json")) as f:
        metadata = json.load(f)
    assert metadata["version"] == "0.5.1" and check_version(metadata) == []
    assert "../" not in metadata["data_source"] and "docs/data.md" in metadata["data_source"]


def readme_commands(bundle: str) -> list[str]:
    """The ``monai.bundle run`` commands of a bundle's README (continuation lines joined)."""
    with open(os.path.join(REPO_ROOT, bundle, "docs", "README.md")) as f:
        text = f.read().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if "-m monai.bundle run " in line]


@pytest.mark.parametrize("bundle", BUNDLES)
def test_readme_commands_use_config_keys_and_a_data_variable(bundle):
    commands = readme_commands(bundle)
    assert len(commands) >= 3
    for command in commands:
        configs = re.findall(r"bundles/\w+/configs/\w+\.json", re.search(r"--config_file (\S+)", command).group(1))
        keys = set()
        for config in configs:
            with open(os.path.join(REPO_ROOT, config)) as f:
                keys |= set(json.load(f))
        flags = set(re.findall(r"--(\w+)", command.split("monai.bundle run", 1)[1])) - BUNDLE_OPTIONS
        assert flags <= keys, f"{sorted(flags - keys)} are not keys of {configs}"
        assert "../" not in command
        for dataset_dir in re.findall(r"--dataset_dir (\S+)", command):
            assert dataset_dir.startswith("$DATA_DIR/"), command


def test_ci_runs_the_checker_on_both_bundles():
    with open(os.path.join(REPO_ROOT, ".ci", "run")) as f:
        lines = [line.strip() for line in f]
    assert "python -m monai_grata.utils.verify_bundle bundles/grata bundles/spinalcord_gm" in lines


@pytest.fixture
def bundle_copy(tmp_path) -> str:
    """A copy of the spinal-cord bundle (1.6 MB of weights) to break."""
    return shutil.copytree(os.path.join(REPO_ROOT, "bundles", "spinalcord_gm"), str(tmp_path / "spinalcord_gm"))


def _edit_json(path: str, edit: Callable[[dict], None]) -> None:
    with open(path) as f:
        content = json.load(f)
    edit(content)
    with open(path, "w") as f:
        json.dump(content, f)


def _edit_text(path: str, old: str, new: str) -> None:
    with open(path) as f:
        text = f.read()
    assert old in text
    with open(path, "w") as f:
        f.write(text.replace(old, new))


def _append_byte(path: str) -> None:
    with open(path, "ab") as f:
        f.write(b"\0")


def _metadata(bundle: str) -> str:
    return os.path.join(bundle, "configs", "metadata.json")


BREAKAGES = {
    "no_license": (lambda b: os.remove(os.path.join(b, "LICENSE")), "necessary file LICENSE is missing"),
    "version_not_in_changelog": (
        lambda b: _edit_json(_metadata(b), lambda m: m.update(version="0.6.0")),
        "version 0.6.0 is missing in 'changelog'",
    ),
    "version_not_newest": (
        lambda b: _edit_json(_metadata(b), lambda m: m["changelog"].update({"0.10.0": "later"})),
        "version 0.5.1 is not the newest in 'changelog' (0.10.0 is)",
    ),
    "invalid_metadata": (
        lambda b: _edit_json(_metadata(b), lambda m: m.pop("task")),
        "not valid against docs/metadata_schema.json: 'task' is a required property",
    ),
    "local_data_path": (
        lambda b: _edit_json(_metadata(b), lambda m: m.update(data_source="see ../data/README.md")),
        "metadata field 'data_source' points at a relative path outside the bundle",
    ),
    "no_schema": (
        lambda b: os.remove(os.path.join(b, "docs", "metadata_schema.json")),
        "metadata_schema.json is missing",
    ),
    "wrong_hash": (
        lambda b: _edit_text(os.path.join(b, "large_files.yml"), "89573e3c", "00000000"),
        "large file models/source.pt: sha256 is 89573e3c",
    ),
    "changed_weights": (
        lambda b: _append_byte(os.path.join(b, "models", "source.pt")),
        "large file models/source.pt: sha256 is",
    ),
    "unlisted_weights": (
        lambda b: shutil.copy(os.path.join(b, "models", "source.pt"), os.path.join(b, "models", "extra.pt")),
        "weight file models/extra.pt is not listed in large_files.yml",
    ),
    "no_url": (
        lambda b: _edit_text(os.path.join(b, "large_files.yml"), 'url: "bundles/spinalcord_gm/models/source.pt"', ""),
        "large file models/source.pt: 'url' is missing",
    ),
    "url_of_another_file": (
        lambda b: _edit_text(
            os.path.join(b, "large_files.yml"), 'models/source.pt"\n    hash', 'models/x.pt"\n    hash'
        ),
        "is neither a download link nor a path ending in models/source.pt",
    ),
    "listed_file_missing": (
        lambda b: os.remove(os.path.join(b, "models", "source.pt")),
        "large file models/source.pt is listed but not in the bundle",
    ),
    "no_large_files_list": (
        lambda b: os.remove(os.path.join(b, "large_files.yml")),
        "weight file models/source.pt is not listed in large_files.yml",
    ),
    "readme_section_missing": (
        lambda b: _edit_text(os.path.join(b, "docs", "README.md"), "## Performance", "## Results"),
        "docs/README.md lacks the section(s) ['Performance']",
    ),
    "job_option_undeclared": (
        lambda b: _edit_text(os.path.join(b, "configs", "inference.json"), '"steps": null, ', ""),
        "option 'steps' must be declared at the top level",
    ),
    "job_option_not_passed_on": (
        lambda b: _edit_text(os.path.join(b, "configs", "inference.json"), '"radius": "@radius", ', ""),
        "wrong: ['radius']",
    ),
    "no_inference_config": (
        lambda b: os.remove(os.path.join(b, "configs", "inference.json")),
        "inference config file is missing",
    ),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_broken_copy_fails_with_a_clear_message(bundle_copy, breakage):
    break_bundle, message = BREAKAGES[breakage]
    assert verify_bundle(bundle_copy)
    break_bundle(bundle_copy)
    with pytest.raises(BundleCheckError) as error:
        verify_bundle(bundle_copy)
    assert any(message in problem for problem in error.value.problems), error.value.problems


def test_command_line_exit_status_and_report(bundle_copy, capsys):
    assert main([bundle_copy]) == 0
    assert f"{bundle_copy}: ok" in capsys.readouterr().out
    os.remove(os.path.join(bundle_copy, "LICENSE"))
    assert main([bundle_copy, os.path.join(bundle_copy, "missing")]) == 1
    err = capsys.readouterr().err
    assert "necessary file LICENSE is missing" in err and "missing: 1 problem(s):\n  - not a folder" in err
