"""GGUF export parity in llama.cpp, per method, on SmolLM2-135M (issue 23's goals table).

    python benchmarks/gguf_parity.py --work /tmp/gguf-parity [--methods lora,dora] [--steps 4] [--lr 3e-3]

For each method: a short training run on SmolLM2-135M (all-linear, shakespeare), then
`peftlab export --to gguf --verify` with 24 more prompts (32 in all, to pass 2,000 positions):
  * LoRA-exact methods: --mode lora with an f32 base, an f16 base, and the alias's original Q4_1
    GGUF as --base-gguf;
  * DoRA, MoRA, LongLoRA, QLoRA: --mode merged --dtype f32.
Each export's parity.json and its wall time are collected into <work>/table.md and table.json.
Runs are reused when their folder exists, so an interrupted table resumes. Each step runs the CLI in
its own process with OMP_NUM_THREADS=1 (on a shared 2-core machine a second torch thread is slower).
Methods that barely move the model in 4 steps (VeRA, AdaLoRA, dora_rank: 0-2 changed top-1 tokens)
are measured with a longer run (e.g. --steps 40 --lr 1e-2), so that their effect exceeds an f16 or
Q4_1 base's rounding; the table's "trained" column says how each adapter was trained.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

LORA_METHODS = ["lora", "rslora", "lora_fa", "loraplus", "vera", "adalora", "dylora", "dora_rank", "delta_lora"]
MERGED_METHODS = ["dora", "mora", "longlora", "qlora"]
#: Options a 4-step run needs (schedules that otherwise start after the run ends).
METHOD_FLAGS = {
    "adalora": ["--tinit", "1", "--tfinal", "1"],
    "delta_lora": ["--delta-start-step", "1"],
    "longlora": ["--rope-scale", "2"],
}
EXTRA_PROMPTS = [
    "Describe a busy market on a Saturday morning.", "What is photosynthesis?", "Write a limerick about a cat.",
    "Explain how a bicycle stays upright.", "What should I pack for a weekend hiking trip?",
    "Give a short biography of William Shakespeare.", "How do vaccines work?", "Write two lines of a sonnet about the sea.",
    "What is the Pythagorean theorem?", "Suggest a name for a bakery and explain it.",
]


def run(command: list[str], log: Path) -> float:
    started = time.monotonic()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:  # the CLI's last line says why (e.g. the parity check's refusal)
        lines = [line for line in log.read_text().splitlines() if line.strip()]
        raise RuntimeError(f"{lines[-1] if lines else 'no output'} (exit {code}; see {log})")
    return time.monotonic() - started


def peftlab(*args: str) -> list[str]:
    return [sys.executable, "-m", "peftlab", *args]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--methods", default=",".join(LORA_METHODS + MERGED_METHODS))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--lr", default="3e-3")
    parser.add_argument("--bases", default="f32,f16,q4_1", help="LoRA-mode bases to verify on")
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    prompts = work / "prompts.txt"
    from peftlab.gguf_export.verify import MORE_PROMPTS

    prompts.write_text("\n".join([*MORE_PROMPTS, *EXTRA_PROMPTS]) + "\n")  # 32 prompts with the built-in 8
    from peftlab.assets import resolve_gguf

    q4_1 = resolve_gguf("smollm2-135m")
    rows = json.loads((work / "table.json").read_text()) if (work / "table.json").exists() else []
    done = {(r["method"], r["export"]) for r in rows}
    methods = args.methods.split(",")
    for method in methods:  # train every adapter first, then export in the order of the goals' priority
        adapter = work / "runs" / method
        if not (adapter / "adapter_config.json").exists():
            run(peftlab("train", "--model", "smollm2-135m", "--task", "causal-lm", "--dataset", "shakespeare",
                        "--method", method, "--max-steps", str(args.steps), "--batch-size", "2", "--max-length", "48",
                        "--max-eval-samples", "4", "--lr", args.lr, "--seed", "0", "--out", str(adapter),
                        *METHOD_FLAGS.get(method, [])), work / f"train-{method}.log")
    lora_methods = [m for m in methods if m not in MERGED_METHODS]
    bases = {b: ["--base-gguf", str(q4_1)] if b == "q4_1" else ["--dtype", b] for b in args.bases.split(",")}
    # The goals' order: every method on the f32 base, the merged exports, then the other bases for one
    # method, then for the rest (so a table cut short still holds the bars that must be met).
    jobs = [(m, "lora, f32 base", bases["f32"]) for m in lora_methods if "f32" in bases]
    jobs += [(m, "merged f32", ["--mode", "merged", "--dtype", "f32"]) for m in methods if m in MERGED_METHODS]
    others = [(m, f"lora, {b} base", flags) for m in lora_methods for b, flags in bases.items() if b != "f32"]
    jobs += sorted(others, key=lambda job: job[0] != lora_methods[0])
    for method, label, flags in jobs:
        if (method, label) in done:
            continue
        out = work / "exports" / f"{method}-{label.replace(', ', '-').replace(' ', '-')}"
        try:
            seconds = run(peftlab("export", "--adapter", str(work / "runs" / method), "--to", "gguf", "--out", str(out),
                                  "--overwrite", "--verify", "--verify-prompts", str(prompts), *flags),
                          work / f"export-{out.name}.log")
            parity = json.loads((out / "parity.json").read_text())
        except RuntimeError as error:
            seconds, parity = None, {"error": str(error)}
        options = json.loads((work / "runs" / method / "metrics.json").read_text())["options"]
        trained = f"{options['max_steps']} steps, lr {options['lr']:g}"
        rows.append({"method": method, "export": label, "trained": trained, "seconds": seconds, "load": os.getloadavg()[0],
                     **parity})
        (work / "table.json").write_text(json.dumps(rows, indent=1))
        write_table(rows, work / "table.md")
        print(f"{method} {label}: {parity.get('top1_agreement', parity.get('error'))}", flush=True)


def write_table(rows: list[dict], path: Path) -> None:
    lines = ["| method | trained | export | top-1 agreement | positions | max rel. logit diff | greedy identical | effect rel. diff "
             "| top-1 changed by adapter (peftlab/llama.cpp) | base alone: top-1 agreement | export+verify s (load) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r.get('trained', '')} | {r['export']} | error: {r['error'][:80]} | | | | | | | |")
            continue
        base_alone = f"{100 * r['base_top1_agreement']:.2f}%" if "base_top1_agreement" in r else ""  # older rows lack it
        lines.append(
            f"| {r['method']} | {r.get('trained', '')} | {r['export']} | {100 * r['top1_agreement']:.2f}% | {r['positions']} | {r['max_relative_logit_diff']:.2g} "
            f"| {r['generations_identical']}/{r['generations']} | {r['effect_relative_diff']:.2g} "
            f"| {r['effect_top1_changed_peftlab']}/{r['effect_top1_changed_engine']} "
            f"| {base_alone} | {r['seconds']:.0f} ({r['load']:.1f}) |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
