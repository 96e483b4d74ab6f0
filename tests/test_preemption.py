"""Preemption and interruption: a signal (SIGTERM from a scheduler, SLURM's SIGUSR1 warning, Ctrl-C's SIGINT) stops
each command after the unit of work in hand (a training step, a sampled batch, an encoded shard, an ablation variant)
with exit 3 (130 for Ctrl-C), and the same command rerun finishes the job as if never stopped; under torchrun the
processes agree on the step to stop after; data workers ignore the signal; scripts/slurm's `preemptible.sh` turns
SLURM's warning into a clean stop and a requeue (run with a fake `scontrol` and a fake step)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_same_state, encode_cli, final_checkpoint, folder_bytes, invoke, read_pngs, tiny_unet

from diffit_cli.config import dump_preset
from diffit_cli.data import shard_name
from diffit_cli.posthoc.store import list_profiles, load_profile_state

# ------------------------------------------------------------------------------------------------------- scripts/slurm
SLURM = Path(__file__).resolve().parents[1] / "scripts" / "slurm"

# the job step: records the signal it gets, then exits like diffit (3) or like a launcher around it (1)
STEP = """
import signal, sys, time, pathlib
out = pathlib.Path(sys.argv[1])
def stop(sig, frame):
    out.write_text(signal.Signals(sig).name)
    sys.exit(int(sys.argv[2]))
signal.signal(signal.SIGTERM, stop)
pathlib.Path(sys.argv[1] + ".started").touch()
time.sleep(float(sys.argv[3]))
"""


def _batch(tmp_path, code: int, sleep: float, warn: bool):
    (tmp_path / "bin").mkdir(exist_ok=True)
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    scontrol.chmod(0o755)
    (tmp_path / "step.py").write_text(STEP)
    script = (
        f"set -euo pipefail; source {SLURM / 'preemptible.sh'}; preemptible {sys.executable} "
        f"{tmp_path / 'step.py'} {tmp_path / 'got'} {code} {sleep}"
    )
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "SLURM_JOB_ID": "42"}
    proc = subprocess.Popen(["bash", "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not (tmp_path / "got.started").exists() and time.time() < deadline:
        time.sleep(0.05)
    if warn:
        proc.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@120` sends to the batch shell
    out, _ = proc.communicate(timeout=60)
    log = tmp_path / "scontrol.log"
    return (
        proc.returncode,
        (tmp_path / "got").read_text() if (tmp_path / "got").exists() else None,
        log.read_text() if log.exists() else "",
    )


@pytest.mark.parametrize("code", [3, 1])  # diffit itself, or a launcher (torchrun) that exits 1 around it
def test_the_warning_reaches_the_step_as_sigterm_and_the_job_requeues(tmp_path, code):
    rc, got, scontrol = _batch(tmp_path, code, sleep=30, warn=True)
    assert got == "SIGTERM" and rc == code
    assert scontrol.split() == ["requeue", "42"]


def test_a_step_that_ends_on_its_own_is_not_requeued(tmp_path):
    rc, got, scontrol = _batch(tmp_path, 3, sleep=0.1, warn=False)
    assert rc == 0 and got is None and scontrol == ""


def test_the_sbatch_scripts_ask_for_the_warning_and_use_preemptible():
    for name in ("train", "sample", "encode"):
        text = (SLURM / f"{name}.sbatch").read_text()
        assert "#SBATCH --signal=B:USR1@120" in text and "#SBATCH --requeue" in text, name
        assert "preemptible.sh" in text and "\npreemptible srun " in text, name
    subprocess.run(["bash", "-n", *(str(p) for p in SLURM.glob("*.sbatch")), str(SLURM / "preemptible.sh")], check=True)


# ----------------------------------------------------------------------------------------------------------- training
def _wait_for_reports(run_dir, n: int) -> None:
    """Until the run's log.jsonl holds `n` lines (at most 2 minutes): the run is past start-up, mid-training."""
    log, deadline = run_dir / "log.jsonl", time.time() + 120
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= n):
        time.sleep(0.05)


def _torchrun_train(tmp_path, port: int, *extra: str) -> tuple[list[str], dict]:
    """(command, environment) training the tiny preset for 0.3 kimg with two processes under torchrun."""
    p = tiny_unet("train.total_kimg=0.3", "train.snapshot_kimg=0.3", "train.report_kimg=0.008", *extra)
    preset_file = tmp_path / "p.yaml"
    preset_file.write_text(dump_preset(p))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={port}",
        "-m",
        "diffit_cli",
        "train",
        "--preset",
        str(preset_file),
        "--run-dir",
        str(tmp_path / "run"),
    ]
    return cmd, {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.e2e
@pytest.mark.parametrize("sig, code", [("SIGUSR1", 3), ("SIGINT", 130)])
def test_a_signal_checkpoints_exits_and_the_rerun_is_bit_identical(tmp_path, sig, code):
    """SLURM's `--signal=B:USR1@120` (exit 3) or Ctrl-C (exit 130) mid-run: checkpoint after the current
    step; the rerun finishes with the weights of an uninterrupted run (both runs as real subprocesses, same
    threads), and with every post-hoc EMA snapshot it stores (one per step here: the cut step's too)."""
    import signal

    p = tiny_unet(
        "train.total_kimg=0.4",
        "train.snapshot_kimg=0.4",
        "train.report_kimg=0.008",
        "train.posthoc_ema=[0.1]",
        "train.posthoc_ema_kimg=0.008",
    )
    preset_file = tmp_path / "p.yaml"
    preset_file.write_text(dump_preset(p))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "diffit_cli", "train", "--preset", str(preset_file), "--run-dir"]
    straight = subprocess.run(cmd + [str(tmp_path / "straight")], env=env, capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-2000:]
    proc = subprocess.Popen(
        cmd + [str(tmp_path / "cut")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _wait_for_reports(tmp_path / "cut", 5)
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    assert f"stopped by {sig}" in err and "rerun the same command" in " ".join(err.split())
    cut = final_checkpoint(tmp_path / "cut")
    assert 0 < cut["nimg"] < 400  # a checkpoint mid-way, not at a snapshot boundary
    again = subprocess.run(cmd + [str(tmp_path / "cut")], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert_same_state(final_checkpoint(tmp_path / "straight"), final_checkpoint(tmp_path / "cut"), exact=True)
    stored = [list_profiles(tmp_path / run) for run in ("straight", "cut")]
    assert [s.step for s in stored[0]] == [s.step for s in stored[1]] == list(range(1, 51))
    last = [load_profile_state(s[-1].path) for s in stored]
    assert all(torch.equal(v, last[1][k]) for k, v in last[0].items())


@pytest.mark.e2e
def test_sigterm_to_torchrun_reaches_both_processes_and_data_workers_survive_it(tmp_path):
    """The launcher path of scripts/slurm/preemptible.sh: SIGTERM to torchrun is passed to both training
    processes (and to their data workers, which ignore it); both finish the step, the checkpoint is written, and
    the rerun finishes. torchrun itself exits 1 around the processes' 3 (the sbatch requeues on either)."""
    import signal

    cmd, env = _torchrun_train(tmp_path, 29579, "data.num_workers=1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_reports(tmp_path / "run", 3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "stopped by SIGTERM" in err, err[-3000:]
    assert "DataLoader worker" not in err, err[-3000:]
    cut = final_checkpoint(tmp_path / "run")
    assert 0 < cut["nimg"] < 300  # the preemption checkpoint, not a snapshot
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert final_checkpoint(tmp_path / "run")["nimg"] == 304  # whole global batches of 8


def _children(pid: int) -> list[int]:
    return [int(c) for c in open(f"/proc/{pid}/task/{pid}/children").read().split()]


@pytest.mark.e2e
@pytest.mark.skipif(not os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children"), reason="needs Linux /proc")
def test_a_signal_that_reaches_one_process_stops_both_at_the_same_step(tmp_path):
    """`kill` of one rank (or a signal that reaches the ranks a step apart): the processes agree on the step after
    which they stop, so none waits at the checkpoint's barrier while another is in the next step's gradient
    all-reduce (that hung); the checkpoint is written, exit 3, and the rerun finishes."""
    import signal

    cmd, env = _torchrun_train(tmp_path, 29581)
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    _wait_for_reports(tmp_path / "run", 3)
    ranks = _children(proc.pid)
    assert len(ranks) == 2, ranks
    os.kill(ranks[-1], signal.SIGUSR1)  # one rank only
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
        proc.communicate()
        pytest.fail("the processes did not stop together (hung)")
    assert proc.returncode != 0 and "stopped by SIGUSR1" in err, err[-3000:]
    cut = final_checkpoint(tmp_path / "run")
    assert 0 < cut["nimg"] < 300  # the signal's checkpoint, not a snapshot
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert final_checkpoint(tmp_path / "run")["nimg"] == 304


def test_without_a_gloo_group_each_process_acts_on_its_own_signal(monkeypatch):
    from diffit_cli.preemption import AgreedStop

    def no_gloo(**kwargs):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:144] no address to connect to\nmore")

    monkeypatch.setattr(torch.distributed, "new_group", no_gloo)
    notes, caught = [], []
    stop = AgreedStop(caught, world=2, note=notes.append)
    assert len(notes) == 1 and "no address to connect to" in notes[0] and "\n" not in notes[0]
    assert stop() is None
    caught.append("SIGTERM")
    assert stop() == "SIGTERM" and stop.close() is None  # at once, nothing in flight


# ------------------------------------------------------------------------------------------------------------- Ctrl-C
def test_the_first_ctrl_c_is_collected_with_a_note_and_the_second_interrupts():
    import signal

    from diffit_cli.preemption import preemption_signals

    before = signal.getsignal(signal.SIGINT)
    notes = []
    with pytest.raises(KeyboardInterrupt):
        with preemption_signals(notes.append) as caught:
            os.kill(os.getpid(), signal.SIGINT)
            assert caught == ["SIGINT"] and len(notes) == 1 and "Ctrl-C again" in notes[0]
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.parametrize("wrapped", [False, True])
def test_an_interrupt_is_one_line_exit_130_and_a_new_run_leaves_nothing(tmp_path, monkeypatch, wrapped):
    """Ctrl-C outside a unit of work (or a second one, which torch.save turns into a RuntimeError): one line, exit
    130, and a new run folder without a checkpoint is removed."""
    import diffit_cli.training as training
    from diffit_cli.fileio import new_output

    def interrupted(preset, run_dir, **kwargs):
        with new_output(run_dir, keep=lambda: False):
            run_dir.mkdir()
            (run_dir / "preset.yaml").write_text("x")
            if not wrapped:
                raise KeyboardInterrupt
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos") from None

    monkeypatch.setattr(training, "train", interrupted)
    r = invoke("train", "--run-dir", str(tmp_path / "run"))
    assert r.exit_code == 130, r.output
    assert "interrupted" in r.output and "rerun the same command" in " ".join(r.output.split())
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) <= 3
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------------- data workers
def test_a_loader_left_open_does_not_hang_the_exit():
    """Data workers ignore SIGTERM (preemption), the signal multiprocessing stops daemonic children with at exit: a
    loader whose iterator is still held at exit (as a traceback holds it after an error) must not make the exit wait
    on its workers for ever."""
    script = (
        "import torch\n"
        "from diffit_cli.data.loader import make_loader\n"
        "ds = torch.utils.data.TensorDataset(torch.zeros(64, 3), torch.zeros(64))\n"
        "it = iter(make_loader(ds, 8, num_workers=1))\n"
        "next(it)\n"
        "print('got a batch')\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "got a batch" in r.stdout, r.stderr


# ------------------------------------------------------------------------------------------------------------- sample
@pytest.mark.e2e
@pytest.mark.parametrize("name, sig, code", [("png", "SIGUSR1", 3), ("s.npz", "SIGINT", 130)])
def test_a_signal_stops_sampling_after_the_batch_and_the_rerun_completes(
    unet_ckpt, tmp_path, monkeypatch, name, sig, code
):
    """SIGUSR1 (SLURM's warning) or Ctrl-C during `diffit sample`: the batch in hand is written, exit 3
    (130); the same command finishes the rest, and the images equal an uninterrupted run's."""
    import os
    import signal

    from diffit_cli.sampling.sinks import NpzSink, PngSink

    seeds = ["--seeds", "0-9", "--batch", "4", "--ckpt", str(unet_ckpt)]
    straight = tmp_path / "straight" / name
    assert invoke("sample", *seeds, "--out", str(straight)).exit_code == 0
    sink_type = NpzSink if name.endswith(".npz") else PngSink
    write = sink_type.write

    def write_then_signal(self, *a):
        write(self, *a)
        os.kill(os.getpid(), getattr(signal, sig))  # as SLURM's `--signal=B:USR1@120` or a Ctrl-C would, mid-run

    out = tmp_path / "cut" / name
    with monkeypatch.context() as m:
        m.setattr(sink_type, "write", write_then_signal)
        r = invoke("sample", *seeds, "--out", str(out))
    assert r.exit_code == code, r.output
    assert f"stopped by {sig}" in r.output and "rerun the same command" in " ".join(r.output.split())
    assert sig != "SIGINT" or "Ctrl-C again" in " ".join(r.output.split())  # said at once: a batch may take minutes
    assert sink_type(out).done(list(range(10))) == {0, 1, 2, 3}  # the first batch, and nothing more
    assert invoke("sample", *seeds, "--out", str(out)).exit_code == 0
    read = (lambda p: np.load(p)["arr_0"]) if name.endswith(".npz") else (lambda p: read_pngs(p, range(10)))
    assert np.array_equal(read(out), read(straight))


# ----------------------------------------------------------------------------------------------------- encode-latents
@pytest.mark.e2e
@pytest.mark.parametrize("sig, code", [("SIGTERM", 3), ("SIGINT", 130)])
def test_a_signal_stops_after_the_shard_in_hand_and_the_rerun_finishes(
    tiny_vae, images, tmp_path, monkeypatch, sig, code
):
    """SIGTERM (a scheduler's preemption notice) or Ctrl-C during encode-latents: the shard in hand is
    written, exit 3 (130); the rerun's bytes equal an uninterrupted run's."""
    import os
    import signal

    import diffit_cli.encode_latents as E

    assert encode_cli(images, tmp_path / "full", tiny_vae / "folder").exit_code == 0
    write = E.write_shard

    def write_then_signal(*a, **k):
        write(*a, **k)
        os.kill(os.getpid(), getattr(signal, sig))

    with monkeypatch.context() as m:
        m.setattr(E, "write_shard", write_then_signal)
        r = encode_cli(images, tmp_path / "part", tiny_vae / "folder")
    assert r.exit_code == code and f"stopped by {sig}" in r.output, r.output
    assert (tmp_path / "part" / shard_name(0)).exists() and not (tmp_path / "part" / shard_name(1)).exists()
    assert encode_cli(images, tmp_path / "part", tiny_vae / "folder").exit_code == 0
    assert folder_bytes(tmp_path / "full") == folder_bytes(tmp_path / "part")


# ------------------------------------------------------------------------------------------------------------- ablate
@pytest.mark.parametrize(
    "field, value, code, words",
    [
        ("preempted", "SIGUSR1", 3, "stopped by SIGUSR1"),
        ("preempted", "SIGINT", 130, "stopped by SIGINT"),
        ("stopped", "loss spike", 2, "no result is recorded"),
    ],
)
def test_a_variant_whose_training_was_cut_short_is_not_scored(tmp_path, monkeypatch, field, value, code, words):
    """A signal (SLURM's warning, Ctrl-C) or train.on_spike=stop ends a variant's training early: the study stops
    there instead of scoring the half-trained checkpoint and recording it as the variant's result (a rerun would
    then have skipped it as finished)."""
    import diffit_cli.training
    from diffit_cli.ablation.variants import VariantRunner
    from diffit_cli.training.recipe import TrainState

    monkeypatch.setattr(diffit_cli.training, "train", lambda *a, **k: TrainState(nimg=4096, **{field: value}))
    monkeypatch.setattr(VariantRunner, "sample_and_score", lambda *a, **k: pytest.fail("a cut-short run was scored"))
    r = invoke("ablate", "window-size", "--budget", "test", "--runs-dir", str(tmp_path / "ws"), "--only", "w2")
    assert r.exit_code == code and words in r.output and "Traceback" not in r.output, r.output
    assert not list((tmp_path / "ws").rglob("result.json"))
