"""How long ``peftlab export --to gguf --verify`` takes on SmolLM2-135M, and where the time goes (issue 23: <= 60 s).

    python benchmarks/gguf_export_time.py --work /tmp/gguf-time [--mode lora|merged] [--repeats 1]

Trains a LoRA adapter once (4 steps, reused when <work>/runs/lora exists), then times the whole
export + verify in this process the way the CLI runs it (model load included), with each stage
timed by wrapping the functions that do it: the peftlab reference (greedy generation + logits),
writing the GGUF files, llama.cpp loading, llama.cpp's batched logits and its greedy decoding.
Prints one JSON line per repeat with the load average beside it; the machine is shared, so run it
when it is quiet for the figure that counts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from functools import wraps
from pathlib import Path

STAGES: dict[str, float] = defaultdict(float)


def timed(owner, name: str, stage: str) -> None:
    function = getattr(owner, name)

    @wraps(function)
    def wrapper(*args, **kwargs):
        started = time.monotonic()
        try:
            return function(*args, **kwargs)
        finally:
            STAGES[stage] += time.monotonic() - started

    setattr(owner, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--mode", choices=["lora", "merged"], default="lora")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    adapter = args.work / "runs" / "lora"
    if not (adapter / "adapter_config.json").exists():
        subprocess.run([sys.executable, "-m", "peftlab", "train", "--model", "smollm2-135m", "--task", "causal-lm",
                        "--dataset", "shakespeare", "--method", "lora", "--max-steps", "4", "--batch-size", "2",
                        "--max-length", "48", "--max-eval-samples", "4", "--lr", "3e-3", "--seed", "0", "--out",
                        str(adapter)], check=True, stdout=subprocess.DEVNULL)

    from peftlab.gguf_export import exporter, verify, writer
    from peftlab.gguf_export.exporter import export_gguf
    from peftlab.train.build import load_trained

    timed(exporter, "peftlab_reference", "peftlab reference")
    timed(exporter, "write_model_gguf", "write GGUF model")
    timed(exporter, "write_lora_gguf", "write GGUF LoRA")
    timed(verify.Engine, "__init__", "llama.cpp load")
    timed(verify.Engine, "logits", "llama.cpp batched logits")
    timed(verify.Engine, "greedy", "llama.cpp greedy decoding")
    for repeat in range(args.repeats):
        STAGES.clear()
        out = args.work / f"export-{args.mode}"
        shutil.rmtree(out, ignore_errors=True)
        started = time.monotonic()
        model, tokenizer = load_trained("smollm2-135m", str(adapter), "causal-lm")
        STAGES["load the adapter"] = time.monotonic() - started
        from peftlab.assets import resolve_gguf

        result = export_gguf(model, tokenizer, out, mode=args.mode, verify=True, reference_gguf=resolve_gguf("smollm2-135m"))
        total = time.monotonic() - started
        print(json.dumps({"repeat": repeat, "mode": args.mode, "seconds_total": round(total, 1),
                          "stages": {k: round(v, 1) for k, v in STAGES.items()},
                          "prompts": result.parity["generations"], "positions": result.parity["positions"],
                          "load_average": os.getloadavg()}), flush=True)


if __name__ == "__main__":
    main()
