"""Issue 15 item 2: `peftlab study NAME` -- each study's grid, its verdicts from the records, the
unknown-name error. The child process is replaced by records with given accuracies (no training)."""

from __future__ import annotations

import pytest

from peftlab.lab import runner
from peftlab.lab.results import RunRecord
from peftlab.lab.study import STUDIES
from test_compare import run_cli

#: accuracy by (swept value, seed): alpha=2r clearly better; r=8 vs 2 within the spread; r=32 worse than 8.
ACCURACY = {("r", 0): 0.80, ("r", 1): 0.81, ("2r", 0): 0.86, ("2r", 1): 0.87,
            (2, 0): 0.84, (2, 1): 0.86, (8, 0): 0.85, (8, 1): 0.86, (32, 0): 0.80, (32, 1): 0.81}


@pytest.fixture
def launched(monkeypatch) -> list:
    runs = []

    def launch(run, folder, log):
        runs.append(run)
        value = next(v for k, v in run.sweep.items() if k != "seed")
        return RunRecord(method=run.method, run_name=run.run_name, status="ok", sweep=run.sweep,
                         options=run.options, val_accuracy=ACCURACY[(value, run.sweep["seed"])])

    monkeypatch.setattr(runner, "launch", launch)
    return runs


def test_alpha_study_grid_and_verdict(tmp_path, launched) -> None:
    code, stdout, stderr = run_cli("study", "alpha", "--out", str(tmp_path / "out"))
    assert code == 0, stderr
    assert [run.run_name for run in launched] == [
        "lora[lora_alpha=r,seed=0]", "lora[lora_alpha=r,seed=1]", "lora[lora_alpha=2r,seed=0]", "lora[lora_alpha=2r,seed=1]"]
    assert [run.options["lora_alpha"] for run in launched] == [8, 8, 16, 16]  # lora's default r is 8
    assert [run.options["seed"] for run in launched] == [0, 1, 0, 1]
    verdict = "+6.0 points (mean of 2 seeds); seed-to-seed spread 1.0 points. Verdict: holds."
    assert verdict in stdout and verdict in (tmp_path / "out" / "verdicts.md").read_text(encoding="utf-8")


def test_rank_study_gives_no_effect_and_a_confirmed_overfit(tmp_path, launched) -> None:
    code, stdout, _ = run_cli("study", "rank", "--out", str(tmp_path / "out"))
    assert code == 0
    assert sorted({run.options["r"] for run in launched}) == [2, 8, 32] and len(launched) == 6
    lines = [line for line in stdout.splitlines() if line.startswith("- Claim")]
    assert lines[0].endswith("Verdict: no effect beyond seed spread.")  # +0.5 points, spread 2.0
    assert lines[1].endswith("Verdict: holds.")  # r=32 is 5 points less accurate, spread 1.0


def test_unknown_study_lists_the_known_ones(tmp_path, launched) -> None:
    code, _, stderr = run_cli("study", "alfa", "--out", str(tmp_path / "out"))
    assert code == 2 and f"unknown study 'alfa'; the studies are: {', '.join(STUDIES)}" in stderr
    assert launched == [] and not (tmp_path / "out").exists()
