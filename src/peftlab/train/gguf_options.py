"""The ``peftlab export --to gguf`` flags and their run (kept apart so ExportCommand stays small)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from peftlab.assets import notice


def add_gguf_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("--to gguf (llama.cpp / Ollama)")
    group.add_argument("--mode", choices=["lora", "merged"], default="lora",
                       help="lora: a llama.cpp LoRA GGUF on the base's GGUF (exact for plain-LoRA updates); merged: one "
                            "GGUF of the model with the adapter folded in (DoRA, MoRA, LongLoRA, trained embeddings)")
    group.add_argument("--dtype", choices=["f32", "f16", "bf16", "q8_0"], default="f32",
                       help="storage of the written matrices (q8_0: --mode merged only) (default: f32)")
    group.add_argument("--base-gguf", metavar="FILE",
                       help="your GGUF of the base model (checked to hold the adapter's base weights); default: written")
    group.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                       help="run the export in llama.cpp and compare with the trained model; writes parity.json "
                            "(default: on when llama_cpp is installed)")
    group.add_argument("--verify-prompts", metavar="FILE", help="more prompts for --verify, one per line")


GGUF_DEFAULTS = {"mode": "lora", "dtype": "f32", "base_gguf": None, "verify": None, "verify_prompts": None}


def refuse_gguf_flags(args: argparse.Namespace) -> None:
    """--to lora with a --to gguf flag: refused rather than ignored."""
    from peftlab.train.options import OptionsError

    given = [name for name, default in GGUF_DEFAULTS.items() if getattr(args, name) != default]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise OptionsError(f"{flags} apply to --to gguf; this export is --to {args.to}.")


def run_gguf_export(args: argparse.Namespace, out: Path, loaded) -> int:
    from peftlab.assets import resolve_gguf
    from peftlab.gguf_export import export_gguf

    if args.rank is not None or args.max_rank is not None:
        from peftlab.train.options import OptionsError

        raise OptionsError("--rank and --max-rank apply to --to lora; a GGUF export is exact (or use --mode merged).")
    model_name, model, tokenizer = loaded
    result = export_gguf(
        model, tokenizer, out, mode=args.mode, dtype=args.dtype, base_gguf=args.base_gguf, verify=args.verify,
        prompts_file=args.verify_prompts, reference_gguf=resolve_gguf(model_name), overwrite=args.overwrite,
    )
    notice(f"exported {args.adapter} as GGUF ({args.mode}, {args.dtype}) to {out} in {result.seconds:.1f} s: {result.fidelity}")
    if result.parity is not None:
        p = result.parity
        print(json.dumps({k: p[k] for k in ("positions", "top1_agreement", "max_relative_logit_diff", "generations",
                                            "generations_identical", "effect_relative_diff", "base_top1_agreement", "passed")}, indent=1))
    return 0
