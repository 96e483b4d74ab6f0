"""Watching a run: trackers through Accelerate, FID along training with best.pt, curves.png and
`diffit plot`, `eval-fid --ckpt` with repeats over seed ranges."""

import json
import zipfile

import numpy as np
import pytest
import torch
from helpers import TINY_UNET, invoke, set_flags, tiny_unet
from PIL import Image

from diffit_cli import checkpoint as ck
from diffit_cli.build import build_diffusion, build_network
from diffit_cli.config import dump_preset
from diffit_cli.curves import curve_panels, draw_curves, read_log, taken_path
from diffit_cli.data import open_source
from diffit_cli.errors import DiffitError
from diffit_cli.fid import metrics as M
from diffit_cli.fid import score as S
from diffit_cli.fid.extractors import register_test_extractor
from diffit_cli.sampling.generate import generate, make_decoder
from diffit_cli.sampling.sinks import png_path
from diffit_cli.training import TrackerSpec, train

STANDIN = register_test_extractor()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Statistics (stand-in extractor) of 64 images of the tiny preset's training data."""
    src = open_source(tiny_unet().data)
    path = tmp_path_factory.mktemp("ref") / "ref.npz"
    M.save_reference(
        np.stack([src[i][0].numpy().transpose(1, 2, 0) for i in range(64)]), path, feature_extractor=STANDIN
    )
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
    fid = [
        "eval.every_kimg=0.016",
        "eval.num_samples=8",
        f"eval.feature_extractor={STANDIN}",
        f"eval.reference={reference}",
        "train.keep_checkpoints=1",
    ]
    state = train(tiny_unet(*fid), run, trackers=TrackerSpec(("tensorboard",)))  # to 0.032 kimg
    log = _log(run)
    fids = [r for r in log if r.get("event") == "fid"]
    assert [r["kimg"] for r in fids] == [0.016, 0.032] and {r["extractor"] for r in fids} == {STANDIN}
    assert all(np.isfinite(r["fid"]) and r["num_samples"] == 8 for r in fids)
    assert (run / "curves.png").is_file() and not (run / "fid-samples").exists()

    # TensorBoard's own reader gives back exactly log.jsonl's numbers
    scalars = _scalars(run / "trackers" / "diffit")
    reports = [r for r in log if "loss" in r and "event" not in r]
    assert [r["step"] for r in reports] == [1, 2, 3, 4]  # one report a step (8 images a report, 8 a batch)
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


def _reported(run_dir):
    """log.jsonl's report numbers as the trackers get them: {"train/<key>": {step: value}}."""
    out = {}
    for rec in _log(run_dir):
        if "loss" in rec and "event" not in rec:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    out.setdefault(f"train/{k}", {})[rec["step"]] = v
    return out


def _grid(run_dir, kimg):
    return np.asarray(Image.open(run_dir / "samples" / f"grid-{kimg:012.3f}.png").convert("RGB"))


def _train_and_resume(tmp_path, tracker):
    """A run of 16 images logged to `tracker`, then resumed to 32 in the same folder; the tracker run id kept in
    trackers.json must not change. Returns (run folder, id)."""
    run = tmp_path / "run"
    spec = TrackerSpec((tracker,), "diffit-test")
    train(tiny_unet("train.total_kimg=0.016"), run, trackers=spec)
    run_id = json.loads((run / "trackers.json").read_text())[tracker]
    train(tiny_unet("train.total_kimg=0.032"), run, trackers=spec)
    assert json.loads((run / "trackers.json").read_text())[tracker] == run_id
    return run, run_id


@pytest.mark.e2e
def test_mlflow_gets_log_jsonl_the_config_and_the_grids_and_a_resume_continues_the_run(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install 'diffit-cli[mlflow]')")
    pytest.importorskip(
        "sqlalchemy",
        reason="MLflow's sqlite store needs the full mlflow package, not mlflow-skinny "
        "(pip install 'diffit-cli[mlflow]')",
    )
    import mlflow
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is ./mlruns
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    run, run_id = _train_and_resume(tmp_path, "mlflow")  # params are write-once: this raised before

    client = MlflowClient()
    r = client.get_run(run_id)
    assert r.info.run_name == "run" and r.info.status == "FINISHED"
    assert [x.info.run_id for x in client.search_runs([r.info.experiment_id])] == [run_id]
    assert client.get_experiment(r.info.experiment_id).name == "diffit-test"
    assert r.data.params["run"] == "run" and r.data.params["model.channels"] == "[16, 16]"
    assert r.data.params["train.total_kimg"] == "0.016" and r.data.tags["train.total_kimg"] == "0.032"
    reported = _reported(run)
    assert sorted(reported["train/loss"]) == [1, 2, 3, 4] and set(r.data.metrics) == set(reported)
    for key, values in reported.items():
        assert {m.step: m.value for m in client.get_metric_history(run_id, key)} == pytest.approx(values, rel=1e-6)
    pngs = sorted(
        (a.path for a in client.list_artifacts(run_id, "images") if a.path.endswith(".png")),
        key=lambda path: int(path.split("+step+")[1].split("+")[0]),
    )
    assert [path.split("+step+")[1].split("+")[0] for path in pngs] == ["2", "4"]
    for path, kimg in zip(pngs, (0.016, 0.032)):
        got = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(tmp_path / "dl"))
        assert np.array_equal(np.asarray(Image.open(got).convert("RGB")), _grid(run, kimg))


@pytest.mark.e2e
def test_aim_gets_log_jsonl_the_config_and_the_grids_and_a_resume_continues_the_run(tmp_path):
    pytest.importorskip("aim", reason="aim is not installed (pip install 'diffit-cli[aim]')")
    from aim import Repo
    from aim.cli.cli import cli_entry_point
    from aim.storage.context import Context
    from click.testing import CliRunner as ClickRunner

    run, run_hash = _train_and_resume(tmp_path, "aim")

    # Aim's readers go through the repository's index, which `aim up` keeps up to date; here `aim storage reindex`
    r = ClickRunner().invoke(cli_entry_point, ["storage", "--repo", str(run / "trackers"), "reindex", "-y"])
    assert r.exit_code == 0, r.output
    repo = Repo(str(run / "trackers"))
    assert list(repo.list_all_runs()) == [run_hash]
    arun = repo.get_run(run_hash)
    assert arun.name == "run" and arun.experiment == "diffit-test"
    assert arun["hparams"]["run"] == "run" and arun["hparams"]["train.total_kimg"] == 0.032
    reported = _reported(run)
    assert sorted(reported["train/loss"]) == [1, 2, 3, 4]
    for key, values in reported.items():
        steps, (got, *_) = arun.get_metric(key, Context({})).data.items_list()
        assert dict(zip(steps, got)) == pytest.approx(values, rel=1e-6), key
    steps, (images, *_) = arun.get_image_sequence("samples", Context({})).data.items_list()
    assert steps == [2, 4]
    for image, kimg in zip(images, (0.016, 0.032)):
        assert np.array_equal(np.asarray(image.to_pil_image().convert("RGB")), _grid(run, kimg))


def _comet_archive(zip_path):
    """An offline Comet experiment's archive: its experiment.json and its messages (one JSON object a line)."""
    with zipfile.ZipFile(zip_path) as z:
        return (
            zip_path,
            json.loads(z.read("experiment.json")),
            [json.loads(line) for line in z.read("messages.json").decode().splitlines()],
        )


@pytest.mark.e2e
def test_comet_offline_gets_log_jsonl_the_config_and_the_grids_and_a_resume_continues_the_experiment(
    tmp_path, monkeypatch
):
    pytest.importorskip("comet_ml", reason="comet_ml is not installed (pip install 'diffit-cli[comet_ml]')")
    monkeypatch.setenv("COMET_START_ONLINE", "false")  # no API key needed: an archive to `comet upload` later
    monkeypatch.setenv("COMET_OFFLINE_DIRECTORY", str(tmp_path / "comet"))
    run, key = _train_and_resume(tmp_path, "comet_ml")

    archives = [_comet_archive(z) for z in (tmp_path / "comet").glob("*.zip")]
    assert len(archives) == 2 and all(exp["offline_id"] == key for _, exp, _ in archives)  # one experiment
    archives.sort(key=lambda a: a[1]["start_time"])
    assert archives[1][1]["user_provided_experiment_key"] and archives[1][1]["resume_strategy"] == "get_or_create"
    metrics, params = {}, {}
    for zip_path, exp, messages in archives:
        assert exp["project_name"] == "diffit-test"
        others = {m["payload"]["key"]: m["payload"]["value"] for m in messages if m["type"] == "log_other"}
        assert others["Name"] == "run"
        for m in messages:
            if m["type"] == "metric_msg" and m["payload"]["metric"]["metricName"].startswith("train/"):
                metric = m["payload"]["metric"]
                metrics.setdefault(metric["metricName"], {})[metric["step"]] = metric["metricValue"]
            elif m["type"] == "parameter_msg":
                params[m["payload"]["param"]["paramName"]] = m["payload"]["param"]["paramValue"]
        grids = [
            m["payload"]
            for m in messages
            if m["type"] == "file_upload" and m["payload"]["upload_type"] == "visualization"
        ]
        assert [g["additional_params"]["figName"] for g in grids] == ["samples"]
        kimg = grids[0]["additional_params"]["step"] * 0.008
        with zipfile.ZipFile(zip_path) as z, z.open(grids[0]["file_path"]) as f:
            assert np.array_equal(np.asarray(Image.open(f).convert("RGB")), _grid(run, kimg))
    reported = _reported(run)
    assert sorted(reported["train/loss"]) == [1, 2, 3, 4] and set(metrics) == set(reported)
    for key, values in reported.items():
        assert metrics[key] == pytest.approx(values, rel=1e-6), key
    assert params["run"] == "run" and params["train.total_kimg"] == 0.032


def test_unknown_or_missing_trackers_are_one_line_errors(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    args = set_flags(TINY_UNET)
    r = invoke("train", "--run-dir", tmp_path / "run", "--log-with", "mlflow", *args)
    assert r.exit_code == 2 and "pip install 'diffit-cli[mlflow]'" in r.output and "Traceback" not in r.output
    r = invoke("train", "--run-dir", tmp_path / "run", "--log-with", "neptune", *args)
    assert r.exit_code == 2 and "choose from tensorboard, wandb, mlflow, aim, comet_ml" in r.output
    assert not (tmp_path / "run").exists()


def test_a_tracker_that_cannot_start_is_a_one_line_error(tmp_path, monkeypatch):
    """E.g. Comet online without an API key, or an MLflow store that MLflow refuses: the tracker's reason, exit 2,
    and a new run folder is not left behind."""
    pytest.importorskip("tensorboard", reason="the tensorboard package (in the test extra) is not installed")
    from accelerate.tracking import TensorBoardTracker

    def refuse(self):
        raise ValueError("no API key")

    monkeypatch.setattr(TensorBoardTracker, "start", refuse)
    args = set_flags(TINY_UNET)
    r = invoke("train", "--run-dir", tmp_path / "run", "--log-with", "tensorboard", *args)
    assert r.exit_code == 2 and "a tracker did not start: ValueError: no API key" in r.output, r.output
    assert "Traceback" not in r.output and not (tmp_path / "run").exists()


def test_fid_along_training_offline_without_inception_weights_stops_before_training(tmp_path):
    """The stand-in extractor is used only when asked for: offline with no Inception weights, a run that measures
    FID with the default extractor stops at once (exit 2, saying where the weights go), nothing written."""
    args = set_flags(TINY_UNET + ["eval.every_kimg=0.016"])
    r = invoke("train", "--run-dir", tmp_path / "run", *args)
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
        A.run_study(
            "window-size", "test", runs_dir=tmp_path, only=["w4"], trackers=TrackerSpec(("tensorboard",), "studies")
        )
    assert seen == [TrackerSpec(("tensorboard",), "studies", name="w4", group="window-size")]


def test_taken_path_keeps_what_a_resume_or_rollback_replaced():
    recs = [{"kimg": k, "loss": v} for k, v in [(1, 5), (2, 4), (3, 3), (2, 9), (3, 8), (4, 7)]]
    assert [(r["kimg"], r["loss"]) for r in taken_path(recs)] == [(1, 5), (2, 9), (3, 8), (4, 7)]


def test_plot_draws_several_runs_from_their_logs(tmp_path):
    for name, fid in (("a", True), ("b", False)):
        d = tmp_path / name
        d.mkdir()
        lines = [
            {"kimg": k, "step": k, "loss": 1 / k, "lr": 1e-3, "img_per_s": 100.0, "grad_norm": 2.0 / k}
            for k in range(1, 6)
        ]
        if fid:
            lines.append({"event": "fid", "kimg": 5, "step": 5, "fid": 30.0, "extractor": STANDIN})
            lines.append({"event": "spike", "kimg": 5, "loss": 99.0, "median": 1.0, "action": "warn"})
        (d / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"kimg": 6, "lo')  # torn end
    panels = curve_panels({"a": read_log(tmp_path / "a")})
    assert panels[0].series[0].y == [1 / k for k in range(1, 6)]  # the spike line (it has a loss too) is no report
    # what the log holds: no attention-logit panel for a log without it
    assert [p.title for p in panels] == ["loss", "learning rate", "img/s", "gradient norm", "FID"]
    out = tmp_path / "both.png"
    r = invoke("plot", tmp_path / "a", tmp_path / "b", "--out", out)
    assert r.exit_code == 0, r.output
    with Image.open(out) as im:
        assert im.size[0] > 900 and im.size[1] > 500  # 2 rows of 3 panels
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "missing", tmp_path / "empty"):
        r = invoke("plot", tmp_path / "a", bad)
        assert r.exit_code == 2 and "log.jsonl" in r.output and "Traceback" not in r.output
    (tmp_path / "empty" / "log.jsonl").write_text("")
    r = invoke("plot", tmp_path / "empty")
    assert r.exit_code == 2 and "no report yet" in r.output


def test_a_run_with_one_report_shows_its_point(tmp_path):
    """A short run (or any run at its first report) has one point per curve: a line without a marker drew nothing."""
    rec = {"kimg": 2.0, "step": 32, "loss": 1.0, "lr": 1e-3, "img_per_s": 300.0, "grad_norm": 1.2}
    (tmp_path / "log.jsonl").write_text(json.dumps(rec) + "\n")
    with Image.open(draw_curves(tmp_path)) as im:
        rgb = np.asarray(im.convert("RGB")).astype(int)
    blue = (np.abs(rgb - [31, 119, 180]).sum(-1) < 40).sum()  # matplotlib's first line colour (C0)
    assert blue > 4 * 20  # a visible marker in each of the four panels


@pytest.mark.e2e
def test_eval_fid_ckpt_repeats_follow_the_seed_ranges(tmp_path, reference):
    p = tiny_unet()
    torch.manual_seed(0)
    net = build_network(p.model)
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": net.state_dict(), "ema": net.state_dict(), "preset": dump_preset(p)}, ckpt)
    keep, out = tmp_path / "keep", tmp_path / "fid.json"
    r = invoke(
        "eval-fid",
        "--ckpt",
        ckpt,
        "--num",
        8,
        "--repeats",
        2,
        "--ref",
        reference,
        "--feature-extractor",
        STANDIN,
        "--keep",
        keep,
        "--json",
        out,
    )
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert [x["seeds"] for x in res["repeats"]] == ["0-7", "8-15"] and len(res["values"]) == 2
    assert res["min"] == min(res["values"]) and res["mean"] == pytest.approx(np.mean(res["values"]))
    for v in res["values"]:
        assert f"{v:.4f}" in r.output
    assert f"min {res['min']:.4f}" in r.output and f"mean {res['mean']:.4f}" in r.output
    # repeat 1 is seeds 8..15: its kept images are those seeds' samples, and its FID is those images' FID
    ((_, _, images),) = generate(
        net.eval(),
        build_diffusion(p.diffusion, p.model),
        p,
        list(range(8, 16)),
        make_decoder(p, None, torch.device("cpu"), "fp32")[0],
        batch=8,
    )
    kept = np.stack([np.asarray(Image.open(png_path(keep / "repeat-1", s))) for s in range(8, 16)])
    assert np.array_equal(kept, images)
    again = M.compute_metrics(keep / "repeat-1", reference, feature_extractor=STANDIN)
    assert again["fid"] == pytest.approx(res["values"][1], rel=1e-6)
    r = invoke(
        "eval-fid", "--ckpt", ckpt, "--num", 8, "--ref", reference, "--feature-extractor", STANDIN, "--keep", keep
    )
    assert r.exit_code == 2 and "not empty" in r.output


def test_eval_fid_flag_combinations_are_one_line_errors(tmp_path):
    for args, says in (
        (["--num", 8], "go with --ckpt"),
        ([], "give SAMPLES"),
        (["--ckpt", tmp_path / "x.pt", tmp_path / "samples"], "drop SAMPLES"),
    ):
        r = invoke("eval-fid", *args)
        assert r.exit_code == 2 and says in r.output and "Traceback" not in r.output, r.output


def test_eval_fid_ckpt_across_machines_needs_a_shared_keep_folder(monkeypatch, tmp_path):
    """Without --keep the images go to the main machine's /tmp: processes on two hosts are refused before any
    sampling; on one host, or with --keep, they go ahead."""

    class TwoProcesses:
        num_processes = 2

    hosts = {"one": ["node-a", "node-a"], "two": ["node-a", "node-b"]}
    for case, names in hosts.items():
        monkeypatch.setattr(S, "gather_object", lambda obj, names=names: names)
        S.check_shared_scratch(TwoProcesses(), tmp_path / "keep")
        if case == "one":
            S.check_shared_scratch(TwoProcesses(), None)
        else:
            with pytest.raises(DiffitError, match="several machines needs --keep DIR"):
                S.check_shared_scratch(TwoProcesses(), None)
    # and `eval-fid --ckpt` asks it before any sampling
    p = tiny_unet()
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": {}, "ema": build_network(p.model).state_dict(), "preset": dump_preset(p)}, ckpt)

    def refuse(state, keep):
        raise DiffitError(f"asked with keep={keep}")

    monkeypatch.setattr(S, "check_shared_scratch", refuse)
    r = invoke("eval-fid", "--ckpt", ckpt, "--num", 4, "--feature-extractor", STANDIN, "--ref", tmp_path / "none.npz")
    assert r.exit_code == 2 and "asked with keep=None" in r.output, r.output
