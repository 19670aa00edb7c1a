"""The verdict of a study: does a rule of thumb hold on these runs, by more than seed-to-seed noise?

A study compares a *treatment* (``lora_alpha=2r``) with a *control* (``lora_alpha=r``), each run with
several seeds. Its verdict states the claim, the measured effect (treatment mean minus control mean,
in accuracy points) and the seed-to-seed spread (the larger of the two arms' max-minus-min across
seeds), and reads:

    holds                            |effect| > spread, in the claimed direction
    contradicted                     |effect| > spread, against it
    no effect beyond seed spread     |effect| <= spread: these runs cannot tell the two apart
    not judged                       an arm has fewer than two seeds, so there is no spread to beat
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from statistics import fmean
from typing import Any, Literal

from peftlab.lab.results import RunRecord

Outcome = Literal["holds", "contradicted", "no effect beyond seed spread", "not judged"]
#: A study's runs are told apart by seed through this sweep option.
SEED_OPTION = "seed"


@dataclass(frozen=True)
class Verdict:
    claim: str
    control: str  # e.g. "lora_alpha=r"
    treatment: str
    control_accuracies: tuple[float, ...]  # one per seed
    treatment_accuracies: tuple[float, ...]
    outcome: Outcome

    @property
    def effect_points(self) -> float:
        return 100 * (fmean(self.treatment_accuracies) - fmean(self.control_accuracies))

    @property
    def spread_points(self) -> float | None:
        """The seed-to-seed spread, None when an arm has a single seed."""
        arms = (self.control_accuracies, self.treatment_accuracies)
        if any(len(arm) < 2 for arm in arms):
            return None
        return 100 * max(max(arm) - min(arm) for arm in arms)

    def text(self) -> str:
        seeds = min(len(self.control_accuracies), len(self.treatment_accuracies))
        spread = self.spread_points
        measured = (f"{self.treatment} {fmean(self.treatment_accuracies):.3f} vs {self.control} "
                    f"{fmean(self.control_accuracies):.3f}, an effect of {self.effect_points:+.1f} points "
                    f"(mean of {seeds} seed{'s' if seeds > 1 else ''})")
        noise = ("; one seed gives no seed-to-seed spread, run at least two" if spread is None
                 else f"; seed-to-seed spread {spread:.1f} points")
        return f"Claim: {self.claim}. Measured: {measured}{noise}. Verdict: {self.outcome}."


def judge(claim: str, control: str, treatment: str, control_accuracies: Sequence[float],
          treatment_accuracies: Sequence[float], treatment_better: bool = True) -> Verdict:
    """The verdict on ``claim``: that ``treatment`` is more accurate than ``control`` (or, with
    ``treatment_better=False``, less accurate)."""
    if not control_accuracies or not treatment_accuracies:
        raise ValueError(f"no successful runs for {control if not control_accuracies else treatment}: "
                         "a verdict needs accuracies for both arms")
    verdict = Verdict(claim, control, treatment, tuple(control_accuracies), tuple(treatment_accuracies), "not judged")
    spread = verdict.spread_points
    if spread is None:
        return verdict
    effect = verdict.effect_points
    if abs(effect) <= spread + 1e-9:  # rounding must not turn "equal to the spread" into "beyond it"
        outcome: Outcome = "no effect beyond seed spread"
    else:
        outcome = "holds" if (effect > 0) == treatment_better else "contradicted"
    return Verdict(claim, control, treatment, verdict.control_accuracies, verdict.treatment_accuracies, outcome)


def judge_records(runs: Sequence[RunRecord], claim: str, option: str, control: Any, treatment: Any,
                  treatment_better: bool = True) -> Verdict:
    """The verdict from a study's records: the successful runs whose sweep sets ``option`` to ``control``
    or ``treatment``, one accuracy per seed (runs without a swept seed count as one seed)."""
    def arm(value: Any) -> list[float]:
        return [run.val_accuracy for run in runs
                if run.ok and run.val_accuracy is not None and run.sweep.get(option) == value]

    return judge(claim, f"{option}={control}", f"{option}={treatment}", arm(control), arm(treatment),
                 treatment_better)
