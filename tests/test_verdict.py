"""Issue 15 item 2 (the verdict engine of `peftlab study`): verdicts from given records, including
"no effect beyond noise", a claim of no effect, an interaction, consistency, and a single seed."""

from __future__ import annotations

import math

import pytest

from peftlab.lab.results import RunRecord
from peftlab.lab.verdict import (
    GENERAL_PERPLEXITY,
    PEAK_MEMORY,
    Cell,
    Consistency,
    Effect,
    Interaction,
    judge,
    judge_consistency,
    judge_interaction,
    settings,
)

CLAIM = "alpha = 2r beats alpha = r"


def cells(control: list[float], treatment: list[float]) -> tuple[Cell, Cell]:
    return Cell("lora_alpha=r", tuple(control)), Cell("lora_alpha=2r", tuple(treatment))


def record(alpha: str, seed: int, accuracy: float | None, ok: bool = True, **sweep) -> RunRecord:
    return RunRecord(method="lora", run_name=f"lora[{alpha},{sweep},seed={seed}]", status="ok" if ok else "failed",
                     sweep={"lora_alpha": alpha, **sweep, "seed": seed}, val_accuracy=accuracy, eval_examples=872)


def test_an_effect_larger_than_the_spread_holds() -> None:
    verdict = judge(CLAIM, *cells([0.80, 0.81], [0.85, 0.86]))
    assert verdict.outcome == "holds"
    assert verdict.effect == pytest.approx(5.0) and verdict.spread == pytest.approx(1.0)
    assert verdict.text() == (
        "Claim: alpha = 2r beats alpha = r. Measured: lora_alpha=2r 0.855 vs lora_alpha=r 0.805, an effect of "
        "+5.0 points (mean of 2 seeds); seed-to-seed spread 1.0 points. Verdict: holds.")


def test_an_effect_against_the_claim_contradicts_it() -> None:
    assert judge(CLAIM, *cells([0.85, 0.86], [0.80, 0.81])).outcome == "contradicted"
    # the claim that the treatment is *lower* (e.g. "more epochs overfit") holds on the same numbers
    assert judge("more epochs overfit", *cells([0.85, 0.86], [0.80, 0.81]), expect="lower").outcome == "holds"


def test_an_effect_within_the_spread_is_no_effect() -> None:
    verdict = judge(CLAIM, *cells([0.80, 0.84], [0.82, 0.83]))
    assert verdict.effect == pytest.approx(0.5) and verdict.spread == pytest.approx(4.0)
    assert verdict.outcome == "no effect beyond noise"
    assert verdict.text().endswith("seed-to-seed spread 4.0 points. Verdict: no effect beyond noise.")
    # exactly at the spread: still not beyond it
    assert judge(CLAIM, *cells([0.80, 0.82], [0.82, 0.84])).outcome == "no effect beyond noise"


def test_a_claim_of_no_effect_holds_within_the_spread_and_fails_beyond_it() -> None:
    small = judge("SGD saves no memory", Cell("adamw", (903.0, 907.0)), Cell("sgd", (902.0, 906.0)), "same", PEAK_MEMORY)
    assert small.outcome == "holds" and small.text() == (
        "Claim: SGD saves no memory. Measured: sgd 904 MB vs adamw 905 MB, an effect of -1 MB (mean of 2 seeds); "
        "seed-to-seed spread 4 MB. Verdict: holds (no effect beyond noise).")
    large = judge("SGD saves no memory", Cell("adamw", (940.0, 944.0)), Cell("sgd", (902.0, 906.0)), "same", PEAK_MEMORY)
    assert large.outcome == "contradicted" and large.text().endswith("an effect of -38 MB (mean of 2 seeds); "
                                                                    "seed-to-seed spread 4 MB. Verdict: contradicted.")


def test_an_interaction_must_beat_both_effects_spreads() -> None:
    sgd = (Cell("constant", (0.78, 0.79)), Cell("cosine", (0.84, 0.85)))  # +6 points, spread 1
    adamw = (Cell("constant", (0.85, 0.87)), Cell("cosine", (0.855, 0.865)))  # 0 points, spread 2
    verdict = judge_interaction("cosine helps SGD more", sgd, adamw, "cosine", ("sgd", "adamw"))
    assert verdict.outcome == "holds" and verdict.effect == pytest.approx(6.0) and verdict.spread == pytest.approx(3.0)
    close = (Cell("constant", (0.85, 0.87)), Cell("cosine", (0.88, 0.90)))  # +3 points: 3 apart, not beyond 1 + 2
    assert judge_interaction("c", sgd, close, "cosine", ("sgd", "adamw")).outcome == "no effect beyond noise"
    assert judge_interaction("c", close[::-1], sgd, "cosine", ("a", "b")).outcome == "contradicted"


def test_an_accuracy_effect_must_also_beat_the_evaluation_sets_sampling_error() -> None:
    # last session's rank study: r=32 0.785 vs r=8 0.792 with seeds 0.3 points apart, on SST-2's 872 examples
    r8, r32 = Cell("r=8", (0.7901, 0.7936)), Cell("r=32", (0.7833, 0.7867))
    verdict = judge("r = 32 overfits", r8, r32, "lower", eval_examples=872)
    mean = (0.7901 + 0.7936 + 0.7833 + 0.7867) / 4
    sampling = 100 * math.sqrt(mean * (1 - mean) / 872)  # 1.38 points at the cells' mean accuracy
    assert verdict.outcome == "no effect beyond noise" and verdict.spread == pytest.approx(sampling)
    assert verdict.measured.endswith("seed-to-seed spread 0.3 points, below the evaluation set's sampling error of "
                                     "1.4 points (872 examples), the noise the effect had to beat")
    # the same runs on a set 100x larger, or with the size unknown: the seed spread is the bar, and it holds
    assert judge("r = 32 overfits", r8, r32, "lower", eval_examples=87_200).outcome == "holds"
    assert judge("r = 32 overfits", r8, r32, "lower").outcome == "holds"
    # a wide seed spread stays the bar; memory has no sampling error
    wide = judge("c", Cell("a", (0.70, 0.75)), Cell("b", (0.78, 0.79)), eval_examples=872)
    assert wide.spread == pytest.approx(5.0) and "sampling" not in wide.measured
    memory = judge("c", Cell("a", (903.0, 904.0)), Cell("b", (906.0, 907.0)), "higher", PEAK_MEMORY, eval_examples=872)
    assert memory.outcome == "holds" and memory.spread == pytest.approx(1.0)
    # an interaction: each effect's spread raised to the sampling error before they are added
    sgd = (Cell("constant", (0.780, 0.781)), Cell("cosine", (0.800, 0.801)))  # +2 points, spread 0.1
    adamw = (Cell("constant", (0.850, 0.851)), Cell("cosine", (0.850, 0.851)))  # 0 points, spread 0.1
    assert judge_interaction("c", sgd, adamw, "cosine", ("sgd", "adamw")).outcome == "holds"
    weighed = judge_interaction("c", sgd, adamw, "cosine", ("sgd", "adamw"), eval_examples=872)
    assert weighed.outcome == "no effect beyond noise" and weighed.spread > 2.5


def test_consistency_weighs_the_seed_deviation_against_the_sampling_error() -> None:
    steady = judge_consistency("consistent", Cell("lora", (0.85, 0.86, 0.855)), 872)
    assert steady.outcome == "holds" and steady.effect == pytest.approx(0.5)  # sd 0.5 points < 1.19
    wild = judge_consistency("consistent", Cell("lora", (0.80, 0.86, 0.83)), 872)
    assert wild.outcome == "contradicted" and "standard deviation 3.00 points" in wild.text()
    unknown = judge_consistency("consistent", Cell("lora", (0.80, 0.86)), None)
    assert unknown.outcome == "not judged" and "number of evaluation examples is not recorded" in unknown.text()


def test_one_seed_is_not_judged_and_says_why() -> None:
    verdict = judge(CLAIM, *cells([0.80], [0.90]))
    assert verdict.outcome == "not judged" and verdict.spread is None
    assert "one seed gives no seed-to-seed spread, run at least two" in verdict.text()
    assert judge_consistency("consistent", Cell("lora", (0.8,)), 872).outcome == "not judged"


def test_questions_read_their_cells_from_records_ignoring_failed_runs_and_other_values() -> None:
    runs = [record("r", 1, 0.80), record("r", 2, 0.81), record("2r", 1, 0.85), record("2r", 2, 0.86),
            record("2r", 3, None, ok=False), record("4r", 1, 0.99)]
    verdict = Effect(CLAIM, "lora_alpha", "r", "2r").judge(runs)
    assert verdict.outcome == "holds" and verdict.effect == pytest.approx(5.0)
    missing = Effect(CLAIM, "lora_alpha", "r", "8r").judge(runs)
    assert missing.outcome == "not judged"
    assert missing.text() == ("Claim: alpha = 2r beats alpha = r. Measured: no successful runs for lora_alpha=8r, so "
                              "nothing to compare. Verdict: not judged.")
    by_optimizer = [record(alpha, seed, accuracy, optimizer=optimizer)
                    for optimizer, base in (("sgd", 0.70), ("adamw", 0.80)) for alpha, lift in (("r", 0), ("2r", 0.1))
                    for seed, accuracy in ((0, base + lift), (1, base + lift + 0.01))]
    sgd_only = Effect(CLAIM, "lora_alpha", "r", "2r", where={"optimizer": "sgd"}).judge(by_optimizer)
    assert "optimizer=sgd,lora_alpha=2r 0.805 vs optimizer=sgd,lora_alpha=r 0.705" not in sgd_only.text()
    assert "lora_alpha=2r,optimizer=sgd 0.805 vs lora_alpha=r,optimizer=sgd 0.705" in sgd_only.text()
    same = Interaction("2r helps sgd more", "lora_alpha", "r", "2r", "optimizer", "sgd", "adamw").judge(by_optimizer)
    assert same.outcome == "no effect beyond noise" and same.effect == pytest.approx(0.0)
    five = [record("r", seed, 0.85 + seed / 1000) for seed in range(5)]
    assert Consistency("consistent").judge(five).text().startswith(
        "Claim: consistent. Measured: lora_alpha=r over 5 seeds: mean 0.852")
    assert Consistency("consistent").judge(runs).outcome == "not judged"  # several settings: not one setup


def test_the_method_is_a_setting_when_the_runs_have_several() -> None:
    runs = [RunRecord(method=method, run_name=f"{method}[seed={seed}]", status="ok", sweep={"seed": seed},
                      val_accuracy=accuracy + seed / 100)
            for method, accuracy in (("full", 0.90), ("lora", 0.85)) for seed in (0, 1)]
    verdict = Effect("lora learns less than full", "method", "full", "lora", expect="lower").judge(runs)
    assert verdict.outcome == "holds" and verdict.text().startswith(
        "Claim: lora learns less than full. Measured: method=lora 0.855 vs method=full 0.905, an effect of -5.0 points")
    assert settings(runs) == [{"method": "full"}, {"method": "lora"}]
    assert settings(runs[:2]) == [{}]  # one method: no method setting


def test_a_paired_comparison_cancels_what_a_seed_does_to_both_cells() -> None:
    adamw = Cell("adamw", (1000.0, 1055.0), seeds=(0, 1))  # seed 1's batches are longer: +55 MB for both
    sgd = Cell("sgd", (958.0, 1015.0), seeds=(0, 1))
    unpaired = judge("SGD needs less memory", adamw, sgd, "lower", PEAK_MEMORY)
    assert unpaired.outcome == "no effect beyond noise"  # -41 MB against a 57 MB spread
    paired = judge("SGD needs less memory", adamw, sgd, "lower", PEAK_MEMORY, paired=True)
    assert paired.outcome == "holds" and paired.effect == pytest.approx(-41.0) and paired.spread == pytest.approx(2.0)
    assert "seed-to-seed spread of the differences 2 MB" in paired.text()
    unmatched = judge("c", adamw, Cell("sgd", (958.0,), seeds=(7,)), "lower", PEAK_MEMORY, paired=True)
    assert unmatched.outcome == "not judged" and "share no seed" in unmatched.text()


def test_a_value_that_is_not_finite_is_not_judged_and_says_where() -> None:
    # full fine-tuning's perplexity overflowed at seed 1 (a diverged run): "lora forgets less" must not "hold" on inf
    full = Cell("method=full", (30.0, math.inf), seeds=(0, 1))
    lora = Cell("method=lora", (21.0, 21.5), seeds=(0, 1))
    verdict = judge("lora forgets less", full, lora, "lower", GENERAL_PERPLEXITY)
    assert verdict.outcome == "not judged"
    assert "method=full has a value that is not finite (inf at seed 1: a run that diverged)" in verdict.text()
    nan = judge("c", Cell("a", (0.8, 0.81)), Cell("b", (math.nan, 0.9)))
    assert nan.outcome == "not judged" and "b has a value that is not finite (nan" in nan.text()
    assert full.finite() == Cell("method=full", (30.0,), seeds=(0,))


def test_two_runs_at_one_seed_are_no_cell_to_judge() -> None:
    # a setting that leaves a swept option free mixes its values: refused, not averaged over
    mixed = Cell("lora_alpha=2r", (0.85, 0.86, 0.70, 0.71), seeds=(0, 1, 0, 1))
    verdict = judge(CLAIM, Cell("lora_alpha=r", (0.80, 0.81), seeds=(0, 1)), mixed)
    assert verdict.outcome == "not judged" and "lora_alpha=2r holds several runs at one seed (0, 1, 0, 1)" in verdict.text()


def test_means_over_different_numbers_of_seeds_say_so() -> None:
    verdict = judge(CLAIM, Cell("lora_alpha=r", (0.80, 0.81, 0.80)), Cell("lora_alpha=2r", (0.85, 0.86)))
    assert "(means of 2 and 3 seeds)" in verdict.text()


def test_a_paired_comparison_shows_the_means_of_the_seeds_it_pairs() -> None:
    adamw = Cell("adamw", (1000.0, 1055.0, 1100.0), seeds=(0, 1, 2))  # sgd's seed 2 failed
    sgd = Cell("sgd", (958.0, 1015.0), seeds=(0, 1))
    paired = judge("SGD needs less memory", adamw, sgd, "lower", PEAK_MEMORY, paired=True)
    # the effect, -41 MB, is the difference of the means shown (986 vs 1,028), not of 986 vs all of adamw's 1,052
    assert paired.text().startswith("Claim: SGD needs less memory. Measured: sgd 986 MB vs adamw 1,028 MB, an effect "
                                    "of -41 MB")
