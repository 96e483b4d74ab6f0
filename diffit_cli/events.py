"""Progress events: every long-running worker (training, sampling, encoding, metrics, studies) reports through one
`Progress` callable with these three frozen dataclasses; `commands/_common.py` renders them with rich, the same way
for every command, and a Python caller may pass any callable (e.g. `events.append`).

- `Start`: a task begins (or resumes at `done`) with `total` units of work; `text` is said once.
- `Step`: the task has reached `done` of `total`; `figures` are its current numbers (loss, img/s, ...), `status`
  the short line shown beside the bar.
- `Message`: anything else worth saying (a snapshot, a skipped variant, a loss spike); `data` holds it structured.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class Start:
    task: str  # "train", "sample", "encode", "features", ...
    total: float
    done: float = 0.0
    unit: str = ""  # "kimg", "images", ...
    text: str = ""


@dataclass(frozen=True)
class Step:
    task: str
    done: float
    total: float
    figures: Mapping[str, Any] = field(default_factory=dict)
    status: str = ""


@dataclass(frozen=True)
class Message:
    text: str
    level: str = "info"  # info | warning
    data: Mapping[str, Any] = field(default_factory=dict)


Event = Start | Step | Message


class Progress(Protocol):
    def __call__(self, event: Event) -> None: ...


def quiet(event: Event) -> None:
    """A Progress that ignores everything (the default of every worker)."""


def main_process_only(progress: Progress | None, is_main: bool) -> Callable[[Event], None]:
    """`progress` on the main process, `quiet` elsewhere (one bar per run, not one per process)."""
    return progress if (progress is not None and is_main) else quiet
