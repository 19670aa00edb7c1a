"""QLoRA on CPU: storage, model size, training-step memory and time; peftlab vs HF peft + bitsandbytes.

Storage: bits per parameter of the quantized layers, summed from the tensors each library keeps
(peftlab: packed codes and double-quantized statistics; bitsandbytes: the same plus the code
tables each layer's quant state holds; a tensor shared by several layers counts once).

Size: the whole model in memory (parameters, buffers, quant states; tied tensors once) and on
disk (safetensors files: ``save_pretrained`` for fp32 and bitsandbytes, ``save_model`` of the
state dict for peftlab's 4-bit model), against the fp32 model.

Step memory: each variant alone in a fresh child process (glibc's mmap threshold fixed, as in
``train_step.py``); after the first step (which allocates the optimizer state) the RSS high-water
mark is reset (``/proc/self/clear_refs``), then two more steps. Reported: the RSS then ("ready": model, adapter, optimizer state), and the peak during the steps.

Step time (forward, loss, backward, AdamW step): medians over interleaved steps, two ways.
In one process, all variants built side by side and stepped round-robin (machine noise hits all
alike). bitsandbytes' CPU kernels are OpenMP code next to torch's: were they two runtimes, each
pool's spin-waiting threads could steal the cores the other needs (here bitsandbytes' libgomp.so.1
resolves to the copy torch bundles, one runtime). The separate-process figures (each variant alone
in a child, the children alternating for ``--rounds`` rounds) show whether sharing a process
distorts the comparison.

Dequantisation throughput: ``nf4_codec.bench_codec`` on the model's own weight shapes.

    python benchmarks/qlora.py                                        # everything, SmolLM2-135M steps
    python benchmarks/qlora.py --sections time --batch 4 --length 64 --steps 5
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import transformers
from torch import nn

import nf4_codec
import train_step
from peftlab.quant import Linear4bit, model_size_bytes, quantize_model

VARIANTS = ("peftlab-lora", "peftlab-qlora", "hf-lora", "hf-qlora")
SECTIONS = ("storage", "memory", "time", "codec")
SIZE_MODELS = ("minilm-l6", "smollm2-135m")
#: wall: elapsed time; cpu: this process's CPU time, which other load on a shared machine disturbs far
#: less (with --threads 1; spin-waiting threads still count, so a pool conflict still shows).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


# -- building ------------------------------------------------------------------------------------


def load_hf_4bit(model_name: str) -> nn.Module:
    """The model as HF users load it for QLoRA: transformers quantizes with bitsandbytes while loading."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, BitsAndBytesConfig

    from peftlab.assets import resolve_model

    path = resolve_model(model_name)
    causal = any(a.endswith("ForCausalLM") for a in (AutoConfig.from_pretrained(path).architectures or []))
    cls, extra = (AutoModelForCausalLM, {}) if causal else (AutoModelForSequenceClassification, {"num_labels": 2})
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    return cls.from_pretrained(path, quantization_config=config, device_map="cpu", dtype=torch.float32, **extra)


def build_variant(name: str, model_name: str, r: int, dense: nn.Module | None = None):
    """(model, optimizer) ready to step: LoRA on every linear layer of the blocks, r and alpha = 2r."""
    library, method = name.split("-")
    if method == "qlora" and library == "hf":
        model = load_hf_4bit(model_name)
    else:
        model = copy.deepcopy(dense) if dense is not None else train_step.load_base(model_name)[0]
        if method == "qlora":
            quantize_model(model)
    task = "CAUSAL_LM" if "ForCausalLM" in type(model).__name__ else "SEQ_CLS"
    options = dict(r=r, lora_alpha=2 * r, target_modules="all-linear", task_type=task)
    if library == "peftlab":
        import peftlab

        model = peftlab.get_peft_model(model, peftlab.LoraConfig(**options))
    else:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(**options))
    model.train()
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


# -- storage and size ----------------------------------------------------------------------------


def _unique_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        if t is not None:
            seen[(t.data_ptr(), t.numel(), t.dtype)] = t.numel() * t.element_size()
    return sum(seen.values())


def _bnb_state_tensors(state) -> list[torch.Tensor]:
    parts = [state.absmax, state.code, state.offset]
    if state.state2 is not None:
        parts += [state.state2.absmax, state.state2.code]
    return [t for t in parts if isinstance(t, torch.Tensor)]


def ours_layer_stats(model: nn.Module) -> tuple[int, float]:
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    values = sum(m.in_features * m.out_features for m in layers)
    stored = _unique_bytes(t for m in layers for t in [m.packed, *(getattr(m, n) for n in m._stat_names())])
    return len(layers), 8 * stored / values


def _bnb_quantized(model: nn.Module) -> list[nn.Module]:
    """bitsandbytes layers that hold a 4-bit weight (a head transformers initialised fresh stays fp32)."""
    import bitsandbytes as bnb

    return [m for m in model.modules()
            if isinstance(m, bnb.nn.Linear4bit) and getattr(m.weight, "quant_state", None) is not None]


def bnb_layer_stats(model: nn.Module) -> tuple[int, float, float]:
    """(layers, bits/param with each layer's code tables, bits/param without them)."""
    layers = _bnb_quantized(model)
    values = sum(m.in_features * m.out_features for m in layers)
    states = [m.weight.quant_state for m in layers]
    codes = _unique_bytes(t for s in states for t in (s.code, s.state2.code if s.state2 is not None else None))
    stored = _unique_bytes([m.weight.data for m in layers] + [t for s in states for t in _bnb_state_tensors(s)])
    return len(layers), 8 * stored / values, 8 * (stored - codes) / values


def bnb_model_bytes(model: nn.Module) -> int:
    states = [m.weight.quant_state for m in _bnb_quantized(model)]
    return _unique_bytes(list(model.parameters()) + list(model.buffers()) + [t for s in states for t in _bnb_state_tensors(s)])


def _disk_bytes(folder: str) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def bench_storage(model_name: str) -> None:
    from safetensors.torch import save_model

    dense, _ = train_step.load_base(model_name)
    with tempfile.TemporaryDirectory() as tmp:
        dense.save_pretrained(f"{tmp}/fp32")
        sizes = {"fp32": (model_size_bytes(dense), _disk_bytes(f"{tmp}/fp32"))}
        ours = quantize_model(copy.deepcopy(dense))
        os.makedirs(f"{tmp}/ours")
        save_model(ours, f"{tmp}/ours/model.safetensors")
        sizes["peftlab nf4"] = (model_size_bytes(ours), _disk_bytes(f"{tmp}/ours"))
        theirs = load_hf_4bit(model_name)
        theirs.save_pretrained(f"{tmp}/bnb")
        sizes["bitsandbytes nf4"] = (bnb_model_bytes(theirs), _disk_bytes(f"{tmp}/bnb"))
    n_ours, bits_ours = ours_layer_stats(ours)
    n_bnb, bits_bnb, bits_bnb_no_codes = bnb_layer_stats(theirs)
    print(f"\n{model_name}: quantized layers: peftlab {n_ours}, bitsandbytes {n_bnb}")
    print(f"  bits per parameter of those layers: peftlab {bits_ours:.3f}; bitsandbytes {bits_bnb:.3f} "
          f"({bits_bnb_no_codes:.3f} without the code tables each layer's quant state holds)")
    fp32_mem, fp32_disk = sizes["fp32"]
    print(f"  {'':<18}{'in memory':>12}{'x fp32':>8}{'on disk':>12}{'x fp32':>8}")
    for label, (mem, disk) in sizes.items():
        print(f"  {label:<18}{mem / 2**20:>9.1f} MiB{mem / fp32_mem:>8.3f}{disk / 2**20:>9.1f} MiB{disk / fp32_disk:>8.3f}")


# -- step memory and time ------------------------------------------------------------------------


def make_batch(model: nn.Module, args) -> dict:
    return train_step.make_batch(model, "ForCausalLM" in type(model).__name__, args.batch, args.length)


def child_memory(args) -> dict:
    model, optimizer = build_variant(args.child, args.model, args.r)
    batch = make_batch(model, args)
    train_step.step(model, optimizer, batch)  # allocates the optimizer state: counted, as in training
    Path("/proc/self/clear_refs").write_text("5")
    ready = train_step._rss_kb("VmRSS")
    for _ in range(2):
        train_step.step(model, optimizer, batch)
    return {"rss_ready_mb": ready / 1024, "peak_rss_mb": train_step._rss_kb("VmHWM") / 1024}


def child_time(args) -> dict:
    model, optimizer = build_variant(args.child, args.model, args.r)
    batch = make_batch(model, args)
    for _ in range(args.warmup):
        train_step.step(model, optimizer, batch)
    clock, times = CLOCKS[args.clock], []
    for _ in range(args.steps):
        start = clock()
        train_step.step(model, optimizer, batch)
        times.append(clock() - start)
    return {"times": times}


def run_child(args, variant: str, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--child-mode", mode, "--model", args.model,
           "--batch", str(args.batch), "--length", str(args.length), "--r", str(args.r), "--threads", str(args.threads),
           "--steps", str(args.child_steps), "--warmup", str(args.warmup), "--clock", args.clock]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}  # sizes torch's and bitsandbytes' pools alike
    if mode == "memory":
        # As train_step.py: a fixed mmap threshold makes glibc give freed blocks back, so RSS follows the
        # live tensors rather than the allocator's history.
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def in_process_times(args, variants: list[str]) -> dict[str, list[float]]:
    dense, _ = train_step.load_base(args.model)
    built = {name: build_variant(name, args.model, args.r, dense) for name in variants}
    batch = make_batch(dense, args)
    del dense
    for model, optimizer in built.values():
        for _ in range(args.warmup):
            train_step.step(model, optimizer, batch)
    clock, times = CLOCKS[args.clock], {name: [] for name in variants}
    for i in range(args.steps):
        for name in variants[i % len(variants):] + variants[: i % len(variants)]:  # rotate the order
            start = clock()
            train_step.step(*built[name], batch)
            times[name].append(clock() - start)
        print(f"  in-process round {i + 1}/{args.steps}", file=sys.stderr, end="\r")
    return times


def separate_process_times(args, variants: list[str]) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(args.rounds):
        for name in variants[i % len(variants):] + variants[: i % len(variants)]:
            times[name] += run_child(args, name, "time")["times"]
        print(f"  separate-process round {i + 1}/{args.rounds}", file=sys.stderr, end="\r")
    return times


def bench_steps(args, variants: list[str], sections: list[str]) -> None:
    print(f"\nSteps on {args.model}: LoRA r={args.r} on all linear layers, batch {args.batch} x {args.length} tokens, "
          f"{args.threads} threads, median {args.clock} time")
    memory = {name: run_child(args, name, "memory") for name in variants} if "memory" in sections else {}
    together = in_process_times(args, variants) if "time" in sections else {}
    apart = separate_process_times(args, variants) if "time" in sections else {}

    def median(times: dict, name: str) -> float | None:
        return statistics.median(times[name]) if times.get(name) else None

    def cell(value: float | None, fmt: str) -> str:
        return format(value, fmt) if value is not None else "-"

    base = {"together": median(together, "peftlab-lora"), "apart": median(apart, "peftlab-lora")}
    print(f"\n{'variant':<15}{'s/step 1 proc':>14}{'x LoRA':>8}{'s/step apart':>14}{'x LoRA':>8}"
          f"{'RSS ready MB':>14}{'peak RSS MB':>13}")
    for name in variants:
        t1, t2 = median(together, name), median(apart, name)
        r1 = t1 / base["together"] if t1 and base["together"] else None
        r2 = t2 / base["apart"] if t2 and base["apart"] else None
        mem = memory.get(name, {})
        print(f"{name:<15}{cell(t1, '.3f'):>14}{cell(r1, '.2f'):>8}{cell(t2, '.3f'):>14}{cell(r2, '.2f'):>8}"
              f"{cell(mem.get('rss_ready_mb'), '.0f'):>14}{cell(mem.get('peak_rss_mb'), '.0f'):>13}")
    for label, times in (("in one process", together), ("in separate processes", apart)):
        ours, theirs = median(times, "peftlab-qlora"), median(times, "hf-qlora")
        if ours and theirs:
            print(f"  peftlab QLoRA / HF peft + bitsandbytes QLoRA {label}: {ours / theirs:.2f}")
    for label, times in (("in one process", together), ("in separate processes", apart)):
        if times:
            print(f"  step times {label}: " + "; ".join(f"{n} " + " ".join(f"{t:.2f}" for t in times[n]) for n in variants))


def bench_codec(args) -> None:
    """Dequantisation throughput on the model's own weight shapes, by the codec benchmark."""
    dense, _ = train_step.load_base(args.model)
    shapes = sorted({(m.out_features, m.in_features) for m in quantize_model(dense).modules() if isinstance(m, Linear4bit)})
    print(f"\nNF4 codec on {args.model}'s weight shapes (benchmarks/nf4_codec.py, each library in its own process):")
    for shape in shapes:
        nf4_codec.bench_codec(shape, args.codec_repeats, args.rounds, True, args.threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="model for the step and codec figures")
    parser.add_argument("--size-models", default=",".join(SIZE_MODELS))
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"any of {', '.join(SECTIONS)}")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="interleaved timed steps per variant in one process")
    parser.add_argument("--child-steps", type=int, default=3, help="timed steps per child process and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--codec-repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall", help="step timer (cpu: use with --threads 1)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()  # load reports and progress bars would bury the figures
    transformers.utils.logging.disable_progress_bar()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # read by bitsandbytes' OpenMP runtime when it loads
    torch.set_num_threads(args.threads)
    if args.child:
        result = child_memory(args) if args.child_mode == "memory" else child_time(args)
        print(json.dumps(result))
        return
    sections = args.sections.split(",")
    print(f"torch {torch.__version__}, {args.threads} threads, load average at start {os.getloadavg()[0]:.2f}")
    if "storage" in sections:
        for model_name in args.size_models.split(","):
            bench_storage(model_name)
    if "memory" in sections or "time" in sections:
        bench_steps(args, args.variants.split(","), sections)
    if "codec" in sections:
        bench_codec(args)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
