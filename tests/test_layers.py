"""Tests for diffit_cli.core.layers and core.attention: embeddings, relative position bias, windows, TMSA (DiffiT
Eq. 3–8), and the attention kernels (reference, SDPA, flex_attention) and how a preset selects one."""

import math

import pytest
import torch
from helpers import tiny_unet, tiny_vit

from diffit_cli.build import build_network
from diffit_cli.core.attention import (
    TIME_MODES,
    TMSA,
    relative_position_index,
    set_attention_kernel,
    window_merge,
    window_partition,
)
from diffit_cli.core.layers import DiffiTBlock, FourierEmbedding, LabelEmbedder, TimestepEmbedder, timestep_embedding
from diffit_cli.training import TrainError, train


def set_plain(module, plain=True):
    for m in module.modules():
        if isinstance(m, TMSA):
            m.kernel = "reference" if plain else "sdpa"


def test_timestep_embedding_cos_then_sin():
    t = torch.tensor([0.0, 3.0])
    emb = timestep_embedding(t, 8)
    assert emb.shape == (2, 8)
    assert torch.allclose(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = torch.exp(-math.log(1e4) * torch.arange(4) / 4)
    assert torch.allclose(emb[1], torch.cat([torch.cos(3 * freqs), torch.sin(3 * freqs)]), atol=1e-6)
    assert timestep_embedding(t, 7).shape == (2, 7)


def test_time_embedders():
    torch.manual_seed(0)
    t = torch.tensor([-1.0, 0.5])
    assert FourierEmbedding(16)(t).shape == (2, 16)
    emb = TimestepEmbedder(32, 16, kind="fourier", augment_dim=3)
    assert "fourier.freqs" in emb.state_dict()
    out = emb(t)
    assert out.shape == (2, 32)
    assert not torch.allclose(out, emb(t, torch.ones(2, 3)))  # augment labels enter the time token
    with pytest.raises(ValueError):
        TimestepEmbedder(8, kind="nope")


def test_label_embedder_null_class_and_dropout():
    emb = LabelEmbedder(10, 8, dropout_prob=1.0)
    assert emb.embedding_table.weight.shape == (11, 8)
    y = torch.arange(4)
    null = emb.embedding_table.weight[10]
    emb.train()
    assert torch.equal(emb(y), null.expand(4, 8))  # p = 1: every label dropped
    emb.eval()
    assert torch.equal(emb(y), emb.embedding_table.weight[:4])
    assert torch.equal(emb(y, train=True), null.expand(4, 8))
    forced = emb(y, force_drop_ids=torch.tensor([1, 0, 1, 0]))
    assert torch.equal(forced[0], null) and torch.equal(forced[1], emb.embedding_table.weight[1])


def test_relative_position_index_matches_offsets():
    w = 3
    idx = relative_position_index(w)
    assert idx.shape == (9, 9) and idx.dtype == torch.int64
    assert int(idx.min()) == 0 and int(idx.max()) == (2 * w - 1) ** 2 - 1
    for i in range(9):
        for j in range(9):
            dr, dc = i // w - j // w, i % w - j % w
            assert idx[i, j] == (dr + w - 1) * (2 * w - 1) + (dc + w - 1)


def test_window_partition_merge_identity():
    x = torch.randn(2, 8, 12, 5)
    win = window_partition(x, 4)
    assert win.shape == (2 * 2 * 3, 16, 5)
    assert torch.equal(win[0], x[0, :4, :4].reshape(16, 5))
    assert torch.equal(win[1], x[0, :4, 4:8].reshape(16, 5))
    assert torch.equal(win[6], x[1, :4, :4].reshape(16, 5))
    assert torch.equal(window_merge(win, 4, 8, 12), x)


def reference_tmsa(attn: TMSA, x, x_t, w):
    """DiffiT Eq. 6 written out: per-head softmax(q kᵀ/√d + B) v with B looked up pair by pair."""
    B, N, C = x.shape
    h, d = attn.num_heads, attn.head_dim
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias + (x_t @ attn.qkv_temb.weight.T + attn.qkv_temb.bias)[:, None]
    q, k, v = [z.view(B, N, h, d).transpose(1, 2) for z in qkv.chunk(3, dim=-1)]
    bias = torch.empty(h, N, N)
    for i in range(N):
        for j in range(N):
            dr, dc = i // w - j // w, i % w - j % w
            bias[:, i, j] = attn.relative_position_bias_table[(dr + w - 1) * (2 * w - 1) + dc + w - 1]
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + bias, dim=-1)
    return (a @ v).transpose(1, 2).reshape(B, N, C) @ attn.proj.weight.T + attn.proj.bias


def test_global_tmsa_matches_written_out_formula():
    torch.manual_seed(0)
    attn = TMSA(16, 2, 12, window_size=4)
    x, x_t = torch.randn(2, 16, 16), torch.randn(2, 12)
    ref = reference_tmsa(attn, x, x_t, 4)
    assert torch.allclose(attn(x, x_t, (4, 4)), ref, atol=1e-5)
    set_plain(attn)
    assert torch.allclose(attn(x, x_t, (4, 4)), ref, atol=1e-5)


def test_windowed_tmsa_equals_global_tmsa_per_window():
    torch.manual_seed(0)
    attn = TMSA(16, 2, 12, window_size=4)
    x, x_t = torch.randn(2, 8 * 8, 16), torch.randn(2, 12)
    out = attn(x, x_t, (8, 8)).view(2, 8, 8, 16)
    grid = x.view(2, 8, 8, 16)
    for r in (0, 4):  # the test may loop; the module does not
        for c in (0, 4):
            crop = grid[:, r : r + 4, c : c + 4].reshape(2, 16, 16)
            ref = attn(crop, x_t, (4, 4))  # window = grid: global attention on the crop
            assert torch.allclose(out[:, r : r + 4, c : c + 4].reshape(2, 16, 16), ref, atol=1e-5)


@pytest.mark.parametrize("mode", TIME_MODES)
def test_sdpa_equals_plain_path(mode):
    torch.manual_seed(0)
    attn = TMSA(16, 2, 12, window_size=4, time_mode=mode)
    x, x_t = torch.randn(3, 8 * 4, 16), torch.randn(3, 12)
    fast = attn(x, x_t, (8, 4))  # with gradients: explicit fast path on CPU
    with torch.no_grad():
        fused = attn(x, x_t, (8, 4))  # without: SDPA's fused kernel (fp32 CPU)
    set_plain(attn)
    plain = attn(x, x_t, (8, 4))
    assert torch.allclose(fast, plain, atol=1e-5) and torch.allclose(fused, plain, atol=1e-5)


def test_store_attn_and_key_time_projection_cancels():
    """docs/paper.md, 'TMSA': x_t·W_kt shifts every logit of a query equally, so softmax ignores it."""
    torch.manual_seed(0)
    C = 16
    attn = TMSA(C, 2, 12, window_size=4)
    attn.store_attn = True
    x, x_t = torch.randn(2, 64, C), torch.randn(2, 12)
    attn(x, x_t, (8, 8))
    before = attn.last_attn.clone()
    assert before.shape == (2 * 4, 2, 16, 16)
    assert torch.allclose(before.sum(-1), torch.ones(()))
    with torch.no_grad():
        attn.qkv_temb.weight[C : 2 * C].normal_(std=3.0)  # key rows
        attn.qkv_temb.bias[C : 2 * C].normal_(std=3.0)
    attn(x, x_t, (8, 8))
    assert torch.allclose(attn.last_attn, before, atol=1e-5)
    with torch.no_grad():
        attn.qkv_temb.weight[:C].normal_(std=3.0)  # query rows do change the pattern
    attn(x, x_t, (8, 8))
    assert not torch.allclose(attn.last_attn, before, atol=1e-3)


@pytest.mark.parametrize("mode", TIME_MODES)
def test_softmax_invariant_key_terms_get_no_gradient(mode):
    """docs/stability.md: the key's shared term (x_t·W_kt + b_k) cannot change the output, so it must get exactly
    zero gradient (Adam would turn rounding noise there into steps that grow the logits without bound)."""
    torch.manual_seed(0)
    C = 16
    attn = TMSA(C, 2, 12, window_size=4, time_mode=mode)
    x, x_t = torch.randn(2, 64, C), torch.randn(2, 12)
    for autocast in (False, True):
        attn.zero_grad()
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            attn(x, x_t, (8, 8)).float().square().mean().backward()
        assert torch.count_nonzero(attn.qkv.bias.grad[C : 2 * C]) == 0
        assert torch.count_nonzero(attn.qkv.bias.grad[:C]) > 0
        if mode == "tmsa":
            assert torch.count_nonzero(attn.qkv_temb.weight.grad[C : 2 * C]) == 0
            assert torch.count_nonzero(attn.qkv_temb.bias.grad[C : 2 * C]) == 0
            assert torch.count_nonzero(attn.qkv_temb.weight.grad[:C]) > 0


@pytest.mark.parametrize("mode", TIME_MODES)
def test_block_time_modes_forward_backward(mode):
    torch.manual_seed(0)
    block = DiffiTBlock(16, 2, 12, window_size=4, time_mode=mode)
    if mode == "adaln":
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.1)
    x = torch.randn(2, 64, 16)
    t1, t2 = torch.randn(2, 12), torch.randn(2, 12)
    out = block(x, t1, (8, 8))
    assert out.shape == x.shape
    assert not torch.allclose(out, block(x, t2, (8, 8)))  # time enters in every mode
    out.square().sum().backward()
    assert all(p.grad is not None for p in block.parameters())


def test_tmsa_bf16_autocast_cpu():
    torch.manual_seed(0)
    block = DiffiTBlock(16, 2, 12, window_size=4)
    x, x_t = torch.randn(2, 64, 16), torch.randn(2, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x, x_t, (8, 8))
    assert torch.isfinite(out).all()
    assert torch.allclose(out.float(), block(x, x_t, (8, 8)), atol=0.1)


# -------------------------------------------------------------------------------------------------- attention kernels
# flex_attention with the relative position bias as a score_mod equals the reference maths. PyTorch has no CPU
# backward for flex_attention, so the CPU tests check the forward pass and the bias-gradient check runs on a GPU
# (tests/test_cuda.py).
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
