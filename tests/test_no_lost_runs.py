"""A training run's files are never lost (issue 14, item 3) and broken files are named (item 4):
an existing run is not overwritten by accident, two processes cannot train into one folder, a
full disk replaces nothing, an interrupted save's leftovers are cleaned, a bare --resume continues."""

from __future__ import annotations

import errno
import json
import subprocess
import sys

import pytest
from test_cli import run_cli, tiny_flags
from train_fixtures import bert_dir, sentiment_dir, tiny_options  # noqa: F401

import peftlab.io as io_module
from peftlab.train import OptionsError, run_training
from peftlab.train.checkpoint import CheckpointError
from peftlab.train.loop import TrainingRun
from peftlab.train.run_folder import LOCK_NAME, FolderInUseError


@pytest.fixture
def finished_run(bert_dir, sentiment_dir, tmp_path):
    out = tmp_path / "run"
    run_training(tiny_options(bert_dir, sentiment_dir, out, max_steps=2, save_every=2))
    return out


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != LOCK_NAME}


def test_a_finished_run_is_not_overwritten_without_overwrite(finished_run, bert_dir, sentiment_dir):
    before = _snapshot(finished_run)
    with pytest.raises(OptionsError, match=r"already holds a run \(adapter_config.json, .*pass --overwrite to replace it, --resume"):
        run_training(tiny_options(bert_dir, sentiment_dir, finished_run, max_steps=1, lr=0.5))
    assert _snapshot(finished_run) == before
    metrics = run_training(tiny_options(bert_dir, sentiment_dir, finished_run, max_steps=1, lr=0.5, overwrite=True))
    assert metrics["steps"] == 1 and json.loads((finished_run / "metrics.json").read_text())["steps"] == 1
    assert not list(finished_run.glob("checkpoint-*"))  # the old run's checkpoint went with it


def test_a_second_process_cannot_train_into_the_same_folder(bert_dir, sentiment_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
         "f.write(str(os.getpid())); f.flush(); print('locked', flush=True); time.sleep(60)", str(out / LOCK_NAME)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FolderInUseError, match=rf"another peftlab process \(pid {holder.pid}\) is training into {out}"):
            run_training(tiny_options(bert_dir, sentiment_dir, out, max_steps=1))
    finally:
        holder.kill()
        holder.wait()
    assert run_training(tiny_options(bert_dir, sentiment_dir, out, max_steps=1))["steps"] == 1  # free again


def test_a_full_disk_replaces_nothing_and_says_so(finished_run, bert_dir, sentiment_dir, monkeypatch):
    before = {name: data for name, data in _snapshot(finished_run).items() if name.startswith("adapter_")}

    def no_space(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half")  # what a full disk leaves: a partial temporary file
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io_module, "save_file", no_space)
    with pytest.raises(OSError, match=rf"^disk full while writing the new run to {finished_run}: nothing was replaced there\. Free space"):
        run_training(tiny_options(bert_dir, sentiment_dir, finished_run, max_steps=1, lr=0.5, overwrite=True))
    assert {n: d for n, d in _snapshot(finished_run).items() if n.startswith("adapter_")} == before
    assert not list(finished_run.glob(".*.tmp"))


def test_an_interrupted_run_leaves_nothing_stale_and_a_bare_resume_continues_it(bert_dir, sentiment_dir, tmp_path, monkeypatch):
    flags = ["--max-steps", "4", "--save-every", "2", "--r", "4"]
    reference = tmp_path / "reference"
    assert run_cli_ok(["train", *tiny_flags(bert_dir, sentiment_dir, reference), *flags])
    out = tmp_path / "interrupted"
    original_step = TrainingRun.train_step

    def stop_at_step_3(self, batches):
        if self.state.step == 2:
            raise KeyboardInterrupt
        return original_step(self, batches)

    monkeypatch.setattr(TrainingRun, "train_step", stop_at_step_3)
    from peftlab.cli import main

    assert main(["train", *tiny_flags(bert_dir, sentiment_dir, out), *flags]) == 130
    monkeypatch.setattr(TrainingRun, "train_step", original_step)
    # What a process killed during a save leaves: hidden temporary files and folders.
    (out / ".checkpoint-4.x1.tmp").mkdir()
    (out / ".adapter_model.safetensors.x2.tmp").write_bytes(b"partial")
    assert main(["train", "--resume", str(out)]) == 0  # no other flag: the saved options are used
    assert not list(out.glob(".*.tmp"))
    resumed = json.loads((out / "metrics.json").read_text())
    expected = json.loads((reference / "metrics.json").read_text())
    assert resumed["train_loss_curve"] == expected["train_loss_curve"] and resumed["options"]["r"] == 4


def test_sigterm_cleans_up_like_ctrl_c_and_leaves_the_old_run(finished_run, bert_dir, sentiment_dir):
    """kill / timeout / torchrun send SIGTERM: the new run's staging folder is removed, the old run stays."""
    import signal
    import time

    before = _snapshot(finished_run)
    flags = [*tiny_flags(bert_dir, sentiment_dir, finished_run), "--max-steps", "100000", "--overwrite"]
    child = subprocess.Popen([sys.executable, "-m", "peftlab", "train", *flags], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(finished_run.parent.glob(".run.*.staging.tmp/metrics.jsonl")):  # training has begun
            assert child.poll() is None and time.monotonic() < deadline, child.stderr.read() if child.poll() else "timeout"
            time.sleep(0.1)
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1] == "peftlab train: stopped by SIGTERM"
    assert _snapshot(finished_run) == before
    assert not list(finished_run.parent.glob(".*.tmp")) and not list(finished_run.glob(".*.tmp"))


def test_a_compare_child_stopped_by_sigterm_is_reported_as_such():
    from peftlab.lab.runner import _failure_summary

    assert _failure_summary(143, ["step 3"]).startswith("the run's process was killed by SIGTERM\n")
    assert _failure_summary(-15, []).startswith("the run's process was killed by SIGTERM\n")


def run_cli_ok(argv) -> bool:
    from peftlab.cli import main

    return main(argv) == 0


@pytest.mark.parametrize("name", ["trainer_state.json", "trainable.safetensors", "optimizer.pt"])
def test_a_corrupt_checkpoint_file_is_named(finished_run, bert_dir, sentiment_dir, name):
    path = finished_run / "checkpoint-2" / name
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(CheckpointError, match=rf"{path} is truncated or corrupt"):
        run_training(tiny_options(bert_dir, sentiment_dir, finished_run, max_steps=2, save_every=2, resume=str(finished_run)))


def test_a_truncated_model_file_is_named(bert_dir, sentiment_dir, tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    for file in bert_dir.iterdir():
        (model / file.name).write_bytes(file.read_bytes())
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    code, _, err = run_cli(capsys, "train", *tiny_flags(model, sentiment_dir, tmp_path / "out"), "--max-steps", "1")
    assert code == 2 and "Traceback" not in err
    assert f"{weights} is truncated or corrupt" in err.strip().splitlines()[-1]


def test_max_length_above_the_models_positions_is_refused(bert_dir, sentiment_dir, tmp_path, capsys):
    flags = tiny_flags(bert_dir, sentiment_dir, tmp_path / "out")
    flags[flags.index("--max-length") + 1] = "64"  # a flag given twice with different values is refused
    code, _, err = run_cli(capsys, "train", *flags)
    assert code == 2 and "--max-length 64 is above the model's limit of 32 positions" in err.strip().splitlines()[-1]


def test_a_rank_that_cannot_fit_is_refused_before_training(bert_dir, sentiment_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", *tiny_flags(bert_dir, sentiment_dir, tmp_path / "out"), "--r", str(2**40))
    assert code == 2 and "Traceback" not in err
    assert "for its weights alone" in err.strip().splitlines()[-1] and "lower r" in err
