"""Tests for the latent DiffiT (docs/paper.md, 'Latent network'): release layout, parameter counts, init, time modes."""

import numpy as np
import pytest
import torch

from diffit_cli.core.attention import TIME_MODES, relative_position_index
from diffit_cli.models import LATENT_SIZES, LatentDiffiT

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, num_classes=10)


def count(model, trainable=False):
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


@pytest.mark.parametrize("size,total,trainable", [(32, 561_330_144, 561_035_232), (64, 563_562_464, 562_382_816)])
def test_xl2_parameter_counts_on_meta(size, total, trainable):
    with torch.device("meta"):
        model = LatentDiffiT(input_size=size)
    assert count(model) == total
    assert count(model, trainable=True) == trainable


def test_named_sizes():
    assert LATENT_SIZES["XL/2"] == {"depth": 28, "hidden_size": 1152, "num_heads": 16, "patch_size": 2}
    assert LATENT_SIZES["S/8"]["hidden_size"] == 384 and LATENT_SIZES["B/4"]["num_heads"] == 12
    assert LATENT_SIZES["L/2"]["depth"] == 24 and len(LATENT_SIZES) == 12


def release_state_dict(input_size, patch, c_in, D, depth, heads, classes, learn_sigma=True):
    """The release's key list and shapes (docs/paper.md, 'Latent network'), written out by hand."""
    T, W = (input_size // patch) ** 2, input_size // patch
    out = c_in * (2 if learn_sigma else 1)
    r = torch.randn
    sd = {
        "x_embedder.proj.weight": r(D, c_in, patch, patch),
        "x_embedder.proj.bias": r(D),
        "pos_embed": r(1, T, D),
        "t_embedder.mlp.0.weight": r(D, 256),
        "t_embedder.mlp.0.bias": r(D),
        "t_embedder.mlp.2.weight": r(D, D),
        "t_embedder.mlp.2.bias": r(D),
        "y_embedder.embedding_table.weight": r(classes + 1, D),
        "final_layer.linear.weight": r(patch * patch * out, D),
        "final_layer.linear.bias": r(patch * patch * out),
    }
    for n in range(depth):
        b = f"blocks.{n}."
        sd.update(
            {
                b + "attn.qkv.weight": r(3 * D, D),
                b + "attn.qkv.bias": r(3 * D),
                b + "attn.qkv_temb.weight": r(3 * D, D),
                b + "attn.qkv_temb.bias": r(3 * D),
                b + "attn.proj.weight": r(D, D),
                b + "attn.proj.bias": r(D),
                b + "attn.relative_position_bias_table": r((2 * W - 1) ** 2, heads),
                b + "attn.relative_position_index": torch.randint(0, (2 * W - 1) ** 2, (W * W, W * W)),
                b + "mlp.fc1.weight": r(4 * D, D),
                b + "mlp.fc1.bias": r(4 * D),
                b + "mlp.fc2.weight": r(D, 4 * D),
                b + "mlp.fc2.bias": r(D),
            }
        )
    return sd


def test_release_state_dict_loads_strict():
    sd = release_state_dict(8, 2, 4, 32, 2, 4, 10)
    model = LatentDiffiT(**TINY)
    assert set(model.state_dict()) == set(sd)
    model.load_state_dict(sd, strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert not model.pos_embed.requires_grad
    # the persistent index buffer equals the release's Swin construction
    fresh = LatentDiffiT(**TINY).blocks[1].attn.relative_position_index
    assert fresh.shape == (16, 16) and fresh.dtype == torch.int64
    assert torch.equal(fresh, relative_position_index(4))


def test_pos_embed_matches_release_formula():
    model = LatentDiffiT(**TINY)
    D, g = 32, 4

    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.stack(np.meshgrid(np.arange(g, dtype=np.float32), np.arange(g, dtype=np.float32)), axis=0)
    ref = np.concatenate([one_d(D // 2, grid[0]), one_d(D // 2, grid[1])], axis=1)
    assert torch.allclose(model.pos_embed[0], torch.from_numpy(ref).float(), atol=1e-6)


def test_init_follows_release():
    torch.manual_seed(0)
    model = LatentDiffiT(**TINY)
    assert torch.count_nonzero(model.final_layer.linear.weight) == 0
    assert torch.count_nonzero(model.blocks[0].attn.qkv.bias) == 0
    assert model.y_embedder.embedding_table.weight.std().item() == pytest.approx(0.02, rel=0.2)
    assert model.t_embedder.mlp[0].weight.std().item() == pytest.approx(0.02, rel=0.2)
    table = model.blocks[0].attn.relative_position_bias_table
    assert table.std().item() == pytest.approx(0.02, rel=0.3)  # timm-style trunc_normal_(std=.02), cut at ±2


def test_forward_shapes_zero_init_and_null_class():
    torch.manual_seed(0)
    model = LatentDiffiT(**TINY)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999]), torch.tensor([1, 2, 10])
    out = model(x, t, y)
    assert out.shape == (3, 8, 8, 8) and torch.count_nonzero(out) == 0
    small = LatentDiffiT(**{**TINY, "learn_sigma": False, "patch_size": 4})
    assert small(x, t.float(), y).shape == (3, 4, 8, 8)


def test_time_and_label_dependence_and_gradients():
    torch.manual_seed(0)
    model = LatentDiffiT(**TINY)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    model.eval()
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 4])
    out = model(x, torch.tensor([10, 10]), y)
    assert not torch.allclose(out, model(x, torch.tensor([600, 600]), y))
    assert not torch.allclose(out, model(x, torch.tensor([10, 10]), torch.tensor([10, 10])))
    # label dropout p=1 in training == feeding the null class
    model.y_embedder.dropout_prob = 1.0
    model.train()
    assert torch.allclose(model(x, torch.tensor([10, 10]), y), model(x, torch.tensor([10, 10]), torch.tensor([10, 10])))
    model.y_embedder.dropout_prob = 0.0
    model.zero_grad()
    model(x, torch.tensor([10, 700]), torch.tensor([3, 10])).square().mean().backward()
    assert model.pos_embed.grad is None
    D = 32
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        g = p.grad
        if name.endswith("attn.qkv_temb.weight") or name.endswith("attn.qkv_temb.bias"):
            # docs/paper.md, 'TMSA': the key time-projection gets (numerically) zero gradient; q and v rows learn
            assert g[D : 2 * D].abs().max() < 1e-6 * max(1.0, g.abs().max().item()) + 1e-9, name
            assert g[:D].abs().max() > 0 and g[2 * D :].abs().max() > 0, name
        else:
            assert g is not None and g.abs().max() > 0, name


def test_time_modes_build_run_and_differ():
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.tensor([3, 10])
    outs = {}
    for mode in TIME_MODES:
        torch.manual_seed(0)
        model = LatentDiffiT(**TINY, time_mode=mode)
        torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
        if mode == "adaln":  # adaLN-Zero is time-independent at init by design; wake the modulation up
            for name, p in model.named_parameters():
                if "adaLN_modulation" in name:
                    torch.nn.init.normal_(p, std=0.05)
        out = model(x, t, y)
        out.square().mean().backward()
        assert out.shape == (2, 8, 8, 8) and torch.isfinite(out).all()
        assert not torch.allclose(out, model(x, t.flip(0), y)), mode
        outs[mode] = out.detach()
    modes = list(outs)
    for i, a in enumerate(modes):
        for b in modes[i + 1 :]:
            assert not torch.allclose(outs[a], outs[b]), (a, b)


def test_bf16_autocast_and_plain_path():
    torch.manual_seed(0)
    model = LatentDiffiT(**TINY)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.tensor([3, 10])
    ref = model(x, t, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y)
    assert torch.isfinite(out).all() and torch.allclose(out.float(), ref, atol=0.1)
    for blk in model.blocks:
        blk.attn.kernel = "reference"
    assert torch.allclose(model(x, t, y), ref, atol=1e-5)
