"""Preemption (SLURM's `--signal`, a scheduler's SIGTERM) and Ctrl-C: a worker collects the signal, finishes the unit
of work in hand (an optimizer step and a checkpoint, a sample batch, a latent shard), and stops; the command exits
with `PREEMPTED_EXIT` (`INTERRUPTED_EXIT` for Ctrl-C), and rerunning the same command continues where it stopped.
A second Ctrl-C interrupts at once. Several training processes agree on the step after which they all stop
(`AgreedStop`)."""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import signal
import threading
from collections.abc import Callable

PREEMPTED_EXIT = 3  # exit code of a run stopped by SIGTERM/SIGUSR1 after saving its work: rerun to continue
INTERRUPTED_EXIT = 130  # the same after Ctrl-C (SIGINT): 128 + 2, as shells report an interrupted command
SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")


def exit_code(signal_name: str) -> int:
    """The exit code of a command stopped by `signal_name` after saving its work."""
    return INTERRUPTED_EXIT if signal_name == "SIGINT" else PREEMPTED_EXIT


class Preempted(Exception):
    """Raised by a worker that stopped on a signal after saving its work (`diffit sample`, `encode-latents`)."""

    def __init__(self, signal_name: str, where: str):
        super().__init__(
            f"stopped by {signal_name} after {where}; rerun the same command to continue "
            f"(exit {exit_code(signal_name)})"
        )
        self.signal_name = signal_name


@contextlib.contextmanager
def preemption_signals(on_interrupt: Callable[[str], None] | None = None):
    """Collect SIGTERM / SIGUSR1 / SIGINT into a list while working; the worker checks it after each unit of work.
    The first Ctrl-C is collected like the others and `on_interrupt` gets a line saying so (a batch may take
    minutes); a second one raises KeyboardInterrupt at once. Only the main thread can install handlers; elsewhere
    nothing is caught."""
    caught: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return

    def collect(sig, frame):
        name = signal.Signals(sig).name
        if name == "SIGINT" and name in caught:
            raise KeyboardInterrupt
        caught.append(name)
        if name == "SIGINT" and on_interrupt is not None:
            on_interrupt(
                "Ctrl-C: saving the work in hand, then stopping (press Ctrl-C again to stop at once and lose it)"
            )

    names = [n for n in SIGNALS if hasattr(signal, n)]
    previous = {n: signal.signal(getattr(signal, n), collect) for n in names}
    try:
        yield caught
    finally:
        for n, handler in previous.items():
            signal.signal(getattr(signal, n), handler)


def shield_worker(_worker_id: int | None = None) -> None:
    """Runs in each data worker: ignore the preemption signals (a launcher such as torchrun sends them to the whole
    process group, a terminal its Ctrl-C); the main process stops after its unit of work and the workers end with
    it."""
    for name in SIGNALS:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


def shielded_workers():
    """The DataLoader `worker_init_fn` for workers that ignore the preemption signals (`shield_worker`), called in
    the main process. At exit multiprocessing stops daemonic children with SIGTERM and then waits for them, which
    such a worker ignores: a loader left open by an error (its iterator held by a traceback) would hang the exit
    for ever. So the main process kills its daemonic children first (atexit handlers run last-registered first)."""
    global _kill_registered
    if not _kill_registered:
        atexit.register(_kill_daemonic_children)
        _kill_registered = True
    return shield_worker


_kill_registered = False


def _kill_daemonic_children() -> None:
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join(5)


class AgreedStop:
    """After each step: the signal on which every process stops now, or None. A launcher, a terminal or `kill` may
    reach the processes a step apart, or reach only one; a process that checkpointed alone would wait at the
    checkpoint's barrier while the others entered the next step's gradient all-reduce. So the processes' flags are
    combined (max) over a CPU (gloo) group, one step late and without a device sync: each call starts the all-reduce
    of this process's flag and reads the one started by the previous call, the same value on every process after the
    same step. One process: its own flag, at once. `close()` waits for the last all-reduce when the loop ends. Where
    no gloo group can be made (a cluster whose hosts gloo cannot reach), each process acts on its own flag and
    `note` says so."""

    def __init__(self, caught: list[str], world: int, note: Callable[[str], None]):
        self.caught, self.pending, self.group = caught, None, None
        if world > 1:
            import torch  # slow; `commands/` import this module at start-up for the exit codes, before any torch

            try:
                self.group = torch.distributed.new_group(backend="gloo")  # collective: every process
            except RuntimeError as e:
                note(
                    f"no CPU process group to agree on a stop ({str(e).splitlines()[0][:120]}): a signal that "
                    "reaches the processes a step apart can leave one waiting at the checkpoint"
                )

    def __call__(self) -> str | None:
        if self.group is None:
            return self.caught[0] if self.caught else None
        agreed = self.close()
        if agreed is None:
            import torch  # slow; `commands/` import this module at start-up for the exit codes, before any torch

            flag = torch.tensor([max((SIGNALS.index(n) + 1 for n in self.caught), default=0)], dtype=torch.int32)
            self.pending = (
                torch.distributed.all_reduce(flag, torch.distributed.ReduceOp.MAX, group=self.group, async_op=True),
                flag,
            )
        return agreed

    def close(self) -> str | None:
        """Wait for the all-reduce in flight, if any; the signal it agreed on."""
        if self.pending is None:
            return None
        (work, flag), self.pending = self.pending, None
        work.wait()
        return SIGNALS[int(flag) - 1] if int(flag) else None
