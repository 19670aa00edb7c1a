"""S²-Attn vs full attention: one LoRA training step on SmolLM2-135M at long context, time and peak memory.

Both variants are the same model with LoRA (r 8, alpha 16) on q, k, v, o; they differ only in the
attention implementation during training: ``sdpa`` (full causal attention) or peftlab's S²-Attn
(``methods/s2_attention.py``, groups of L/4, half the heads shifted). One step = forward, loss,
backward, AdamW step, zero_grad, on one sequence of L random tokens.

Each (variant, length) runs alone in a fresh child process (memory: peak RSS above the RSS once the
model is built, glibc's mmap threshold fixed, as ``train_step.py``); time is the median of the timed
steps after one warm-up step.

    python benchmarks/s2_attention.py --lengths 1024,2048,4096 --threads 2 --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import _rss_kb, load_base  # noqa: E402  (the shared model loader and RSS reader)

VARIANTS = ("full", "s2")


def child(args) -> None:
    from peftlab import LoraConfig, get_peft_model
    from peftlab.methods.s2_attention import enable_s2_attention

    torch.set_num_threads(args.threads)
    base, _ = load_base(args.model)
    if args.child == "s2":
        enable_s2_attention(base, args.ratio)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(100, base.config.vocab_size - 1, (1, args.length), generator=torch.Generator().manual_seed(0))
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    Path("/proc/self/clear_refs").write_text("5")
    before = _rss_kb("VmRSS")
    times = []
    for index in range(1 + args.steps):
        start = clock()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if index:  # the first step (optimizer state, allocator warm-up) is not timed, but its memory counts
            times.append(clock() - start)
    print(json.dumps({"variant": args.child, "length": args.length, "step_s": statistics.median(times),
                      "peak_above_model_mb": (_rss_kb("VmHWM") - before) / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lengths", default="1024,2048,4096")
    parser.add_argument("--ratio", type=float, default=0.25, help="S²-Attn group size as a fraction of L")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.child:
        child(args)
        return
    print(f"model {args.model}, LoRA r=8 on q,k,v,o, batch 1, {args.threads} threads, median of {args.steps} steps "
          f"({args.clock} time), S²-Attn groups of {args.ratio:g}·L")
    print(f"\n{'L':>6}{'variant':>9}{'s/step':>10}{'x full':>8}{'peak MB above model':>21}")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    for length in [int(v) for v in args.lengths.split(",")]:
        rows = {}
        for variant in VARIANTS:
            cmd = [sys.executable, __file__, "--child", variant, "--length", str(length), "--model", args.model,
                   "--ratio", str(args.ratio), "--steps", str(args.steps), "--threads", str(args.threads), "--clock", args.clock]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
            rows[variant] = json.loads(out.strip().splitlines()[-1])
        for variant, row in rows.items():
            ratio = row["step_s"] / rows["full"]["step_s"]
            print(f"{length:>6}{variant:>9}{row['step_s']:>10.2f}{ratio:>8.2f}{row['peak_above_model_mb']:>21.0f}")


if __name__ == "__main__":
    main()
