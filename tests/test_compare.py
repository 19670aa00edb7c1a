"""`peftlab compare` end to end on a tiny BERT and a tiny TSV dataset, each run in its own process.

One real comparison (full, lora, qlora, and a dora made to fail) is shared by the module; resume and
interruption are checked with a stand-in for the child process, so they cost no extra training.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from conftest import TINY_VOCAB
from method_table import METHOD_TABLE
from peftlab.cli import main
from peftlab.lab import runner
from peftlab.lab.measure import environment, forward_latency_ms, saved_model_bytes
from peftlab.lab.results import RunRecord, load_results

METHODS = "full,lora,dora,qlora"
FAILING = "dora.target_modules=no_such_layer"
TRAIN_EXAMPLES, BATCH = 48, 16
STEPS = TRAIN_EXAMPLES // BATCH


def write_dataset(folder: Path) -> Path:
    """Sentences of the tiny vocabulary whose label is given away by one word: learnable in a few steps."""
    rng = random.Random(0)
    folder.mkdir(parents=True)
    for split, count in (("train", TRAIN_EXAMPLES), ("validation", 16)):
        rows = ["sentence\tlabel"]
        for i in range(count):
            label = i % 2
            words = [rng.choice(["good", "great"] if label else ["bad", "awful"]), *rng.sample(
                ["the", "movie", "film", "is", "was", "a"], 3)]
            rng.shuffle(words)
            rows.append(f"{' '.join(words)}\t{label}")
        (folder / f"{split}.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


def write_model(folder: Path, tokenizer) -> Path:
    """A 2-layer BERT with 64-wide layers: big enough that NF4 blocks fit, small enough to train in a blink."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(TINY_VOCAB), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=32, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("assets")
    return {"model": write_model(root / "model", tiny_tokenizer), "data": write_dataset(root / "data")}


@pytest.fixture(scope="module")
def shared_flags(assets) -> list[str]:
    return ["--model", str(assets["model"]), "--dataset", str(assets["data"]), "--max-length", "16",
            "--batch-size", str(BATCH), "--eval-batch-size", "8", "--r", "2", "--log-every", "1",
            "--max-train-samples", str(TRAIN_EXAMPLES)]


def run_cli(*argv: str) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(list(argv))
    return code, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def comparison(tmp_path_factory, shared_flags) -> dict:
    out = tmp_path_factory.mktemp("compare") / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")  # tiny matrices: a second thread only waits on this busy machine
        code, stdout, stderr = run_cli("compare", "--methods", METHODS, "--set", FAILING, "--out", str(out),
                                       *shared_flags)
    return {"out": out, "code": code, "stdout": stdout, "stderr": stderr,
            "json": json.loads((out / "results.json").read_text(encoding="utf-8"))}


def records(comparison) -> dict[str, dict]:
    return {run["run_name"]: run for run in comparison["json"]["runs"]}


def ok_record(run) -> RunRecord:
    return RunRecord(method=run.method, run_name=run.run_name, status="ok", sweep=run.sweep, options=run.options)


# -- one real comparison ------------------------------------------------------------------------------


def test_every_record_has_every_key_with_sane_values(comparison):
    runs = records(comparison)
    assert list(runs) == ["full", "lora", "dora", "qlora"]
    for run in runs.values():
        assert set(run) == set(RunRecord.__dataclass_fields__)
    for name in ("full", "lora", "qlora"):
        run = runs[name]
        assert run["status"] == "ok" and run["error"] is None and run["sweep"] == {}
        assert 0 <= run["val_accuracy"] <= 1
        assert run["steps"] == STEPS
        assert [point["step"] for point in run["train_loss_curve"]] == list(range(1, STEPS + 1))
        assert run["val_curve"][-1]["step"] == STEPS and run["train_accuracy"][0]["epoch"] == 1
        for key in ("train_time_s", "time_per_step_s", "examples_per_s", "peak_memory_mb",
                    "adapter_size_bytes", "model_size_bytes"):
            assert run[key] > 0, key
        assert run["options"]["method"] == name and run["options"]["seed"] == 42
        # chance level: the share of the eval set's most frequent label, a whole number of its examples
        majority = run["majority_accuracy"] * run["eval_examples"]
        assert run["majority_accuracy"] >= 0.5 and abs(majority - round(majority)) < 1e-9
    full, lora, qlora = runs["full"], runs["lora"], runs["qlora"]
    assert full["trainable_params"] == full["total_params"]
    assert 0 < lora["trainable_params"] < 0.1 * lora["total_params"]
    assert qlora["trainable_params"] == lora["trainable_params"]
    assert qlora["model_size_bytes"] < full["model_size_bytes"] / 3
    assert lora["model_size_bytes"] == full["model_size_bytes"]
    assert lora["adapter_size_bytes"] < full["adapter_size_bytes"] / 3
    assert full["latency_ms"]["adapter"] is None and full["latency_ms"]["base"] > 0 and full["latency_ms"]["merged"] > 0
    assert all(lora["latency_ms"][kind] > 0 for kind in ("base", "adapter", "merged"))
    assert lora["options"]["target_modules"]  # resolved by the model family, recorded
    # compare's default: adapters without dropout, as the seed experiment's hand-written LoRA and DoRA.
    assert lora["options"]["lora_dropout"] == qlora["options"]["lora_dropout"] == 0.0
    for run in (full, lora, qlora):  # a CPU run: the step split into forward, backward, optimizer
        split = run["step_time_split_s"]
        assert set(split) == {"forward", "backward", "optimizer"} and all(v > 0 for v in split.values())
        assert sum(split.values()) <= run["time_per_step_s"]


def test_runs_share_data_order_and_seed(comparison):
    runs = records(comparison)
    shared = ("seed", "max_train_samples", "batch_size", "dataset", "model", "max_length")
    assert len({tuple(runs[name]["options"][key] for key in shared) for name in ("full", "lora", "qlora")}) == 1


def test_a_failing_run_is_recorded_and_the_others_complete(comparison):
    dora = records(comparison)["dora"]
    assert dora["status"] == "failed"
    assert "no_such_layer" in dora["error"].splitlines()[0]  # the exception's line comes first
    assert "last lines of its output" in dora["error"]
    assert all(dora[key] is None for key in ("val_accuracy", "train_time_s", "latency_ms", "model_size_bytes"))
    assert comparison["code"] == 1  # some run failed
    assert "dora failed:" in comparison["stdout"]


def test_environment_and_config_are_recorded(comparison):
    env, config = comparison["json"]["environment"], comparison["json"]["config"]
    for key in ("python", "torch", "transformers", "peftlab", "cpu", "torch_threads", "gpu"):
        assert key in env
    assert config["methods"] == METHODS.split(",") and config["set"] == [FAILING]
    assert "method" not in config and "out" not in config


def test_report_files_progress_and_table(comparison):
    out, stdout, stderr = comparison["out"], comparison["stdout"], comparison["stderr"]
    for name in ("results.json", "results.csv", "report.md", "report.html", "compare.json"):
        assert (out / name).is_file(), name
    assert list((out / "plots").glob("*.png"))
    with open(out / "results.csv", encoding="utf-8", newline="") as file:
        assert [row["run_name"] for row in csv.DictReader(file)] == ["full", "lora", "dora", "qlora"]
    assert "[1/4] full: starting" in stderr and "[4/4] qlora: ok, val accuracy" in stderr
    assert "min left for 3 runs" in stderr  # an ETA once a run has finished
    assert "    lora | peftlab: training lora" in stderr  # the child's own progress, echoed
    assert stdout.splitlines()[0].split()[:3] == ["run", "method", "status"]
    assert f"report: {out / 'report.html'}" in stdout
    for run in ("full", "lora", "dora", "qlora"):
        assert (out / "runs" / run / "output.log").is_file()
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "forward / backward / optimizer (s/step)" in report and "fwd/bwd/opt s" in stdout
    assert "Adapter dropout: 0 for lora, dora, qlora." in report


def test_report_subcommand_rewrites_the_report(comparison, tmp_path):
    code, stdout, _ = run_cli("report", str(comparison["out"]), "--out", str(tmp_path))
    assert code == 0 and (tmp_path / "report.html").is_file() and "lora" in stdout


# -- resume and interruption, with a stand-in child ---------------------------------------------------


@pytest.fixture
def fake_launch(monkeypatch):
    """Replaces the child process: records which runs were launched; a run named in ``interrupt_at`` raises Ctrl-C."""
    calls: list[str] = []
    state = {"interrupt_at": None}

    def launch(run, folder, log):
        if run.run_name == state["interrupt_at"]:
            raise KeyboardInterrupt
        calls.append(run.run_name)
        folder.mkdir(parents=True, exist_ok=True)  # what the child leaves: its run folder
        return ok_record(run)

    monkeypatch.setattr(runner, "launch", launch)
    return calls, state


def test_resume_skips_finished_runs_and_reruns_failed_and_missing(comparison, tmp_path, fake_launch):
    calls, _ = fake_launch
    out = shutil.copytree(comparison["out"], tmp_path / "out")
    before = load_results(out / "results.json")
    assert run_cli("compare", "--resume", str(out))[0] == 0
    assert calls == ["dora"]  # only the failed run
    after = load_results(out / "results.json")
    assert [run.run_name for run in after.runs] == ["full", "lora", "dora", "qlora"]
    assert after.runs[0] == before.runs[0] and after.runs[2].ok

    data = json.loads((out / "results.json").read_text(encoding="utf-8"))
    data["runs"] = [run for run in data["runs"] if run["run_name"] != "lora"]
    (out / "results.json").write_text(json.dumps(data), encoding="utf-8")
    calls.clear()
    assert run_cli("compare", "--resume", str(out))[0] == 0
    assert calls == ["lora"]  # the missing one


def test_resume_with_changed_options_reruns_the_changed_runs(comparison, tmp_path, fake_launch, shared_flags):
    calls, _ = fake_launch
    out = shutil.copytree(comparison["out"], tmp_path / "out")
    code, _, _ = run_cli("compare", "--resume", str(out), "--methods", METHODS, "--set", FAILING,
                         "--set", "lora.lr=5e-3", *shared_flags)
    assert code == 0 and calls == ["lora", "dora"]


def test_ctrl_c_leaves_a_partial_report_that_resume_completes(tmp_path, fake_launch, shared_flags):
    calls, state = fake_launch
    out = tmp_path / "out"
    state["interrupt_at"] = "lora"
    code, _, stderr = run_cli("compare", "--methods", "full,lora,qlora", "--out", str(out), *shared_flags)
    assert code == 130 and f"--resume {out}" in stderr
    assert [run.run_name for run in load_results(out / "results.json").runs] == ["full"]
    assert (out / "report.html").is_file() and not list(out.glob(".*tmp*")) and not list(out.glob(".report-*"))
    state["interrupt_at"] = None
    assert run_cli("compare", "--resume", str(out))[0] == 0
    assert calls == ["full", "lora", "qlora"]


def test_adapter_dropout_given_by_flag_or_set_wins_over_compare_default(tmp_path, fake_launch, shared_flags):
    out = tmp_path / "out"
    code, _, _ = run_cli("compare", "--methods", "full,lora,dora", "--set", "dora.lora_dropout=0.1",
                         "--out", str(out), *shared_flags)
    planned = {run["run_name"]: run["options"] for run in json.loads((out / "compare.json").read_text())["runs"]}
    assert code == 0 and planned["lora"]["lora_dropout"] == 0.0 and planned["dora"]["lora_dropout"] == 0.1
    assert planned["full"].get("lora_dropout") is None
    code, _, _ = run_cli("compare", "--methods", "lora", "--lora-dropout", "0.05", "--out", str(tmp_path / "b"),
                         *shared_flags)
    runs = json.loads((tmp_path / "b" / "compare.json").read_text())["runs"]
    assert code == 0 and runs[0]["options"]["lora_dropout"] == 0.05


# -- errors before any run -------------------------------------------------------------------------------


@pytest.fixture
def no_launch(monkeypatch):
    def launch(*args):
        raise AssertionError("a run was started despite the error")

    monkeypatch.setattr(runner, "launch", launch)


def test_incompatible_results_file_on_resume_is_an_error(comparison, tmp_path, no_launch):
    out = shutil.copytree(comparison["out"], tmp_path / "out")
    data = json.loads((out / "results.json").read_text(encoding="utf-8"))
    data["peftlab_results_version"] = 0
    (out / "results.json").write_text(json.dumps(data), encoding="utf-8")
    code, _, stderr = run_cli("compare", "--resume", str(out))
    assert code == 2 and "peftlab_results_version=0" in stderr and "Re-run" in stderr


def test_unknown_method_lists_the_registered_ones(tmp_path, no_launch):
    code, _, stderr = run_cli("compare", "--methods", "full,lorra", "--out", str(tmp_path / "out"))
    assert code == 2
    assert "unknown method 'lorra'" in stderr and "full, lora" in stderr and "qlora" in stderr
    assert not (tmp_path / "out").exists()


def test_unknown_sweep_option_lists_the_valid_ones(tmp_path, no_launch):
    code, _, stderr = run_cli("compare", "--sweep", "rank=2,4", "--out", str(tmp_path / "out"))
    assert code == 2 and "unknown option 'rank'" in stderr and "lora_alpha" in stderr


def test_unwritable_output_folder_fails_before_any_run(tmp_path, no_launch, shared_flags):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder", encoding="utf-8")
    code, _, stderr = run_cli("compare", "--methods", "lora", "--out", str(blocker / "out"), *shared_flags)
    assert code == 2 and "cannot write to the output folder" in stderr and "Choose another --out" in stderr


def test_data_the_task_cannot_use_fails_once_before_any_run(tmp_path, no_launch, shared_flags):
    """A bad file used to fail every run the same way, one after another, after the base model had loaded."""
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "validation"):
        (data / f"{split}.csv").write_text("sentence,label\nthe movie,1\na film,not-a-class\n", encoding="utf-8")
    flags = [*shared_flags]
    flags[flags.index("--dataset") + 1] = str(data)
    code, _, stderr = run_cli("compare", "--methods", "lora,dora", "--out", str(tmp_path / "out"), *flags)
    assert code == 2 and stderr.count("peftlab compare: error:") == 1 and "not-a-class" in stderr, stderr
    assert not (tmp_path / "out").exists()


def test_a_finished_comparison_is_not_overwritten_without_resume(comparison, no_launch, shared_flags):
    code, _, stderr = run_cli("compare", "--methods", "lora", "--out", str(comparison["out"]), *shared_flags)
    assert code == 2 and "--resume" in stderr


# -- measurements ---------------------------------------------------------------------------------------


def test_saved_model_bytes_counts_weights_and_config_only(tmp_path):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "adapter_config.json").write_text("{}", encoding="utf-8")
    (tmp_path / "tokenizer.json").write_text("{" + " " * 5000 + "}", encoding="utf-8")
    (tmp_path / "metrics.json").write_text("{}", encoding="utf-8")
    assert saved_model_bytes(tmp_path) == 1002
    with pytest.raises(FileNotFoundError, match="no saved weights"):
        saved_model_bytes(tmp_path / "checkpoint")


class Doubler(torch.nn.Module):
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return input_ids * 2


def test_forward_latency_and_environment():
    assert forward_latency_ms(Doubler(), {"input_ids": torch.ones(2, 8)}, repeats=3) >= 0
    assert environment()["torch"] == torch.__version__


def test_every_method_of_the_table_runs_in_compare(tmp_path, shared_flags, monkeypatch):
    """The methods of the table that the shared comparison does not run, in one more comparison: each
    run completes, trains a small part of the model, and is timed merged and not. Each run is the
    child's work (train, measure, record) done in this process: the child process itself is the
    shared comparison's test, and a process per method would cost minutes on a loaded machine."""
    monkeypatch.setattr(runner, "launch", lambda run, folder, log: runner.execute(runner.write_spec(run, folder)))
    names = [case.name for case in METHOD_TABLE if case.name not in METHODS.split(",")]
    out = tmp_path / "out"
    # Each method at its own defaults: not every method has an `r` (AdaLoRA has init_r/target_r).
    at = shared_flags.index("--r")
    flags = shared_flags[:at] + shared_flags[at + 2:]
    code, stdout, stderr = run_cli("compare", "--methods", ",".join(names), "--out", str(out), *flags)
    assert code == 0, stderr
    runs = {run["run_name"]: run for run in json.loads((out / "results.json").read_text(encoding="utf-8"))["runs"]}
    assert list(runs) == names
    for name, run in runs.items():
        assert run["status"] == "ok" and run["steps"] == STEPS and 0 <= run["val_accuracy"] <= 1, name
        assert 0 < run["trainable_params"] < 0.25 * run["total_params"], name  # MoRA's r=8 on 64-wide layers: 17%
        assert all(run["latency_ms"][kind] > 0 for kind in ("base", "adapter", "merged")), name
    # Where the rank went: every rank of DyLoRA's one adapter evaluated, the budget of dora_rank/AdaLoRA per layer.
    assert [point["rank"] for point in runs["dylora"]["accuracy_per_rank"]] == list(range(1, 9))  # r = 8 by default
    assert all(0 <= point["accuracy"] <= 1 for point in runs["dylora"]["accuracy_per_rank"])
    for name in ("dora_rank", "adalora"):
        ranks = runs[name]["rank_per_layer"]
        assert ranks and all(isinstance(rank, int) and rank >= 0 for rank in ranks.values()), name
    assert sum(runs["dora_rank"]["rank_per_layer"].values()) == 8 * len(runs["dora_rank"]["rank_per_layer"])
    assert all(run["rank_per_layer"] == {} for name, run in runs.items() if name not in ("dora_rank", "adalora"))
    assert (out / "plots" / "accuracy_per_rank.png").is_file() and (out / "plots" / "rank_per_layer.png").is_file()
    assert "Rank per layer" in (out / "report.md").read_text() and "Accuracy per rank" in (out / "report.md").read_text()
