"""Loss-spike watch: the detector on synthetic loss traces, and the training loop's warn / stop / rollback."""

import json
import math

import numpy as np
import pytest
import torch
from helpers import TINY_UNET, invoke, set_flags, tiny_unet

from diffit_cli.checkpoint import checkpoint_name, latest_checkpoint, load_checkpoint
from diffit_cli.events import Message, Step
from diffit_cli.training import train
from diffit_cli.training.monitor import SpikeDetector


def _feed(det, losses, report_kimg=2.0):
    """Feed one loss per report; return the spikes with the index of the report that completed each."""
    found = []
    for i, loss in enumerate(losses):
        kimg = (i + 1) * report_kimg
        spike = det.update(kimg, int(i * report_kimg * 1000), loss)
        if spike is not None:
            found.append((i, spike))
    return found


def _noisy_flat(n, level=0.08, noise=0.15, seed=0):
    rng = np.random.default_rng(seed)
    return list(level * (1 + noise * rng.standard_normal(n)))


def test_fires_on_the_reported_divergence_trace():
    """A diverging run's loss trace: a steady 0.08 loss that jumps tenfold at 92 kimg and stays up."""
    losses = list(np.linspace(1.5, 0.09, 20)) + _noisy_flat(25) + [0.821, 1.206, 1.056, 0.955, 1.051, 0.932]
    spikes = _feed(SpikeDetector(), losses)
    # once per `patience` (3) high reports while it stays up: reports 45-47 from 92 kimg, then 48-50 from 98 kimg
    assert [(i, s.first_kimg) for i, s in spikes] == [(47, 92.0), (50, 98.0)]
    index, spike = spikes[0]
    assert index == 47 and spike.first_kimg == 92.0 and spike.start_nimg == 90_000
    assert spike.ratio > 9 and abs(spike.median - 0.08) < 0.01


def test_quiet_on_a_noisy_flat_or_falling_trace():
    det = SpikeDetector()
    assert _feed(det, list(np.linspace(2.0, 0.1, 30)) + _noisy_flat(200, noise=0.25)) == []
    assert 1.0 < det.max_ratio < 2.0


def test_a_single_outlier_is_not_a_spike_but_nan_counts():
    det = SpikeDetector(patience=3)
    losses = _noisy_flat(30)
    assert _feed(det, losses[:20] + [0.5] + losses[20:]) == []  # one bad report, then back to normal
    det = SpikeDetector(patience=2)
    spikes = _feed(det, _noisy_flat(20) + [math.nan, math.nan])
    assert [(i, s.first_kimg) for i, s in spikes] == [(21, 42.0)] and math.isnan(spikes[0][1].loss)


def test_warmup_reports_only_feed_the_median():
    det = SpikeDetector(warmup_kimg=10)
    assert _feed(det, [0.1, 5.0, 5.0, 5.0, 5.0]) == []  # all within the first 10 kimg
    assert det.max_ratio == 0.0


def test_state_round_trip_continues_identically():
    trace = _noisy_flat(30) + [1.0] * 4
    whole = SpikeDetector()
    expected = _feed(whole, trace)
    first, second = SpikeDetector(), SpikeDetector()
    _feed(first, trace[:31])
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))  # survives a checkpoint
    rest = [(i + 31, s) for i, s in _feed_from(second, trace, 31)]
    assert [(i, s.kimg) for i, s in expected] == [(i, s.kimg) for i, s in rest]


def _feed_from(det, losses, start, report_kimg=2.0):
    found = []
    for i in range(start, len(losses)):
        spike = det.update((i + 1) * report_kimg, int(i * report_kimg * 1000), losses[i])
        if spike is not None:
            found.append((i - start, spike))
    return found


# ---------------------------------------------------------------------------------------------- training loop
def _spike_at(monkeypatch, kimg: float):
    """Make the run's detector report a spike once, at the report of `kimg` (its interval's start = suspect)."""
    real = SpikeDetector.update

    def update(self, k, start_nimg, loss):
        out = real(self, k, start_nimg, loss)
        if abs(k - kimg) < 1e-9 and not getattr(self, "_fired", False):
            self._fired = True
            from diffit_cli.training.monitor import Spike

            return Spike(k, k, start_nimg, loss * 10, loss)
        return out

    monkeypatch.setattr(SpikeDetector, "update", update)


def _log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


ROLLBACK = (
    "train.total_kimg=0.048",
    "train.on_spike=rollback",
    "train.spike_lr_factor=0.25",
    "train.keep_checkpoints=5",
)


@pytest.mark.e2e
def test_rollback_resumes_from_the_last_good_checkpoint_with_a_lower_lr(tmp_path, monkeypatch):
    _spike_at(monkeypatch, 0.032)  # reports every 8 img, snapshots every 16: the spiking interval began at 24 img,
    # so the last good checkpoint is the one at 16 img
    p = tiny_unet(*ROLLBACK)
    events = []
    state = train(p, tmp_path / "a", progress=events.append)
    spike = next(e.data for e in events if isinstance(e, Message) and e.data.get("event") == "spike")
    good = tmp_path / "a" / "checkpoints" / checkpoint_name(16)
    assert spike["action"] == "rollback" and spike["checkpoint"] == str(good)
    assert spike["rollback_kimg"] == 0.016 and spike["lr_scale"] == 0.25
    assert state.nimg == 48 and state.rollbacks == 1 and state.lr_scale == 0.25
    reports = [r for r in _log(tmp_path / "a") if "loss" in r and "event" not in r]
    assert [r["kimg"] for r in reports] == [0.008, 0.016, 0.024, 0.032, 0.024, 0.032, 0.040, 0.048]
    lr = p.train.lr
    assert [r["lr"] for r in reports] == pytest.approx([lr] * 4 + [lr * 0.25] * 4)
    assert any(e.get("event") == "spike" for e in _log(tmp_path / "a"))
    final = load_checkpoint(latest_checkpoint(tmp_path / "a"))
    assert final["lr_scale"] == 0.25 and final["rollbacks"] == 1
    assert load_checkpoint(good)["lr_scale"] == 0.25  # the rolled-back-to checkpoint carries the new scale

    b = train(p, tmp_path / "b")  # the same command again: the same spike, rollback and result, bit for bit
    assert b.nimg == 48
    fb = load_checkpoint(latest_checkpoint(tmp_path / "b"))
    for k in final["model"]:
        assert torch.equal(final["model"][k], fb["model"][k]), k


@pytest.mark.e2e
def test_rollback_then_kill_resumes_bit_identically(tmp_path, monkeypatch):
    _spike_at(monkeypatch, 0.032)
    p = tiny_unet(*ROLLBACK)
    train(p, tmp_path / "straight")

    class Killed(Exception):
        pass

    def kill_after_rollback(e):
        if isinstance(e, Step) and e.done == 0.040:
            raise Killed

    monkeypatch.undo()
    _spike_at(monkeypatch, 0.032)
    with pytest.raises(Killed):
        train(p, tmp_path / "killed", progress=kill_after_rollback)
    monkeypatch.undo()  # after the kill the detector sees the real losses again: no second spike
    train(p, tmp_path / "killed")
    a = load_checkpoint(latest_checkpoint(tmp_path / "straight"))
    b = load_checkpoint(latest_checkpoint(tmp_path / "killed"))
    assert (a["nimg"], a["lr_scale"]) == (b["nimg"], b["lr_scale"]) == (48, 0.25)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


@pytest.mark.e2e
def test_report_logs_gradient_norm_and_attention_logits(tmp_path):
    state = train(tiny_unet("train.total_kimg=0.016"), tmp_path)
    for r in state.history:
        assert r["grad_norm"] > 0 and r["grad_norm_max"] >= r["grad_norm"] * 0.999
        assert math.isfinite(r["attn_logit_max"])
    assert [json.loads(line)["attn_logit_max"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [
        r["attn_logit_max"] for r in state.history
    ]


@pytest.mark.e2e
def test_cli_on_spike_stop_names_the_checkpoint_and_exits_1(tmp_path, monkeypatch):
    _spike_at(monkeypatch, 0.032)
    args = set_flags(TINY_UNET + ["train.total_kimg=0.048", "train.on_spike=stop"])
    r = invoke("train", "--run-dir", str(tmp_path / "run"), *args)
    assert r.exit_code == 1, r.output
    words = "".join(r.output.split())  # rich wraps long lines, even inside a path
    assert "lossspikeat0.032kimg" in words and checkpoint_name(16) in words and "stopped:" in r.output
    assert "Traceback" not in r.output
    assert load_checkpoint(latest_checkpoint(tmp_path / "run"))["nimg"] == 16  # stopped: nothing saved after it
