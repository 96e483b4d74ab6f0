"""Loss-spike detection for training runs (docs/stability.md).

A report is *high* when its loss exceeds `factor` × the running median of the last `window` accepted reports;
`patience` high reports in a row make a spike. High reports do not enter the median, so a run that jumps and
stays up keeps being compared with the loss it had before the jump. Reports before `warmup_kimg` only feed the
median. The state is a plain dict, saved in every checkpoint, so a resumed run watches exactly as before.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field


@dataclass
class Spike:
    kimg: float  # the report that completed the spike
    first_kimg: float  # the first high report
    start_nimg: int  # images seen when the first high report's interval began: later checkpoints are suspect
    loss: float
    median: float

    @property
    def ratio(self) -> float:
        return self.loss / self.median


@dataclass
class SpikeDetector:
    factor: float = 2.0
    patience: int = 3
    window: int = 25
    warmup_kimg: float = 10.0
    recent: list[float] = field(default_factory=list)  # accepted losses, newest last
    high: list[tuple[float, int, float]] = field(default_factory=list)  # (kimg, interval start nimg, loss)
    max_ratio: float = 0.0  # largest loss / running median seen after warm-up (the benchmark's figure)

    def update(self, kimg: float, start_nimg: int, loss: float) -> Spike | None:
        """Feed one report (its kimg, the nimg its interval began at, its mean loss); a `Spike` when one completes."""
        if kimg <= self.warmup_kimg or not self.recent:
            self._accept(loss)
            return None
        median = statistics.median(self.recent)
        self.max_ratio = max(self.max_ratio, loss / median)
        if not loss <= self.factor * median:  # also catches NaN
            self.high.append((kimg, start_nimg, loss))
            if len(self.high) >= self.patience:
                (first_kimg, start, _), self.high = self.high[0], []
                return Spike(kimg, first_kimg, start, loss, median)
            return None
        self.high = []
        self._accept(loss)
        return None

    def _accept(self, loss: float) -> None:
        self.recent = (self.recent + [loss])[-self.window :]

    def state_dict(self) -> dict:
        return {"recent": list(self.recent), "high": [list(h) for h in self.high], "max_ratio": self.max_ratio}

    def load_state_dict(self, state: dict) -> None:
        self.recent = list(state["recent"])
        self.high = [tuple(h) for h in state["high"]]
        self.max_ratio = state["max_ratio"]
