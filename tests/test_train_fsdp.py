"""FSDP2 (``--strategy fsdp``): two processes under torchrun (gloo, CPU) train what one process trains.

Each launch costs a few seconds (two fresh interpreters importing torch and transformers), so one
launch checks several things where it can.
"""

from __future__ import annotations

import dataclasses
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

from peftlab.hooks import TrainingHook
from peftlab.methods import METHODS as REGISTRY
from peftlab.train import OptionsError, TrainOptions, fsdp, run_training
from peftlab.quant import Linear4bit
from peftlab.train.build import build_model
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


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """``peftlab train ARGS`` on 2 processes, as a user starts it."""
    return launch("-m", "peftlab", "train", *args)


def launch(*program: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *program]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def assert_same_training(sharded: Path, single: dict, strategy: str = "fsdp", tolerance: float = 1e-5) -> dict:
    """Loss per step, evaluations and the final adapter equal within ``tolerance``; returns the sharded metrics.

    The adapter also gets 1e-4 relative: two processes sum a gradient in another order, and Adam
    divides by sqrt(v), which magnifies that difference where a gradient is near 0 (seen: 1.01e-5 on
    an element of 0.06 after 4 QLoRA steps; DDP's test allows the same).
    """
    metrics = json.loads((sharded / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["strategy"] == strategy
    assert metrics["train_loss_curve"] == pytest.approx(single["train_loss_curve"], abs=tolerance)
    assert [v["eval_loss"] for v in metrics["val_curve"]] == pytest.approx(
        [v["eval_loss"] for v in single["val_curve"]], abs=tolerance)
    weights = "adapter_model.safetensors" if single["options"]["method"] != "full" else "model.safetensors"
    one = load_file(Path(single["options"]["out"]) / weights)
    two = load_file(sharded / weights)
    assert one.keys() == two.keys()
    for key in one:
        assert two[key].dtype == one[key].dtype and two[key].shape == one[key].shape, key
        torch.testing.assert_close(two[key], one[key], atol=tolerance, rtol=1e-4)
    return metrics


#: Every method of the registry (QLoRA included: LoRA on the 4-bit base), and full fine-tuning.
METHODS = [*REGISTRY, "full"]
STRATEGIES = ("fsdp", "ddp")
DROPOUTS = [f.name for f in dataclasses.fields(TrainOptions) if f.name.endswith("_dropout")]


def method_run(method: str) -> dict:
    """``RUN`` for ``method``, its adapter dropout off (the fields of other methods left unset)."""
    options = REGISTRY[method].options if method in REGISTRY else {}
    scale = {"rope_scale": 1.0} if "rope_scale" in options else {}  # LongLoRA says how far it extends the context
    return {**RUN, "method": method, **scale, **{name: 0.0 if name in options else None for name in DROPOUTS}}

#: The resumed pair: dropout on, so each process's restored RNG state matters; the whole run leaves checkpoint-3.
RESUME = dict(strategy="fsdp", lora_dropout=0.2, save_every=3)


def sharded_bytes(options: TrainOptions) -> list[int]:
    """What each of 2 processes should hold under FSDP2: its dim-0 half of every parameter (the first
    process the larger half, as torch.chunk), the 4-bit storage held as parameters, and every buffer."""
    model, _, _ = build_model(options.with_method_defaults(), None)
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.shardable_storage_()
    held = [0, 0]
    for param in {id(p): p for p in model.parameters()}.values():
        rows, row_bytes = param.shape[0], param[0].numel() * param.element_size()
        held[0] += -(-rows // 2) * row_bytes
        held[1] += (rows - -(-rows // 2)) * row_bytes
    buffers = sum(b.numel() * b.element_size() for b in {id(b): b for b in model.buffers()}.values())
    return [h + buffers for h in held]


@pytest.fixture(scope="module")
def launched(llama_dir, prompt_dir, tmp_path_factory) -> Path:
    """One torchrun launch, many trainings: every method under both strategies, then an FSDP2 run
    with checkpoints and a second one resuming from its checkpoint-3. Returns the folder of their outputs."""
    folder = tmp_path_factory.mktemp("launched")
    runs = [tiny_options(llama_dir, prompt_dir, folder / f"{method}-{strategy}", strategy=strategy, **method_run(method))
            for method in METHODS for strategy in STRATEGIES]
    runs += [tiny_options(llama_dir, prompt_dir, folder / "whole", **RUN, **RESUME),
             tiny_options(llama_dir, prompt_dir, folder / "resumed", **RUN, **RESUME, resume=str(folder / "whole/checkpoint-3"))]
    (folder / "runs.json").write_text(json.dumps([dataclasses.asdict(options) for options in runs]))
    launch(str(Path(__file__).parent / "training_worker.py"), str(folder / "runs.json"))
    return folder


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_under_fsdp_and_ddp_what_one_process_trains(method, launched, llama_dir, prompt_dir, tmp_path):
    # AdamW with clipping (the defaults); 7 examples a batch split 4 + 3; an odd evaluation split
    # (8 examples in batches of 5: one process runs a padding batch to keep in step).
    single = run_training(tiny_options(llama_dir, prompt_dir, tmp_path, **method_run(method)))
    for strategy in STRATEGIES:
        folder = launched / f"{method}-{strategy}"
        if (folder / "refused.txt").exists():  # only FSDP2 may refuse a method, and it must say why
            assert strategy == "fsdp", (folder / "refused.txt").read_text()
            assert "cannot train with --strategy fsdp" in (folder / "refused.txt").read_text()
            continue
        metrics = assert_same_training(folder, single, strategy)
        assert (metrics["trainable_params"], metrics["total_params"]) == (
            single["trainable_params"], single["total_params"])  # 4-bit storage as parameters: not counted twice
        # Written once, by the first process: the same files and config as the unsharded run.
        assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in tmp_path.iterdir())
        config = "adapter_config.json" if method != "full" else "config.json"
        assert (folder / config).read_text() == (tmp_path / config).read_text()
        assert len(metrics["peak_memory_mb_per_process"]) == 2
        assert metrics["peak_memory_mb"] == max(metrics["peak_memory_mb_per_process"])
        assert all(0 < train <= peak for train, peak in zip(metrics["training_peak_memory_mb_per_process"],
                                                             metrics["peak_memory_mb_per_process"]))
        # FSDP2 shards every parameter (QLoRA's 4-bit codes included) and replicates buffers; DDP replicates all.
        whole, = single["model_bytes_per_process"]
        expected = sharded_bytes(tiny_options(llama_dir, prompt_dir, tmp_path, **method_run(method)))
        assert metrics["model_bytes_per_process"] == (expected if strategy == "fsdp" else [whole, whole])


def test_resume_under_fsdp_continues_exactly_and_needs_the_same_world_size(launched, llama_dir, prompt_dir, tmp_path):
    whole, resumed = (json.loads((launched / name / "metrics.json").read_text()) for name in ("whole", "resumed"))
    assert resumed["train_loss_curve"] == pytest.approx(whole["train_loss_curve"], abs=1e-6)
    assert resumed["eval_loss"] == pytest.approx(whole["eval_loss"], abs=1e-6)
    a, b = (load_file(launched / name / "adapter_model.safetensors") for name in ("whole", "resumed"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-5)

    # The checkpoint holds whole tensors (as an unsharded run's), not one process's shards.
    checkpoint = launched / "whole/checkpoint-3"
    saved = load_checkpoint(checkpoint)
    assert sorted(tuple(v.shape) for v in saved.trainable.values()) == sorted(tuple(v.shape) for v in a.values())
    assert sorted(tuple(state["exp_avg"].shape) for state in saved.optimizer["state"].values()) == sorted(
        tuple(v.shape) for v in a.values())
    # Another number of processes: refused, since each process's RNG stream cannot be split or merged.
    with pytest.raises(CheckpointError, match="written by 2 processes; resume with the same number"):
        run_training(tiny_options(llama_dir, prompt_dir, tmp_path, **RUN, **{**RESUME, "strategy": "auto"},
                                  resume=str(checkpoint)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_nodes_at_one_rendezvous_train_as_one_process_with_gradients_averaged_once(llama_dir, prompt_dir, tmp_path):
    """Two torchrun agents, one process each, as two "nodes" meeting at a c10d rendezvous on localhost,
    running ``peftlab train`` as a user would.

    Plain SGD without clipping: the update is proportional to the gradient, so gradients summed
    instead of averaged over the processes (pytorch issue 162338: gloo's AVG once did that), or
    averaged twice, change the loss from step 2 on. Adam and clipping would hide a constant factor.
    """
    sgd = dict(optimizer="sgd", momentum=0.0, max_grad_norm=0, lr=0.5, scheduler="constant", warmup_ratio=0)
    single = run_training(tiny_options(llama_dir, prompt_dir, tmp_path / "one", **{**RUN, **sgd}))
    endpoint = f"localhost:{free_port()}"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=peftlab-test", "-m", "peftlab", "train",
                *flags(llama_dir, prompt_dir, tmp_path / "two", strategy="fsdp", **sgd)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agents = [subprocess.Popen(launcher, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
              for _ in range(2)]
    outputs = [agent.communicate(timeout=300) for agent in agents]
    for agent, (_, err) in zip(agents, outputs):
        assert agent.returncode == 0, err[-4000:]
    metrics = assert_same_training(tmp_path / "two", single)
    assert sum(out.count('"eval_loss"') for out, _ in outputs) == 1  # one summary, from global rank 0
    # The check has teeth: a doubled gradient moves the loss of step 2 by far more than the tolerance.
    doubled = run_training(tiny_options(llama_dir, prompt_dir, tmp_path / "double", **{**RUN, **sgd, "lr": 1.0}))
    assert abs(doubled["train_loss_curve"][1] - metrics["train_loss_curve"][1]) > 1e-3


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


def test_fsdp_accepts_a_bf16_base_with_fp32_adapters_and_refuses_mixed_trainable_dtypes(tmp_path):
    launch(str(Path(__file__).parent / "fsdp_dtypes_worker.py"), env={"OUT": str(tmp_path)})
    for rank in range(2):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["grad_max_diff"] < 1e-5 and report["grad_dtypes"] == ["torch.float32"]
        # torch 2.13 refuses a unit whose trainable tensors mix dtypes; peftlab says so first, in words.
        assert "FSDP expects uniform original parameter dtype" in report["torch_refuses"]
        assert report["peftlab_refuses"].startswith("FSDP2 cannot shard base_model.model.layers.0: its trainable tensors mix dtypes")


def test_a_method_whose_hooks_need_whole_tensors_is_refused_under_fsdp(monkeypatch, llama_dir, prompt_dir, tmp_path):
    class RankPruning(TrainingHook):  # works_on_shards left False, as an unknown hook's
        pass

    class RankDraw(TrainingHook):
        works_on_shards = True

    model, _, _ = build_model(tiny_options(llama_dir, prompt_dir, tmp_path).with_method_defaults(), None)
    monkeypatch.setattr(fsdp, "discover_hooks", lambda model: [RankDraw()])
    fsdp.check_method_can_shard(model)  # a hook that reads no tensor is fine
    monkeypatch.setattr(fsdp, "discover_hooks", lambda model: [RankDraw(), RankPruning()])
    with pytest.raises(OptionsError, match=r"method lora cannot train with --strategy fsdp: its training hooks "
                                           r"\(RankPruning\).*Use --strategy ddp"):
        fsdp.check_method_can_shard(model)


def test_accelerate_launch_with_the_shipped_fsdp2_config_runs_peftlab_train_unchanged(llama_dir, prompt_dir, tmp_path):
    single = run_training(tiny_options(llama_dir, prompt_dir, tmp_path / "one", **RUN))
    shipped = Path(__file__).parents[1] / "docs/fsdp2.yaml"
    config = tmp_path / "fsdp2-cpu.yaml"  # the shipped file, on a machine without GPUs (as the docs say)
    config.write_text(shipped.read_text().replace("use_cpu: false", "use_cpu: true"))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
               "-m", "peftlab", "train", *flags(llama_dir, prompt_dir, tmp_path / "two")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    assert_same_training(tmp_path / "two", single, "fsdp")  # auto: FSDP2, from the accelerate config
