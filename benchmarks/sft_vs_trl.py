"""Chat fine-tuning side by side: peftlab's engine vs TRL's SFTTrainer + HF peft, padded and packed.

Both sides train LoRA (same r, alpha, dropout 0, all linear layers of the blocks) on the same
tokenised rows: a seeded set of conversations with a realistic spread of lengths (short questions,
answers from a few words to a few hundred), rendered with the model's chat template by
``peftlab.data.render_conversation`` (ids + assistant-token mask); TRL gets those ids with the
same labels, so its own tokenisation plays no part. Same lr (linear decay, no warmup), max grad
norm, batch, max length, steps and seed; AdamW (torch) on both; no gradient checkpointing on
either (SFTConfig's default turns it on). TRL keeps its other defaults (it also computes the
entropy and token accuracy it logs).

Batches: ``--batch`` conversations per step, padded to the longest (``padded``), or packed
(``packed``: each side packs the whole training set best fit into sequences of at most
``--max-length``, peftlab with ``--packing``, TRL with ``packing=True`` (its bfd strategy and
padding-free batches); both take as many sequences per step as hold about ``--batch``
conversations' tokens, so padded and packed steps see about the same tokens). Padded, both sides
see the same rows in the same order (the same seeded permutation).

Figures per variant, each run in a fresh child process: trained tokens per second (tokens of the
rows, padding excluded, over the steps after ``--warmup``; step times only, data loading left out
on TRL's side and counted on peftlab's), the share of padding in the batches, the final training
loss (the last step's mean over its label tokens), the peak memory of the process (CPU: RSS
high-water mark, which includes the model; CUDA: max allocated), and the exact match of greedy
answers to ``--eval-rows`` held-out conversations (the same generation code on both sides, with its
binomial standard error). Then the ``interleaved-*`` variants time both sides' steps alternately in
one process, so that a machine whose load changes slows both alike: the ratio to trust on a shared
machine (wall and CPU time; ``--profile N`` adds torch.profiler's top ops of N more steps per side).

``--data spread`` (default) is the seeded conversations above: lengths lognormal like instruction
data (a user turn of ~20 words, an answer of ~40, up to 150/300, a fifth with two exchanges, a
third with a system prompt), which padding wastes ~30% on; ``--data number-words`` is peftlab's
offline instruction set (short rows of nearly one length), where exact match moves within a few
hundred steps.

    python benchmarks/sft_vs_trl.py                                     # SmolLM2-135M, CPU, 2 threads
    python benchmarks/sft_vs_trl.py --steps 12 --warmup 2 --batch 8 --max-length 512 --threads 2
    python benchmarks/sft_vs_trl.py --variants peftlab-packed,trl-packed --steps 4
    python benchmarks/sft_vs_trl.py --device cuda --steps 30 --batch 16 --max-length 1024

Goals (issue 22): peftlab >= 1.5x TRL's tokens/s with packing on both sides, >= 1.3x without;
final loss within the seed-to-seed spread (rerun with ``--seed 1`` for it); held-out exact match within
its standard error; peak memory no higher. State the load (``uptime``).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SEPARATE = ("peftlab-padded", "trl-padded", "peftlab-packed", "trl-packed")
VARIANTS = (*SEPARATE, "interleaved-padded", "interleaved-packed")
WORDS = ("the a of to and in is it that for on with as was at by this be from or have not are an they which one "
         "you had but what all were when we there can more if out so said about into than them only some time could "
         "number answer model data train value first then each list word two three four five question result").split()


def conversations(count: int, seed: int) -> list[list[dict[str, str]]]:
    """Seeded chat rows whose lengths spread as instruction data does: a lognormal number of words."""
    rng = random.Random(seed)

    def text(mean_words: float, cap: int) -> str:
        n = max(2, min(cap, int(rng.lognormvariate(math.log(mean_words), 0.8))))
        return " ".join(rng.choice(WORDS) for _ in range(n)) + "."

    rows = []
    for _ in range(count):
        messages = [{"role": "system", "content": "You answer briefly."}] if rng.random() < 0.3 else []
        for _ in range(1 if rng.random() < 0.8 else 2):
            messages += [{"role": "user", "content": text(20, 150)}, {"role": "assistant", "content": text(40, 300)}]
        rows.append(messages)
    return rows


def write_data(folder: Path, args: argparse.Namespace) -> None:
    if args.data == "number-words":
        from peftlab.data.synthetic import number_words_rows

        train = [row["messages"] for row in number_words_rows("train")[: args.rows]]
        validation = [row["messages"] for row in number_words_rows("validation")[: args.eval_rows]]
    else:
        rows = conversations(args.rows + args.eval_rows, args.seed)
        train, validation = rows[: args.rows], rows[args.rows :]
    for name, part in (("train", train), ("validation", validation)):
        with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"messages": messages}) + "\n" for messages in part)


def peak_memory_mb(device: str) -> float:
    from peftlab.train.loop import peak_memory_mb as peak

    import torch

    return peak(torch.device(device))


def held_out_exact_match(model, tokenizer, data: Path, args: argparse.Namespace) -> float:
    """Exact match (peftlab's normalisation) of the greedy answers to the validation rows, the same
    generation code on both sides."""
    from peftlab.data import load_dataset_spec
    from peftlab.train.generation import Sampling
    from peftlab.train.generation_eval import answer_questions, held_out_questions
    from peftlab.train.generation_metrics import generation_scores

    questions = held_out_questions(load_dataset_spec(data, "validation", task="causal-lm"))
    answers = answer_questions(model.eval(), tokenizer, questions, Sampling(max_new_tokens=args.new_tokens))
    return generation_scores(answers, [q.reference for q in questions])["exact_match"]


# -- the two sides (run in a child process each) -----------------------------------------------------


def peftlab_options(args: argparse.Namespace, data: Path, packing: bool):
    from peftlab.train.options import TrainOptions

    out = Path(tempfile.mkdtemp(prefix="sft-peftlab-"))
    return TrainOptions(
        model=args.model, task="causal-lm", dataset=str(data), method="lora", r=args.r, lora_alpha=args.alpha,
        lora_dropout=0.0, target_modules="all-linear", lr=args.lr, scheduler="linear", warmup_ratio=0.0,
        batch_size=packed_batch_size(args, trl_rows(args, data)) if packing else args.batch, max_steps=args.steps,
        max_length=args.max_length, packing=packing, seed=args.seed,
        max_eval_samples=1, eval_batch_size=1, log_every=1, device=args.device, out=str(out), overwrite=True,
    )


def run_peftlab(args: argparse.Namespace, data: Path, packing: bool) -> dict[str, Any]:
    from peftlab.train.loop import run_training

    options = peftlab_options(args, data, packing)
    out = Path(options.out)
    metrics = run_training(options)
    from peftlab.train.generation import load_for_generation

    exact = held_out_exact_match(*load_for_generation(None, str(out)), data, args)
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][args.warmup :]
    seconds = sum(row["step_time_s"] for row in steps)
    tokens = sum(row["tokens_per_s"] * row["step_time_s"] for row in steps)
    return {"tokens_per_s": tokens / seconds, "final_loss": metrics["train_loss_curve"][-1],
            "padding_share": metrics["padding_share"], "peak_memory_mb": metrics["peak_memory_mb"],
            "rows_truncated": metrics["train_rows_truncated"], "exact_match": exact}


def trl_rows(args: argparse.Namespace, data: Path) -> list[dict[str, list[int]]]:
    """The training rows as peftlab tokenises them: ids and labels (-100 where not learnt), cut at --max-length."""
    from peftlab.assets import load_tokenizer
    from peftlab.data import CausalLMCollator, load_dataset_spec

    tokenizer = load_tokenizer(args.model)
    collator = CausalLMCollator(tokenizer, max_length=args.max_length)
    rows = []
    for item in load_dataset_spec(data, "train", task="causal-lm"):
        ids, mask = collator.fit(*collator.encode_whole(item))
        rows.append({"input_ids": ids, "labels": [i if m else -100 for i, m in zip(ids, mask)]})
    return rows


def packed_batch_size(args: argparse.Namespace, rows: list[dict[str, list[int]]]) -> int:
    """Packed sequences per step, on both sides: as many as hold about ``--batch`` rows' tokens."""
    mean_length = sum(len(r["input_ids"]) for r in rows) / len(rows)
    return max(1, round(args.batch * mean_length / args.max_length))


def trl_trainer(args: argparse.Namespace, data: Path, packing: bool):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from peftlab.assets import load_model_and_tokenizer

    rows = trl_rows(args, data)
    model, tokenizer = load_model_and_tokenizer(args.model, "causal-lm")
    batch = packed_batch_size(args, rows) if packing else args.batch
    config = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="sft-trl-"), per_device_train_batch_size=batch, max_steps=args.steps,
        learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch", seed=args.seed, data_seed=args.seed, max_length=args.max_length, packing=packing,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=args.device == "cpu", bf16=False,
        dataloader_num_workers=0, disable_tqdm=True,
        gradient_checkpointing=False,  # TRL's SFTConfig turns it on by default; peftlab's default is off
    )
    lora = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    return SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                      peft_config=lora)


def run_trl(args: argparse.Namespace, data: Path, packing: bool) -> dict[str, Any]:
    import torch
    from transformers import TrainerCallback

    trainer = trl_trainer(args, data, packing)
    counted: list[tuple[int, int]] = []  # (tokens, slots) of each batch collated, in order
    collate = trainer.data_collator

    def counting_collator(examples):
        batch_out = collate(examples)
        slots = batch_out["input_ids"].numel()
        tokens = int(batch_out["attention_mask"].sum()) if "attention_mask" in batch_out else slots
        counted.append((tokens, slots))
        return batch_out

    trainer.data_collator = counting_collator
    times: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.began = time.perf_counter()

        def on_step_end(self, *_, **__):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.began)

    trainer.add_callback(StepClock())
    trainer.train()
    used = counted[: len(times)]
    tokens = sum(t for t, _ in used[args.warmup :])
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    peak = peak_memory_mb(args.device)  # of training, before generation
    return {"tokens_per_s": tokens / sum(times[args.warmup :]), "final_loss": losses[-1],
            "padding_share": 1 - sum(t for t, _ in used) / sum(s for _, s in used),
            "peak_memory_mb": peak, "rows_truncated": None,
            "exact_match": held_out_exact_match(trainer.model, trainer.processing_class, data, args)}


# -- tokens/s interleaved: both sides in one process, step by step -------------------------------------


def interleaved(args: argparse.Namespace, data: Path, packing: bool) -> dict[str, Any]:
    """peftlab's and TRL's training steps alternated in one process (who goes first alternates too),
    so a change of load on the machine slows both alike; tokens/s of each over the steps after
    ``--warmup``. TRL's steps are its ``Trainer.training_step`` (forward, SFTTrainer's loss and
    metrics, backward) plus the clip, optimizer and scheduler steps its loop takes; its batches are
    collated outside the clock. peftlab's are ``TrainingRun.train_step``, collation included. Padded,
    both take the same rows at each step."""
    import torch

    from peftlab.train.distributed import start_processes
    from peftlab.train.loop import TrainingRun

    options = peftlab_options(args, data, packing).with_method_defaults()
    run = TrainingRun(options, start_processes(options.device, options.strategy), Path(options.out))
    order = run.epoch_batches(0)

    def peftlab_step(index: int) -> tuple[float, float, int]:
        before, began, cpu = run.state.tokens_seen, time.perf_counter(), time.process_time()
        run.train_step([order[index % len(order)]])
        return time.perf_counter() - began, time.process_time() - cpu, run.state.tokens_seen - before

    trainer = trl_trainer(args, data, packing)
    trainer.create_optimizer_and_scheduler(num_training_steps=args.steps)
    model = trainer.model
    loader = iter(trainer.get_train_dataloader())

    # Padded, TRL's dataset holds the rows in peftlab's order: both sides take the same rows each step
    # (a padded step's cost follows its longest row). Packed sequences are nearly full: TRL's own order.
    same_rows = not packing and len(trainer.train_dataset) == len(run.train_data)

    def trl_step(index: int) -> tuple[float, float, int]:
        if same_rows:
            rows = [trainer.train_dataset[i] for i in order[index % len(order)]]
            batch = trainer._prepare_inputs(trainer.data_collator(
                [{k: v for k, v in row.items() if k in ("input_ids", "labels")} for row in rows]))
        else:
            batch = trainer._prepare_inputs(next(loader))
        tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        items = (batch["labels"][..., 1:] != -100).sum()
        began, cpu = time.perf_counter(), time.process_time()
        trainer.training_step(model, batch, items)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        model.zero_grad()
        return time.perf_counter() - began, time.process_time() - cpu, tokens

    sides = {"peftlab": peftlab_step, "trl": trl_step}
    measured: dict[str, list[tuple[float, float, int]]] = {"peftlab": [], "trl": []}
    for index in range(args.steps):
        for name in list(sides) if index % 2 == 0 else list(sides)[::-1]:
            measured[name].append(sides[name](index))
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for name, step in sides.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for index in range(args.profile):
                    step(args.steps + index)
            print(f"  {name} {'packed' if packing else 'padded'}, {args.profile} profiled steps:\n"
                  + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18), file=sys.stderr)
    run.processes.close()
    result = {}
    for name, steps in measured.items():
        kept = steps[args.warmup :]
        tokens = sum(n for _, _, n in kept)
        result[name] = (tokens / sum(t for t, _, _ in kept), tokens / sum(c for _, c, _ in kept))
        print(f"  {name} {'packed' if packing else 'padded'} step seconds (wall/CPU): "
              + " ".join(f"{t:.2f}/{c:.2f}" for t, c, _ in steps), file=sys.stderr, flush=True)
    return {"peftlab_tokens_per_s": result["peftlab"][0], "trl_tokens_per_s": result["trl"][0],
            "peftlab_tokens_per_cpu_s": result["peftlab"][1], "trl_tokens_per_cpu_s": result["trl"][1]}


# -- the parent: one child per variant, then the table ------------------------------------------------


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    side, packing = args.child.split("-")[0], args.child.endswith("packed")
    run = {"peftlab": run_peftlab, "trl": run_trl, "interleaved": interleaved}[side]
    result = run(args, Path(args.data_folder), packing)
    Path(args.result).write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--rows", type=int, default=256, help="training conversations")
    parser.add_argument("--data", choices=("spread", "number-words"), default="spread",
                        help="spread: seeded conversations with a realistic length spread (default); number-words: "
                             "peftlab's offline instruction set, short rows whose exact match learning moves")
    parser.add_argument("--eval-rows", type=int, default=16, help="held-out conversations answered for exact match")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per held-out answer")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of tokens/s")
    parser.add_argument("--batch", type=int, default=8, help="conversations per step")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--alpha", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="interleaved variants: then profile this many more steps of each side (torch.profiler)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data-folder", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r}; use {', '.join(VARIANTS)}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="sft-data-") as folder:
        write_data(Path(folder), args)
        for variant in variants:
            result = Path(folder) / f"{variant}.json"
            flags = [a for a in sys.argv[1:]]
            command = [sys.executable, __file__, *flags, "--child", variant, "--data-folder", folder, "--result", str(result)]
            print(f"running {variant} ...", file=sys.stderr, flush=True)
            subprocess.run(command, check=True)
            results[variant] = json.loads(result.read_text())
    print(f"\nSmolLM2-style chat SFT, {args.model}: LoRA r={args.r} alpha={args.alpha} all-linear, batch {args.batch}, "
          f"max length {args.max_length}, {args.steps} steps ({args.warmup} warm-up left out), {args.threads} threads, {args.device}")
    print(f"{'variant':16} {'tokens/s':>10} {'padding':>8} {'final loss':>11} {'peak MB':>9} {'exact match':>17}")
    for variant, r in results.items():
        if variant in SEPARATE:
            error = math.sqrt(r["exact_match"] * (1 - r["exact_match"]) / args.eval_rows)  # binomial standard error
            print(f"{variant:16} {r['tokens_per_s']:10.1f} {r['padding_share']:8.1%} {r['final_loss']:11.4f} "
                  f"{r['peak_memory_mb']:9.0f} {r['exact_match']:10.1%} ± {error:4.1%}")
    for mode in ("padded", "packed"):
        ours, theirs = results.get(f"peftlab-{mode}"), results.get(f"trl-{mode}")
        if ours and theirs:
            print(f"{mode}, separate runs: peftlab / TRL tokens/s = {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x, "
                  f"peak memory {ours['peak_memory_mb'] / theirs['peak_memory_mb']:.2f}x")
        both = results.get(f"interleaved-{mode}")
        if both:
            print(f"{mode}, interleaved steps: peftlab {both['peftlab_tokens_per_s']:.1f} tokens/s, TRL "
                  f"{both['trl_tokens_per_s']:.1f}: {both['peftlab_tokens_per_s'] / both['trl_tokens_per_s']:.2f}x "
                  f"(per CPU second: {both['peftlab_tokens_per_cpu_s'] / both['trl_tokens_per_cpu_s']:.2f}x)")
    if "peftlab-padded" in results and "peftlab-packed" in results:
        gain = results["peftlab-packed"]["tokens_per_s"] / results["peftlab-padded"]["tokens_per_s"]
        print(f"packing's gain (peftlab, separate runs): {gain:.2f}x tokens/s; padding share without packing "
              f"{results['peftlab-padded']['padding_share']:.1%}, with {results['peftlab-packed']['padding_share']:.1%}")
    if "interleaved-padded" in results and "interleaved-packed" in results:
        gain = results["interleaved-packed"]["peftlab_tokens_per_s"] / results["interleaved-padded"]["peftlab_tokens_per_s"]
        print(f"packing's gain (peftlab, interleaved runs): {gain:.2f}x tokens/s")


if __name__ == "__main__":
    main()
