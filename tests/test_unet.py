"""Tests for the image-space DiffiT (docs/paper.md, 'Image-space network'): shapes, zero-init head, gradients,
time modes, autocast."""

import pytest
import torch

from diffit_cli.core.attention import TIME_MODES, TMSA
from diffit_cli.core.unet import ResBlock, group_norm
from diffit_cli.models import ImageDiffiT

CIFAR_LIKE = dict(
    img_resolution=32,
    channels=(32, 64, 64),
    blocks=(1, 1, 1),
    window_size=(4, 4, 4),
    head_dim=16,
    time_dim=48,
    dropout=0.0,
)
FFHQ_LIKE = dict(
    img_resolution=64,
    channels=(16, 32, 32, 32),
    blocks=(1, 2, 2, 2),
    window_size=8,
    head_dim=16,
    time_dim=32,
    dropout=0.0,
)


def wake_head(model, std=0.1):
    torch.nn.init.normal_(model.head[-1].weight, std=std)


def test_paper_configs_parameter_counts_on_meta():
    with torch.device("meta"):
        cifar = ImageDiffiT()
        ffhq = ImageDiffiT(img_resolution=64, channels=(128, 256, 256, 256), blocks=(1, 2, 2, 2), window_size=8)
    assert sum(p.numel() for p in cifar.parameters()) == 16_984_771
    assert sum(p.numel() for p in ffhq.parameters()) == 25_369_563
    assert [b.block.attn.num_heads for b in cifar.enc[1].blocks] == [8, 8]  # 256 / head_dim 32


@pytest.mark.parametrize("cfg", [CIFAR_LIKE, FFHQ_LIKE], ids=["cifar10-like", "ffhq64-like"])
def test_shapes_and_zero_output_at_init(cfg):
    torch.manual_seed(0)
    model = ImageDiffiT(**cfg)
    res = cfg["img_resolution"]
    x = torch.randn(2, 3, res, res)
    out = model(x, torch.tensor([-1.0, 0.7]))
    assert out.shape == x.shape and torch.count_nonzero(out) == 0
    assert len(model.enc) == len(cfg["channels"]) and len(model.dec) == len(cfg["channels"]) - 1
    assert sum(len(s.blocks) for s in model.dec) == sum(cfg["blocks"][:-1])


def test_window_clamped_and_out_channels():
    model = ImageDiffiT(
        img_resolution=16,
        in_channels=4,
        out_channels=8,
        channels=(16, 32),
        blocks=(1, 1),
        window_size=16,
        head_dim=16,
        time_dim=16,
    )
    assert model.windows == (16, 8)
    assert model(torch.randn(1, 4, 16, 16), torch.zeros(1)).shape == (1, 8, 16, 16)
    with pytest.raises(ValueError):
        ImageDiffiT(img_resolution=32, channels=(16, 32), blocks=(1, 1), window_size=(4, 4, 4), head_dim=16)


def test_output_has_the_input_channels_by_default():
    """A grey (1-channel) network predicts 1 channel: the head followed a fixed 3 and EDM broadcast it silently."""
    model = ImageDiffiT(
        img_resolution=16, in_channels=1, channels=(16, 32), blocks=(1, 1), window_size=4, head_dim=16, time_dim=16
    )
    assert model(torch.randn(2, 1, 16, 16), torch.zeros(2)).shape == (2, 1, 16, 16)


def test_resblock_is_outer_residual_over_block():
    torch.manual_seed(0)
    rb = ResBlock(32, 2, 8, window_size=4, mlp_ratio=4.0, dropout=0.0, time_mode="tmsa")
    x, x_t = torch.randn(2, 32, 8, 8), torch.randn(2, 8)
    h = rb.conv(torch.nn.functional.silu(rb.norm(x)))
    tokens = rb.block(h.flatten(2).transpose(1, 2), x_t, (8, 8))
    ref = tokens.transpose(1, 2).reshape(2, 32, 8, 8) + x
    assert torch.allclose(rb(x, x_t), ref, atol=1e-5)


def test_gradients_reach_every_learnable_parameter():
    torch.manual_seed(0)
    model = ImageDiffiT(**CIFAR_LIKE, num_classes=5, augment_dim=3)
    wake_head(model)
    x = torch.randn(2, 3, 32, 32)
    model(x, torch.tensor([-1.0, 0.5]), torch.tensor([1, 4]), torch.randn(2, 3)).square().mean().backward()
    for name, p in model.named_parameters():
        if name.endswith("attn.qkv_temb.weight") or name.endswith("attn.qkv_temb.bias"):
            C = p.shape[0] // 3
            # docs/paper.md, 'TMSA': the key time-projection's gradient vanishes (softmax shift invariance)
            assert p.grad[C : 2 * C].abs().max() < 1e-5 * p.grad.abs().max() + 1e-9, name
            assert p.grad[:C].abs().max() > 0 and p.grad[2 * C :].abs().max() > 0, name
        else:
            assert p.grad is not None and p.grad.abs().max() > 0, name


def test_time_label_and_augment_dependence():
    torch.manual_seed(0)
    model = ImageDiffiT(**CIFAR_LIKE, num_classes=5, label_dropout=1.0, augment_dim=3).eval()
    wake_head(model)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([-1.0, 0.5])
    out = model(x, t, torch.tensor([1, 2]))
    assert not torch.allclose(out, model(x, t + 0.5, torch.tensor([1, 2])))
    assert not torch.allclose(out, model(x, t, torch.tensor([3, 2])))
    assert torch.allclose(model(x, t), model(x, t, torch.tensor([5, 5])))  # y=None -> null class
    assert not torch.allclose(out, model(x, t, torch.tensor([1, 2]), torch.ones(2, 3)))
    model.train()  # label_dropout = 1: training replaces every label with the null class
    assert torch.allclose(model(x, t, torch.tensor([1, 2])), model(x, t, torch.tensor([5, 5])))


def test_time_modes_and_embeddings_differ():
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([-1.0, 0.5])
    outs = {}
    for mode in TIME_MODES:
        torch.manual_seed(0)
        model = ImageDiffiT(**CIFAR_LIKE, time_mode=mode)
        wake_head(model)
        if mode == "adaln":  # adaLN-Zero is time-independent at init by design
            for name, p in model.named_parameters():
                if "adaLN_modulation" in name:
                    torch.nn.init.normal_(p, std=0.05)
        out = model(x, t)
        out.square().mean().backward()
        assert out.shape == x.shape and torch.isfinite(out).all()
        assert not torch.allclose(out, model(x, t.flip(0))), mode
        outs[mode] = out.detach()
    torch.manual_seed(0)
    fourier = ImageDiffiT(**CIFAR_LIKE, time_embedding="fourier")
    wake_head(fourier)
    outs["fourier"] = fourier(x, t).detach()
    names = list(outs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not torch.allclose(outs[a], outs[b]), (a, b)


def test_bf16_autocast_and_plain_attention_path():
    torch.manual_seed(0)
    model = ImageDiffiT(**CIFAR_LIKE)
    wake_head(model)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([-1.0, 0.5])
    ref = model(x, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t)
    assert torch.isfinite(out).all() and torch.allclose(out.float(), ref, atol=0.1)
    for m in model.modules():
        if isinstance(m, TMSA):
            m.kernel = "reference"
    assert torch.allclose(model(x, t), ref, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_norm_on_channels_last_cpu_tensors_matches_plain_group_norm(dtype):
    torch.manual_seed(0)
    norm = group_norm(64).to(dtype)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    ref = torch.nn.GroupNorm(32, 64, eps=1e-6).to(dtype)
    ref.load_state_dict(norm.state_dict())
    x = (torch.randn(2, 64, 8, 8) * 3 + 1).to(dtype)
    a = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    b = x.clone().requires_grad_()
    out_a, out_b = norm(a), ref(b)
    assert out_a.is_contiguous(memory_format=torch.channels_last)  # the next conv keeps its memory format
    g = torch.randn_like(out_b)
    out_a.backward(g), out_b.backward(g)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}
    torch.testing.assert_close(out_a, out_b, **tol)
    torch.testing.assert_close(a.grad, b.grad, **tol)
    torch.testing.assert_close(norm.weight.grad, ref.weight.grad, **tol)


def test_label_table_init_follows_edm_in_image_space_and_the_release_in_latent_space():
    from diffit_cli.models import LatentDiffiT

    torch.manual_seed(0)
    image = ImageDiffiT(channels=(32, 32), blocks=(1, 1), window_size=4, head_dim=16, time_dim=256, num_classes=10)
    latent = LatentDiffiT(
        input_size=8, patch_size=2, in_channels=4, hidden_size=256, depth=1, num_heads=4, num_classes=10
    )
    # EDM's map_label gives unit-scale label rows; DiT/the release keep N(0, .02)
    assert image.y_embedder.embedding_table.weight.std().item() == pytest.approx(1.0, abs=0.05)
    assert latent.y_embedder.embedding_table.weight.std().item() == pytest.approx(0.02, abs=0.002)
    assert image.t_embedder.mlp[0].weight.std().item() == pytest.approx(0.02, abs=0.002)
