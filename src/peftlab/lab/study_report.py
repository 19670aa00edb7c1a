"""The reports of ``peftlab study``: one study's, and the one report of ``peftlab study all``.

A study's report.html is its comparison's report opened by the study: verdicts first, then what the
runs show (:mod:`peftlab.lab.study_findings`) and the study's plot (:mod:`peftlab.lab.study_plots`).
``study all`` writes OUT/report.md and OUT/report.html over OUT/NAME/, one folder per study: every
verdict in one table first, the outcomes counted, then each study's verdicts, findings and plot,
with the path of its full report.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from peftlab.lab.plots import Plot
from peftlab.lab.report import (
    Block,
    BulletList,
    Heading,
    Image,
    Paragraph,
    ReportHead,
    Table,
    key_value_table,
    write_blocks,
)
from peftlab.lab.results import Results, RunRecord
from peftlab.lab.study import STUDIES, Study, verdicts
from peftlab.lab.study_findings import all_findings, study_findings
from peftlab.lab.study_plots import plot_loss_by_setting, plot_study
from peftlab.lab.verdict import ACCURACY, Verdict

STUDY_PLOT = "study.png"
LOSS_PLOT = "study_loss.png"
ALL_TITLE = "peftlab study all"


def study_head(study: Study) -> ReportHead:
    """What a study's report opens with, computed afresh from the results each time it is written."""
    return ReportHead(f"peftlab study {study.name}", lambda results, plots: study_blocks(study, results, plots))


def head_for(results: Results) -> ReportHead | None:
    """The head of a results file written by a study (its config names it), else None."""
    name = results.config.get("study")
    return study_head(STUDIES[name]) if name in STUDIES else None


def study_blocks(study: Study, results: Results, plots_dir: Path, level: int = 2) -> list[Block]:
    blocks: list[Block] = [Paragraph(f"Study {study.name}: {study.about}."), Heading(level, "Verdicts"),
                           BulletList([verdict.text() for verdict in verdicts(study, results.runs)])]
    if study.note:
        blocks.append(Paragraph(study.note))
    sentences = (study.work.findings(results) if study.work else []) + study_findings(results.runs, study.metric)
    if sentences:
        blocks += [Heading(level, "What the runs show"), BulletList(sentences)]
    for plot in (draw_study_plot(study, results, plots_dir), draw_loss_plot(study, results, plots_dir)):
        if plot is not None:
            blocks += [Heading(level + 1, plot.title), Image(plot), Paragraph(plot.caption)]
    return blocks


def draw_study_plot(study: Study, results: Results, plots_dir: Path) -> Plot | None:
    title = f"Study {study.name}: {study.metric.name} per setting"
    path = plot_study(results, study.metric, title, plots_dir / STUDY_PLOT)
    if path is None:
        return None
    caption = (f"Each dot is one seed's {study.metric.name}; the bar is the mean over seeds and the grey line "
               "the seed-to-seed range. A verdict's effect is the distance between two settings' bars; it counts "
               "when it is wider than their lines.")
    if study.metric is ACCURACY:
        caption += " Hollow diamonds: training accuracy counted during the last epoch, averaged over seeds."
    return Plot(title, path, caption)


def draw_loss_plot(study: Study, results: Results, plots_dir: Path) -> Plot | None:
    """The training loss against the steps per setting, for a study that asks for it (``loss_curves``)."""
    if not study.loss_curves:
        return None
    title = f"Study {study.name}: training loss against the steps"
    path = plot_loss_by_setting(results, title, plots_dir / LOSS_PLOT)
    if path is None:
        return None
    return Plot(title, path, "Each thin line is one seed's training loss at every optimizer step, the thick line "
                "of its colour the mean over seeds. Left of the dotted line: the first 10% of the steps, whose mean "
                "loss the convergence verdicts compare.")


def write_study_all_report(outcomes: Sequence[tuple[Study, Results, list[Verdict]]], out: Path,
                           folders: dict[str, Path], elapsed_s: float,
                           left_out: Sequence[tuple[Study, str]] = (), resumed: bool = False) -> Path:
    """OUT/report.md and OUT/report.html for every study's outcome; returns the HTML's path. ``elapsed_s``
    is this invocation's time: after ``--resume`` it leaves out the runs finished before, which the
    summed training time still counts."""
    all_verdicts = [(study.name, verdict) for study, _, study_verdicts in outcomes for verdict in study_verdicts]
    runs = [run for _, results, _ in outcomes for run in results.runs]
    failed = sum(not run.ok for run in runs)
    config = outcomes[0][1].config if outcomes else {}
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    took = (f"this --resume took {elapsed_s / 60:.1f} min (the runs it found finished are not in that figure)"
            if resumed else f"in {elapsed_s / 60:.1f} min")
    blocks: list[Block] = [
        Heading(1, ALL_TITLE),
        Paragraph(f"{len(outcomes)} studies, {len(runs)} runs ({len(runs) - failed} ok, {failed} failed) on "
                  f"{config.get('model', '?')} with {config.get('dataset', '?')}, {took}; "
                  f"{_training_min(runs):.1f} min of training in all runs. Generated {generated}."),
        Heading(2, "Verdicts"),
        Table(["study", "claim", "verdict", "measured"],
              [[name, verdict.claim, verdict.outcome + verdict.note, verdict.measured] for name, verdict in all_verdicts],
              numeric=[False] * 4, failed_rows=[verdict.outcome == "not judged" for _, verdict in all_verdicts]),
        BulletList(all_findings(all_verdicts)),
    ]
    if left_out:
        blocks += [Heading(2, "Studies left out"),
                   BulletList([f"{study.name} ({study.about}): {why}" for study, why in left_out])]
    for study, results, _ in outcomes:
        folder = folders[study.name]
        failed_runs = sum(not run.ok for run in results.runs)
        blocks += [Heading(2, f"Study {study.name}"), *study_blocks(study, results, folder / "plots", level=3),
                   Paragraph(f"{len(results.runs)} runs ({failed_runs} failed), "
                             f"{_training_min(results.runs):.1f} min of training "
                             f"in all. Every run, table and plot of this study: "
                             f"{folder.relative_to(out).as_posix()}/report.html.")]
    if outcomes:
        blocks += [Heading(2, "Environment"), key_value_table(outcomes[0][1].environment)]
    write_blocks(blocks, out, ALL_TITLE)
    return out / "report.html"


def _training_min(runs: Sequence[RunRecord]) -> float:
    """The runs' training time summed, in minutes (a run without one counts 0)."""
    return sum(run.train_time_s or 0 for run in runs) / 60
