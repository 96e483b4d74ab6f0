"""Test-wide settings: nothing downloads (HF_HUB_OFFLINE, a private TORCH_HOME)."""

import os
import tempfile

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TORCH_HOME", tempfile.mkdtemp(prefix="diffit-torch-home-"))
os.environ.pop("DIFFIT_DEBUG", None)


@pytest.fixture
def one_thread():
    """Run a test on one torch thread (for tests of small element-wise loops), then restore."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
