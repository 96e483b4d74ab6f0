"""Watching a run (issue #16): trackers through Accelerate, FID along training with best.pt, curves.png and
`diffit plot`, `eval-fid --ckpt` with repeats over seed ranges."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from diffit_cli import checkpoint as ck
from diffit_cli import metrics as M
from diffit_cli.app import build_app
from diffit_cli.build import build_diffusion, build_network
from diffit_cli.config import dump_preset
from diffit_cli.curves import curve_panels, read_log, taken_path
from diffit_cli.data import open_source
from diffit_cli.generate import generate, png_path
from diffit_cli.sampling import make_decoder
from diffit_cli.training import TrackerSpec, train

from helpers import TINY_UNET, tiny_unet

STANDIN = M.register_test_extractor()


def cli(*args, env=None):
    return CliRunner().invoke(build_app(), [str(a) for a in args], env=env)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Statistics (stand-in extractor) of 64 images of the tiny preset's training data."""
    src = open_source(tiny_unet().data)
    path = tmp_path_factory.mktemp("ref") / "ref.npz"
    M.save_reference(np.stack([src[i][0].numpy().transpose(1, 2, 0) for i in range(64)]), path,
                     feature_extractor=STANDIN)
    return path


def _log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def _scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


@pytest.mark.e2e
def test_fid_along_training_tensorboard_best_checkpoint_curves_and_resume(tmp_path, reference):
    pytest.importorskip("tensorboard", reason="the tensorboard package (in the test extra) is not installed")
    run = tmp_path / "run"
    fid = ["eval.every_kimg=0.016", "eval.num_samples=8", f"eval.feature_extractor={STANDIN}",
           f"eval.reference={reference}", "train.keep_checkpoints=1"]
    state = train(tiny_unet(*fid), run, trackers=TrackerSpec(("tensorboard",)))  # to 0.032 kimg
    log = _log(run)
    fids = [r for r in log if r.get("event") == "fid"]
    assert [r["kimg"] for r in fids] == [0.016, 0.032] and {r["extractor"] for r in fids} == {STANDIN}
    assert all(np.isfinite(r["fid"]) and r["num_samples"] == 8 for r in fids)
    assert (run / "curves.png").is_file() and not (run / "fid-samples").exists()

    # TensorBoard's own reader gives back exactly log.jsonl's numbers
    scalars = _scalars(run / "trackers" / "diffit")
    reports = [r for r in log if "loss" in r and "event" not in r]
    assert len(reports) == 4
    for rec in reports:
        for k, v in rec.items():
            if k != "step" and isinstance(v, (int, float)):
                assert scalars[f"train/{k}"][rec["step"]] == pytest.approx(v, rel=1e-6), k
    assert scalars["eval/fid"] == pytest.approx({r["step"]: r["fid"] for r in fids}, rel=1e-6)

    # resume: the same curve goes on, in the same TensorBoard folder, and best.pt follows the lowest FID
    state = train(tiny_unet(*fid, "train.total_kimg=0.048"), run, trackers=TrackerSpec(("tensorboard",)))
    fids = [r for r in taken_path([r for r in _log(run) if r.get("event") == "fid"])]
    assert [r["kimg"] for r in fids] == [0.016, 0.032, 0.048]
    best = min(fids, key=lambda r: r["fid"])
    assert state.best["fid"] == best["fid"] and state.best["kimg"] == best["kimg"]
    assert ck.best_checkpoint(run).name == ck.checkpoint_name(round(best["kimg"] * 1000))
    assert ck.load_checkpoint(ck.best_checkpoint(run))["best"]["fid"] == best["fid"]
    assert sorted(_scalars(run / "trackers" / "diffit")["eval/fid"]) == [r["step"] for r in fids]


def test_best_checkpoint_is_never_pruned(tmp_path):
    state = {"ema": {}, "preset": "x"}
    ck.save_checkpoint(tmp_path, state, 1000, keep=1)
    best = ck.save_checkpoint(tmp_path, state, 2000, keep=1, best=True)
    for nimg in (3000, 4000):
        ck.save_checkpoint(tmp_path, state, nimg, keep=1)
    assert ck.best_checkpoint(tmp_path) == best.resolve() and best.is_file()
    assert [n for n, _ in ck.list_checkpoints(tmp_path)] == [2000, 4000]
    assert ck.latest_checkpoint(tmp_path).name == ck.checkpoint_name(4000)


@pytest.mark.e2e
def test_wandb_offline_writes_its_files_and_a_resume_continues_the_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install 'diffit-cli[wandb]')")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    spec = TrackerSpec(("wandb",), "diffit-test")
    train(tiny_unet("train.total_kimg=0.016"), run, trackers=spec)
    run_id = json.loads((run / "trackers.json").read_text())["wandb"]
    runs = list((run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    train(tiny_unet("train.total_kimg=0.024"), run, trackers=spec)
    assert json.loads((run / "trackers.json").read_text())["wandb"] == run_id
    assert len(list((run / "wandb").glob(f"offline-run-*-{run_id}"))) == 2  # both sessions log the same run id


def test_unknown_or_missing_trackers_are_one_line_errors(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    args = sum([["--set", s] for s in TINY_UNET], [])
    r = cli("train", "--run-dir", tmp_path / "run", "--log-with", "mlflow", *args)
    assert r.exit_code == 2 and "pip install 'diffit-cli[mlflow]'" in r.output and "Traceback" not in r.output
    r = cli("train", "--run-dir", tmp_path / "run", "--log-with", "neptune", *args)
    assert r.exit_code == 2 and "choose from tensorboard, wandb, mlflow, aim, comet_ml" in r.output
    assert not (tmp_path / "run").exists()


def test_fid_along_training_offline_without_inception_weights_stops_before_training(tmp_path):
    """The stand-in extractor is used only when asked for: offline with no Inception weights, a run that measures
    FID with the default extractor stops at once (exit 2, saying where the weights go), nothing written."""
    args = sum([["--set", s] for s in TINY_UNET + ["eval.every_kimg=0.016"]], [])
    r = cli("train", "--run-dir", tmp_path / "run", *args)
    assert r.exit_code == 2 and "Inception" in r.output and "--inception-weights" in r.output
    assert not (tmp_path / "run").exists()


def test_ablate_logs_each_variant_as_its_own_tracker_run_grouped_by_study(tmp_path, monkeypatch):
    import diffit_cli.training
    from diffit_cli import ablation as A

    seen = []

    class Stop(Exception):
        pass

    def fake_train(preset, run_dir, **kw):
        seen.append(kw["trackers"])
        raise Stop

    monkeypatch.setattr(diffit_cli.training, "train", fake_train)
    with pytest.raises(Stop):
        A.run_study("window-size", "test", runs_dir=tmp_path, only=["w4"],
                    trackers=TrackerSpec(("tensorboard",), "studies"))
    assert seen == [TrackerSpec(("tensorboard",), "studies", name="w4", group="window-size")]


def test_taken_path_keeps_what_a_resume_or_rollback_replaced():
    recs = [{"kimg": k, "loss": v} for k, v in [(1, 5), (2, 4), (3, 3), (2, 9), (3, 8), (4, 7)]]
    assert [(r["kimg"], r["loss"]) for r in taken_path(recs)] == [(1, 5), (2, 9), (3, 8), (4, 7)]


def test_plot_draws_several_runs_from_their_logs(tmp_path):
    for name, fid in (("a", True), ("b", False)):
        d = tmp_path / name
        d.mkdir()
        lines = [{"kimg": k, "step": k, "loss": 1 / k, "lr": 1e-3, "img_per_s": 100.0} for k in range(1, 6)]
        if fid:
            lines.append({"event": "fid", "kimg": 5, "step": 5, "fid": 30.0, "extractor": STANDIN})
            lines.append({"event": "spike", "kimg": 5, "loss": 99.0, "median": 1.0, "action": "warn"})
        (d / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"kimg": 6, "lo')  # torn end
    loss = curve_panels({"a": read_log(tmp_path / "a")})[0]
    assert loss.series[0].y == [1 / k for k in range(1, 6)]  # the spike line (it has a loss too) is no report
    out = tmp_path / "both.png"
    r = cli("plot", tmp_path / "a", tmp_path / "b", "--out", out)
    assert r.exit_code == 0, r.output
    with Image.open(out) as im:
        assert im.size[0] > 600 and im.size[1] > 500  # 2 × 2 panels (loss, lr, img/s, FID)
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "missing", tmp_path / "empty"):
        r = cli("plot", tmp_path / "a", bad)
        assert r.exit_code == 2 and "log.jsonl" in r.output and "Traceback" not in r.output
    (tmp_path / "empty" / "log.jsonl").write_text("")
    r = cli("plot", tmp_path / "empty")
    assert r.exit_code == 2 and "no report yet" in r.output


@pytest.mark.e2e
def test_eval_fid_ckpt_repeats_follow_the_seed_ranges(tmp_path, reference):
    p = tiny_unet()
    torch.manual_seed(0)
    net = build_network(p.model)
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": net.state_dict(), "ema": net.state_dict(), "preset": dump_preset(p)}, ckpt)
    keep, out = tmp_path / "keep", tmp_path / "fid.json"
    r = cli("eval-fid", "--ckpt", ckpt, "--num", 8, "--repeats", 2, "--ref", reference, "--feature-extractor", STANDIN,
            "--keep", keep, "--json", out)
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert [x["seeds"] for x in res["repeats"]] == ["0-7", "8-15"] and len(res["values"]) == 2
    assert res["min"] == min(res["values"]) and res["mean"] == pytest.approx(np.mean(res["values"]))
    for v in res["values"]:
        assert f"{v:.4f}" in r.output
    assert f"min {res['min']:.4f}" in r.output and f"mean {res['mean']:.4f}" in r.output
    # repeat 1 is seeds 8..15: its kept images are those seeds' samples, and its FID is those images' FID
    (_, _, images), = generate(net.eval(), build_diffusion(p.diffusion, p.model), p, list(range(8, 16)),
                               make_decoder(p, None, torch.device("cpu"), "fp32")[0], batch=8)
    kept = np.stack([np.asarray(Image.open(png_path(keep / "repeat-1", s))) for s in range(8, 16)])
    assert np.array_equal(kept, images)
    again = M.compute_metrics(keep / "repeat-1", reference, feature_extractor=STANDIN)
    assert again["fid"] == pytest.approx(res["values"][1], rel=1e-6)
    r = cli("eval-fid", "--ckpt", ckpt, "--num", 8, "--ref", reference, "--feature-extractor", STANDIN, "--keep", keep)
    assert r.exit_code == 2 and "not empty" in r.output


def test_eval_fid_flag_combinations_are_one_line_errors(tmp_path):
    for args, says in ((["--num", 8], "go with --ckpt"), ([], "give SAMPLES"),
                       (["--ckpt", tmp_path / "x.pt", tmp_path / "samples"], "drop SAMPLES")):
        r = cli("eval-fid", *args)
        assert r.exit_code == 2 and says in r.output and "Traceback" not in r.output, r.output
