"""Peak memory per process and step time: one process vs two with DDP vs two with FSDP2.

    python benchmarks/distributed.py --model smollm2-135m --steps 8 --batch 8 --length 128
    python benchmarks/distributed.py --model smollm2-135m --bases nf4 --setups fsdp-2 --steps 3   # a quick check

Each setup is one real ``peftlab train`` run (``torchrun --standalone`` for two processes), LoRA on
every linear layer of the model (``--method lora``: fp32 base; ``--method qlora``: NF4 base), on a
fixed causal-LM data set written here; the figures are read back from the run's metrics files:

    model MB     parameters and buffers a process holds between steps (its shards, under FSDP2)
    train peak   each process's peak resident memory (CPU) or allocated memory (CUDA) from the
                 first training step on
    load peak    each process's peak over the whole run, loading included (every process of a
                 run loads the whole model before sharding it)
    step s       median wall time of a step, the first (warm-up) step left out

On CPU each process gets ``--threads`` threads divided by its process count, so every setup uses
the same cores; a loaded machine disturbs step times (the load average is printed), not the
memory figures. glibc's mmap threshold is fixed in the runs so that freed memory leaves the process.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

BASES = {"fp32": "lora", "nf4": "qlora"}
SETUPS = {"one": (1, "auto"), "ddp-2": (2, "ddp"), "fsdp-2": (2, "fsdp")}
WORDS = ("the model reads a long sentence about films music weather cities rivers and numbers then writes "
         "another one that continues it with more words of the same kind").split()


def write_data(folder: Path, examples: int, length: int) -> Path:
    """Prompt/response pairs of about ``length`` words, so that every batch is full at ``--length`` tokens."""
    rng = random.Random(0)
    for split, count in (("train", examples), ("validation", 8)):
        with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for _ in range(count):
                words = rng.choices(WORDS, k=length)
                row = {"prompt": " ".join(words[: length // 2]), "response": " ".join(words[length // 2 :])}
                f.write(json.dumps(row) + "\n")
    return folder


def run(setup: str, base: str, args: argparse.Namespace, data: Path, out: Path) -> dict:
    processes, strategy = SETUPS[setup]
    train = ["-m", "peftlab", "train", "--model", args.model, "--task", "causal-lm", "--dataset", str(data),
             "--method", BASES[base], "--strategy", strategy, "--max-steps", str(args.steps),
             "--batch-size", str(args.batch), "--max-length", str(args.length), "--log-every", "1",
             "--max-eval-samples", "8", "--eval-batch-size", "4", "--target-modules", "all-linear",
             "--device", args.device, "--out", str(out)]
    launcher = [] if processes == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    # A fixed mmap threshold makes glibc hand freed blocks back to the OS, so that RSS follows the live
    # tensors (the whole model each process loads before sharding is freed, not kept by the allocator).
    env = {**os.environ, "OMP_NUM_THREADS": str(max(args.threads // processes, 1)), "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run([sys.executable, *launcher, *train], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{setup} {base} failed:\n{result.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    steps = [json.loads(line)["step_time_s"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "setup": setup, "base": base, "processes": processes, "strategy": metrics["strategy"],
        "model_mb": [round(b / 2**20, 1) for b in metrics["model_bytes_per_process"]],
        "train_peak_mb": [round(m, 1) if m is not None else None for m in metrics["training_peak_memory_mb_per_process"]],
        "load_peak_mb": [round(m, 1) for m in metrics["peak_memory_mb_per_process"]],
        "step_s": statistics.median(steps[1:] or steps),
        "loss_curve": metrics["train_loss_curve"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--bases", default="fp32,nf4", help="comma-separated: fp32 (LoRA), nf4 (QLoRA)")
    parser.add_argument("--setups", default="one,ddp-2,fsdp-2", help=f"comma-separated: {', '.join(SETUPS)}")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8, help="global batch (split over the processes)")
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads shared by a setup's processes")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--json", metavar="FILE", help="also write the rows here")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = write_data(Path(tmp), examples=args.batch * args.steps, length=args.length)
        for base in args.bases.split(","):
            for setup in args.setups.split(","):
                rows.append(run(setup, base, args, data, Path(tmp) / f"{base}-{setup}"))
                row = rows[-1]
                print(f"{base:5} {setup:7} model MB {row['model_mb']}  train peak MB {row['train_peak_mb']}  "
                      f"load peak MB {row['load_peak_mb']}  step {row['step_s']:.3f} s", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; model {args.model}, global batch "
          f"{args.batch} x {args.length} tokens, {args.steps} steps")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
