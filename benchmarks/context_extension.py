"""Context extension with LongLoRA: SmolLM2-135M's RoPE interpolated 2x, perplexity on held-out Shakespeare.

The paper's claim to test (LongLoRA, Chen et al. 2023): fine-tuning with shifted sparse attention
(S²-Attn) reaches about the perplexity of full-attention fine-tuning, and plain LoRA needs the
trainable embeddings and norms to extend well. Five models, the trained ones with the same seed,
data order, steps, batch and learning rate, on the ``shakespeare`` text (train split for
training, the held-out last ~10% for perplexity):

    base            SmolLM2 as it is: its native positions (the reference)
    scaled          RoPE interpolated by --rope-scale (2), untrained: what the extension costs at first
    longlora        S²-Attn, LoRA r 8 on q,k,v,o + embeddings + norms (the paper's recipe, `--method longlora`)
    longlora-full   the same trainable set with full attention (isolates S²-Attn)
    lora-full       full attention, LoRA on q,k,v,o only (the paper's plain-LoRA baseline)

Perplexity is measured at each --eval-lengths length (default: the training length L, the
"original" length of this setting, and 2L, the "extended" one), on --eval-windows windows of
held-out text each.

Full size, on a GPU: SmolLM2's native context is 8192 tokens (max_position_embeddings), so a 2x
extension trains at 16384 and compares 8192 with 16384:

    python benchmarks/context_extension.py --train-length 16384 --eval-lengths 8192,16384 --steps 1000 --device cuda

CPU size (the default): the same 2x RoPE interpolation, 150 steps of one 512-token window each
(77k tokens; the paper trains 1000 steps of 64 x 8192), evaluated at 512 and 1024. Measured here:
a LongLoRA step at L = 512 takes 3.6 s of one-thread CPU time, a 1024-token evaluation window 2.8 s,
so the whole script takes about half an hour on 2 quiet cores. Both lengths are far inside the 8192 tokens
SmolLM2 was trained at, so these numbers do NOT show perplexity beyond the native context. What
they show: how much the 2x position compression (the step that lets a model reach twice its
context) costs the model ("scaled" vs "base"), how much each fine-tuning wins back within the same
budget, and whether S²-Attn training gets as far as full attention. S²-Attn's group size is the
paper's L/4 at the training length (here G = 128; the method's default, 1/4 of the extended
context, would be 4096 and leave a 512-token run full attention); the run prints G.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

RUNS = ("longlora", "longlora-full", "lora-full")


def train(args, name: str, out: Path, group_ratio: float) -> dict:
    from peftlab.train import TrainOptions, run_training

    options = dict(
        model=args.model, task="causal-lm", dataset=args.dataset, max_length=args.train_length, method="longlora",
        rope_scale=args.rope_scale, s2_group_size_ratio=group_ratio if name == "longlora" else 1.0,
        max_steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr, seed=args.seed,
        max_eval_samples=1, log_every=max(1, args.steps // 10), device=args.device, out=str(out), overwrite=True,
        method_options={"modules_to_save": []} if name == "lora-full" else {},
    )
    return run_training(TrainOptions(**options))


def perplexities(args, model, tokenizer, text: str) -> dict[int, float]:
    from peftlab.perplexity import perplexity

    model.eval()
    return {length: perplexity(model, tokenizer, text, length, max_windows=args.eval_windows, seed=args.seed).perplexity
            for length in args.eval_lengths}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dataset", default="shakespeare", help="a text alias or .txt file (train/held-out split)")
    parser.add_argument("--rope-scale", type=float, default=2.0, help="the context extension factor")
    parser.add_argument("--train-length", type=int, default=512, help="tokens per training window (the paper's L)")
    parser.add_argument("--eval-lengths", help="comma-separated context lengths to score (default: L and 2L)")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--lr", type=float, default=2e-4, help="the longlora method's default")
    parser.add_argument("--eval-windows", type=int, default=16, help="held-out windows scored per length")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--out", help="folder for the adapters and results.json (default: a temporary folder)")
    args = parser.parse_args()
    args.eval_lengths = ([int(v) for v in args.eval_lengths.split(",")] if args.eval_lengths
                         else [args.train_length, 2 * args.train_length])
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)

    from peftlab import PeftModel, get_peft_model
    from peftlab.assets import load_model_and_tokenizer
    from peftlab.methods.longlora import LongLoraConfig
    from peftlab.methods.s2_attention import group_size
    from peftlab.perplexity import read_text_split

    out = Path(args.out or tempfile.mkdtemp(prefix="context-extension-"))
    base, tokenizer = load_model_and_tokenizer(args.model, "causal-lm")
    native = base.config.max_position_embeddings
    extended = round(native * args.rope_scale)
    # The paper's G = L/4 at the length it trains at: as a fraction of the extended context, the method's unit.
    group_ratio = args.train_length / 4 / extended
    print(f"{args.model}: native context {native}, RoPE x{args.rope_scale:g} -> {extended}; training at "
          f"L = {args.train_length}, S²-Attn G = {group_size(extended, group_ratio)}; {args.steps} steps of "
          f"{args.batch_size * args.grad_accum} window(s), lr {args.lr:g}; perplexity on {args.eval_windows} held-out "
          f"windows at {', '.join(map(str, args.eval_lengths))}; {args.threads} threads; load {os.getloadavg()[0]:.1f}",
          flush=True)
    text = read_text_split(args.dataset)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")

    results = {"base": {"perplexity": perplexities(args, base.to(device), tokenizer, text)}}
    scaled = get_peft_model(base, LongLoraConfig(rope_scale=args.rope_scale, modules_to_save=[], task_type="CAUSAL_LM"))
    results["scaled"] = {"perplexity": perplexities(args, scaled, tokenizer, text)}  # B = 0: the scaled base
    del scaled, base
    for name in RUNS:
        start = time.perf_counter()
        metrics = train(args, name, out / name, group_ratio)
        model, _ = load_model_and_tokenizer(args.model, "causal-lm")
        adapted = PeftModel.from_pretrained(model, out / name).to(device)
        results[name] = {"perplexity": perplexities(args, adapted, tokenizer, text),
                         "train_time_s": metrics["train_time_s"], "trainable_params": metrics["trainable_params"],
                         "wall_s": time.perf_counter() - start}
        print(f"{name}: {results[name]}", flush=True)
        del model, adapted

    header = "".join(f"{'ppl@' + str(n):>12}" for n in args.eval_lengths)
    print(f"\n{'model':<15}{header}{'trainable':>12}{'train s':>10}")
    for name, row in results.items():
        cells = "".join(f"{row['perplexity'][n]:>12.2f}" for n in args.eval_lengths)
        print(f"{name:<15}{cells}{row.get('trainable_params', 0):>12,}{row.get('train_time_s', 0):>10.0f}")
    settings = {k: v for k, v in vars(args).items()} | {"native_context": native, "extended_context": extended,
                                                        "group_size": group_size(extended, group_ratio)}
    (out / "results.json").write_text(json.dumps({"settings": settings, "results": results}, indent=1))
    print(f"\nresults: {out / 'results.json'}")


if __name__ == "__main__":
    sys.exit(main())
