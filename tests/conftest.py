import os

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
