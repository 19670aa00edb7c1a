"""Where a training step's time goes: forward, backward, optimizer.

Each phase is timed with ``perf_counter`` around it, which is only true where an op has finished
when it returns: on a CPU. On a GPU kernels run asynchronously, and timing a phase would need a
synchronize that slows the run, so there the split is not measured (``None``). What a step spends
outside the phases (collating its batch, logging, the loss bookkeeping) is its time less theirs.
"""

from __future__ import annotations

import time

PHASES = ("forward", "backward", "optimizer")


class PhaseClock:
    """Adds the seconds of each phase to ``totals`` (a dict kept across steps and checkpoints).

    ``mark()`` where a phase begins, ``lap(phase)`` where it ends: the time since the last mark or
    lap goes to ``phase``, so the loop needs two lines per phase and no re-indented block.
    """

    def __init__(self, totals: dict[str, float], enabled: bool) -> None:
        self.totals = totals
        self.enabled = enabled
        self._since = time.perf_counter()

    def mark(self) -> None:
        self._since = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        if self.enabled:
            self.totals[phase] = self.totals.get(phase, 0.0) + now - self._since
        self._since = now


def split_per_step(totals: dict[str, float], steps: int) -> dict[str, float] | None:
    """Seconds per step in each phase; None when nothing was timed."""
    if not steps or not totals:
        return None
    return {phase: totals.get(phase, 0.0) / steps for phase in PHASES}
