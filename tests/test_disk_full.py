"""A full disk (ENOSPC) while writing metrics.jsonl, results.json/csv or a comparison's report: one line
saying what was being written, where, and what to do; the previous good file stays whole."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

import peftlab.io as io_module
from peftlab.io import DiskFullError
from peftlab.lab import runner
from peftlab.lab.results import Results, RunRecord, load_results, results_to_csv, save_results
from peftlab.train.loop import TrainingRun

NO_SPACE = OSError(errno.ENOSPC, "No space left on device")


def results_of(*names: str) -> Results:
    return Results(runs=[RunRecord(method="lora", run_name=name, status="ok", val_accuracy=0.8) for name in names],
                   environment={}, config={})


def test_a_full_disk_mid_line_leaves_metrics_jsonl_whole(tmp_path, monkeypatch) -> None:
    run = SimpleNamespace(out=tmp_path, processes=SimpleNamespace(is_main=True))
    TrainingRun._write_metrics_lines(run, [{"step": 10, "loss": 0.5}], mode="w")
    before = (tmp_path / "metrics.jsonl").read_text()
    real_write = os.write

    def half_then_full(fd, data):
        real_write(fd, bytes(data[: len(data) // 2]))  # what a disk filling up mid-write leaves
        raise NO_SPACE

    monkeypatch.setattr(io_module.os, "write", half_then_full)
    with pytest.raises(DiskFullError, match=rf"^disk full while adding to {tmp_path}/metrics.jsonl: its earlier lines "
                                            r"are intact\. Free space on that disk, or write elsewhere\.$"):
        TrainingRun._write_metrics_lines(run, [{"step": 20, "loss": 0.4}], mode="a")
    assert (tmp_path / "metrics.jsonl").read_text() == before  # no half line to break a reader
    monkeypatch.setattr(io_module.os, "write", real_write)
    TrainingRun._write_metrics_lines(run, [{"step": 20, "loss": 0.4}], mode="a")
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [10, 20]


def test_a_full_disk_keeps_the_previous_results_json_and_csv(tmp_path, monkeypatch) -> None:
    path = tmp_path / "results.json"
    save_results(path, results_of("lora"))
    results_to_csv(results_of("lora"), tmp_path / "results.csv")
    before = {name: (tmp_path / name).read_bytes() for name in ("results.json", "results.csv")}
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()  # not mkstemp's 0600

    def full(text):
        def write(tmp):
            Path(tmp).write_text(text[:10])
            raise NO_SPACE
        return write

    monkeypatch.setattr(io_module, "_text_writer", full)
    with pytest.raises(DiskFullError, match=rf"disk full while writing {path}: nothing was replaced there"):
        save_results(path, results_of("lora", "dora"))
    with pytest.raises(DiskFullError, match=rf"disk full while writing {tmp_path}/results.csv: nothing was replaced"):
        results_to_csv(results_of("lora", "dora"), tmp_path / "results.csv")
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert [run.run_name for run in load_results(path).runs] == ["lora"]
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_full_disk_while_drawing_the_report_keeps_the_previous_report(tmp_path, monkeypatch) -> None:
    import peftlab.lab.report as report

    def report_files(results, folder, head=None):
        (folder / "plots").mkdir(parents=True, exist_ok=True)
        for name in ("report.md", "report.html", "plots/a.png"):
            (folder / name).write_text(",".join(run.run_name for run in results.runs))

    monkeypatch.setattr(report, "write_report", report_files)
    runner.publish(results_of("lora"), tmp_path)

    def no_space(results, folder, head=None):
        raise NO_SPACE

    monkeypatch.setattr(report, "write_report", no_space)
    with pytest.raises(DiskFullError, match=rf"^disk full while writing the report in {tmp_path}: the previous "
                                            r"report.md, report.html and plots are intact\. Free space"):
        runner.publish(results_of("lora", "dora"), tmp_path)
    assert all((tmp_path / name).read_text() == "lora" for name in ("report.md", "report.html", "plots/a.png"))


def test_the_cli_says_it_in_one_line(tmp_path, monkeypatch) -> None:
    from test_compare import run_cli

    monkeypatch.setattr(runner, "launch", lambda run, folder, log: RunRecord(
        method=run.method, run_name=run.run_name, status="ok", sweep=run.sweep, options=run.options))

    plain_writer = io_module._text_writer

    def results_json_does_not_fit(text):
        def write(tmp):
            if ".results.json." in tmp:
                raise NO_SPACE
            plain_writer(text)(tmp)
        return write

    monkeypatch.setattr(io_module, "_text_writer", results_json_does_not_fit)
    code, _, stderr = run_cli("compare", "--methods", "lora", "--out", str(tmp_path / "out"))
    assert code == 2
    assert stderr.splitlines()[-1] == (f"peftlab compare: error: disk full while writing {tmp_path}/out/results.json: "
                                       "nothing was replaced there. Free space on that disk, or write elsewhere.")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
