"""Issue 26, class 4: resume notices what changed -- data whose examples changed since the checkpoint,
a --resume folder that holds no comparison or study, and finished runs whose folders were deleted."""

from __future__ import annotations

import shutil

import pytest
from test_compare import assets, fake_launch, run_cli, shared_flags  # noqa: F401
from train_fixtures import bert_dir, sentiment_dir, tiny_options, write_sentiment_data  # noqa: F401

from peftlab.train.checkpoint import CheckpointError
from peftlab.train.loop import run_training


def test_resume_refuses_data_that_changed_since_the_checkpoint(bert_dir, tmp_path):  # noqa: F811
    data = write_sentiment_data(tmp_path / "data", n_train=32)
    out = tmp_path / "run"
    run_training(tiny_options(bert_dir, data, out, max_steps=2, save_every=2))
    run_training(tiny_options(bert_dir, data, tmp_path / "same", max_steps=2, resume=str(out)))  # same data: continues
    lines = (data / "train.tsv").read_text().splitlines()
    (data / "train.tsv").write_text("\n".join([lines[0], *reversed(lines[1:])]) + "\n")  # same rows, other order
    with pytest.raises(CheckpointError, match=r"was trained on other data: the examples of .* changed since"):
        run_training(tiny_options(bert_dir, data, tmp_path / "other", max_steps=2, resume=str(out)))


@pytest.mark.parametrize("command", ["compare", "study"])
def test_resume_of_a_folder_that_holds_nothing_is_an_error(command, tmp_path, fake_launch):  # noqa: F811
    calls, _ = fake_launch
    argv = [command, *(["alpha"] if command == "study" else [])]
    code, _, stderr = run_cli(*argv, "--resume", str(tmp_path / "missing"))
    assert code == 2 and f"--resume {tmp_path / 'missing'}: nothing to resume there, the folder does not exist" in stderr
    (tmp_path / "empty").mkdir()
    code, _, stderr = run_cli(*argv, "--resume", str(tmp_path / "empty"), "--max-steps", "2")
    assert code == 2 and "nothing to resume there, the folder holds no compare.json" in stderr
    assert calls == [] and not (tmp_path / "missing").exists()


def test_resume_with_deleted_run_folders_is_an_error(tmp_path, fake_launch, shared_flags):  # noqa: F811
    calls, _ = fake_launch
    out = tmp_path / "out"
    assert run_cli("compare", "--methods", "lora,dora", "--out", str(out), *shared_flags)[0] == 0
    shutil.rmtree(out / "runs" / "lora")
    code, _, stderr = run_cli("compare", "--resume", str(out))
    assert code == 2 and "results.json lists lora as finished, but their folders" in stderr
    assert calls == ["lora", "dora"]  # nothing rerun, nothing called done
