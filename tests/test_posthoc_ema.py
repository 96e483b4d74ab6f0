"""EDM2's post-hoc EMA (Karras et al. 2024, Sec. 3.1, App. C.2-C.3): the power-function EMA against its closed form,
γ ↔ σ_rel, reconstruction from stored snapshots against the exact average of a synthetic weight sequence, `diffit
ema` end to end (its checkpoints sample and export), `--sweep`, and its bad input."""

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from helpers import invoke, perturbed_net, read_pngs, tiny_unet

from diffit_cli.config import dump_preset
from diffit_cli.core.posthoc_ema import gamma_of_sigma_rel, power_beta, power_weights, sigma_rel_of_gamma
from diffit_cli.errors import DiffitError
from diffit_cli.fid import score as S
from diffit_cli.posthoc import reconstruct as R
from diffit_cli.posthoc.store import list_profiles, load_profile_state, write_snapshot

STORED = (0.05, 0.10)  # EDM2's two tracked profiles
STEPS, EVERY, BATCH = 96, 24, 8  # snapshots at steps 24, 48, 72, 96


def _recursion(sequence, gamma):
    """θ̂_t = β_t θ̂_{t−1} + (1 − β_t) θ_t over `sequence` (a list of tensors), every partial average returned."""
    avg, out = torch.zeros_like(sequence[0]), []
    for t, theta in enumerate(sequence, start=1):
        beta = power_beta(t, gamma)
        avg = beta * avg + (1 - beta) * theta
        out.append(avg)
    return out


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.10, 0.2, 0.29])
def test_power_ema_recursion_is_the_closed_form_average(sigma_rel):
    gamma = gamma_of_sigma_rel(sigma_rel)
    seq = torch.randn(2000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    averages = _recursion(list(seq), gamma)
    for t in (1, 2, 17, 200, 2000):  # 2000^(γ+1) overflows a float64 at σ_rel 0.01: the closed form uses ratios
        w = power_weights(t, gamma)
        assert w.sum().item() == pytest.approx(1.0, abs=1e-12)
        assert averages[t - 1].item() == pytest.approx((w * seq[:t]).sum().item(), abs=1e-12)
    assert power_beta(1, gamma) == 0.0  # the first average is the first weights


def test_sigma_rel_and_gamma_round_trip_and_edm2_pairs():
    assert gamma_of_sigma_rel(0.05) == pytest.approx(16.97, abs=0.01)  # EDM2 Sec. 3.1
    assert gamma_of_sigma_rel(0.10) == pytest.approx(6.94, abs=0.01)
    for s in (0.001, 0.02, 0.05, 0.1, 0.2, 0.3):
        assert sigma_rel_of_gamma(gamma_of_sigma_rel(s)) == pytest.approx(s, rel=1e-12)
    for bad in (0.0, -0.05, 0.35):
        with pytest.raises(DiffitError, match=r"outside \(0, 0.3\)"):
            R.check_sigma_rels([bad])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A synthetic run of the tiny U-Net: weights θ_τ = base + a drift and seeded per-step noise, the two EDM2
    profiles run by the recursion and stored every 24 steps, and the exact averages of σ_rel 0.07 kept to compare."""
    root = tmp_path_factory.mktemp("run")
    preset = tiny_unet()
    base = perturbed_net(preset).state_dict()
    g = torch.Generator().manual_seed(0)
    floating = {k: v for k, v in base.items() if v.is_floating_point()}
    d1, d2 = ({k: torch.randn(v.shape, generator=g) * 0.05 for k, v in floating.items()} for _ in range(2))
    profiles = {s: {k: v.clone().double() for k, v in floating.items()} for s in (*STORED, 0.07)}
    exact = {}
    for t in range(1, STEPS + 1):
        theta = {
            k: v.double()
            + math.sin(6 * t / STEPS) * d1[k]
            + (t / STEPS) * d2[k]
            + 0.02 * torch.randn(v.shape, generator=g)
            for k, v in floating.items()
        }
        for s, avg in profiles.items():
            beta = power_beta(t, gamma_of_sigma_rel(s))
            for k in avg:
                avg[k].mul_(beta).add_(theta[k], alpha=1 - beta)
        if t % EVERY == 0:
            exact[t] = {k: v.clone() for k, v in profiles[0.07].items()}
            for s in STORED:
                state = {**base, **profiles[s]}
                write_snapshot(root, state, s, gamma_of_sigma_rel(s), t, t * BATCH, dump_preset(preset))
    return root, exact


def _distance(a, b):
    return math.sqrt(sum(((a[k].double() - b[k].double()) ** 2).sum().item() for k in b))


def test_a_stored_profile_comes_back_as_itself(run, tmp_path):
    root, _ = run
    results = R.reconstruct(root, list(STORED), out_dir=tmp_path)
    latest = {p.sigma_rel: p for p in list_profiles(root) if p.step == STEPS}
    for r in results:
        assert r.residual < 1e-6 and r.step == STEPS and r.nimg == STEPS * BATCH
        stored = load_profile_state(latest[r.sigma_rel].path)
        ckpt = torch.load(r.path, weights_only=True)
        assert ckpt["reconstruction"]["sigma_rel"] == r.sigma_rel and ckpt["preset"]
        for k, v in stored.items():
            assert ckpt["ema"][k].dtype == v.dtype, k  # the index buffers stay integers
            torch.testing.assert_close(ckpt["ema"][k], v, rtol=1e-6, atol=1e-7)


def test_an_intermediate_sigma_rel_beats_either_stored_profile(run, tmp_path):
    """σ_rel 0.07 rebuilt from the stored 0.05 and 0.10 snapshots is closer to the exact 0.07 average than either
    stored profile is, at the latest time and at an earlier stored one (--at-kimg)."""
    root, exact = run
    for step in (STEPS, 2 * EVERY):
        at = None if step == STEPS else step * BATCH / 1000
        (r,) = R.reconstruct(root, [0.07], out_dir=tmp_path / str(step), at_kimg=at)
        assert r.step == step and 0 < r.residual < 0.05
        assert set(r.coefficients) == {p.path.name for p in list_profiles(root) if p.step <= step}
        rebuilt = torch.load(r.path, weights_only=True)["ema"]
        miss = _distance(rebuilt, exact[step])
        for p in list_profiles(root):
            if p.step == step:
                assert miss < 0.5 * _distance(load_profile_state(p.path), exact[step]), p.sigma_rel


def test_at_kimg_must_be_a_stored_time(run, tmp_path):
    """The time asked for names the snapshot stored by the step that crossed it (within one batch, 8 images here)."""
    root, _ = run
    (r,) = R.reconstruct(root, [0.07], out_dir=tmp_path / "near", at_kimg=0.185)  # stored at 0.192 (step 24)
    assert (r.nimg, r.step) == (192, 24)
    shutil.rmtree(tmp_path / "near")
    with pytest.raises(DiffitError, match="no snapshot was stored then; stored at kimg 0.192, 0.384"):
        R.reconstruct(root, [0.07], out_dir=tmp_path, at_kimg=0.2)
    assert not tmp_path.joinpath("x").exists() and list(tmp_path.iterdir()) == []


@pytest.mark.e2e
def test_diffit_ema_then_sample_and_export(run, tmp_path):
    """`diffit ema` prints each σ_rel's residual and file; the stored σ_rel's reconstruction samples the images the
    snapshot itself samples, and `diffit export` takes a reconstruction (but not its --raw weights)."""
    root, _ = run
    out = tmp_path / "ema"
    r = invoke("ema", root, "--sigma-rel", "0.05,0.07", "--out", out)
    assert r.exit_code == 0, r.output
    files = sorted(p.name for p in out.iterdir())
    assert files == ["ema-0.050-00000000.768.pt", "ema-0.070-00000000.768.pt"]
    flat = " ".join(r.output.split())
    assert (
        "0.05" in flat
        and "0.07" in flat
        and "residual" in flat
        and "ema-0.070-00000000.768.pt" in "".join(r.output.split())
    )
    snapshot = next(p.path for p in list_profiles(root) if p.step == STEPS and p.sigma_rel == 0.05)
    for name, ckpt in (("rec", out / files[0]), ("snap", snapshot)):
        s = invoke("sample", "--ckpt", ckpt, "--seeds", "0-3", "--out", tmp_path / name)
        assert s.exit_code == 0, s.output
    assert np.array_equal(read_pngs(tmp_path / "rec", range(4)), read_pngs(tmp_path / "snap", range(4)))
    e = invoke("export", out / files[1], tmp_path / "exported")
    assert e.exit_code == 0, e.output
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert config["source"] == {"file": files[1], "kimg": 0.768, "step": STEPS}
    e = invoke("export", out / files[1], tmp_path / "raw", "--raw")
    assert e.exit_code == 2 and "holds only EMA weights" in e.output and not (tmp_path / "raw").exists()


def _fake_scores(calls):
    """A stand-in for `score_checkpoint`: FID = 10 + 1000 (σ_rel − 0.07)², read from the checkpoint."""

    def score(ckpt, num=None, **kw):
        calls.append(ckpt)
        s = torch.load(ckpt, weights_only=True)["reconstruction"]["sigma_rel"]
        fid = 10 + 1000 * (s - 0.07) ** 2
        return {
            "min": fid,
            "num": num or 50000,
            "extractor": "fake",
            "reference": "fake.npz",
            "sampler": "heun",
            "steps": 4,
        }

    return score


def test_sweep_table_plot_best_and_resume(run, tmp_path, monkeypatch):
    root, _ = run
    calls = []
    monkeypatch.setattr(S, "score_checkpoint", _fake_scores(calls))
    sigmas, standin = "0.05,0.07,0.09", ["--feature-extractor", "diffit-randconv-v1"]
    r = invoke("ema", root, "--sigma-rel", sigmas, "--out", tmp_path, "--sweep", "--num-samples", 16, *standin)
    assert r.exit_code == 0, r.output
    assert len(calls) == 3
    saved = json.loads((tmp_path / "ema-sweep.json").read_text())
    assert saved["best"] == "ema-0.070-00000000.768.pt"
    assert {e["request"]["num"] for e in saved["entries"].values()} == {16}
    table = (tmp_path / "ema-sweep.md").read_text()
    (best_line,) = [line for line in table.splitlines() if "**best**" in line]
    assert best_line.startswith("| 0.07 |") and "10.0000" in best_line
    assert (tmp_path / "ema-sweep.png").stat().st_size > 0
    assert "best" in r.output and "10.0000" in r.output
    # the same reconstructions again: nothing is sampled; another --num-samples is scored anew
    r = invoke(
        "ema", root, "--sigma-rel", sigmas, "--out", tmp_path, "--sweep", "--num-samples", 16, "--force", *standin
    )
    assert r.exit_code == 0 and len(calls) == 3, r.output
    r = invoke(
        "ema", root, "--sigma-rel", "0.07", "--out", tmp_path, "--sweep", "--num-samples", 8, "--force", *standin
    )
    assert r.exit_code == 0 and len(calls) == 4, r.output
    # a snapshot rewritten under its name (a rollback, another run): the kept score is not reused
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)  # keeps the modification times: the same snapshots, the score reused
    args = ["--sigma-rel", "0.07", "--out", tmp_path, "--sweep", "--num-samples", 8, "--force", *standin]
    r = invoke("ema", copy, *args)
    assert r.exit_code == 0 and len(calls) == 4, r.output
    snapshot = list_profiles(copy)[0].path
    os.utime(snapshot, ns=(snapshot.stat().st_atime_ns, snapshot.stat().st_mtime_ns + 10**9))
    r = invoke("ema", copy, *args)
    assert r.exit_code == 0 and len(calls) == 5, r.output


@pytest.mark.e2e
def test_sweep_scores_like_eval_fid_ckpt(run, tmp_path):
    """With the offline stand-in extractor the sweep's FID is `eval-fid --ckpt`'s on the same checkpoint."""
    from diffit_cli.data import open_source
    from diffit_cli.fid import metrics as M
    from diffit_cli.fid.extractors import register_test_extractor

    root, _ = run
    standin = register_test_extractor()
    src = open_source(tiny_unet().data)
    ref = M.save_reference(
        np.stack([src[i][0].numpy().transpose(1, 2, 0) for i in range(32)]),
        tmp_path / "ref.npz",
        feature_extractor=standin,
    )["path"]
    args = ["--num-samples", 8, "--feature-extractor", standin, "--ref", ref]
    r = invoke("ema", root, "--sigma-rel", "0.07", "--out", tmp_path / "o", "--sweep", *args)
    assert r.exit_code == 0, r.output
    (entry,) = json.loads((tmp_path / "o" / "ema-sweep.json").read_text())["entries"].values()
    ckpt = tmp_path / "o" / entry["file"]
    e = invoke(
        "eval-fid",
        "--ckpt",
        ckpt,
        "--num",
        8,
        "--feature-extractor",
        standin,
        "--ref",
        ref,
        "--json",
        tmp_path / "f.json",
    )
    assert e.exit_code == 0, e.output
    assert entry["fid"] == pytest.approx(json.loads((tmp_path / "f.json").read_text())["min"], rel=1e-6)


def _tree(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "args, words",
    [
        (["--sigma-rel", "0"], ["σ_rel 0 is outside (0, 0.3)"]),
        (["--sigma-rel", "0.05,0.35"], ["σ_rel 0.35 is outside (0, 0.3)"]),
        (["--sigma-rel", "-0.05"], ["σ_rel -0.05 is outside (0, 0.3)"]),
        (["--sigma-rel", "abc"], ["--sigma-rel 'abc'", "separated by commas"]),
        (["--sigma-rel", "0.05,0.050"], ["0.050 twice"]),
        (["--sigma-rel", "0.07", "--at-kimg", "1"], ["--at-kimg 1", "stored at kimg"]),
        (["--sigma-rel", "0.07", "--num-samples", "8"], ["--num-samples go with --sweep"]),
        (["--sigma-rel", "0.07", "--sweep", "--feature-extractor", "nope"], ["'nope'"]),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(run, tmp_path, args, words):
    root, _ = run
    before = _tree(root)
    r = invoke("ema", root, "--out", tmp_path / "out", *args)
    assert r.exit_code == 2, r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output, r.output
    for word in words:
        assert word in r.output, (word, r.output)
    assert not (tmp_path / "out").exists() and _tree(root) == before


def test_a_run_without_snapshots_and_an_existing_output(run, tmp_path):
    (tmp_path / "bare").mkdir()
    r = invoke("ema", tmp_path / "bare", "--sigma-rel", "0.05")
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert "posthoc-ema" in r.output and "train.posthoc_ema" in r.output
    assert list((tmp_path / "bare").iterdir()) == []
    root, _ = run
    out = tmp_path / "out"
    out.mkdir()
    (out / "ema-0.070-00000000.768.pt").write_bytes(b"mine")
    r = invoke("ema", root, "--sigma-rel", "0.05,0.07", "--out", out)
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert "ema-0.070-00000000.768.pt" in r.output and "--force" in r.output
    assert sorted(p.name for p in out.iterdir()) == ["ema-0.070-00000000.768.pt"]
    assert (out / "ema-0.070-00000000.768.pt").read_bytes() == b"mine"


@pytest.mark.e2e
@pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.device_count() < 2,
    reason="two processes on one GPU: NCCL needs a GPU per process",
)
def test_two_processes_reconstruct_once_and_score_like_one(run, tmp_path):
    """`diffit ema --sweep` under 2 gloo processes (torchrun): the main process writes each reconstruction once
    (the other does not find it in the way), the seeds are split, and the scores equal one process's."""
    import os
    import subprocess
    import sys

    from diffit_cli.data import open_source
    from diffit_cli.fid import metrics as M
    from diffit_cli.fid.extractors import register_test_extractor

    root, _ = run
    standin = register_test_extractor()
    src = open_source(tiny_unet().data)
    images = np.stack([src[i][0].numpy().transpose(1, 2, 0) for i in range(32)])
    ref = M.save_reference(images, tmp_path / "ref.npz", feature_extractor=standin)["path"]
    args = ["--sigma-rel", "0.06,0.08", "--sweep", "--num-samples", "6", "--feature-extractor", standin, "--ref", ref]
    one = invoke("ema", root, "--out", tmp_path / "one", *args)
    assert one.exit_code == 0, one.output
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29591"]
    cmd += ["-m", "diffit_cli", "ema", str(root), "--out", str(tmp_path / "two"), *map(str, args)]
    out = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    scores = [json.loads((tmp_path / d / "ema-sweep.json").read_text())["entries"] for d in ("one", "two")]
    assert {e["file"]: e["fid"] for e in scores[0].values()} == {e["file"]: e["fid"] for e in scores[1].values()}
    for name in (e["file"] for e in scores[0].values()):
        a, b = (torch.load(tmp_path / d / name, weights_only=False)["ema"] for d in ("one", "two"))
        assert all(torch.equal(a[k], b[k]) for k in a)
