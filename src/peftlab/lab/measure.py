"""What the lab measures beside training: where it ran, sizes on disk and in memory, inference latency,
and where a method put its rank (rank per layer; accuracy at each rank of an adapter that runs at several).

Latency is the median time of one forward pass over an evaluation batch, after a warm-up pass,
for three models built from a finished run's saved files:

    base      the pretrained base (NF4-quantized for qlora)
    adapter   the base with the trained adapter, unmerged (null for full fine-tuning: no adapter)
    merged    the adapter folded into the base (for full fine-tuning: the fine-tuned model);
              null when the method cannot merge
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from peftlab.lab.results import Latency, RankAccuracy

if TYPE_CHECKING:
    from peftlab.train.options import TrainOptions

#: Timed forward passes per model, after one warm-up; the median is reported. Few, because on a CPU a
#: pass over an eval batch of a 100M+ model takes seconds, and three models are timed per run.
LATENCY_REPEATS = 3
#: What save_pretrained writes for the model itself (not the tokenizer, not the metrics).
MODEL_FILE_PATTERNS = ("*.safetensors", "*.bin", "*.gguf", "adapter_config.json", "config.json")


def environment() -> dict[str, Any]:
    """Versions, CPU, GPU and thread counts of this machine, for the report."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "peftlab": _version("peftlab"),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "gpu_count": torch.cuda.device_count() if gpu else 0,
        "cuda": torch.version.cuda if gpu else None,
    }


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's marketing name (Linux: /proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def saved_model_bytes(folder: str | os.PathLike[str]) -> int:
    """Bytes on disk of the model files save_pretrained wrote in ``folder``: weights and configs."""
    folder = Path(folder)
    files = {path for pattern in MODEL_FILE_PATTERNS for path in folder.glob(pattern) if path.is_file()}
    if not any(path.suffix in (".safetensors", ".bin", ".gguf") for path in files):
        raise FileNotFoundError(f"{folder} holds no saved weights (*.safetensors, *.bin); did training finish?")
    return sum(path.stat().st_size for path in files)


@torch.no_grad()
def forward_latency_ms(model: nn.Module, batch: dict[str, torch.Tensor], repeats: int = LATENCY_REPEATS) -> float:
    """Median milliseconds of one forward pass over ``batch`` (already on the model's device)."""
    model.eval()
    cuda = any(tensor.is_cuda for tensor in batch.values())
    times = []
    for attempt in range(repeats + 1):
        if cuda:
            torch.cuda.synchronize()
        began = time.perf_counter()
        model(**batch)
        if cuda:
            torch.cuda.synchronize()
        if attempt:  # the first pass warms caches and kernels up
            times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times)


def measure_inference(options: TrainOptions, num_labels: int | None, examples: list[dict[str, Any]],
                      device: torch.device) -> tuple[Latency, int]:
    """The three latencies of a finished run over ``examples`` (one batch), and its base's size in memory.

    ``options`` are the run's resolved options; its saved adapter (or model) is in ``options.out``.
    The size is the base's parameters and buffers: fp32/bf16, or NF4 codes and statistics for qlora.
    """
    from peftlab.assets import load_model_and_tokenizer
    from peftlab.model import PeftModel
    from peftlab.quant import model_size_bytes, quantize_model
    from peftlab.io import read_adapter_config
    from peftlab.train.build import load_trained, make_collator, quantizes_itself

    labels = num_labels or 2
    base, tokenizer = load_model_and_tokenizer(options.model, options.task, num_labels=labels)
    if options.quantization:
        quantize_model(base)
    base_bytes = model_size_bytes(base)
    batch = {key: value.to(device) for key, value in make_collator(options, tokenizer)(examples).items()
             if key != "labels"}
    base_ms = forward_latency_ms(base.to(device), batch)
    if options.is_full_fine_tuning:
        del base
        tuned, _ = load_model_and_tokenizer(options.out, options.task, num_labels=labels)
        return Latency(base=base_ms, adapter=None, merged=forward_latency_ms(tuned.to(device), batch)), base_bytes
    if options.quantization and quantizes_itself(read_adapter_config(Path(options.out)).get("init_lora_weights")):
        del base  # LoftQ's adapter goes on the full-precision base, which it quantizes itself, as in training
        adapted = load_trained(options.model, options.out, options.task, labels, options.quantization)[0].to(device)
    else:
        adapted = PeftModel.from_pretrained(base, options.out).to(device)
    adapter_ms = forward_latency_ms(adapted, batch)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # merging into NF4 warns that re-quantization is lossy
            adapted.merge_adapter()
    except (NotImplementedError, ValueError, TypeError) as error:
        print(f"peftlab: cannot merge this adapter, so no merged latency: {error}", file=sys.stderr)
        return Latency(base=base_ms, adapter=adapter_ms, merged=None), base_bytes
    return Latency(base=base_ms, adapter=adapter_ms, merged=forward_latency_ms(adapted, batch)), base_bytes


def measure_ranks(options: TrainOptions, num_labels: int | None, eval_data: Any,
                  device: torch.device) -> tuple[dict[str, int], list[RankAccuracy]]:
    """Where a finished run's adapter holds its rank: ``{layer: live rank}`` for methods that move
    their budget (AdaLoRA, dora_rank), and the validation accuracy at each rank the adapter can run at
    (DyLoRA: one trained adapter, evaluated at every rank). Empty for the others."""
    if options.is_full_fine_tuning:
        return {}, []
    from peftlab.methods.capabilities import RunsAtSeveralRanks
    from peftlab.train.build import load_trained, make_collator
    from peftlab.train.distributed import Processes
    from peftlab.train.evaluate import evaluate, shard_batches

    model, tokenizer = load_trained(options.model, options.out, options.task, num_labels, options.quantization)
    name = model.active_adapter
    method = model.method_of(name)
    ranks = model.rank_per_layer(name) or {}
    accuracies: list[RankAccuracy] = []
    processes = Processes(0, 1, device, owns_group=False)
    key = "eval_accuracy" if options.task == "seq-cls" else "eval_token_accuracy"
    for rank in method.inference_ranks(model, name) if isinstance(method, RunsAtSeveralRanks) else []:
        model.set_rank(rank)
        batches = shard_batches(eval_data, make_collator(options, tokenizer), processes, options.eval_batch_size)
        accuracies.append({"rank": rank, "accuracy": evaluate(model.to(device), batches, options.task, processes, options.bf16)[key]})
    return ranks, accuracies
