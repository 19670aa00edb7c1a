"""Seconds to initialise a LoRA adapter, per ``init_lora_weights``, peftlab side by side with HF peft.

SmolLM2-135M, all linear layers, r = 16, alpha = 32, float32 on the CPU (or --device). Timed:
``get_peft_model`` on a fresh copy of the base (the copy is not timed), plus for EVA
``initialize_lora_eva_weights`` and for CorDA ``preprocess_corda``, both on the same batches of
held-out Shakespeare (batches of one sequence: HF's CorDA needs them). HF's LoftQ hard-codes a
CUDA/XPU device; on a CPU it runs HF's own ``loftq_init`` with that one line pointed at the CPU (as
the tests do).

The two sides are interleaved so that a change in the machine's load hits both alike: each repeat
runs both, in turns (peftlab first on even repeats, HF first on odd ones), after one untimed warm-up
of each (the first call pays for imports and lazy initialisation: HF's first ``get_peft_model``
imports torch._inductor). Printed per init: the median and the fastest of --repeats runs of each
side, and the ratio of the medians (peftlab / HF; below 1: peftlab faster), with the load average
before and after. On a shared machine the medians move with the load; rerun it on a quiet one. Under
load, torch's two OpenMP threads wait on each other (a 16x16 QR took 26 ms in both libraries at load 8),
which swamps the inits' own cost; ``OMP_NUM_THREADS=1`` keeps a loaded run comparable:

    PYTHONPATH=src python benchmarks/lora_init.py --repeats 5
    PYTHONPATH=src python benchmarks/lora_init.py --inits pissa olora loftq --repeats 5
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/lora_init.py --repeats 3   # on a busy machine
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import inspect
import os
import statistics
import textwrap
import time
import warnings

import torch

INITS = ["True", "gaussian", "orthogonal", "pissa", "pissa_niter_4", "olora", "loftq", "eva", "corda"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # all linear but the head


def _value(name: str):
    return True if name == "True" else name


def _hf_loftq_on(device: str):
    import peft.tuners.lora.layer as hf_layer
    import peft.utils.loftq_utils as hf_loftq

    source = textwrap.dedent(inspect.getsource(hf_loftq.loftq_init)).replace("@torch.no_grad()\n", "")
    source = source.replace('compute_device = "xpu" if is_xpu_available() else "cuda"', f'compute_device = "{device}"')
    namespace = dict(vars(hf_loftq))
    exec(compile(source, hf_loftq.__file__, "exec"), namespace)
    hf_layer.loftq_init = torch.no_grad()(namespace["loftq_init"])


def _batches(tokenizer, device, count: int, length: int) -> list[dict[str, torch.Tensor]]:
    from peftlab.perplexity import read_text_split

    ids = tokenizer(read_text_split("shakespeare"), return_tensors="pt").input_ids[0]
    return [{"input_ids": ids[i * length:(i + 1) * length][None].to(device),
             "attention_mask": torch.ones(1, length, dtype=torch.long, device=device)} for i in range(count)]


def _peftlab(base, init: str, batches):
    import peftlab
    from peftlab.methods.lora_init.corda import preprocess_corda

    value = _value(init)
    config = peftlab.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=value,
                                loftq_config=peftlab.LoftQConfig() if value == "loftq" else {},
                                eva_config=peftlab.EvaConfig() if value == "eva" else None,
                                corda_config=peftlab.CordaConfig() if value == "corda" else None)
    if value == "corda":
        preprocess_corda(base, config, run_model=lambda: [base(**b) for b in batches])
    model = peftlab.get_peft_model(base, config)
    if value == "eva":
        peftlab.initialize_lora_eva_weights(model, batches, show_progress_bar=False)


def _hf(base, init: str, batches):
    import peft
    import peft.tuners.lora.config as hf_config
    import peft.tuners.lora.corda as hf_corda

    value = _value(init)
    find_spec = importlib.util.find_spec
    importlib.util.find_spec = lambda name, *a: object() if name == "scipy" else find_spec(name, *a)
    try:  # HF's LoraConfig asks for scipy with LoftQ and never uses it
        config = peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=value,
                                 loftq_config=peft.LoftQConfig() if value == "loftq" else {},
                                 eva_config=peft.EvaConfig() if value == "eva" else None,
                                 corda_config=hf_config.CordaConfig() if value == "corda" else None)
    finally:
        importlib.util.find_spec = find_spec
    if value == "corda":
        hf_corda.preprocess_corda(base, config, run_model=lambda: [base(**b) for b in batches])
    model = peft.get_peft_model(base, config)
    if value == "eva":
        peft.initialize_lora_eva_weights(model, batches, show_progress_bar=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--inits", nargs="+", default=INITS, choices=INITS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, default=16, help="sequences of --length tokens for EVA and CorDA")
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    if args.device == "cpu":
        _hf_loftq_on("cpu")
    from peftlab.assets import load_model_and_tokenizer

    base, tokenizer = load_model_and_tokenizer(args.model, "causal-lm")
    base = base.float().to(args.device).eval()
    batches = _batches(tokenizer, args.device, args.batches, args.length)
    sides = {"peftlab": _peftlab, "hf": _hf}
    for run in sides.values():  # warm-up, untimed: imports and lazy initialisation
        _timed(run, base, "True", batches)
    print(f"{args.model}, all linear r=16, {args.device}, {torch.get_num_threads()} threads; {args.repeats} runs "
          f"per side, interleaved; load average {_load()} (s)")
    print(f"{'init':<15}{'peftlab':>10}{'(min)':>8}{'HF peft':>10}{'(min)':>8}{'ratio':>8}")
    for init in args.inits:
        times: dict[str, list[float]] = {name: [] for name in sides}
        for repeat in range(args.repeats):
            for name in (list(sides) if repeat % 2 == 0 else list(reversed(sides))):
                times[name].append(_timed(sides[name], base, init, batches))
        ours, theirs = (statistics.median(times[name]) for name in sides)
        print(f"{init:<15}{ours:>10.3f}{min(times['peftlab']):>8.3f}{theirs:>10.3f}{min(times['hf']):>8.3f}"
              f"{ours / theirs:>8.2f}", flush=True)
    print(f"load average after: {_load()}")


def _timed(run, base, init: str, batches) -> float:
    """Seconds of one init on a fresh copy of ``base`` (the copy is not timed)."""
    model = copy.deepcopy(base)
    gc.collect()
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.no_grad() if init in ("eva", "corda") else torch.enable_grad():
        run(model, init, batches)
    return time.perf_counter() - start


def _load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


if __name__ == "__main__":
    main()
