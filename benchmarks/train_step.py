"""Training-step time and peak memory: peftlab vs HF peft vs the floor, on a real model.

The floor is what any adapter method must pay: the frozen backbone's forward plus the backward to
its inputs (``inputs_embeds`` that require grad), with no weight gradients and no optimizer.
Each variant is one full training step (forward, loss, backward, AdamW step, zero_grad), with the
method's training hooks where it has them (AdaLoRA's allocation, DyLoRA's rank draw, ...).

Time: every variant lives in this one process and the steps are interleaved round-robin, so
machine noise hits all of them alike; the figure is the median over the timed steps.
With ``--clock cpu --threads 1`` the figure is process CPU time, which other load on a shared
machine disturbs far less than wall time.
Memory: each variant runs alone in a fresh child process; the figure is the peak RSS during three
training steps above the RSS once the model was built (Linux ``/proc``; the peak is reset with
``clear_refs`` then), with glibc's mmap threshold fixed so that freed memory leaves the process.
"saved MB" is what autograd keeps for backward over one forward (saved-tensor hooks, each storage
once, parameters left out): the activation memory a method like LoRA-FA cuts.

Variants: ``floor``, ``full``, ``peftlab-<method>`` for any registered method (``peftlab train
--method`` names: lora, dora, lora_fa, loraplus, vera, ...) and ``hf-<method>`` where HF peft has
it (:data:`HF_TWINS`). Each adapter variant steps with its library's optimizer for the method:
peftlab's ``make_optimizer`` (the method's groups), HF's ``create_lorafa_optimizer`` /
``create_loraplus_optimizer`` for lora_fa / loraplus, AdamW otherwise.

    python benchmarks/train_step.py --variants floor,peftlab-lora,peftlab-lora_fa,hf-lora_fa --no-time

    python benchmarks/train_step.py --model minilm-l6 --targets query,value --batch 32 --length 64
    python benchmarks/train_step.py --model smollm2-135m --targets all-linear --batch 8 --length 128
    python benchmarks/train_step.py --model minilm-l6 --targets query,key,value,dense --dropout 0.05

``--r`` defaults to each method's rank in ``peftlab compare`` (its ``run_defaults``: 8, VeRA 256; HF's
twin gets the same). ``--dropout`` is the adapters' ``lora_dropout`` (peftlab and HF alike; the model's own dropout
layers run as in training either way).

The step-time table of issue 12 (2 threads, wall clock; one row per command; for another peftlab,
e.g. an older commit checked out in ../wt-before, put its src first: PYTHONPATH=../wt-before/src):

    python benchmarks/train_step.py --model smollm2-135m --targets all-linear --batch 4 --length 128 \
        --steps 6 --warmup 2 --threads 2 --no-memory
    python benchmarks/train_step.py --model minilm-l6 --targets query,key,value,dense --batch 32 --length 64 \
        --steps 10 --warmup 2 --threads 2 --no-memory
    python benchmarks/train_step.py --model minilm-l6 --targets query,key,value,dense --batch 32 --length 64 \
        --steps 10 --warmup 2 --threads 2 --no-memory --dropout 0.05

Issue 10 (rank that adapts; goals: DyLoRA and dora_rank <= 1.15x the floor, AdaLoRA <= 1.25x and no
slower than HF's with ``update_and_allocate``; LoRA in the same run as the yardstick):

    python benchmarks/train_step.py --model smollm2-135m --targets all-linear --batch 4 --length 128 \
        --steps 10 --warmup 2 --threads 2 --no-memory \
        --variants floor,peftlab-lora,peftlab-dylora,peftlab-dora_rank,peftlab-adalora,hf-adalora
    python benchmarks/train_step.py --model minilm-l6 --targets query,key,value,dense --batch 32 --length 64 \
        --steps 10 --warmup 2 --threads 2 --no-memory \
        --variants floor,peftlab-lora,peftlab-dylora,peftlab-dora_rank,peftlab-adalora,hf-adalora

DyLoRA draws its rank per step (the same draws in every run: ``TrainingProgress`` seed 0), so its
median mixes ranks 1..r; dora_rank's timed steps lie before its pruning phase (the schedule is
:data:`TOTAL_STEPS` long), where it pays the importance EMA and the variance regulariser every
step (the work of most of a run's steps) and no pruning round.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

VARIANTS = ("floor", "full", "peftlab-lora", "hf-lora", "peftlab-dora", "hf-dora")
#: peftlab method -> (HF peft config class, its fields that make the same adapter).
HF_TWINS = {
    "lora": ("LoraConfig", {}), "rslora": ("LoraConfig", {"use_rslora": True}), "dora": ("LoraConfig", {"use_dora": True}),
    "lora_fa": ("LoraConfig", {}), "loraplus": ("LoraConfig", {}), "vera": ("VeraConfig", {}),
    "adalora": ("AdaLoraConfig", {}),
}
#: The schedule length the timed steps report to training hooks: far beyond them, so AdaLoRA stays in its
#: pruning phase (a budget and a mask at every step, HF's deltaT=1) for every timed step.
TOTAL_STEPS = 10**6


def _method_fields(method: str, r: int) -> dict:
    """Fields that size a method with no single ``r``: AdaLoRA at HF's proportions, 1.5r pruned to r."""
    if method == "adalora":
        return {"init_r": 3 * r // 2, "target_r": r, "lora_alpha": 2 * r, "total_step": TOTAL_STEPS}
    return {}
LORAPLUS_RATIO = 16.0


def load_base(model_name: str):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    try:
        from peftlab.assets import resolve_model

        path = resolve_model(model_name)
    except (ImportError, ValueError, FileNotFoundError):
        path = model_name
    config = AutoConfig.from_pretrained(path)
    causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
    cls = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    kwargs = {} if causal else {"num_labels": 2}
    model = cls.from_pretrained(path, dtype=torch.float32, **kwargs)
    return model, causal


def make_batch(model, causal: bool, batch: int, length: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, model.config.vocab_size - 1, (batch, length), generator=g)
    labels = ids.clone() if causal else torch.randint(0, 2, (batch,), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def method_rank(method: str) -> int:
    """The rank ``peftlab compare`` runs a method at (its ``run_defaults``; VeRA's is 256), else 8."""
    import peftlab

    return peftlab.METHODS[method].run_defaults.get("r", 8) if method in peftlab.METHODS else 8


def build_variant(name: str, base, causal: bool, targets: str, r: int | None, dropout: float = 0.0):
    """A ready-to-step (model, optimizer, hooks); the floor gets no optimizer. ``hooks`` are the
    method's training hooks (peftlab's HookRunner, as the training loop runs them; HF's AdaLoRA
    allocator) or None, so a method that works between steps pays for it here too."""
    model = copy.deepcopy(base)
    task = "CAUSAL_LM" if causal else "SEQ_CLS"
    target_modules = targets if targets == "all-linear" else targets.split(",")
    if name == "floor":
        model.requires_grad_(False)
        return model, None, None
    if name == "full":
        model.requires_grad_(True)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-4), None
    lib, method = name.split("-", 1)
    r = method_rank(method) if r is None else r
    shared = dict(target_modules=target_modules, task_type=task)
    if lib == "peftlab":
        import peftlab
        from peftlab.optim import make_optimizer
        from peftlab.train.hooks import HookRunner, discover_hooks

        peftlab_method = peftlab.METHODS[method]
        fields = {**_size_fields(peftlab_method.options, r, dropout), **_method_fields(method, r)}
        if peftlab_method.quantization:  # qlora: the base quantized first, as the training engine does
            from peftlab.train.build import quantize

            quantize(model)
        model = peftlab.get_peft_model(model, peftlab_method.make_config(**fields, **shared))
        optimizer = make_optimizer(model, "adamw", lr=1e-4, weight_decay=0.01)  # torch AdamW's default, as the others
        return model, optimizer, HookRunner(discover_hooks(model))
    import peft
    import peft.optimizers

    hf_class, preset = HF_TWINS[method]
    config_class = getattr(peft, hf_class)
    fields = {**_size_fields({f.name for f in dataclasses.fields(config_class)}, r, dropout), **_method_fields(method, r)}
    model = peft.get_peft_model(model, config_class(**fields, **preset, **shared))
    if method == "lora_fa":
        return model, peft.optimizers.create_lorafa_optimizer(model, r=r, lora_alpha=2 * r, lr=1e-4), None
    if method == "loraplus":
        optimizer = peft.optimizers.create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-4, loraplus_lr_ratio=LORAPLUS_RATIO)
        return model, optimizer, None
    hooks = HfAdaLoraAllocation(model) if method == "adalora" else None
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4), hooks


class HfAdaLoraAllocation:
    """HF's AdaLoRA step work in HookRunner's shape: its regulariser is inside HF's forward (it has a
    task_type), its allocation is ``update_and_allocate`` after the optimizer step."""

    def __init__(self, model) -> None:
        self.model = model

    def on_step_begin(self, progress) -> None:
        pass

    def extra_loss(self, progress):
        return None

    def after_backward(self, progress) -> None:
        pass

    def after_optimizer_step(self, progress) -> None:
        self.model.base_model.update_and_allocate(progress.step)


def _size_fields(names, r: int, dropout: float) -> dict:
    """Rank, alpha = 2r and adapter dropout under the names a method's config has."""
    fields = {"r": r, "lora_alpha": 2 * r}
    fields = {k: v for k, v in fields.items() if k in names}
    fields.update({name: dropout for name in names if name.endswith("_dropout") and name != "module_dropout"})
    return fields


def step(model, optimizer, batch: dict, hooks=None, index: int = 0) -> None:
    """One training step, with the method's hooks at the points the training loop calls them."""
    if optimizer is None:  # the floor: backward to the input embeddings only
        embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
        out = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"])
        out.loss.backward()
        return
    if hooks is None:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return
    from peftlab.hooks import TrainingProgress

    progress = TrainingProgress(step=index, total_steps=TOTAL_STEPS, epoch=0.0)
    hooks.on_step_begin(progress)
    loss = model(**batch).loss
    extra = hooks.extra_loss(progress)
    (loss if extra is None else loss + extra).backward()
    hooks.after_backward(progress)
    optimizer.step()
    hooks.after_optimizer_step(progress)
    optimizer.zero_grad(set_to_none=True)


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child_memory(args) -> None:
    torch.set_num_threads(args.threads)
    base, causal = load_base(args.model)
    model, optimizer, hooks = build_variant(args.child, base, causal, args.targets, args.r, args.dropout)
    del base
    batch = make_batch(model, causal, args.batch, args.length)
    Path("/proc/self/clear_refs").write_text("5")
    before = _rss_kb("VmRSS")
    for index in range(3):  # the first step allocates the optimizer state: counted, as in training
        step(model, optimizer, batch, hooks, index)
    peak = _rss_kb("VmHWM")
    print(json.dumps({"variant": args.child, "peak_above_model_mb": (peak - before) / 1024, "peak_rss_mb": peak / 1024,
                      "saved_for_backward_mb": saved_for_backward_mb(model, optimizer, batch, hooks)}))


def saved_for_backward_mb(model, optimizer, batch: dict, hooks=None) -> float:
    """MB autograd keeps for backward over one training step's forward: each storage once, no parameters."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        step(model, optimizer, batch, hooks, index=3)
    return sum(storages.values()) / 2**20


def measure_memory(args, variants) -> dict:
    results = {}
    for name in variants:
        cmd = [sys.executable, __file__, "--child", name, "--model", args.model, "--targets", args.targets,
               "--batch", str(args.batch), "--length", str(args.length), "--threads", str(args.threads),
               *(["--r", str(args.r)] if args.r is not None else []),
               "--dropout", str(args.dropout)]
        # A fixed mmap threshold makes glibc hand freed blocks back to the OS, so RSS follows the
        # live tensors instead of the allocator's history (which otherwise differs run to run by GBs).
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])
    return results


def warmed_variant(name: str, base, causal: bool, batch: dict, args):
    """``build_variant`` for ``args``' workload, in training mode, after its ``args.warmup`` steps."""
    model, optimizer, hooks = build_variant(name, base, causal, args.targets, args.r, args.dropout)
    model.train()
    for index in range(args.warmup):
        step(model, optimizer, batch, hooks, index)
    return model, optimizer, hooks


def measure_time(args, variants) -> dict[str, list[float]]:
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    base, causal = load_base(args.model)
    batch = make_batch(base, causal, args.batch, args.length)
    built = {name: warmed_variant(name, base, causal, batch, args) for name in variants}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(args.steps):
        # Rotate the order each round so no variant always runs right after the same neighbour.
        order = variants[i % len(variants):] + variants[: i % len(variants)]
        for name in order:
            model, optimizer, hooks = built[name]
            start = clock()
            step(model, optimizer, batch, hooks, args.warmup + i)
            times[name].append(clock() - start)
        print(f"  round {i + 1}/{args.steps}", file=sys.stderr, end="\r")
    return times


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, adapters, batch and threads a variant steps with (this script's and ``step_profile.py``'s)."""
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--targets", default="query,value")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--r", type=int, default=None,
                        help="every adapter's rank (default: each method's lab default, as peftlab compare: 8, VeRA 256)")
    parser.add_argument("--dropout", type=float, default=0.0, help="the adapters' lora_dropout (default: 0)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(parser)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: process CPU time, robust to other load on a shared machine (use with --threads 1)")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-variant memory processes")
    parser.add_argument("--no-time", action="store_true", help="skip the interleaved timing")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.child:
        child_memory(args)
        return
    variants = args.variants.split(",")
    print(f"model {args.model}, targets {args.targets}, batch {args.batch} x {args.length}, r={args.r or 'lab defaults'}, "
          f"adapter dropout {args.dropout:g}, "
          f"{args.threads} threads, {args.steps} interleaved steps (median {args.clock} time)")
    times = {} if args.no_time else measure_time(args, variants)
    memory = {} if args.no_memory else measure_memory(args, variants)
    floor = statistics.median(times["floor"]) if "floor" in times else None
    print(f"\n{'variant':<18}{'median s/step':>14}{'x floor':>9}{'vs HF peft':>11}{'peak MB above model':>21}{'saved MB':>10}")
    for name in variants:
        med = statistics.median(times[name]) if name in times else None
        ratio = f"{med / floor:.2f}" if med and floor else "-"
        twin = name.replace("peftlab-", "hf-")
        vs_hf = f"{med / statistics.median(times[twin]):.2f}" if med and name.startswith("peftlab-") and twin in times else ""
        mem = f"{memory[name]['peak_above_model_mb']:.0f}" if name in memory else ""
        saved = f"{memory[name]['saved_for_backward_mb']:.1f}" if name in memory else ""
        print(f"{name:<18}{med or float('nan'):>14.3f}{ratio:>9}{vs_hf:>11}{mem:>21}{saved:>10}")


if __name__ == "__main__":
    main()
