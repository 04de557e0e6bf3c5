import importlib.util
import os
from types import ModuleType

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_DIR = os.path.join(REPO_ROOT, "bundles", "grata", "sample")
CONFIG_DIR = os.path.join(REPO_ROOT, "bundles", "grata", "configs")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def sample_dir() -> str:
    return SAMPLE_DIR


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` as a module (``scripts/`` is no package).

    Args:
        name: the script's file name without ``.py``.
    """
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO_ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Device-specific code is tested on every device this machine has: "cuda" is reported as skipped without one.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def pytest_configure(config):
    config.addinivalue_line("markers", "device: runs once per device (cpu, and cuda when available)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.device)


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """The device a test runs on, once per device; on CUDA with TF32 off, so results compare with float32
    references as on the CPU (cuDNN convolutions default to TF32 on recent GPUs)."""
    if request.param != "cuda":
        yield torch.device(request.param)
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield torch.device("cuda")
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
