"""Seconds to initialise a LoRA adapter, per ``init_lora_weights``, peftlab side by side with HF peft.

SmolLM2-135M, all linear layers, r = 16, alpha = 32, float32 on the CPU (or --device). Timed:
``get_peft_model`` on a fresh copy of the base (the copy is not timed), plus for EVA
``initialize_lora_eva_weights`` and for CorDA ``preprocess_corda``, both on the same batches of
held-out Shakespeare (batches of one sequence: HF's CorDA needs them). Medians of --repeats runs,
the two libraries alternating. HF's LoftQ hard-codes a CUDA/XPU device; on a CPU it runs HF's own
``loftq_init`` with that one line pointed at the CPU (as the tests do).

    python benchmarks/lora_init.py
    python benchmarks/lora_init.py --inits pissa olora loftq --repeats 5
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import inspect
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
    parser.add_argument("--repeats", type=int, default=3)
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
    print(f"{args.model}, all linear r=16, {args.device}, {torch.get_num_threads()} threads; median of {args.repeats} runs (s)")
    print(f"{'init':<15}{'peftlab':>10}{'HF peft':>10}{'ratio':>8}")
    for init in args.inits:
        times = {"peftlab": [], "hf": []}
        for _ in range(args.repeats):
            for name, run in (("peftlab", _peftlab), ("hf", _hf)):
                copy_ = copy.deepcopy(base)
                torch.manual_seed(0)
                start = time.perf_counter()
                with torch.no_grad() if init in ("eva", "corda") else torch.enable_grad():
                    run(copy_, init, batches)
                times[name].append(time.perf_counter() - start)
                del copy_
        ours, theirs = statistics.median(times["peftlab"]), statistics.median(times["hf"])
        print(f"{init:<15}{ours:>10.3f}{theirs:>10.3f}{ours / theirs:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
