"""Issue 26, classes 1 and 7: no command writes into a folder that holds something unless --overwrite;
a refused, failed or disk-full overwrite leaves the old folder byte for byte as it was; every file
written (adapters, merged models, checkpoints, the model cache) is readable as the umask says."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
from train_fixtures import bert_dir, sentiment_dir, tiny_options  # noqa: F401

from peftlab.cli import main
from peftlab.io import DiskFullError
from peftlab.train import loop
from peftlab.train.loop import run_training


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too), by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def hidden_siblings(folder: Path) -> list[str]:
    return [p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.")]


@pytest.fixture(scope="module")
def adapter(bert_dir, sentiment_dir, tmp_path_factory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("run") / "adapter"
    run_training(tiny_options(bert_dir, sentiment_dir, out, max_steps=2, save_every=2))
    return out


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("command", ["merge", "export"])
def test_merge_and_export_refuse_a_folder_that_holds_something(command, adapter, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, err = cli(capsys, command, "--adapter", str(adapter), "--out", str(out))
    assert code == 2 and f"--out {out} already holds something (notes.txt); pass --overwrite" in err
    assert snapshot(out) == {"notes.txt": b"mine"}
    # A second merge/export into the first one's folder is refused the same way; --overwrite replaces it all.
    assert cli(capsys, command, "--adapter", str(adapter), "--out", str(tmp_path / "first"))[0] == 0
    first = snapshot(tmp_path / "first")
    assert cli(capsys, command, "--adapter", str(adapter), "--out", str(tmp_path / "first"))[0] == 2
    assert snapshot(tmp_path / "first") == first
    assert cli(capsys, command, "--adapter", str(adapter), "--out", str(out), "--overwrite")[0] == 0
    assert snapshot(out).keys() == first.keys() and not hidden_siblings(out)


def test_export_into_a_finished_run_or_around_its_input_is_refused(adapter, tmp_path, capsys):
    run = snapshot(adapter)
    code, err = cli(capsys, "export", "--adapter", str(adapter), "--out", str(adapter.parent))
    assert code == 2 and f"--out {adapter.parent} holds {adapter}, which this command reads" in err
    code, err = cli(capsys, "merge", "--adapter", str(adapter), "--out", str(adapter.parent), "--overwrite")
    assert code == 2 and "which this command reads; give a folder outside it" in err and snapshot(adapter) == run


def test_a_failed_train_overwrite_leaves_the_old_run_exactly(bert_dir, sentiment_dir, adapter, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "run"
    os.system(f"cp -a {adapter} {out}")
    before = snapshot(out)
    assert "metrics.jsonl" in before and "checkpoint-2/trainable.safetensors" in before

    def fails(self, *args):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(loop.TrainingRun, "_finish", fails)  # after metrics.jsonl and a checkpoint were written
    with pytest.raises(RuntimeError, match="out of memory"):
        run_training(tiny_options(bert_dir, sentiment_dir, out, max_steps=3, save_every=1, overwrite=True))
    assert snapshot(out) == before and not hidden_siblings(out)
    monkeypatch.undo()
    run_training(tiny_options(bert_dir, sentiment_dir, out, max_steps=3, overwrite=True, seed=7))
    after = snapshot(out)
    assert not any(name.startswith("checkpoint-") for name in after)  # the old run's checkpoint went with it
    assert b'"seed": 7' in after["metrics.json"] and not hidden_siblings(out)


def test_a_full_disk_while_merging_replaces_nothing(adapter, tmp_path, monkeypatch, capsys):
    from transformers import PreTrainedModel

    out = tmp_path / "merged"
    assert cli(capsys, "merge", "--adapter", str(adapter), "--out", str(out))[0] == 0
    before = snapshot(out)

    def half_then_full(self, folder, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", half_then_full)
    code, err = cli(capsys, "merge", "--adapter", str(adapter), "--out", str(out), "--overwrite")
    assert code == 2 and err.splitlines()[-1] == (
        f"peftlab merge: error: disk full while writing the merged model to {out}: nothing was replaced there. "
        "Free space on that disk, or write elsewhere.")
    assert snapshot(out) == before and not hidden_siblings(out)
    with pytest.raises(DiskFullError):  # and to a new folder: no half-written folder left
        _merge_raises(adapter, tmp_path / "new")
    assert not (tmp_path / "new").exists() and not hidden_siblings(tmp_path / "new")


def _merge_raises(adapter: Path, out: Path) -> None:
    import argparse

    from peftlab.train.commands import merge

    merge.run(argparse.Namespace(adapter=str(adapter), out=str(out), overwrite=False))


def test_written_files_are_readable_as_the_umask_says(adapter, tmp_path, umask_022, capsys, bert_dir, sentiment_dir):  # noqa: F811
    run_training(tiny_options(bert_dir, sentiment_dir, tmp_path / "run", max_steps=2, save_every=2))
    assert cli(capsys, "merge", "--adapter", str(tmp_path / "run"), "--out", str(tmp_path / "merged"))[0] == 0
    assert cli(capsys, "export", "--adapter", str(tmp_path / "run"), "--out", str(tmp_path / "exported"))[0] == 0
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in tmp_path.rglob("*")
             if not p.name.startswith(".")}
    assert "run/adapter_model.safetensors" in modes and "run/checkpoint-2/trainable.safetensors" in modes
    assert "merged/model.safetensors" in modes and "exported/adapter_model.safetensors" in modes
    assert {name: mode for name, mode in modes.items() if mode != (0o755 if (tmp_path / name).is_dir() else 0o644)} == {}


def test_the_model_cache_is_readable_as_the_umask_says(tmp_path, umask_022):
    import torch
    from safetensors.torch import save_file

    from peftlab.assets import build_once

    target = build_once(tmp_path / "model", lambda folder: save_file({"w": torch.zeros(1)}, str(folder / "model.safetensors")))
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    assert stat.S_IMODE((target / "model.safetensors").stat().st_mode) == 0o644
