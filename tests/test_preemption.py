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

import pytest

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
