"""The lab's output side: results.json contract, CSV, plots, report.md / report.html, terminal table."""

from __future__ import annotations

import base64
import csv
import json
import random
import re
from pathlib import Path

import pytest

from peftlab.lab.report import format_table, write_report
from peftlab.lab.results import (
    RESULTS_VERSION,
    VERSION_KEY,
    Latency,
    Results,
    ResultsFormatError,
    ResultsVersionError,
    RunRecord,
    load_results,
    results_to_csv,
    save_results,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GPT2_LARGE_PARAMS = 774_030_080
OOM_ERROR = "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB\nTraceback (most recent call last): ..."


def ok_record(method: str, run_name: str, seconds: float, accuracy: float, trainable: int,
              sweep: dict | None = None, model_bytes: int = 3_096_120_320) -> RunRecord:
    """A plausible successful run: numbers shaped like the seed experiment (GPT-2 Large on SST-2)."""
    noise = random.Random(run_name)
    steps = 400
    losses = [{"step": s, "loss": 0.7 * 0.995**s + 0.25 + noise.uniform(-0.05, 0.05)} for s in range(10, steps + 1, 10)]
    val_curve = [{"step": s, "accuracy": accuracy - 0.2 * 0.99**s} for s in range(50, steps + 1, 50)]
    is_full = method == "full"
    return RunRecord(
        method=method, run_name=run_name, status="ok", sweep=sweep or {},
        val_accuracy=accuracy, val_curve=val_curve, train_loss_curve=losses,
        train_accuracy=[{"epoch": 1, "accuracy": accuracy - 0.03}, {"epoch": 2, "accuracy": accuracy + 0.01}],
        train_time_s=seconds, time_per_step_s=seconds / steps, examples_per_s=steps * 16 / seconds,
        step_time_split_s={"forward": 0.3 * seconds / steps, "backward": 0.6 * seconds / steps,
                           "optimizer": (0.02 if is_full else 0.001) * seconds / steps},
        peak_memory_mb=21_000.0 if is_full else 9_500.0 * model_bytes / 3_096_120_320 + 2_000,
        trainable_params=trainable, total_params=GPT2_LARGE_PARAMS + (0 if is_full else trainable),
        adapter_size_bytes=model_bytes if is_full else trainable * 4 + 5_000,
        model_size_bytes=model_bytes,
        latency_ms=Latency(base=41.5, adapter=41.5 if is_full else 47.9, merged=None if method == "qlora" else 41.6),
        steps=steps, options={"lr": 2e-4, "target_modules": ["c_attn"], **(sweep or {})},
    )


def failed_record(method: str, run_name: str, sweep: dict | None = None) -> RunRecord:
    return RunRecord(method=method, run_name=run_name, status="failed", error=OOM_ERROR, sweep=sweep or {},
                     options={"lr": 2e-4})


def synthetic_results() -> Results:
    return Results(
        environment={"versions": {"python": "3.11.7", "torch": "2.13.0"}, "cpu": "x86_64", "gpu": None, "threads": 2},
        config={"model": "gpt2-large", "dataset": "sst2", "epochs": 2, "batch_size": 16},
        runs=[
            ok_record("full", "full", 1613.6, 0.89, GPT2_LARGE_PARAMS),
            ok_record("lora", "lora", 1016.6, 0.90, 1_474_560),
            ok_record("dora", "dora", 1205.5, 0.90, 1_612_800),
            ok_record("qlora", "qlora", 1390.2, 0.86, 1_474_560, model_bytes=493_921_280),
            failed_record("adalora", "adalora"),
        ],
    )


def sweep_results() -> Results:
    runs = [ok_record("full", "full", 1613.6, 0.89, GPT2_LARGE_PARAMS)]
    for method, base_seconds in (("lora", 1000.0), ("dora", 1190.0)):
        for r in (4, 8, 16, 64):
            runs.append(ok_record(method, f"{method}[r={r}]", base_seconds + 2 * r, 0.88 + r / 3200,
                                  36 * r * 5120, sweep={"r": r}))
    runs[-1] = failed_record("dora", "dora[r=64]", sweep={"r": 64})
    for lr in (1e-4, 3e-4, 1e-3):
        runs.append(ok_record("lora", f"lora[lr={lr:g}]", 1010.0, 0.9 - abs(lr - 3e-4) * 40, 1_474_560,
                              sweep={"lr": lr}))
    return Results(environment={"cpu": "x86_64"}, config={"model": "gpt2-large"}, runs=runs)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_report(synthetic_results(), tmp_path_factory.mktemp("report"))


@pytest.fixture(scope="module")
def sweep_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_report(sweep_results(), tmp_path_factory.mktemp("sweep_report"))


def assert_png(data: bytes) -> None:
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 5_000, "a PNG this small is an empty figure"


def markdown_image_links(md_path: Path) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md_path.read_text(encoding="utf-8"))


def html_images(html_path: Path) -> list[bytes]:
    sources = re.findall(r"<img [^>]*src=\"([^\"]+)\"", html_path.read_text(encoding="utf-8"))
    assert all(source.startswith("data:image/png;base64,") for source in sources), "every image is embedded"
    return [base64.b64decode(source.split(",", 1)[1], validate=True) for source in sources]


# --- results.json -----------------------------------------------------------------------------------


def test_save_then_load_round_trips(tmp_path: Path) -> None:
    results = synthetic_results()
    path = save_results(tmp_path / "results.json", results)
    assert json.loads(path.read_text())[VERSION_KEY] == RESULTS_VERSION
    assert load_results(path) == results
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"], "no temp file left behind"


@pytest.mark.parametrize("version", [2, None])
def test_load_rejects_other_versions_clearly(tmp_path: Path, version: int | None) -> None:
    data = synthetic_results().to_dict()
    data[VERSION_KEY] = version
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ResultsVersionError, match=rf"{VERSION_KEY}.*reads {VERSION_KEY}={RESULTS_VERSION}"):
        load_results(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda run: run.pop("val_accuracy"), r"runs\[1\]: missing keys val_accuracy"),
        (lambda run: run.update(status="done"), r"runs\[1\] \('lora'\): status must be"),
        (lambda run: run.update(train_time_s="12 s"), r"train_time_s must be a number or null, got '12 s'"),
        (lambda run: run.update(train_loss_curve=[{"step": 1}]), r"train_loss_curve must be a list of"),
        (lambda run: run.update(run_name="full"), r"run_name must be unique, repeated: full"),
        (lambda run: run.update(step_time_split_s=[1, 2]), r"step_time_split_s must be null or an object"),
    ],
)
def test_load_names_the_bad_record_and_key(tmp_path: Path, change, message: str) -> None:
    data = synthetic_results().to_dict()
    change(data["runs"][1])
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ResultsFormatError, match=message):
        load_results(path)


def test_a_file_from_before_the_step_split_still_loads(tmp_path: Path) -> None:
    data = synthetic_results().to_dict()
    for run in data["runs"]:
        del run["step_time_split_s"]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data))
    assert all(run.step_time_split_s is None for run in load_results(path).runs)


def test_csv_has_one_flat_row_per_run(tmp_path: Path) -> None:
    results = sweep_results()
    with results_to_csv(results, tmp_path / "results.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert [row["run_name"] for row in rows] == [run.run_name for run in results.runs]
    assert rows[1]["sweep_r"] == "4" and rows[1]["latency_merged_ms"] == "41.6"
    assert float(rows[1]["step_backward_s"]) == pytest.approx(0.6 * results.runs[1].time_per_step_s)
    failed = next(row for row in rows if row["status"] == "failed")
    assert failed["val_accuracy"] == "" and failed["error"] == OOM_ERROR
    assert rows[0]["option_target_modules"] == '["c_attn"]'


# --- report -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["report", "sweep_report"])
def test_every_plot_is_a_real_png_linked_from_the_markdown(fixture: str, request: pytest.FixtureRequest) -> None:
    md_path, _ = request.getfixturevalue(fixture)
    links = markdown_image_links(md_path)
    plot_files = sorted((md_path.parent / "plots").glob("*.png"))
    assert sorted(md_path.parent / link for link in links) == plot_files
    assert all(link.startswith("plots/") for link in links), "links are relative"
    for path in plot_files:
        assert_png(path.read_bytes())


def test_the_comparison_plots_are_all_there(report: tuple[Path, Path]) -> None:
    names = {path.name for path in (report[0].parent / "plots").glob("*.png")}
    assert names == {"relative_time.png", "loss_curves.png", "val_accuracy.png", "val_curves.png",
                     "model_size.png", "peak_memory.png", "accuracy_vs_params.png", "pareto_time.png",
                     "pareto_memory.png"}


def test_sweep_gets_one_plot_per_swept_option(sweep_report: tuple[Path, Path]) -> None:
    assert (sweep_report[0].parent / "plots" / "sweep_r.png").is_file()
    assert (sweep_report[0].parent / "plots" / "sweep_lr.png").is_file()


@pytest.mark.parametrize("fixture", ["report", "sweep_report"])
def test_html_embeds_one_png_per_plot_and_nothing_external(fixture: str, request: pytest.FixtureRequest) -> None:
    md_path, html_path = request.getfixturevalue(fixture)
    images = html_images(html_path)
    assert len(images) == len(markdown_image_links(md_path))
    for image in images:
        assert_png(image)
    text = html_path.read_text(encoding="utf-8")
    assert not re.search(r"(src|href)=\"(?!data:)|<script|<link|@import|url\(", text)


def test_report_table_lists_every_run_and_the_failure(report: tuple[Path, Path]) -> None:
    md_path, html_path = report
    md = md_path.read_text(encoding="utf-8")
    table = [line for line in md.splitlines() if line.startswith("| ")]
    for name in ("full", "lora", "dora", "qlora", "adalora"):
        assert any(line.startswith(f"| {name} |") for line in table), name
    failed_row = next(line for line in table if line.startswith("| adalora |"))
    assert "failed: RuntimeError: CUDA out of memory" in failed_row
    lora_row = next(line for line in table if line.startswith("| lora |"))
    assert "| 63.0% |" in lora_row and "| 0.762 / 1.52 / 0.00254 |" in lora_row  # forward / backward / optimizer
    assert '<tr class=failed><td>adalora</td>' in html_path.read_text(encoding="utf-8")


def test_terminal_table_is_aligned_and_marks_the_failure() -> None:
    text = format_table(synthetic_results())
    lines = text.splitlines()
    _header, rule, *rows = lines[:7]
    assert [row.split()[0] for row in rows] == ["full", "lora", "dora", "qlora", "adalora"]
    assert "failed" in rows[-1] and "0.900" in rows[1] and "63.0%" in rows[1]
    assert len({len(line) for line in (rule, *rows[:-1])}) == 1, "columns line up"
    assert "adalora failed: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB" in lines


def test_all_failed_still_writes_a_report_that_says_so(tmp_path: Path) -> None:
    results = Results(runs=[failed_record("lora", "lora"), failed_record("dora", "dora")])
    md_path, html_path = write_report(results, tmp_path)
    assert "All runs failed" in md_path.read_text(encoding="utf-8")
    assert "All runs failed" in html_path.read_text(encoding="utf-8")
    assert markdown_image_links(md_path) == [] and html_images(html_path) == []
    assert "All runs failed." in format_table(results)


def test_without_a_full_run_the_slowest_is_100_percent(tmp_path: Path) -> None:
    results = synthetic_results()
    results.runs = [run for run in results.runs if run.method != "full"]
    md = write_report(results, tmp_path)[0].read_text(encoding="utf-8")
    assert "% of qlora (slowest)" in md
    assert "| 100.0% |" in next(line for line in md.splitlines() if line.startswith("| qlora |"))


def test_the_report_says_which_methods_all_left_out_and_why(tmp_path: Path) -> None:
    results = synthetic_results()
    results.config["methods_left_out"] = {"longlora": "LongLoRA's S²-Attn is supported on model types llama"}
    md = write_report(results, tmp_path)[0].read_text(encoding="utf-8")
    assert "--methods all left out what cannot run on this model: longlora (LongLoRA's S²-Attn is supported" in md
    assert "left out" not in write_report(synthetic_results(), tmp_path / "plain")[0].read_text(encoding="utf-8")
