"""TMSA attention backends (issue 17): flex_attention with the relative position bias as a score_mod equals the
reference maths. PyTorch has no CPU backward for flex_attention, so the CPU tests check the forward pass and the
bias-gradient check runs on a GPU (tests/test_cuda.py)."""

import pytest
import torch
from helpers import tiny_unet, tiny_vit

from diffit_cli.build import build_network
from diffit_cli.core.layers import TMSA, set_attention_kernel
from diffit_cli.training import TrainError, train


@pytest.mark.parametrize("time_mode", ["tmsa", "bias", "separate"])
@pytest.mark.parametrize("window,grid", [(4, 8), (8, 8)], ids=["windowed", "global"])
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # CPU: the eager reference
def test_flex_equals_the_reference_forward(time_mode, window, grid):
    torch.manual_seed(0)
    attn = TMSA(32, 4, 16, window, time_mode).eval()
    with torch.no_grad():
        attn.relative_position_bias_table.normal_(0, 1.0)  # a bias that matters
        x, x_t = torch.randn(3, grid * grid, 32), torch.randn(3, 16)
        attn.kernel = "reference"
        ref = attn(x, x_t, (grid, grid))
        attn.kernel = "flex"
        got = attn(x, x_t, (grid, grid))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_the_preset_key_selects_the_backend_and_flex_training_needs_a_gpu(tmp_path):
    for p in (tiny_unet("model.attention_kernel=flex"), tiny_vit("model.attention_kernel=flex")):
        assert {m.kernel for m in build_network(p.model).modules() if isinstance(m, TMSA)} == {"flex"}
    assert {m.kernel for m in build_network(tiny_unet().model).modules() if isinstance(m, TMSA)} == {"sdpa"}
    with pytest.raises(ValueError, match="attention kernel"):
        set_attention_kernel(build_network(tiny_unet().model), "xformers")
    if not torch.cuda.is_available():
        with pytest.raises(TrainError, match="model.attention_kernel=sdpa"):
            train(tiny_unet("model.attention_kernel=flex"), tmp_path)
        assert not any(tmp_path.iterdir())  # refused before anything is written
