"""Regional compilation (build.compile_blocks): equal to eager, with activation checkpointing, and a clean fallback.

The CPU tests use the aot_eager backend: it traces every block through dynamo and AOTAutograd as inductor does, but
inductor's C++ code generation of even a tiny network takes minutes on the 2 shared CPU cores of CI; inductor
itself is tested in tests/test_cuda.py."""

import pytest
import torch
from helpers import invoke, tiny_unet, tiny_vit

from diffit_cli.build import build_network, compile_blocks, want_compile
from diffit_cli.training.recipe import enable_activation_checkpointing


def _loss_and_grads(net, x, t, y):
    torch.manual_seed(1)  # dropout
    net.zero_grad(set_to_none=True)
    out = net(x, t, y)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), [p.grad.clone() for p in net.parameters() if p.grad is not None]


@pytest.mark.parametrize("kind,checkpointing", [("unet", True), ("vit", False)])
def test_compiled_blocks_equal_eager(kind, checkpointing):
    p = (tiny_unet if kind == "unet" else tiny_vit)()
    torch.manual_seed(0)
    eager = build_network(p.model).train()
    for prm in eager.parameters():  # leave the zero-initialised heads: every parameter gets a gradient
        prm.data.normal_(0, 0.1)
    compiled = build_network(p.model).train()
    compiled.load_state_dict(eager.state_dict())
    if checkpointing:
        enable_activation_checkpointing(compiled)
    keys = list(compiled.state_dict())
    assert compile_blocks(compiled, backend="aot_eager") == len(compiled.checkpointable_blocks())
    assert list(compiled.state_dict()) == keys  # checkpoints stay loadable
    res, ch = p.model.spatial_size, p.model.in_channels
    x, t = torch.randn(2, ch, res, res), torch.rand(2) * 10
    y = torch.tensor([1, 3]) if p.model.num_classes else None
    ref, got = _loss_and_grads(eager, x, t, y), _loss_and_grads(compiled, x, t, y)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    assert len(got[1]) == len(ref[1])
    for a, b in zip(got[1], ref[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_failing_compiler_falls_back_to_eager_with_one_note():
    def broken(gm, example_inputs):
        raise RuntimeError("no compiler here\nsecond line")

    p = tiny_unet()
    torch.manual_seed(0)
    net = build_network(p.model)
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    with torch.no_grad():
        ref = net(x, t)
        notes = []
        compile_blocks(net, notes.append, backend=broken)
        out, again = net(x, t), net(x, t)
    assert torch.equal(out, ref) and torch.equal(again, ref)
    assert len(notes) == 1 and "no compiler here" in notes[0] and "second line" not in notes[0]
    assert "eagerly" in notes[0]


def test_compile_setting_is_tri_state():
    assert want_compile("auto", "cuda") and not want_compile("auto", "cpu")
    assert want_compile(True, "cpu") and not want_compile(False, "cuda")
    assert tiny_unet().train.compile == "auto" and tiny_unet("train.compile=true").train.compile is True


def test_cli_compile_flags_reach_the_preset():
    for flags, want in (([], "compile: auto"), (["--compile"], "compile: true"), (["--no-compile"], "compile: false")):
        result = invoke("train", "--preset", "demo", "--dry-run", *flags)
        assert result.exit_code == 0, result.output
        assert want in result.output


def test_blocks_compile_with_static_shapes_by_default(monkeypatch):
    """The U-Net runs blocks of one class at several resolutions: with dynamo's automatic dynamic shapes inductor
    failed on the demo network (a symbolic-shape error, then eager); each resolution gets a static graph instead."""
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw) or fn)
    net = build_network(tiny_unet().model)
    compile_blocks(net)
    compile_blocks(net, dynamic=None, mode="max-autotune")
    n = len(net.checkpointable_blocks())
    assert seen == [{"dynamic": False}] * n + [{"dynamic": None, "mode": "max-autotune"}] * n


def test_every_block_call_stays_compiled_with_many_networks_in_one_process():
    """Dynamo keeps one graph per (shape, grad mode) of a block class in one cache that stops at 8 entries, past
    which blocks would run eagerly without a word: four U-Nets of other widths in one process (as `ablate` trains
    them), each in training and without grad, must run every block call through a compiled graph."""
    # torch's defaults, whatever ran before; dynamo's own patch restores them (pytest's monkeypatch would delete the
    # settings on undo, which hides them from every later test)
    with torch._dynamo.config.patch(recompile_limit=8, accumulated_recompile_limit=256):
        _compile_four_networks()


def _compile_four_networks():
    torch._dynamo.reset()
    runs = []

    def counting(gm, example_inputs):  # a backend that runs the traced graph and counts its calls
        return lambda *args: runs.append(1) or gm.forward(*args)

    expected = 0
    for channels in ("[16, 16]", "[16, 32]", "[32, 32]", "[24, 48]"):
        p = tiny_unet(f"model.channels={channels}")
        net = build_network(p.model).train()
        n = compile_blocks(net, backend=counting)
        x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
        net(x, t, None)
        with torch.no_grad():
            net.eval()(x, t, None)
        expected += 2 * n
    torch._dynamo.reset()
    assert len(runs) == expected
