"""The README and the docs a user reads first: commands with options the configs really have (a typo there costs a
new user their first hour), links that resolve, the README's Python example, nothing that points at a folder a user
does not have."""

import glob
import json
import os
import re
import subprocess
import sys
import unicodedata

import pytest

from .conftest import CONFIG_DIR, REPO_ROOT

BUNDLE_OPTIONS = {"config_file", "meta_file", "filepath", "run_id", "bundle_root", "logging_file", "args_file"}
USER_DOCS = ("README.md", "docs/bundle.md", "docs/benchmark.md", "docs/install.md")


def read(path: str) -> str:
    with open(os.path.join(REPO_ROOT, path), encoding="utf-8") as f:
        return f.read()


def readme_commands(prefix: str, files: tuple[str, ...] = USER_DOCS) -> list[str]:
    """The shell commands of the README and the first docs that start with ``prefix`` (continuation lines joined)."""
    text = "\n".join(read(path) for path in files).replace("\\\n", " ")
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


def test_readme_is_read_in_two_minutes():
    assert len(read("README.md").splitlines()) <= 120


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    text = unicodedata.normalize("NFC", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@pytest.mark.parametrize(
    "page",
    ["README.md", *sorted(os.path.relpath(p, REPO_ROOT) for p in glob.glob(os.path.join(REPO_ROOT, "docs", "*.md")))],
)
def test_relative_links_and_their_anchors_resolve(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", read(page)):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        assert os.path.exists(os.path.join(REPO_ROOT, resolved)), f"{page}: broken link {target}"
        if anchor and resolved.endswith(".md"):
            headings = re.findall(r"^#+ (.+)$", read(resolved), flags=re.MULTILINE)
            assert anchor in {github_anchor(h) for h in headings}, f"{page}: no heading for #{anchor} in {resolved}"


def test_no_user_facing_text_points_at_the_developers_workshop():
    pages = [
        "README.md",
        *glob.glob(os.path.join(REPO_ROOT, "docs", "*.md")),
        *glob.glob(os.path.join(REPO_ROOT, "bundles", "*", "docs", "README.md")),
        *glob.glob(os.path.join(REPO_ROOT, "bundles", "*", "configs", "*.json")),
    ]
    for page in pages:
        assert "../shared" not in read(page), f"{page} points at ../shared: use a data folder the user sets"


def readme_python_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", read("README.md"), flags=re.DOTALL)
    assert len(blocks) == 1, "the README has one Python example"
    return blocks[0]


def test_readme_python_example_is_short_and_uses_the_handler_in_a_monai_evaluator():
    code = readme_python_example()
    compile(code, "README.md", "exec")
    assert len([line for line in code.splitlines() if line.strip()]) <= 15
    assert "SupervisedEvaluator(" in code and "TTAHandler(" in code


@pytest.mark.slow
def test_readme_python_example_runs_as_written(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(readme_python_example() + '\nprint("dice", evaluator.state.metrics["dice"])\n')
    run = subprocess.run([sys.executable, str(script)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    dice = float(re.search(r"^dice (\S+)$", run.stdout, flags=re.MULTILINE).group(1))
    assert 0.5 < dice <= 1.0
