"""Post-hoc EMA during training (EDM2 Sec. 3.1): the tracked profiles follow the closed-form power-function average,
are stored every `train.posthoc_ema_kimg` and never pruned, the middle of three is rebuilt from the outer two, and a
profile cannot be added to a run under way (bit-identical resume and two processes with profiles: test_training)."""

import pytest
import torch
from helpers import TINY_UNET, final_checkpoint, invoke, set_flags, tiny_unet

from diffit_cli.checkpoint import latest_checkpoint
from diffit_cli.core.posthoc_ema import gamma_of_sigma_rel, power_weights
from diffit_cli.events import Message
from diffit_cli.posthoc.reconstruct import reconstruct
from diffit_cli.posthoc.store import list_profiles, load_profile_state
from diffit_cli.training import train
from diffit_cli.training.posthoc import PowerEmaProfiles, store_due

PROFILES = ["train.posthoc_ema=[0.05, 0.1]", "train.posthoc_ema_kimg=0.008"]


def test_profiles_follow_the_closed_form_power_function_average():
    """After t updates each profile holds Σ_τ w_τ θ_τ with w_τ = (τ^(γ+1) − (τ−1)^(γ+1)) / t^(γ+1)."""
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    profiles = PowerEmaProfiles(net, (0.05, 0.2))
    history = []
    for step in range(1, 41):
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn_like(p) + step / 10)
        history.append([p.detach().clone().double() for p in net.parameters()])
        profiles.update(net, step)
    for sigma_rel, ema in zip((0.05, 0.2), profiles.emas):
        w = power_weights(40, gamma_of_sigma_rel(sigma_rel))
        for i, p in enumerate(ema.net.parameters()):
            expected = sum(w[t] * history[t][i] for t in range(40))
            torch.testing.assert_close(p.double(), expected, rtol=1e-5, atol=1e-6)


def test_the_interval_counts_whole_images():
    """1.001 kimg is 1001 images (1.001·1000 = 1000.9999… in floats): due at the step that crosses 1001, not 1000."""
    p = tiny_unet("train.posthoc_ema=[0.05]", "train.posthoc_ema_kimg=1.001")  # batch 8
    assert [n for n in (992, 1000, 1008, 2000, 2008) if store_due(p, n, done=False)] == [1008, 2008]


@pytest.mark.e2e
def test_snapshots_are_stored_on_schedule_never_pruned_and_announced(tmp_path):
    events = []
    p = tiny_unet(*PROFILES, "train.keep_checkpoints=1")
    train(p, tmp_path / "run", progress=events.append)
    stored = list_profiles(tmp_path / "run")
    assert [(s.sigma_rel, s.nimg, s.step) for s in stored] == [
        (s, n, n // 8) for n in (8, 16, 24, 32) for s in (0.05, 0.1)
    ]
    assert len(list((tmp_path / "run" / "checkpoints").glob("ckpt-*.pt"))) == 1
    assert stored[0].gamma == pytest.approx(gamma_of_sigma_rel(0.05))
    last = final_checkpoint(tmp_path / "run")["posthoc_ema"]
    for s in stored[-2:]:  # the end of the run: the stored profile is the checkpoint's
        assert all(torch.equal(v, last[repr(s.sigma_rel)][k]) for k, v in load_profile_state(s.path).items())
    notes = [e.text for e in events if isinstance(e, Message) and e.text.startswith("post-hoc EMA")]
    assert len(notes) == 1 and "4 × 2 snapshots" in notes[0], notes
    r = invoke("sample", "--ckpt", stored[-1].path, "--seeds", "0-1", "--out", tmp_path / "s.npz")
    assert r.exit_code == 0, r.output  # a stored profile is itself a weights file


@pytest.mark.e2e
def test_a_forced_resume_under_other_settings_sets_the_later_snapshots_aside(tmp_path):
    """Resumed from the older checkpoint (16 kimg) because the newest is torn: a plain resume stores the later
    snapshots again, bit for bit; with --force and another learning rate the run trains anew from there, so the
    snapshots stored after it (24 and 32 kimg, made under the old rate) are set aside and stored anew."""
    run, settings = tmp_path / "run", (*PROFILES, "train.keep_checkpoints=2")  # checkpoints at 16 and 32 kimg
    train(tiny_unet(*settings), run)
    before = {s.path.name: load_profile_state(s.path) for s in list_profiles(run)}

    def tear_latest():
        latest = latest_checkpoint(run)
        latest.write_bytes(latest.read_bytes()[:100])

    tear_latest()
    train(tiny_unet(*settings), run)
    assert not list((run / "posthoc-ema").glob("*.superseded"))
    for s in list_profiles(run):
        assert all(torch.equal(v, before[s.path.name][k]) for k, v in load_profile_state(s.path).items())
    tear_latest()
    events = []
    train(tiny_unet(*settings, "train.lr=5e-3"), run, force=True, progress=events.append)
    aside = sorted(p.name.removesuffix(".superseded") for p in (run / "posthoc-ema").glob("*.superseded"))
    assert aside == sorted(name for name in before if name.endswith((".024.safetensors", ".032.safetensors")))
    assert sorted(s.path.name for s in list_profiles(run)) == sorted(before)  # stored anew, under the new rate
    renewed = load_profile_state(run / "posthoc-ema" / aside[-1])
    assert not all(torch.equal(v, before[aside[-1]][k]) for k, v in renewed.items())
    notes = [e.text for e in events if isinstance(e, Message) and "superseded" in e.text]
    assert len(notes) == 1 and "4 post-hoc EMA snapshots" in notes[0] and "train.lr" in notes[0], notes


@pytest.mark.e2e
def test_a_profile_cannot_be_added_to_a_run_under_way(tmp_path):
    train(tiny_unet("train.total_kimg=0.016"), tmp_path / "run")
    flags = set_flags(["train.total_kimg=0.032", "train.posthoc_ema=[0.05]"])
    r = invoke("train", "--preset", "demo", *set_flags(TINY_UNET), *flags, "--run-dir", tmp_path / "run", "--force")
    assert r.exit_code == 2, r.output
    assert "holds no post-hoc EMA profile for σ_rel 0.05" in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "posthoc-ema").exists()


@pytest.mark.parametrize(
    "setting",
    [
        *(f"train.posthoc_ema={v}" for v in ("[0.0]", "[0.3]", "[-0.1]", "[0.05, 0.05]")),
        "train.posthoc_ema=[0.05, 0.05001]",  # one snapshot file name (4 decimals) for both
        "train.posthoc_ema_kimg=0.0005",  # less than one image
    ],
)
def test_bad_profiles_are_one_line(setting, tmp_path):
    r = invoke("train", "--preset", "demo", "--set", setting, "--run-dir", tmp_path / "r")
    assert r.exit_code == 2 and setting.split("=")[0] in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


@pytest.mark.e2e
def test_the_middle_profile_is_reconstructed_from_the_outer_two(tmp_path):
    """A tiny network trained with σ_rel 0.05, 0.075 and 0.10 tracked: `reconstruct` from the snapshots of the outer
    two alone comes closer to the directly tracked 0.075 than either outer profile is."""
    p = tiny_unet(
        "train.posthoc_ema=[0.05, 0.075, 0.1]",
        "train.posthoc_ema_kimg=0.016",
        "train.total_kimg=0.128",
        "train.lr=1e-2",
    )
    train(p, tmp_path / "run")
    for s in list_profiles(tmp_path / "run"):
        if s.sigma_rel == 0.075:
            s.path.rename(tmp_path / s.path.name)  # the reconstruction sees only 0.05 and 0.10
    (result,) = reconstruct(tmp_path / "run", [0.075])
    tracked = final_checkpoint(tmp_path / "run")["posthoc_ema"]
    rebuilt = torch.load(result.path, weights_only=True)["ema"]

    def distance(state):
        return sum((state[k].double() - tracked["0.075"][k].double()).square().sum() for k in rebuilt) ** 0.5

    outer = min(distance(tracked["0.05"]), distance(tracked["0.1"]))
    assert distance(rebuilt) < 0.5 * outer, (distance(rebuilt), outer)
