"""The training step's parts (issue 17): the fused optimizer's device-side skip, the EMA as one lerp, the skipped
count read at report time."""

import json
import math

import pytest
import torch
from helpers import tiny_unet

from diffit_cli.build import build_network, build_optimizer
from diffit_cli.training import train
from diffit_cli.training.recipe import Ema, step_unless


def _state(net, opt):
    return [p.detach().clone() for p in net.parameters()], [
        {k: v.clone() for k, v in s.items()} for s in opt.state.values()
    ]


def _grads(net, value=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    for p in net.parameters():
        p.grad = torch.full_like(p, value) if value is not None else torch.randn(p.shape, generator=g)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "host-flag"])
def test_a_non_finite_step_is_skipped_exactly(fused):
    p = tiny_unet("train.optimizer=adamw", "train.weight_decay=0.01")
    torch.manual_seed(0)
    net, twin = build_network(p.model), build_network(p.model)
    twin.load_state_dict(net.state_dict())
    opt = build_optimizer(net.parameters(), p.train)
    if not fused:
        opt = torch.optim.AdamW(net.parameters(), lr=p.train.lr, weight_decay=0.01)
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=p.train.lr, weight_decay=0.01, fused=fused)
    assert bool(opt.defaults["fused"]) is fused  # the kernel training uses on CPU (and CUDA)
    for model, o in ((net, opt), (twin, twin_opt)):
        _grads(model, seed=1)
        step_unless(o, torch.zeros(()))
    before = _state(net, opt)
    _grads(net, float("nan"))
    step_unless(opt, torch.ones(()))  # skipped: parameters, moments and step count untouched
    after = _state(net, opt)
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
    assert all(torch.equal(a[k], b[k]) for a, b in zip(before[1], after[1]) for k in a)
    for model, o in ((net, opt), (twin, twin_opt)):  # the next step is the one the twin, never skipped, takes
        _grads(model, seed=2)
        step_unless(o, torch.zeros(()))
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), twin.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(net.parameters(), before[0]))


def test_ema_update_is_the_ema_formula():
    torch.manual_seed(0)
    net = build_network(tiny_unet().model)
    ema = Ema(net)
    ref = [p.detach().clone() for p in ema.net.parameters()]
    for p in net.parameters():
        p.data.add_(torch.randn_like(p))
    for beta in (0.999, 0.5):
        ema.update(net, beta)
        ref = [beta * e + (1 - beta) * p.detach() for e, p in zip(ref, net.parameters())]
        for got, want in zip(ema.net.parameters(), ref):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.e2e
def test_skipped_steps_are_counted_at_report_time(tmp_path, monkeypatch):
    from diffit_cli.core.edm import EDM

    real, calls = EDM.loss, []

    def loss(self, *a, **k):  # the second optimizer step's loss (one micro-batch per step) is NaN
        calls.append(1)
        out = real(self, *a, **k)
        return out * float("nan") if len(calls) == 2 else out

    monkeypatch.setattr(EDM, "loss", loss)
    state = train(tiny_unet("train.report_kimg=0.016"), tmp_path)  # 4 steps, a report every 2
    assert state.step == 4 and state.skipped == 1 and state.skipped_in_a_row == 0
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert [r["skipped"] for r in log] == [1, 1]
    assert all(math.isfinite(r["grad_norm"]) for r in log)  # the skipped step's norm is left out of the mean
