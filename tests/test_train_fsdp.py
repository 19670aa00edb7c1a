"""FSDP2 (``--strategy fsdp``): two processes under torchrun (gloo, CPU) train what one process trains.

Each launch costs a few seconds (two fresh interpreters importing torch and transformers), so one
launch checks several things where it can.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import llama_dir, prompt_dir, tiny_options  # noqa: F401

from peftlab.train import OptionsError, run_training
from peftlab.train.checkpoint import CheckpointError, load_checkpoint

RUN = dict(task="causal-lm", batch_size=7, grad_accum=2, max_steps=4, eval_every=2, lr=1e-2, eval_batch_size=5)


def flags(model_dir: Path, data_dir: Path, out: Path, **changes) -> list[str]:
    """The command-line flags for ``tiny_options(model_dir, data_dir, out, **RUN, **changes)``."""
    values = {**dict(model=model_dir, dataset=data_dir, out=out, lora_dropout=0, max_length=16, log_every=1),
              **RUN, **changes}
    args = []
    for key, value in values.items():
        if isinstance(value, dict):
            args += [a for k, v in value.items() for a in ("--method-option", f"{k}={v}")]
        else:
            args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def torchrun(*args: str, launcher: list[str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    launcher = launcher or ["--standalone", "--nproc_per_node=2"]
    command = [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "peftlab", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def assert_same_training(sharded: Path, single: dict, tolerance: float = 1e-5) -> dict:
    """Loss per step, evaluations and the final adapter equal within ``tolerance``; returns the sharded metrics.

    The adapter also gets 1e-4 relative: two processes sum a gradient in another order, and Adam
    divides by sqrt(v), which magnifies that difference where a gradient is near 0 (seen: 1.01e-5 on
    an element of 0.06 after 4 QLoRA steps; DDP's test allows the same).
    """
    metrics = json.loads((sharded / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["options"]["strategy"] == "fsdp"
    assert metrics["train_loss_curve"] == pytest.approx(single["train_loss_curve"], abs=tolerance)
    assert [v["eval_loss"] for v in metrics["val_curve"]] == pytest.approx(
        [v["eval_loss"] for v in single["val_curve"]], abs=tolerance)
    one = load_file(Path(single["options"]["out"]) / "adapter_model.safetensors")
    two = load_file(sharded / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    for key in one:
        assert two[key].dtype == one[key].dtype and two[key].shape == one[key].shape, key
        torch.testing.assert_close(two[key], one[key], atol=tolerance, rtol=1e-4)
    return metrics


@pytest.mark.parametrize("method", ["lora", "dora", "qlora"])
def test_fsdp_trains_what_one_process_trains(method, llama_dir, prompt_dir, tmp_path):
    # AdamW with clipping (the defaults) for the methods; 7 examples a batch split 4 + 3, an odd
    # evaluation split (8 examples in batches of 5: one process runs a padding batch).
    single = run_training(tiny_options(llama_dir, prompt_dir, tmp_path / "one", method=method, **RUN))
    result = torchrun(*flags(llama_dir, prompt_dir, tmp_path / "two", method=method, strategy="fsdp"))
    metrics = assert_same_training(tmp_path / "two", single)
    assert metrics["trainable_params"] == single["trainable_params"]
    assert metrics["total_params"] == single["total_params"]  # 4-bit storage held as parameters is not counted twice
    assert len(metrics["peak_memory_mb_per_process"]) == 2
    assert metrics["peak_memory_mb"] == max(metrics["peak_memory_mb_per_process"])
    # Sharded, not replicated (the 4-bit codes of QLoRA's base included): each process holds about half.
    whole, = single["model_bytes_per_process"]
    assert all(0.45 * whole < held < 0.6 * whole for held in metrics["model_bytes_per_process"])
    # Written once, by the first process: one summary, the same files and config as the unsharded run.
    assert result.stdout.count('"eval_loss"') == 1
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    assert (tmp_path / "two/adapter_config.json").read_text() == (tmp_path / "one/adapter_config.json").read_text()


def test_fsdp_gradients_are_averaged_exactly_once(llama_dir, prompt_dir, tmp_path):
    """Plain SGD without clipping: the update is proportional to the gradient, so gradients summed
    instead of averaged over the 2 processes (pytorch issue 162338, gloo's AVG), or averaged twice,
    change the loss from step 2 on. (Adam and clipping hide a constant factor: not used here.)"""
    sgd = dict(optimizer="sgd", momentum=0.0, max_grad_norm=0, lr=0.5, scheduler="constant", warmup_ratio=0)
    single = run_training(tiny_options(llama_dir, prompt_dir, tmp_path / "one", **{**RUN, **sgd}))
    torchrun(*flags(llama_dir, prompt_dir, tmp_path / "two", strategy="fsdp", **sgd))
    metrics = assert_same_training(tmp_path / "two", single)
    # The check has teeth: a doubled gradient moves the loss of step 2 by far more than the tolerance.
    doubled = run_training(tiny_options(llama_dir, prompt_dir, tmp_path / "double", **{**RUN, **sgd, "lr": 1.0}))
    assert abs(doubled["train_loss_curve"][1] - metrics["train_loss_curve"][1]) > 1e-3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_nodes_with_one_rendezvous_endpoint_train_and_match(llama_dir, prompt_dir, tmp_path):
    """Two torchrun agents, one process each, as two "nodes" meeting at a c10d rendezvous on localhost."""
    single = run_training(tiny_options(llama_dir, prompt_dir, tmp_path / "one", **RUN))
    endpoint = f"localhost:{free_port()}"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=peftlab-test", "-m", "peftlab", "train",
                *flags(llama_dir, prompt_dir, tmp_path / "two", strategy="fsdp")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agents = [subprocess.Popen(launcher, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
              for _ in range(2)]
    outputs = [agent.communicate(timeout=300) for agent in agents]
    for agent, (_, err) in zip(agents, outputs):
        assert agent.returncode == 0, err[-4000:]
    assert_same_training(tmp_path / "two", single)
    assert sum(out.count('"eval_loss"') for out, _ in outputs) == 1  # one summary, from global rank 0


def test_resume_under_fsdp_continues_exactly_and_needs_the_same_world_size(llama_dir, prompt_dir, tmp_path):
    # Dropout on, so each process's restored RNG state matters; checkpoint-3 is left by the whole run.
    run = dict(strategy="fsdp", lora_dropout=0.2, save_every=3)
    torchrun(*flags(llama_dir, prompt_dir, tmp_path / "whole", **run))
    whole = json.loads((tmp_path / "whole/metrics.json").read_text())
    checkpoint = tmp_path / "whole/checkpoint-3"
    torchrun(*flags(llama_dir, prompt_dir, tmp_path / "resumed", resume=checkpoint, **run))
    resumed = json.loads((tmp_path / "resumed/metrics.json").read_text())
    assert resumed["train_loss_curve"] == pytest.approx(whole["train_loss_curve"], abs=1e-6)
    assert resumed["eval_loss"] == pytest.approx(whole["eval_loss"], abs=1e-6)
    a, b = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("whole", "resumed"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-5)

    # The checkpoint holds whole tensors (as an unsharded run's), not one process's shards.
    saved = load_checkpoint(checkpoint)
    shapes = {k: tuple(v.shape) for k, v in load_file(tmp_path / "whole/adapter_model.safetensors").items()}
    assert {tuple(v.shape) for v in saved.trainable.values()} == set(shapes.values())
    assert sorted(tuple(state["exp_avg"].shape) for state in saved.optimizer["state"].values()) == sorted(
        tuple(v.shape) for v in saved.trainable.values())
    # Another number of processes: refused, since each process's RNG stream cannot be split or merged.
    with pytest.raises(CheckpointError, match="written by 2 processes; resume with the same number"):
        run_training(tiny_options(llama_dir, prompt_dir, tmp_path / "one", **RUN, lora_dropout=0.2, save_every=3,
                                  resume=str(checkpoint)))


def test_fsdp_without_a_process_group_says_how_to_launch(llama_dir, prompt_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(OptionsError, match="--strategy fsdp shards the model across processes.*torchrun"):
        run_training(tiny_options(llama_dir, prompt_dir, tmp_path, strategy="fsdp", max_steps=1))


def test_accelerate_configs_peftlab_cannot_honour_are_refused(llama_dir, prompt_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(OptionsError, match="FSDP version 1; peftlab shards with FSDP2"):
        run_training(tiny_options(llama_dir, prompt_dir, tmp_path, max_steps=1))
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(OptionsError, match="mixed_precision: bf16.*--bf16"):
        run_training(tiny_options(llama_dir, prompt_dir, tmp_path, max_steps=1))
