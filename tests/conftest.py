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


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A DIFFIT_CACHE of the test's own (datasets by name, training-set statistics), returned as a path."""
    monkeypatch.setenv("DIFFIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ------------------------------------------------------------------------ module-scoped data shared by several files
@pytest.fixture(scope="module")
def unet_ckpt(tmp_path_factory):
    """A tiny U-Net checkpoint (helpers.tiny_unet) whose weights are perturbed away from the zero-initialised head,
    so the sampled images depend on them."""
    from helpers import perturbed_net, tiny_unet, weights_state

    from diffit_cli.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("unet")
    p = tiny_unet()
    net = perturbed_net(p)
    save_checkpoint(root, weights_state(p, net), 0, keep=1)
    return root / "checkpoints" / "latest.pt"


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    """A random tiny AutoencoderKL saved as a folder (`/ "folder"`) and a single file (`/ "vae.safetensors"`)."""
    from helpers import save_tiny_vae

    return save_tiny_vae(tmp_path_factory.mktemp("vae"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """An image folder to encode: two classes (cat, dog) of three random 40×48 RGB images."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root
