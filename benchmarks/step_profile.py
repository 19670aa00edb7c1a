"""Where a training step's time goes: torch.profiler's self time per op, one column per variant.

The variants, model and batch are ``train_step.py``'s (same names, same step); each is profiled
over a few steps after a warmup and the table lists every op's self CPU time per step and its calls
per step, ops ordered by how much more time they take than in the first variant (the floor, by
default). So the rows on top are what a method adds: its products, the Python of its autograd node
(rows named after the node), its optimizer step.

    python benchmarks/step_profile.py --model smollm2-135m --targets all-linear --batch 4 --length 128 \
        --variants floor,peftlab-lora,hf-lora

The profiler adds ~10-20 us to every op, so small ops look larger than in ``train_step.py``'s wall
clock: read the table for where, ``train_step.py`` for how much.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
import train_step  # noqa: E402  (the variants and the step being profiled)


def profile_variant(model, optimizer, hooks, batch: dict, steps: int, first_index: int) -> dict[str, tuple[float, float]]:
    """op name -> (self CPU ms per step, calls per step)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for index in range(steps):
            train_step.step(model, optimizer, batch, hooks, first_index + index)
    return {e.key: (e.self_cpu_time_total / steps / 1000, e.count / steps) for e in prof.key_averages()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    train_step.add_workload_arguments(parser)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps per variant")
    parser.add_argument("--variants", default="floor,peftlab-lora,hf-lora", help="the first is the baseline of the order")
    parser.add_argument("--rows", type=int, default=30)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    variants = args.variants.split(",")
    base, causal = train_step.load_base(args.model)
    batch = train_step.make_batch(base, causal, args.batch, args.length)
    table = {}
    for name in variants:
        model, optimizer, hooks = train_step.warmed_variant(name, base, causal, batch, args)
        table[name] = profile_variant(model, optimizer, hooks, batch, args.steps, args.warmup)
        print(f"  profiled {name}", file=sys.stderr)
        del model, optimizer, hooks

    first = table[variants[0]]
    ops = {op for ops in table.values() for op in ops}
    extra = {op: max(t.get(op, (0.0, 0.0))[0] for t in table.values()) - first.get(op, (0.0, 0.0))[0] for op in ops}
    print(f"model {args.model}, targets {args.targets}, batch {args.batch} x {args.length}, adapter dropout "
          f"{args.dropout:g}, {args.threads} threads; self CPU ms per step (calls per step), {args.steps} profiled steps")
    print(f"{'op':<48}" + "".join(f"{name:>24}" for name in variants))
    for op in sorted(ops, key=lambda o: -extra[o])[: args.rows]:
        cells = "".join(f"{table[n].get(op, (0.0, 0.0))[0]:>15.1f} ({table[n].get(op, (0.0, 0.0))[1]:>5.0f})" for n in variants)
        print(f"{op[:47]:<48}{cells}")
    print(f"{'total':<48}" + "".join(f"{sum(ms for ms, _ in table[n].values()):>15.1f}{'':>8}" for n in variants))


if __name__ == "__main__":
    main()
