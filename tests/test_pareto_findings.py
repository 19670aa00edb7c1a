"""Issue 15 items 1, 2 and 6: the Pareto front, the report's findings sentences, the method notes, and
the validation-curve plot only when a run was evaluated more than once -- all from given records."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from peftlab.lab.findings import findings, share
from peftlab.lab.method_notes import FULL_FINE_TUNING_NOTE, describe_method
from peftlab.lab.pareto import Point, dominates, front_names, pareto_front
from peftlab.lab.plots import plot_val_curves
from peftlab.lab.report import write_report
from peftlab.lab.results import Results, RunRecord
from peftlab.methods import METHODS

sys.path.insert(0, str(Path(__file__).parent))
from test_report import failed_record, ok_record, synthetic_results  # noqa: E402


def names(points: list[Point]) -> list[str]:
    return [point.name for point in points]


def test_front_drops_dominated_points_and_keeps_the_trade_offs() -> None:
    points = [
        Point("cheap", 0.80, (10.0,)),
        Point("dominated", 0.79, (20.0,)),  # less accurate and dearer than cheap
        Point("accurate", 0.90, (100.0,)),
        Point("middle", 0.85, (50.0,)),
        Point("dear-and-same", 0.85, (60.0,)),  # as accurate as middle, dearer: dominated
    ]
    assert names(pareto_front(points)) == ["cheap", "accurate", "middle"]


def test_identical_points_do_not_dominate_each_other() -> None:
    twins = [Point("a", 0.9, (5.0, 1.0)), Point("b", 0.9, (5.0, 1.0)), Point("worse", 0.9, (5.0, 2.0))]
    assert not dominates(twins[0], twins[1]) and not dominates(twins[1], twins[0])
    assert dominates(twins[0], twins[2])
    assert names(pareto_front(twins)) == ["a", "b"]


def test_several_costs_a_point_best_on_one_cost_stays() -> None:
    points = [Point("fast", 0.8, (100.0, 1.0)), Point("small", 0.8, (1.0, 100.0)), Point("neither", 0.8, (100.0, 100.0))]
    assert names(pareto_front(points)) == ["fast", "small"]
    with pytest.raises(ValueError, match="different numbers of costs"):
        dominates(Point("x", 1, (1.0,)), Point("y", 1, (1.0, 2.0)))


def test_front_of_records_skips_failed_runs_and_runs_without_the_cost() -> None:
    runs = synthetic_results().runs  # full, lora, dora, qlora ok; adalora failed
    assert front_names(runs, ["trainable_params"]) == ["lora"]  # lora: as accurate as dora, fewer params
    # lora and dora tie on accuracy and memory: both on the front; full is dearer and less accurate
    assert front_names(runs, ["peak_memory_mb"]) == ["lora", "dora", "qlora"]
    runs[1].peak_memory_mb = None
    assert front_names(runs, ["peak_memory_mb"]) == ["dora", "qlora"]


def test_share_precision_follows_magnitude() -> None:
    assert [share(98, 100), share(7.5, 100), share(0.19, 100), share(1474560, 774030080)] == ["98%", "7.5%", "0.19%", "0.19%"]


def test_findings_are_computed_from_the_records() -> None:
    results = synthetic_results()
    assert findings(results) == [
        "lora reached the highest validation accuracy, 0.900, tied with dora, +1.0 points over full fine-tuning (0.890).",
        "lora reached 101% of full fine-tuning's accuracy (0.900 vs 0.890) with 0.19% of its trainable parameters, "
        "in 63% of its training time, with 55% of its peak memory.",
        "lora trained fastest (1,016.6 s, 63% of full fine-tuning's), at accuracy 0.900.",
        "qlora used the least peak memory (3,516 MB, 17% of full fine-tuning's), at accuracy 0.860.",
        "2 of 4 runs are dominated -- another run is at least as accurate with no more trainable parameters, "
        "training time or peak memory, and better on one of them: full (by lora), dora (by lora).",
        "1 run failed and is in no comparison above: adalora.",
    ]
    # Change the numbers and the sentences follow: full now the most accurate, lora at 0.882.
    results.runs[0].val_accuracy, results.runs[1].val_accuracy = 0.95, 0.882
    text = findings(results)
    assert text[0] == "full reached the highest validation accuracy, 0.950."
    assert "lora reached 93% of full fine-tuning's accuracy (0.882 vs 0.950)" in text[1]


def test_findings_name_a_tie_instead_of_crowning_the_first_run() -> None:
    runs = [ok_record("lora", "lora", 100.0, 0.80, 1000), ok_record("vera", "vera", 100.0, 0.80, 10),
            ok_record("full", "full[lr=1e-5]", 200.0, 0.75, 100_000)]
    text = findings(Results(runs=runs))
    assert text[0] == ("lora reached the highest validation accuracy, 0.800, tied with vera, +5.0 points over "
                       "full[lr=1e-5] (0.750).")
    assert "vera reached 107% of full fine-tuning (full[lr=1e-5])'s accuracy" in text[1]
    assert "lora trained fastest (100.0 s, 50% of full fine-tuning (full[lr=1e-5])'s, tied with vera)" in text[2]


def test_a_run_with_a_value_that_is_not_finite_is_on_no_front() -> None:
    runs = [ok_record("lora", "lora", 100.0, 0.80, 1000), ok_record("vera", "vera", float("nan"), 0.70, 10),
            ok_record("dora", "dora", 120.0, 0.79, 2000)]
    # a NaN time neither dominates nor is dominated: counted, it would sit on the front of every cost
    assert front_names(runs, ["train_time_s"]) == ["lora"]
    assert front_names(runs, ["trainable_params"]) == ["lora", "vera"]


def test_findings_without_full_compare_with_the_most_accurate_run() -> None:
    runs = [ok_record("lora", "lora", 100.0, 0.80, 1000), ok_record("vera", "vera", 50.0, 0.70, 10)]
    text = findings(Results(runs=runs))
    assert text[0] == "lora reached the highest validation accuracy, 0.800."
    assert text[1].startswith("vera reached 88% of the most accurate run (lora)'s accuracy (0.700 vs 0.800) "
                              "with 1.0% of its trainable parameters, in 50% of its training time")
    assert "dominated" not in " ".join(text)  # each wins on something


def test_runs_at_chance_are_named_and_left_out_of_every_other_sentence() -> None:
    # SST-2's validation set: 872 examples, 50.9% positive; two standard errors above that is 0.543.
    runs = [ok_record("full", "full", 100.0, 0.765, 1000), ok_record("lora", "lora", 80.0, 0.783, 10),
            ok_record("adalora", "adalora", 85.0, 0.509, 15), ok_record("dylora", "dylora", 60.0, 0.542, 10)]
    runs[2].peak_memory_mb = runs[3].peak_memory_mb = 1.0  # the leanest and fastest, but they learned nothing
    for run in runs:
        run.eval_examples, run.majority_accuracy = 872, 0.5092
    text = findings(Results(runs=runs))
    assert text[0] == ("adalora and dylora did not learn the task measurably: their accuracy (0.509-0.542) is within "
                       "2 standard errors (+0.034 on 872 examples) of always answering the most frequent label "
                       "(0.509), so they are left out of the sentences below; a higher learning rate "
                       "(--set METHOD.lr=...) or a longer run may change that.")
    assert not any("adalora" in sentence or "dylora" in sentence for sentence in text[1:])
    assert "lora trained fastest" in " ".join(text) and "lora used the least peak memory" in " ".join(text)
    runs[3].val_accuracy = 0.544  # just over the line: dylora counts again, and is now the fastest
    text = findings(Results(runs=runs))
    assert text[0].startswith("adalora did not learn the task measurably: its accuracy (0.509) is within")
    assert "dylora trained fastest" in " ".join(text)
    # every run at chance: only that is said; unrecorded chance level (older files): nothing is judged
    for run in runs:
        run.val_accuracy = 0.52
    assert len(findings(Results(runs=runs))) == 1
    for run in runs:
        run.majority_accuracy = None
    assert "did not learn" not in " ".join(findings(Results(runs=runs)))


def test_findings_of_nothing_say_nothing() -> None:
    assert findings(Results(runs=[failed_record("lora", "lora")])) == []


@pytest.mark.parametrize("name", list(METHODS))
def test_each_registered_method_is_described_by_its_own_file(name: str) -> None:
    method = METHODS[name]
    own = f"peftlab.methods.{name}"
    module = importlib.import_module(own if importlib.util.find_spec(own) else type(method).__module__)
    first_words = module.__doc__.split()[0]
    line = describe_method(name)
    assert line.startswith(first_words) and "\n" not in line and len(line) < 200
    assert ("NF4" in line) == (method.quantization == "nf4")


def test_dora_gets_its_own_file_line_and_unknown_names_say_so() -> None:
    assert describe_method("dora").startswith("DoRA, weight-decomposed")
    assert describe_method("full") == FULL_FINE_TUNING_NOTE
    assert "not a registered method" in describe_method("gone")


def test_report_opens_with_findings_and_lists_what_each_method_is(tmp_path: Path) -> None:
    md = write_report(synthetic_results(), tmp_path)[0].read_text(encoding="utf-8")
    assert md.index("## Findings") < md.index("## Results") < md.index("## Methods")
    assert "- lora reached the highest validation accuracy, 0.900" in md
    methods = md[md.index("## Methods"):].split("\n\n")[1].splitlines()[2:]
    assert [row.split(" | ")[0] for row in methods] == ["| full", "| lora", "| dora", "| qlora", "| adalora"]
    assert f"| dora | {describe_method('dora')} |" in md


def test_val_curve_plot_only_when_a_run_was_evaluated_more_than_once(tmp_path: Path) -> None:
    once = [ok_record("lora", "lora", 10.0, 0.8, 100), ok_record("dora", "dora", 12.0, 0.8, 110)]
    for run in once:
        run.val_curve = [{"step": run.steps, "accuracy": run.val_accuracy}]
    assert plot_val_curves(Results(runs=once), tmp_path / "a.png") is None
    once[0].val_curve.insert(0, {"step": 10, "accuracy": 0.6})
    assert plot_val_curves(Results(runs=once), tmp_path / "b.png") == tmp_path / "b.png"
