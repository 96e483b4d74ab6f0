"""Test-wide settings: nothing downloads (HF_HUB_OFFLINE, a private TORCH_HOME and DIFFIT_CACHE); GPUs hidden unless
asked for."""

import os
import tempfile

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
# The suite pins CPU semantics (bit-exact resume, gloo processes, exact seed equality), so it hides GPUs unless
# DIFFIT_TEST_CUDA=1 asks for the CUDA checks (`make test-cuda` runs tests/test_cuda.py that way).
if os.environ.get("DIFFIT_TEST_CUDA") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ.setdefault("TORCH_HOME", tempfile.mkdtemp(prefix="diffit-torch-home-"))
# datasets by name and cached training-set statistics go to a private cache (tests may point it elsewhere)
os.environ["DIFFIT_CACHE"] = tempfile.mkdtemp(prefix="diffit-cache-")
os.environ.pop("HF_DATASETS_CACHE", None)
os.environ.pop("DIFFIT_DEBUG", None)


@pytest.fixture
def one_thread():
    """Run a test on one torch thread (for tests of small element-wise loops), then restore."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
