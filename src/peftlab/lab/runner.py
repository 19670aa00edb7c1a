"""Run a comparison: each planned run in a fresh process, its record collected, the report kept current.

    parent (peftlab compare)                       child (python -m peftlab.lab.runner --run-spec)
    for each planned run:
      write OUT/runs/NAME/spec.json   ---------->  run_training(options)   -> OUT/runs/NAME/train/
      echo the child's output                      measure sizes and latency from the saved files
      read OUT/runs/NAME/record.json  <----------  write record.json (a RunRecord)
      save results.json, results.csv, report

A fresh process per run makes ``peak_memory_mb`` that run's alone. Every run gets the same seed,
hence the same data order. A run that fails -- an exception, NaN loss, a non-zero exit, a kill by
the OOM killer -- is recorded as failed with the last lines of its output, and the rest go on.
After each run the results and the report are rewritten atomically, so Ctrl-C leaves a
consistent partial comparison, and ``--resume OUT`` reruns only what did not finish.

Files in OUT: compare.json (the plan), results.json, results.csv, report.md, report.html, plots/,
runs/NAME/{spec.json, output.log, record.json, train/}.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from peftlab.io import atomic_write_text, explain_disk_full
from peftlab.lab.results import (
    Results,
    RunRecord,
    ResultsFormatError,
    load_results,
    results_to_csv,
    save_results,
)
from peftlab.lab.metric import metric_label
from peftlab.lab.sweep import PlannedRun
from peftlab.trackers import require_trackers
from peftlab.termination import EXIT_TERMINATED, Terminated, terminate_as_interrupt
from peftlab.train.options import OptionsError, TrainOptions

if TYPE_CHECKING:
    from peftlab.lab.report import ReportHead

PLAN_FILE = "compare.json"
RESULTS_FILE = "results.json"
CSV_FILE = "results.csv"
RUNS_FOLDER = "runs"
#: Lines of a failed run's output kept as its error.
ERROR_TAIL_LINES = 20
#: Options that only say where a run's numbers are also sent: changing them on --resume keeps finished runs.
TRACKING_OPTIONS = ("report_to", "run_group")

Log = Callable[[str], None]


def log_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- the output folder ------------------------------------------------------------------------------


def check_before_runs(runs: list[PlannedRun], out: Path, resuming: bool) -> None:
    """What would fail every run, refused before any (and before ``out`` is made): a missing tracker
    package (here, not in every run's process), the user's data files that cannot be read as the task's data,
    an output folder that cannot be written or holds a comparison."""
    options = [TrainOptions(**run.options) for run in runs]
    require_trackers(dict.fromkeys(name for each in options for name in each.report_to))
    check_data_files(options)
    prepare_out_dir(out, resuming)


def check_data_files(options: list[TrainOptions]) -> None:
    """Read each distinct data file or folder the runs train on once, as a run would: a bad row or a format
    the task cannot use is one error here, not the same failure in every run. Named datasets (sst2,
    number-words ...) are built in and read by the runs themselves."""
    from peftlab.train.build import load_datasets

    checked = set()
    for each in options:
        key = (each.dataset, each.data_dir, each.task)
        if key in checked or not Path(each.dataset).expanduser().exists():
            continue
        checked.add(key)
        load_datasets(each)


def prepare_out_dir(out: Path, resuming: bool) -> None:
    """Fail before any run when ``out`` cannot be written, or would mix a new comparison into an old one."""
    if not resuming and (out / RESULTS_FILE).exists():
        raise OptionsError(f"{out} already holds a comparison; continue it with --resume {out}, or choose another --out.")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as error:
        raise OptionsError(f"cannot write to the output folder {out}: {error.strerror or error}. Choose another --out.") from None


def check_resumable(out: Path) -> None:
    """``--resume`` of a folder that holds no comparison is an error, not a new comparison."""
    if not (out / PLAN_FILE).is_file():
        state = "does not exist" if not out.exists() else f"holds no {PLAN_FILE}"
        raise OptionsError(f"--resume {out}: nothing to resume there, the folder {state}. Check the path, or start "
                           f"anew with --out {out}.")


def check_run_folders_kept(out: Path, finished: list[str]) -> None:
    """A finished run whose folder was deleted cannot count as done: its model and record are gone."""
    missing = [name for name in finished if not run_folder(out, name).is_dir()]
    if missing:
        raise OptionsError(
            f"--resume {out}: results.json lists {', '.join(missing)} as finished, but their folders in "
            f"{out / RUNS_FOLDER} were deleted. Restore them, or start anew with another --out."
        )


def save_plan(out: Path, runs: list[PlannedRun], config: dict) -> None:
    text = json.dumps({"config": config, "runs": [run.to_dict() for run in runs]}, indent=1) + "\n"
    atomic_write_text(out / PLAN_FILE, text)


def load_plan(out: Path) -> tuple[list[PlannedRun], dict]:
    """The runs and config a comparison in ``out`` was started with."""
    path = out / PLAN_FILE
    if not path.is_file():
        raise OptionsError(f"{out} holds no {PLAN_FILE}: it is not a folder written by `peftlab compare`.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return [PlannedRun.from_dict(run) for run in data["runs"]], data["config"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ResultsFormatError(f"{path} is damaged ({error}); start a new comparison with another --out.") from None


def run_folder(out: Path, run_name: str) -> Path:
    return out / RUNS_FOLDER / (re.sub(r"[^A-Za-z0-9._+=-]+", "_", run_name).strip("_") or "run")


# -- the parent ---------------------------------------------------------------------------------------


def earlier_work(out: Path) -> tuple[list[RunRecord], dict[str, dict]]:
    """The records already in ``out``, and the options each of their runs was planned with.

    Raises ResultsVersionError for a results file from an incompatible version.
    """
    records = load_results(out / RESULTS_FILE).runs if (out / RESULTS_FILE).exists() else []
    planned = {run.run_name: run.options for run in load_plan(out)[0]} if (out / PLAN_FILE).exists() else {}
    return records, planned


def run_comparison(
    runs: list[PlannedRun],
    config: dict,
    out: Path,
    environment: dict,
    resuming: bool = False,
    log: Log = log_to_stderr,
    head: ReportHead | None = None,
) -> Results:
    """Run every planned run not already done in ``out``; return the results, also written to ``out``.

    Resuming, a run is done when ``out`` holds an ok record of it, planned with the same options but
    for :data:`TRACKING_OPTIONS` (trackers do not change what a run measures).
    """
    check_before_runs(runs, out, resuming)
    earlier, earlier_options = earlier_work(out) if resuming else ([], {})
    planned = {run.run_name: run for run in runs}
    done = [record.run_name for record in earlier if record.ok and record.run_name in planned
            and same_measurement(earlier_options.get(record.run_name), planned[record.run_name].options)]
    check_run_folders_kept(out, done)
    # Earlier records stay until their run is redone, and those of runs no longer planned stay for good.
    records = {record.run_name: record for record in earlier if record.run_name in planned}
    left_out = [record for record in earlier if record.run_name not in planned]
    save_plan(out, runs, config)
    if done:
        log(f"peftlab compare: {len(done)} run(s) already done in {out}, skipped: {', '.join(done)}")
        retracked = [name for name in done if earlier_options[name] != planned[name].options]
        if retracked:
            log(f"peftlab compare: the trackers changed ({', '.join(TRACKING_OPTIONS)}); they log the runs still "
                f"to do, not those already done ({', '.join(retracked)})")
    todo = [run for run in runs if run.run_name not in done]
    durations: list[float] = []
    for index, run in enumerate(todo, start=1):
        eta = _eta(durations, len(todo) - index + 1)
        log(f"[{index}/{len(todo)}] {run.run_name}: starting{eta}")
        began = time.monotonic()
        record = launch(run, run_folder(out, run.run_name), log)
        durations.append(time.monotonic() - began)
        records[run.run_name] = record
        log(f"[{index}/{len(todo)}] {run.run_name}: {_outcome(record, metric_label(config))} ({durations[-1]:.0f} s)")
        publish(_results(runs, records, left_out, environment, config), out, head)
    results = _results(runs, records, left_out, environment, config)
    if not todo:
        publish(results, out, head)
    return results


def same_measurement(earlier: dict | None, planned: dict) -> bool:
    """Whether a run planned with ``earlier`` options measured what one planned with ``planned`` would."""
    if earlier is None:
        return False
    untracked = [{name: value for name, value in options.items() if name not in TRACKING_OPTIONS}
                 for options in (earlier, planned)]
    return untracked[0] == untracked[1]


def _outcome(record: RunRecord, label: str) -> str:
    if not record.ok:
        return f"FAILED: {record.error.splitlines()[0] if record.error else 'no error recorded'}"
    return "ok" if record.val_accuracy is None else f"ok, val {label} {record.val_accuracy:.3f}"


def _eta(durations: list[float], runs_left: int) -> str:
    if not durations:
        return ""
    seconds = sum(durations) / len(durations) * runs_left
    return f" (about {seconds / 60:.1f} min left for {runs_left} run{'s' if runs_left > 1 else ''})"


def _results(runs: list[PlannedRun], records: dict[str, RunRecord], kept: list[RunRecord],
             environment: dict, config: dict) -> Results:
    ordered = [records[run.run_name] for run in runs if run.run_name in records]
    return Results(runs=ordered + kept, environment=environment, config=config)


def publish(results: Results, out: Path, head: ReportHead | None = None) -> None:
    """Write results.json, results.csv and the report (opening with ``head``), each file replaced whole so
    none is ever half-written."""
    from peftlab.lab.report import write_report  # here: the child processes need no matplotlib

    save_results(out / RESULTS_FILE, results)
    results_to_csv(results, out / CSV_FILE)
    with tempfile.TemporaryDirectory(dir=out, prefix=".report-") as staging_name:
        staging = Path(staging_name)
        with explain_disk_full(f"writing the report in {out}: the previous report.md, report.html and plots are "
                               "intact"):
            write_report(results, staging, head)
        plots = out / "plots"
        plots.mkdir(exist_ok=True)
        fresh = {path.name for path in (staging / "plots").glob("*")}
        for stale in plots.glob("*"):
            if stale.name not in fresh:
                stale.unlink()
        for name in fresh:
            os.replace(staging / "plots" / name, plots / name)
        for name in ("report.md", "report.html"):
            os.replace(staging / name, out / name)


def launch(run: PlannedRun, folder: Path, log: Log) -> RunRecord:
    """Run one planned run in a child process, echoing its output; its record, or a failed one."""
    command = [sys.executable, "-m", "peftlab.lab.runner", "--run-spec", str(write_spec(run, folder))]
    tail: collections.deque[str] = collections.deque(maxlen=ERROR_TAIL_LINES)
    with (explain_disk_full(f"writing {folder / 'output.log'}: run {run.run_name} was stopped, and the runs before "
                            "it are kept"),
          open(folder / "output.log", "w", encoding="utf-8") as transcript):
        child = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            assert child.stdout is not None  # stdout=PIPE
            for line in child.stdout:
                transcript.write(line)
                tail.append(line.rstrip("\n"))
                log(f"    {run.run_name} | {line.rstrip()}")
            returncode = child.wait()
        finally:
            if child.poll() is None:  # interrupted: take the child down with us
                child.terminate()
                try:
                    child.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
    record_path = folder / "record.json"
    if returncode == 0 and record_path.is_file():
        return RunRecord.from_dict(json.loads(record_path.read_text(encoding="utf-8")), str(record_path))
    return failed_record(run, _failure_summary(returncode, list(tail)))


def write_spec(run: PlannedRun, folder: Path) -> Path:
    """A clean run folder (a rerun leaves no stale record or checkpoint) with the run's spec.json."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    # In the trackers, each run is named as in the report and grouped with its comparison (by default).
    group = run.options.get("run_group") or folder.parents[1].resolve().name
    options = {**run.options, "out": str(folder / "train"), "resume": None, "run_name": run.run_name, "run_group": group}
    spec = {**run.to_dict(), "options": options}
    atomic_write_text(folder / "spec.json", json.dumps(spec, indent=1) + "\n")
    return folder / "spec.json"


def _failure_summary(returncode: int, tail: list[str]) -> str:
    """The error's first line says what went wrong (the exception, or the signal); the output tail follows."""
    if returncode < 0 or returncode == EXIT_TERMINATED:  # a signal; SIGTERM is caught, cleaned up after, and exits 143
        name = signal.Signals(-returncode).name if returncode < 0 else "SIGTERM"
        headline = f"the run's process was killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    elif returncode == 0:
        headline = "the run's process exited without writing its record"
    else:
        headline = next((line.strip() for line in reversed(tail) if line.strip()), f"exit status {returncode}")
    return f"{headline}\n\nexit status {returncode}; last lines of its output:\n" + "\n".join(tail)


def failed_record(run: PlannedRun, error: str) -> RunRecord:
    return RunRecord(method=run.method, run_name=run.run_name, status="failed", error=error, sweep=run.sweep,
                     options=run.options)


# -- the child ------------------------------------------------------------------------------------------


def execute(spec_path: Path) -> RunRecord:
    """Train the run described by ``spec_path``, measure it, and write record.json beside the spec."""
    import transformers

    from peftlab.data.datasets import ClassificationDataset
    from peftlab.lab.extra_eval import evaluate_eval_datasets
    from peftlab.lab.measure import measure_inference, measure_ranks, saved_model_bytes
    from peftlab.lab.metric import EXACT_MATCH, metric_for
    from peftlab.train.build import load_datasets
    from peftlab.train.distributed import pick_device
    from peftlab.train.loop import run_training
    from peftlab.train.options import TrainOptions

    # Loading bars and load reports (e.g. "classifier: newly initialized", expected for a new head),
    # once per model and run, would bury the progress lines in the parent's log.
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    # The comparison owns the run's folder: a rerun replaces what an earlier attempt left there.
    metrics = run_training(TrainOptions(**{**spec["options"], "overwrite": True}))
    options = TrainOptions(**metrics.options)
    train_data, eval_data = load_datasets(options)
    num_labels = getattr(train_data, "num_labels", None)
    batch = [eval_data[i] for i in range(min(options.eval_batch_size, len(eval_data)))]
    latency, model_bytes = measure_inference(options, num_labels, batch, pick_device(options.device))
    rank_per_layer, accuracy_per_rank = measure_ranks(options, num_labels, eval_data, pick_device(options.device))
    metric = metric_for(options)
    accuracy_key = "eval_accuracy" if options.task == "seq-cls" else "eval_token_accuracy"
    eval_datasets = evaluate_eval_datasets(options, spec.get("eval_datasets") or [], num_labels,
                                           getattr(train_data, "label_names", None), accuracy_key)
    scores: dict[str, float] = {}
    if metric is not EXACT_MATCH:
        val_accuracy = metrics.eval[metric["key"]]
    else:  # what the trained model answers: its score, the rest beside it
        answered = answer_held_out(options, eval_data, spec_path.parent / GENERATIONS_FILE)
        val_accuracy = answered["exact_match"]
        scores = {"contains_answer": answered["contains_answer"], "token_accuracy": metrics.eval["eval_token_accuracy"],
                  "eval_loss": metrics.eval["eval_loss"]}
    record = RunRecord(
        method=spec["method"],
        run_name=spec["run_name"],
        status="ok",
        sweep=spec["sweep"],
        val_accuracy=val_accuracy,
        val_curve=[{"step": int(point["step"]), "accuracy": point[metric["key"]]}
                   for point in metrics.val_curve if metric["key"] in point],
        scores=scores,
        train_loss_curve=[{"step": step, "loss": loss} for step, loss in enumerate(metrics.train_loss_curve, 1)],
        train_accuracy=[{"epoch": epoch, "accuracy": accuracy}
                        for epoch, accuracy in enumerate(metrics.train_accuracy, 1)],
        train_time_s=metrics.train_time_s,
        time_per_step_s=metrics.time_per_step_s,
        step_time_split_s=metrics.time_split_per_step_s,
        examples_per_s=metrics.examples_per_s,
        peak_memory_mb=metrics.peak_memory_mb,
        trainable_params=metrics.trainable_params,
        total_params=metrics.total_params,
        adapter_size_bytes=saved_model_bytes(options.out),
        model_size_bytes=model_bytes,
        latency_ms=latency,
        steps=metrics.steps,
        options=metrics.options,
        rank_per_layer=rank_per_layer,
        accuracy_per_rank=accuracy_per_rank,
        eval_datasets=eval_datasets,
        eval_examples=len(eval_data),
        majority_accuracy=eval_data.majority_share() if isinstance(eval_data, ClassificationDataset) else None,
    )
    atomic_write_text(spec_path.parent / "record.json", json.dumps(record.to_dict(), indent=1) + "\n")
    return record


#: Each run's answers to the held-out questions, in its folder (generation metrics only).
GENERATIONS_FILE = "generations.jsonl"


def answer_held_out(options: TrainOptions, eval_data, generations: Path | None, trained: bool = True) -> dict[str, float]:
    """The trained run in ``options.out`` (or, ``trained=False``, its base model untrained) answering the
    held-out questions greedily: ``{"exact_match", "contains_answer"}``; the answers go to ``generations``."""
    from peftlab.train.generation import Sampling, load_for_generation
    from peftlab.train.generation_eval import DEFAULT_EVAL_NEW_TOKENS, held_out_questions, score_answers, write_generations
    from peftlab.train.build import load_run
    from peftlab.train.distributed import pick_device

    questions = held_out_questions(eval_data, getattr(eval_data, "source", options.dataset))
    model, tokenizer = load_run(options) if trained else load_for_generation(options.model)
    model.to(pick_device(options.device))
    scores, rows = score_answers(model, tokenizer, questions, Sampling(DEFAULT_EVAL_NEW_TOKENS),
                                 options.eval_batch_size, with_base=False)
    if generations is not None:
        write_generations(generations, rows, overwrite=True)
    return scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peftlab.lab.runner",
                                     description="Run one planned run of `peftlab compare` (its child process).")
    parser.add_argument("--run-spec", type=Path, required=True, metavar="SPEC.json",
                        help="the run's spec.json, written by `peftlab compare`")
    spec = parser.parse_args(argv).run_spec
    try:
        with terminate_as_interrupt():  # compare stops this child with SIGTERM: let its cleanup run
            execute(spec)
    except Terminated:
        return EXIT_TERMINATED
    return 0


if __name__ == "__main__":
    sys.exit(main())
