"""--report-to: the loop's scalars and the run's options, read back with each tracker's own reader.

TensorBoard's EventAccumulator, MLflow's client on a local file store and the records of a W&B
offline run (W&B's own protobuf ``Record``; the file framing is read below, as wandb no longer
ships a Python reader). A tracker whose package is absent is simulated by hiding the package.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import struct
import sys
import time
import zlib
from pathlib import Path

import pytest
from test_train_checkpoint import KillAfter, Killed
from train_fixtures import bert_dir, sentiment_dir, tiny_options  # noqa: F401

import peftlab.train.loop as loop_module
from peftlab.cli import main
from peftlab.lab import runner
from peftlab.trackers import TRACKERS, TrackedRun, Tracker, TrackerGroup
from peftlab.train import OptionsError, TrainOptions, run_training
from peftlab.train.commands import train
from peftlab.train.options import options_from_args


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


needs = {name: pytest.mark.skipif(not installed(name), reason=f"{name} is not installed") for name in TRACKERS}
STEPS = 3


def run_cli(*argv: str) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(list(argv))
    return code, stdout.getvalue(), stderr.getvalue()


def logged_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def tracked_run(bert_dir, sentiment_dir, out: Path, *trackers: str, **changes) -> dict:
    return run_training(tiny_options(bert_dir, sentiment_dir, out, max_steps=STEPS, eval_every=2,
                                     report_to=list(trackers), **changes))


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A local MLflow file store under tmp_path (MLflow 3 asks to opt in to file stores)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    for name in ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)
    from mlflow import MlflowClient

    return MlflowClient()


def mlflow_runs(client, experiment: str) -> dict:
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r}"
    return {run.info.run_name: run for run in client.search_runs([found.experiment_id])}


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


# -- the options -------------------------------------------------------------------------------------


def test_report_to_takes_a_comma_list_or_a_repeated_flag_and_none_by_default(tmp_path):
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    parse = lambda *flags: options_from_args(parser.parse_args(list(flags))).report_to  # noqa: E731
    assert parse() == [] and parse("--report-to", "none") == []
    assert parse("--report-to", "tensorboard,mlflow") == ["tensorboard", "mlflow"]
    assert parse("--report-to", "wandb", "--report-to", "tensorboard,wandb") == ["wandb", "tensorboard"]
    assert TrainOptions(report_to="mlflow").report_to == ["mlflow"]


@pytest.mark.parametrize("value, message", [
    ("tensorbord", "unknown tracker 'tensorbord' in report_to; the trackers: tensorboard, mlflow, wandb, or none."),
    ("none,mlflow", "report_to: 'none' cannot be combined with trackers (none, mlflow); keep one."),
])
def test_bad_report_to_is_refused(value, message):
    with pytest.raises(OptionsError) as error:
        TrainOptions(report_to=value)
    assert str(error.value) == message


@pytest.mark.parametrize("name", list(TRACKERS))
def test_a_tracker_whose_package_is_missing_names_the_extra(name, bert_dir, sentiment_dir, tmp_path, monkeypatch):
    tracker = TRACKERS[name]
    monkeypatch.delitem(sys.modules, tracker.library, raising=False)  # imported by an earlier test
    monkeypatch.setitem(sys.modules, tracker.extra, None)  # what `import` sees when the package is not installed
    out = tmp_path / "out"
    code, _, stderr = run_cli("train", "--model", str(bert_dir), "--dataset", str(sentiment_dir), "--out", str(out),
                              "--report-to", name)
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1, stderr
    assert lines[0].startswith(f"peftlab train: error: --report-to {name} needs the {tracker.extra} package")
    assert lines[0].endswith(f"install it with: pip install 'peftlab[{name}]'")
    assert not out.exists()  # refused before anything was written
    code, _, stderr = run_cli("compare", "--methods", "lora", "--out", str(tmp_path / "cmp"), "--report-to", name)
    assert code == 2 and f"pip install 'peftlab[{name}]'" in stderr and not (tmp_path / "cmp").exists()
    code, _, stderr = run_cli("compare", "--methods", "lora,dora", "--set", f"dora.report_to={name}",
                              "--out", str(tmp_path / "one"))
    assert code == 2 and f"pip install 'peftlab[{name}]'" in stderr and not (tmp_path / "one").exists()


# -- one run, each tracker ----------------------------------------------------------------------------


@needs["tensorboard"]
def test_tensorboard_gets_the_loop_scalars_and_the_options(bert_dir, sentiment_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    metrics = tracked_run(bert_dir, sentiment_dir, out, "tensorboard")
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    scalars = lambda tag: [(e.step, e.value) for e in events.Scalars(tag)]  # noqa: E731
    rows = logged_rows(out)
    for key in ("loss", "lr", "epoch", "step_time_s", "examples_per_s"):
        assert scalars(f"train/{key}") == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in rows]
    assert [step for step, _ in scalars("train/loss")] == [1, 2, 3]
    for key in ("loss", "accuracy"):
        assert scalars(f"eval/{key}") == [(p["step"], pytest.approx(p[f"eval_{key}"], rel=1e-6))
                                          for p in metrics["val_curve"]]
    assert scalars("final/train_time_s") == [(STEPS, pytest.approx(metrics["train_time_s"], rel=1e-6))]
    assert scalars("final/trainable_params") == [(STEPS, metrics["trainable_params"])]
    text = events.Tensors("options/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(text.strip("`\n")) == metrics["options"]


@needs["mlflow"]
def test_mlflow_gets_one_run_with_the_scalars_and_the_options_as_params(bert_dir, sentiment_dir, tmp_path,
                                                                       mlflow_store):
    out = tmp_path / "my-run"
    metrics = tracked_run(bert_dir, sentiment_dir, out, "mlflow", run_group="tips")
    runs = mlflow_runs(mlflow_store, "tips")  # the group is the experiment
    assert list(runs) == ["my-run"]  # named after --out when --run-name is not given
    run = runs["my-run"]
    assert run.info.status == "FINISHED" and run.data.tags["peftlab.group"] == "tips"
    rows = logged_rows(out)
    assert history(mlflow_store, run.info.run_id, "train/loss") == [(r["step"], pytest.approx(r["loss"])) for r in rows]
    assert history(mlflow_store, run.info.run_id, "eval/accuracy") == [
        (p["step"], pytest.approx(p["eval_accuracy"])) for p in metrics["val_curve"]]
    assert run.data.metrics["final/peak_memory_mb"] == pytest.approx(metrics["peak_memory_mb"])
    params = run.data.params
    assert params["method"] == "lora" and float(params["lr"]) == metrics["options"]["lr"]
    assert json.loads(params["report_to"]) == ["mlflow"] and json.loads(params["max_grad_norm"]) == 1.0
    assert len(params) == len(metrics["options"])


@needs["mlflow"]
def test_a_resumed_run_continues_its_mlflow_run(bert_dir, sentiment_dir, tmp_path, mlflow_store, monkeypatch):
    out = tmp_path / "cut"
    monkeypatch.setattr(loop_module, "discover_hooks", lambda model: [KillAfter(2)])
    with pytest.raises(Killed):
        tracked_run(bert_dir, sentiment_dir, out, "mlflow", save_every=2)
    [killed] = mlflow_runs(mlflow_store, "peftlab").values()  # no group: the "peftlab" experiment
    assert killed.info.status == "FAILED"
    monkeypatch.setattr(loop_module, "discover_hooks", lambda model: [KillAfter(-1)])  # same hooks, never fires
    tracked_run(bert_dir, sentiment_dir, out, "mlflow", save_every=2, resume=str(out))
    [resumed] = mlflow_runs(mlflow_store, "peftlab").values()
    assert resumed.info.run_id == killed.info.run_id and resumed.info.status == "FINISHED"
    assert [step for step, _ in history(mlflow_store, resumed.info.run_id, "train/loss")] == [1, 2, 3]


def wandb_records(run_dir: Path):
    """The records of a W&B offline run: W&B's protobuf ``Record``s in a leveldb-style log of 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2

    [path] = run_dir.glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, pending, block, header = 7, b"", 32768, 7
    while position + header <= len(data):
        if block - position % block < header:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        checksum, length, kind = struct.unpack("<IHB", data[position : position + header])
        chunk = data[position + header : position + header + length]
        position += header + length
        if kind == 0:
            continue
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == checksum
        pending += chunk
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def finished_wandb_run(run_dir: Path, timeout_s: float = 30.0) -> list:
    """The run's records once its exit record is on disk: wandb's service writes after ``finish()`` returns."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = list(wandb_records(run_dir))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


@needs["wandb"]
def test_wandb_logs_offline_by_default(bert_dir, sentiment_dir, tmp_path, monkeypatch):
    for name in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "run"
    metrics = tracked_run(bert_dir, sentiment_dir, out, "wandb", run_name="lora-a", run_group="tips")
    [run_dir] = (out / "wandb").glob("offline-run-*")
    records = finished_wandb_run(run_dir)
    [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.display_name, run.run_group, run.project) == ("lora-a", "tips", "peftlab")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["lr"] == metrics["options"]["lr"] and config["method"] == "lora"
    history_rows = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
                    for r in records if r.WhichOneof("record_type") == "history"]
    losses = [(row["_step"], row["train/loss"]) for row in history_rows if "train/loss" in row]
    assert losses == [(r["step"], pytest.approx(r["loss"])) for r in logged_rows(out)]
    assert [row["eval/accuracy"] for row in history_rows if "eval/accuracy" in row] == [
        pytest.approx(p["eval_accuracy"]) for p in metrics["val_curve"]]
    assert [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"] == [0]


# -- compare and study: a tracker run per run, grouped by the comparison ----------------------------------


@needs["tensorboard"]
@needs["mlflow"]
def test_compare_logs_each_run_as_its_own_tracker_run_grouped_by_the_comparison(bert_dir, sentiment_dir, tmp_path,
                                                                                mlflow_store, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "cmp"
    code, _, stderr = run_cli("compare", "--methods", "full,lora", "--out", str(out), "--model", str(bert_dir),
                              "--dataset", str(sentiment_dir), "--max-steps", "2", "--batch-size", "8",
                              "--max-length", "16", "--log-every", "1", "--report-to", "tensorboard", "--report-to", "mlflow")
    assert code == 0, stderr
    runs = mlflow_runs(mlflow_store, "cmp")  # the comparison's folder name is the group
    assert sorted(runs) == ["full", "lora"]
    results = {run["run_name"]: run for run in json.loads((out / "results.json").read_text())["runs"]}
    for name, run in runs.items():
        assert run.info.status == "FINISHED" and run.data.params["method"] == name
        steps = [step for step, _ in history(mlflow_store, run.info.run_id, "train/loss")]
        assert steps == [1, 2]
        assert run.data.metrics["eval/accuracy"] == pytest.approx(results[name]["val_accuracy"])
        assert list((out / "runs" / name / "train" / "tensorboard").glob("events.out.tfevents.*"))


@needs["tensorboard"]
def test_study_runs_are_tracked_by_their_run_names_grouped_by_the_study(tmp_path, monkeypatch):
    launched = []

    def launch(run, folder, log):  # the child would train with these options
        launched.append((run.run_name, json.loads(runner.write_spec(run, folder).read_text())["options"]))
        return runner.failed_record(run, "not run")

    monkeypatch.setattr(runner, "launch", launch)
    run_cli("study", "alpha", "--out", str(tmp_path / "my-study"), "--report-to", "tensorboard")
    assert len(launched) >= 2 and len({name for name, _ in launched}) == len(launched)
    for name, options in launched:
        assert (options["run_name"], options["run_group"], options["report_to"]) == (name, "my-study", ["tensorboard"])


# -- failures of a tracker ----------------------------------------------------------------------------------


class Recording(Tracker):
    name, library, extra = "recording", "json", "recording"

    def __init__(self, run: TrackedRun, fail_on_log: bool = False) -> None:
        self.calls, self.fail_on_log = [], fail_on_log

    def where(self) -> str:
        return "memory"

    def log(self, scalars, step):
        if self.fail_on_log:
            raise ConnectionError("server gone")
        self.calls.append((step, scalars))

    def finish(self, ok):
        self.calls.append(("finish", ok))


def test_a_tracker_failing_mid_run_is_dropped_with_a_warning_and_the_others_go_on(capsys):
    run = TrackedRun("r", None, Path("."), {})
    good, bad = Recording(run), Recording(run, fail_on_log=True)
    with pytest.raises(RuntimeError), TrackerGroup([bad, good]) as group:
        group.log("eval", {"eval_loss": 0.5, "eval_accuracy": 1, "step": 3, "flag": True, "nan": float("nan")}, 3)
        group.log("train", {"loss": 0.25}, 4)
        raise RuntimeError("training failed")
    assert good.calls == [(3, {"eval/loss": 0.5, "eval/accuracy": 1.0}), (4, {"train/loss": 0.25}), ("finish", False)]
    assert bad.calls == [] and capsys.readouterr().err.count("recording stopped logging (server gone)") == 1
