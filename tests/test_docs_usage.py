"""docs/usage.md's extension examples run as written: the new adapter adapts through the package's entry points and
the new task is known by its name."""

import re

import pytest
import torch

from monai_grata.data import TASKS, resolve_task
from monai_grata.handlers import MetricsReport
from monai_grata.tta import build_adapter
from monai_grata.tta.base import _REGISTRY

from .conftest import REPO_ROOT
from .test_tta_baselines import images, sharp_net

SECTION = "## Extending: a new adapter, a new task"


def extension_examples() -> list[str]:
    """The python blocks of the usage guide's extension section."""
    with open(f"{REPO_ROOT}/docs/usage.md") as f:
        text = f.read()
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.fixture
def examples():
    """The examples' namespace; the adapter and task they register are removed afterwards."""
    namespace = {"__name__": "usage_examples"}
    try:
        for block in extension_examples():
            exec(compile(block, "docs/usage.md", "exec"), namespace)
        yield namespace
    finally:
        _REGISTRY.pop("confident_entropy", None)
        TASKS.pop("vessels", None)


def test_the_section_has_an_adapter_of_at_most_40_lines_and_a_task():
    adapter, task = extension_examples()
    assert "register_adapter" in adapter and len(adapter.strip().splitlines()) <= 40
    assert "register_task" in task


def test_the_new_adapter_adapts_through_build_adapter(examples):
    adapter = build_adapter("confident_entropy", sharp_net(), lr=1e-2)
    source = [p.detach().clone() for p in adapter.params]
    for x in images(2):
        logits = adapter(x)
    assert logits.shape[:2] == (1, 2) and bool(torch.isfinite(logits).all())
    assert set(adapter.last_step.scalars()) == {"loss_aux", "confident"} and float(adapter.last_step.confident) > 0
    assert adapter.last_step.updated and not adapter.last_step.rolled_back
    assert any(not torch.equal(p, q) for p, q in zip(adapter.params, source, strict=True))
    adapter.reset()
    assert all(torch.equal(p, q) for p, q in zip(adapter.params, source, strict=True))


def test_the_new_task_is_known_by_its_name(examples, tmp_path):
    task = resolve_task("vessels")
    assert task is examples["VESSELS"] and task.channels == ("vessel", "artery") and task.multilabel
    report = MetricsReport(str(tmp_path), task="vessels")
    assert list(report.channel_names) == ["vessel", "artery"]


def test_a_task_name_cannot_be_taken_twice(examples):
    from dataclasses import replace

    from monai_grata.data import register_task

    with pytest.raises(ValueError, match="already registered"):
        register_task(replace(examples["VESSELS"], channels=("a", "b")))
