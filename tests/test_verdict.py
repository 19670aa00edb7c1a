"""Issue 15 item 2 (the verdict engine of `peftlab study`): verdicts from given records, including
"no effect beyond seed spread" and a single seed, which cannot be judged."""

from __future__ import annotations

import pytest

from peftlab.lab.results import RunRecord
from peftlab.lab.verdict import judge, judge_records

CLAIM = "alpha = 2r beats alpha = r"


def record(alpha: str, seed: int, accuracy: float | None, ok: bool = True) -> RunRecord:
    return RunRecord(method="lora", run_name=f"lora[lora_alpha={alpha},seed={seed}]", status="ok" if ok else "failed",
                     sweep={"lora_alpha": alpha, "seed": seed}, val_accuracy=accuracy)


def test_an_effect_larger_than_the_spread_holds() -> None:
    verdict = judge(CLAIM, "lora_alpha=r", "lora_alpha=2r", [0.80, 0.81], [0.85, 0.86])
    assert verdict.outcome == "holds"
    assert verdict.effect_points == pytest.approx(5.0) and verdict.spread_points == pytest.approx(1.0)
    assert verdict.text() == (
        "Claim: alpha = 2r beats alpha = r. Measured: lora_alpha=2r 0.855 vs lora_alpha=r 0.805, an effect of "
        "+5.0 points (mean of 2 seeds); seed-to-seed spread 1.0 points. Verdict: holds.")


def test_an_effect_against_the_claim_contradicts_it() -> None:
    assert judge(CLAIM, "r", "2r", [0.85, 0.86], [0.80, 0.81]).outcome == "contradicted"
    # the claim that the treatment is *worse* (e.g. "more epochs overfit") holds on the same numbers
    assert judge("more epochs overfit", "1", "5", [0.85, 0.86], [0.80, 0.81], treatment_better=False).outcome == "holds"


def test_an_effect_within_the_spread_is_no_effect() -> None:
    verdict = judge(CLAIM, "r", "2r", [0.80, 0.84], [0.82, 0.83])
    assert verdict.effect_points == pytest.approx(0.5) and verdict.spread_points == pytest.approx(4.0)
    assert verdict.outcome == "no effect beyond seed spread"
    assert verdict.text().endswith("seed-to-seed spread 4.0 points. Verdict: no effect beyond seed spread.")
    # exactly at the spread: still not beyond it
    assert judge(CLAIM, "r", "2r", [0.80, 0.82], [0.82, 0.84]).outcome == "no effect beyond seed spread"


def test_one_seed_is_not_judged_and_says_why() -> None:
    verdict = judge(CLAIM, "r", "2r", [0.80], [0.90])
    assert verdict.outcome == "not judged" and verdict.spread_points is None
    assert "one seed gives no seed-to-seed spread, run at least two" in verdict.text()


def test_verdict_from_records_ignores_failed_runs_and_other_values() -> None:
    runs = [record("r", 1, 0.80), record("r", 2, 0.81), record("2r", 1, 0.85), record("2r", 2, 0.86),
            record("2r", 3, None, ok=False), record("4r", 1, 0.99)]
    verdict = judge_records(runs, CLAIM, "lora_alpha", "r", "2r")
    assert verdict.control_accuracies == (0.80, 0.81) and verdict.treatment_accuracies == (0.85, 0.86)
    assert verdict.outcome == "holds"
    with pytest.raises(ValueError, match="no successful runs for lora_alpha=8r"):
        judge_records(runs, CLAIM, "lora_alpha", "r", "8r")
