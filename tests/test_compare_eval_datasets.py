"""Issue 15 item 4: `peftlab compare --eval-dataset FILE` scores every run on extra labelled files after
training; the report shows in-domain vs out-of-domain accuracy; labels outside the trained classes stop
the comparison before any run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftlab.lab.report import write_report
from peftlab.lab.results import Results, load_results
from test_compare import assets, no_launch, run_cli, shared_flags  # noqa: F401  (fixtures)
from test_report import ok_record


def write_labelled(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("sentence\tlabel\n" + "".join(f"{text}\t{label}\n" for text, label in rows), encoding="utf-8")
    return path


def test_every_run_is_scored_on_each_extra_set(tmp_path, shared_flags):
    # One set the tiny data's giveaway words decide; one where they are swapped: accuracies must differ.
    agree = write_labelled(tmp_path / "agree.tsv", [("the film was great", "1"), ("a bad movie", "0")] * 4)
    swapped = write_labelled(tmp_path / "swapped.tsv", [("the film was great", "0"), ("a bad movie", "1")] * 4)
    out = tmp_path / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        code, _, stderr = run_cli("compare", "--methods", "full,lora", "--out", str(out), *shared_flags,
                                  "--eval-dataset", str(agree), "--eval-dataset", str(swapped))
    assert code == 0, stderr
    results = load_results(out / "results.json")
    for run in results.runs:
        assert set(run.eval_datasets) == {str(agree), str(swapped)}, run.run_name
        # The same 8 sentences, labels flipped: every right answer on one is a wrong one on the other.
        assert run.eval_datasets[str(agree)] + run.eval_datasets[str(swapped)] == pytest.approx(1.0), run.run_name
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "## In-domain vs out-of-domain accuracy" in md
    plan = json.loads((out / "compare.json").read_text(encoding="utf-8"))
    assert all(run["eval_datasets"] == [str(agree), str(swapped)] for run in plan["runs"])  # resume keeps them


def test_labels_outside_the_trained_classes_stop_before_any_run(tmp_path, shared_flags, no_launch):
    bad = write_labelled(tmp_path / "three_classes.tsv", [("the film was great", "1"), ("meh", "2")])
    code, _, stderr = run_cli("compare", "--methods", "lora", "--out", str(tmp_path / "out"), *shared_flags,
                              "--eval-dataset", str(bad))
    assert code == 2 and "three_classes.tsv" in stderr and "label 2 is outside the classes 0..1" in stderr
    code, _, stderr = run_cli("compare", "--methods", "lora", "--out", str(tmp_path / "out"), *shared_flags,
                              "--eval-dataset", str(tmp_path / "missing.tsv"))
    assert code == 2 and "--eval-dataset" in stderr and "missing.tsv" in stderr
    assert not (tmp_path / "out").exists()


def test_report_table_shows_change_from_in_domain(tmp_path):
    lora, full = ok_record("lora", "lora", 10.0, 0.90, 100), ok_record("full", "full", 20.0, 0.92, 10_000)
    lora.eval_datasets, full.eval_datasets = {"imdb.csv": 0.81}, {"imdb.csv": 0.75}
    md = write_report(Results(runs=[full, lora]), tmp_path)[0].read_text(encoding="utf-8")
    assert "| run | in-domain (validation) | imdb.csv |" in md
    assert "| lora | 0.900 | 0.810 (-9.0) |" in md and "| full | 0.920 | 0.750 (-17.0) |" in md
