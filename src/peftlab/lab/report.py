"""The comparison report: report.md with plots/ beside it, a self-contained report.html, a terminal table.

Both files are rendered from one list of blocks, so they always carry the same content. The HTML
embeds its plots as base64 data URIs and its CSS inline: it needs no network, no JS, no sibling files.
"""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from peftlab.io import atomic_write_text
from peftlab.methods import METHODS
from peftlab.methods.method import adapter_dropout_option
from peftlab.lab import seed_run
from peftlab.lab.findings import findings
from peftlab.lab.method_notes import describe_method
from peftlab.lab.metric import metric_label
from peftlab.lab.figures import render_plots
from peftlab.lab.plots import Plot, format_count, format_mb
from peftlab.lab.results import BYTES_PER_MB, Results, RunRecord
from peftlab.train.phase_clock import PHASES

TITLE = "peftlab comparison report"
#: The terminal's short header of each metric, and the report's name of each of a run's other scores.
SHORT_LABELS = {"accuracy": "acc", "exact match": "EM", "token accuracy": "tok acc"}
SCORE_NAMES = {"contains_answer": "contains answer", "token_accuracy": "token accuracy", "eval_loss": "val loss"}
NO_VALUE = "–"


@dataclass(frozen=True)
class ReportHead:
    """What a report opens with before the comparison's own sections (a study's verdicts and plot)."""

    title: str
    blocks: Callable[[Results, Path], list[Block]]  # from the results, drawing any plot into the given folder


def write_report(results: Results, out_dir: str | os.PathLike[str], head: ReportHead | None = None) -> tuple[Path, Path]:
    """Write out_dir/report.md, out_dir/plots/*.png and out_dir/report.html; return (md_path, html_path)."""
    out_dir = Path(out_dir)
    plots = render_plots(results, out_dir / "plots")
    lead = head.blocks(results, out_dir / "plots") if head else []
    blocks = _report_blocks(results, plots, head.title if head else TITLE, lead, against_seed=head is None)
    return write_blocks(blocks, out_dir, head.title if head else TITLE)


def write_blocks(blocks: Sequence[Block], out_dir: Path, title: str) -> tuple[Path, Path]:
    """out_dir/report.md and out_dir/report.html from ``blocks`` (their images under out_dir), each written whole."""
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    atomic_write_text(md_path, _to_markdown(blocks, out_dir))
    atomic_write_text(html_path, _to_html(blocks, title))
    return md_path, html_path


def format_table(results: Results) -> str:
    """The main table as aligned plain text for the terminal, failed runs' errors listed below it."""
    columns = _columns(results, terminal=True)
    headers = [column.short for column in columns]
    rows = [[_one_line(column.cell(run)) for column in columns] for run in results.runs]
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows)]

    def line(cells: Sequence[str]) -> str:
        padded = (cell.rjust(width) if column.numeric else cell.ljust(width)
                  for cell, width, column in zip(cells, widths, columns))
        return "  ".join(padded).rstrip()

    lines = [line(headers), line(["-" * width for width in widths]), *(line(row) for row in rows)]
    lines += [f"{run.run_name} failed: {_first_line(run.error)}" for run in results.runs if not run.ok]
    if not results.ok_runs:
        lines.append("All runs failed.")
    return "\n".join(lines)


# --- what the report says -------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    header: str  # in the report
    short: str  # in the terminal
    numeric: bool  # right-aligned
    cell: Callable[[RunRecord], str]


def _columns(results: Results, terminal: bool) -> list[Column]:
    """The main table; in the report a failed run's status cell carries its error (the terminal lists it below)."""
    baseline = results.time_baseline()
    if baseline is None:
        time_header = "%"
    elif baseline.is_full_fine_tuning:
        time_header = "% of full"
    else:
        time_header = f"% of {baseline.run_name} (slowest)"

    label = metric_label(results.config)
    score_keys = list(dict.fromkeys(key for run in results.runs for key in run.scores))

    def percent_of_baseline(run: RunRecord) -> str:
        if baseline is None or run.train_time_s is None:
            return NO_VALUE
        return f"{100 * run.train_time_s / baseline.train_time_s:.1f}%"

    def trainable(run: RunRecord) -> str:
        if run.trainable_params is None:
            return NO_VALUE
        fraction = run.trainable_fraction
        share = "" if fraction is None else f" ({_format_percent(100 * fraction)})"
        return format_count(run.trainable_params) + share

    def latency(run: RunRecord) -> str:
        if run.latency_ms is None:
            return NO_VALUE
        values = (run.latency_ms.base, run.latency_ms.adapter, run.latency_ms.merged)
        return " / ".join(_number(value, "{:.1f}") for value in values)

    def step_split(run: RunRecord) -> str:
        split = run.step_time_split_s
        return NO_VALUE if split is None else " / ".join(_three_digits(split.get(phase)) for phase in PHASES)

    def status(run: RunRecord) -> str:
        return run.status if run.ok or terminal else f"failed: {_first_line(run.error)}"

    return [
        Column("run", "run", False, lambda run: run.run_name),
        Column("method", "method", False, lambda run: run.method),
        Column("status", "status", False, status),
        Column(f"val {label}", "val " + SHORT_LABELS.get(label, label), True,
               lambda run: _number(run.val_accuracy, "{:.3f}")),
        *(Column(SCORE_NAMES.get(key, key), SCORE_NAMES.get(key, key), True,
                 lambda run, key=key: _number(run.scores.get(key), "{:.3f}")) for key in score_keys),
        Column("train time (s)", "time s", True, lambda run: _number(run.train_time_s, "{:,.1f}")),
        Column(f"train time ({time_header})", time_header, True, percent_of_baseline),
        Column("time/step (s)", "s/step", True, lambda run: _three_digits(run.time_per_step_s)),
        Column("forward / backward / optimizer (s/step)", "fwd/bwd/opt s", True, step_split),
        Column("examples/s", "ex/s", True, lambda run: _number(run.examples_per_s, "{:,.1f}")),
        Column("peak memory (MB)", "peak MB", True, lambda run: _number(run.peak_memory_mb, "{:,.0f}")),
        Column("trainable params (%)", "trainable", True, trainable),
        Column("adapter size (MB)", "adapter MB", True, lambda run: _megabytes(run.adapter_size_bytes)),
        Column("model size (MB)", "model MB", True, lambda run: _megabytes(run.model_size_bytes)),
        Column("latency ms base / adapter / merged", "latency ms b/a/m", True, latency),
    ]


def _report_blocks(results: Results, plots: Sequence[Plot], title: str = TITLE,
                   lead: Sequence[Block] = (), against_seed: bool = True) -> list[Block]:
    failed = [run for run in results.runs if not run.ok]
    methods = ", ".join(dict.fromkeys(run.method for run in results.runs)) or "none"
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    blocks: list[Block] = [
        Heading(1, title),
        Paragraph(f"{len(results.runs)} run{'' if len(results.runs) == 1 else 's'} "
                  f"({len(results.ok_runs)} ok, {len(failed)} failed); methods: {methods}. Generated {generated}."),
    ]
    if not results.ok_runs:
        blocks.append(Paragraph("All runs failed: there are no metrics or plots to show. "
                                "The errors are listed under “Failed runs”."))
    left_out = results.config.get("methods_left_out") or {}
    if left_out:
        blocks.append(Paragraph("--methods all left out what cannot run on this model: "
                                + "; ".join(f"{name} ({_first_line(reason)})" for name, reason in left_out.items())))
    blocks += lead
    sentences = findings(results)
    if sentences:
        blocks += [Heading(2, "Findings"), BulletList(sentences)]
    blocks += _base_model_blocks(results)
    if against_seed:
        blocks += _seed_run_blocks(results)
    columns = _columns(results, terminal=False)
    blocks += [
        Heading(2, "Results"),
        Table([column.header for column in columns], [[column.cell(run) for column in columns] for run in results.runs],
              numeric=[column.numeric for column in columns], failed_rows=[not run.ok for run in results.runs]),
        Heading(2, "Methods"),
        _methods_table(results),
    ]
    eval_sets = list(dict.fromkeys(name for run in results.runs for name in run.eval_datasets))
    if eval_sets:
        blocks += [Heading(2, "In-domain vs out-of-domain accuracy"),
                   Paragraph("Each run scored after training on its validation set (in-domain) and on each "
                             "--eval-dataset; in brackets, the change from in-domain in accuracy points."),
                   _eval_datasets_table(results, eval_sets)]
    if failed:
        blocks.append(Heading(2, "Failed runs"))
        for run in failed:
            blocks += [Heading(3, run.run_name), Preformatted(run.error or "(no error message recorded)")]
    if plots:
        blocks.append(Heading(2, "Plots"))
        for plot in plots:
            blocks += [Heading(3, plot.title), Image(plot), Paragraph(plot.caption)]
    blocks += [Heading(2, "How to read this"), BulletList(_how_to_read(results))]
    blocks += [Heading(2, "Environment"), key_value_table(results.environment)]
    blocks += [Heading(2, "Config (shared by all runs)"), key_value_table(results.config)]
    return blocks


def _base_model_blocks(results: Results) -> list[Block]:
    """The untrained base model's scores, the floor every run is measured from (generation metrics)."""
    base = results.config.get("base_scores")
    if not base:
        return []
    return [Heading(2, "The base model, untrained"),
            Paragraph(f"{results.config.get('model')} before any training, on the same "
                      f"{base.get('examples', '?')} held-out questions: {metric_label(results.config)} "
                      f"{base['exact_match']:.3f}, contains the answer {base['contains_answer']:.3f}.")]


def _seed_run_blocks(results: Results) -> list[Block]:
    """The published seed run beside this comparison when the setup matches; else why not."""
    rows = seed_run.comparison_rows(results)
    heading = Heading(2, "Against the published seed run")
    if rows is None:
        differences = seed_run.setup_differences(seed_run.seed_runs(results))
        return [heading, Paragraph(f"Not compared with the published seed run ({seed_run.summary()}): this "
                                   f"comparison's setup differs in {'; '.join(differences)}.")]
    return [heading, Paragraph(f"Same setup as the published seed run ({seed_run.summary()}). Time is compared as a "
                               "share of full fine-tuning's, which carries across machines."),
            Table(seed_run.COLUMNS, rows, numeric=[False] + [True] * (len(seed_run.COLUMNS) - 1),
                  failed_rows=[False] * len(rows))]


def _methods_table(results: Results) -> Table:
    methods = list(dict.fromkeys(run.method for run in results.runs))
    return Table(["method", "what it is"], [[method, describe_method(method)] for method in methods],
                 numeric=[False, False], failed_rows=[False] * len(methods))


def _eval_datasets_table(results: Results, eval_sets: list[str]) -> Table:
    def cell(run: RunRecord, name: str) -> str:
        accuracy = run.eval_datasets.get(name)
        if accuracy is None:
            return NO_VALUE
        change = f" ({100 * (accuracy - run.val_accuracy):+.1f})" if run.val_accuracy is not None else ""
        return f"{accuracy:.3f}{change}"

    rows = [[run.run_name, _number(run.val_accuracy, "{:.3f}"), *(cell(run, name) for name in eval_sets)]
            for run in results.runs]
    return Table(["run", "in-domain (validation)", *eval_sets], rows, numeric=[False] + [True] * (len(eval_sets) + 1),
                 failed_rows=[not run.ok for run in results.runs])


def _how_to_read(results: Results) -> list[str]:
    baseline = results.time_baseline()
    reference = (
        "full fine-tuning" if baseline and baseline.is_full_fine_tuning
        else f"the slowest run ({baseline.run_name}), as there is no successful full run" if baseline
        else "a baseline run (none succeeded here)"
    )
    dropout = _adapter_dropout(results)
    return [
        f"Training time is each run's training wall-clock time; the % column and the relative-time plot "
        f"put {reference} at 100%, so 60% means the run took 0.6× as long.",
        "Forward / backward / optimizer is the time per step in each phase (optimizer: gradient clipping, "
        "the update and the method's step hooks); the rest of time/step is batching and bookkeeping. "
        "Measured on CPU runs only (– on a GPU, where it would need a synchronize per phase).",
        *([dropout] if dropout else []),
        _metric_sentence(metric_label(results.config)),
        "Trainable params counts what the optimizer updates; the % is of all parameters of the model.",
        "Model size is the base model held in memory (fp32/bf16, or NF4 for QLoRA); adapter size is the "
        "file saved on disk (the whole checkpoint for full fine-tuning). MB is 2^20 bytes.",
        "Peak memory is the peak while training; latency is inference time per batch for the base model, "
        "with the adapter attached, and with the adapter merged into the weights (– when it can't merge).",
    ]


def _metric_sentence(label: str) -> str:
    what = {
        "accuracy": "Val accuracy is the final validation accuracy (0..1).",
        "exact match": "Val exact match is the share of held-out questions whose greedy answer equals the reference "
                       "after normalisation (lowercase, punctuation to spaces, articles dropped; see peftlab.train.generation_metrics); "
                       "contains answer: the reference occurs in the answer. Token accuracy is the share of answer "
                       "tokens the model predicts right, the next token from the true prefix, which rewards easy "
                       "tokens: it is not how many answers are right.",
        "token accuracy": "Val token accuracy is the share of held-out tokens whose next token the model predicts "
                          "right (argmax) from the true prefix; it is not an answer-level accuracy.",
    }.get(label, f"Val {label} is the comparison's score of each run (0..1).")
    return (what + " On a small evaluation set a difference of one or two points can be noise: compare against the "
            "run-to-run variation before drawing conclusions.")


def _adapter_dropout(results: Results) -> str | None:
    """Which adapter dropout each run had: it costs time (a mask per adapted layer and step) and regularises."""
    by_value: dict[Any, list[str]] = {}
    for run in results.runs:
        value = run.options.get(adapter_dropout_option(METHODS.get(run.method)) or "")
        if value is not None:
            by_value.setdefault(value, []).append(run.run_name)
    if not by_value:
        return None
    parts = "; ".join(f"{value:g} for {', '.join(names)}" for value, names in by_value.items())
    return (f"Adapter dropout: {parts}. peftlab compare runs adapters without dropout unless --lora-dropout or "
            "--set says otherwise, as the seed experiment's hand-written LoRA and DoRA did (peftlab train defaults "
            "to 0.05); with dropout each adapted layer draws a mask over its input every step, and DoRA does a "
            "second product with the frozen weight.")


def key_value_table(values: dict[str, Any]) -> Block:
    rows = [[key, value] for key, value in _flatten(values)]
    if not rows:
        return Paragraph("(not recorded)")
    return Table(["setting", "value"], rows, numeric=[False, False], failed_rows=[False] * len(rows))


def _flatten(values: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """Nested dicts become dotted keys ("versions.torch") so the table stays two columns."""
    for key, value in values.items():
        if isinstance(value, dict) and value:
            yield from _flatten(value, f"{prefix}{key}.")
        elif isinstance(value, (list, tuple)):
            yield f"{prefix}{key}", ", ".join(map(str, value))
        else:
            yield f"{prefix}{key}", NO_VALUE if value is None else str(value)


def _number(value: float | None, style: str) -> str:
    return NO_VALUE if value is None else style.format(value)


def _three_digits(value: float | None) -> str:
    """Three significant digits, trailing zeros kept so the column reads evenly: 3.00, 0.0412, 12.3, 1,204."""
    if value is None:
        return NO_VALUE
    return f"{value:,.0f}" if abs(value) >= 99.95 else f"{value:#.3g}"


def _megabytes(size_bytes: int | None) -> str:
    return NO_VALUE if size_bytes is None else format_mb(size_bytes / BYTES_PER_MB)


def _format_percent(percent: float) -> str:
    return f"{percent:.3g}%" if percent < 1 else f"{percent:.1f}%"


def _first_line(text: str | None, limit: int = 120) -> str:
    line = next((line.strip() for line in (text or "").splitlines() if line.strip()), "no error message recorded")
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _one_line(text: str) -> str:
    return " ".join(text.split())


# --- rendering: one list of blocks, two formats ---------------------------------------------------


@dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class BulletList:
    items: list[str]


@dataclass(frozen=True)
class Preformatted:
    text: str


@dataclass(frozen=True)
class Table:
    headers: list[str]
    rows: list[list[str]]
    numeric: list[bool]
    failed_rows: list[bool]


@dataclass(frozen=True)
class Image:
    plot: Plot


Block = Heading | Paragraph | BulletList | Preformatted | Table | Image


def _to_markdown(blocks: Sequence[Block], out_dir: Path) -> str:
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"{'#' * block.level} {_md_escape(block.text)}")
        elif isinstance(block, Paragraph):
            parts.append(_md_escape(block.text))
        elif isinstance(block, BulletList):
            parts.append("\n".join(f"- {_md_escape(item)}" for item in block.items))
        elif isinstance(block, Preformatted):
            fence = "~~~~" if "```" in block.text else "```"
            parts.append(f"{fence}text\n{block.text.rstrip()}\n{fence}")
        elif isinstance(block, Table):
            align = "| " + " | ".join("---:" if right else ":---" for right in block.numeric) + " |"
            parts.append("\n".join([_md_row(block.headers), align, *map(_md_row, block.rows)]))
        elif isinstance(block, Image):
            link = block.plot.path.relative_to(out_dir).as_posix()
            parts.append(f"![{_md_escape(block.plot.title)}]({link})")
    return "\n\n".join(parts) + "\n"


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(_md_escape(_one_line(cell)) for cell in cells) + " |"


def _md_escape(text: str) -> str:
    for char in "\\`*_[]<>|#":
        text = text.replace(char, "\\" + char)
    return text


def _to_html(blocks: Sequence[Block], title: str = TITLE) -> str:
    body = []
    for block in blocks:
        if isinstance(block, Heading):
            body.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            body.append(f"<p>{html.escape(block.text)}</p>")
        elif isinstance(block, BulletList):
            items = "".join(f"<li>{html.escape(item)}</li>" for item in block.items)
            body.append(f"<ul>{items}</ul>")
        elif isinstance(block, Preformatted):
            body.append(f"<pre>{html.escape(block.text.rstrip())}</pre>")
        elif isinstance(block, Table):
            body.append(_html_table(block))
        elif isinstance(block, Image):
            encoded = base64.b64encode(block.plot.path.read_bytes()).decode("ascii")
            body.append(f'<figure><img src="data:image/png;base64,{encoded}" alt="{html.escape(block.plot.title)}">'
                        "</figure>")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
        + "\n".join(body)
        + "\n</main>\n</body>\n</html>\n"
    )


def _html_table(table: Table) -> str:
    def cell(tag: str, text: str, right: bool) -> str:
        return f'<{tag}{" class=num" if right else ""}>{html.escape(text)}</{tag}>'

    head = "".join(cell("th", text, right) for text, right in zip(table.headers, table.numeric))
    rows = []
    for row, failed in zip(table.rows, table.failed_rows):
        cells = "".join(cell("td", text, right) for text, right in zip(row, table.numeric))
        rows.append(f'<tr{" class=failed" if failed else ""}>{cells}</tr>')
    return f'<div class="table-wrap"><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'


_CSS = """
body { margin: 0; background: #f6f7f9; color: #1f2328;
       font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1200px; margin: 0 auto; padding: 24px 32px 48px; background: #fff; }
h1 { font-size: 26px; margin: 0 0 8px; }
h2 { font-size: 20px; margin: 32px 0 8px; padding-bottom: 4px; border-bottom: 1px solid #d8dee4; }
h3 { font-size: 16px; margin: 20px 0 6px; }
.table-wrap { overflow-x: auto; }
table { border-collapse: collapse; font-size: 13px; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d8dee4; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #eef1f4; }
td.num, th.num { text-align: right; }
td.num { white-space: nowrap; }
tbody tr:nth-child(even) { background: #f8f9fb; }
tr.failed, tr.failed:nth-child(even) { background: #fdecea; color: #8a1c12; }
pre { background: #f3f4f6; padding: 8px 12px; overflow-x: auto; white-space: pre-wrap; font-size: 13px; }
figure { margin: 8px 0; }
img { max-width: 100%; height: auto; border: 1px solid #e5e7eb; }
@media print { body { background: #fff; } main { padding: 0; } }
"""
