"""The ``peftlab train``, ``eval``, ``merge`` and ``export`` subcommands: flags in, files and JSON out.

Each command is an object with ``add_arguments(parser)`` and ``run(args) -> exit code``, the
shape :mod:`peftlab.cli` expects of every subcommand.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from peftlab.assets import notice
from peftlab.output_folder import check_output_folder, staged_output
from peftlab.train.gguf_options import add_gguf_arguments, refuse_gguf_flags, run_gguf_export
from peftlab.train.options import OptionsError, TrainOptions, add_train_arguments, options_from_args

SUMMARY_KEYS = ("eval_accuracy", "eval_loss", "eval_perplexity", "train_time_s", "peak_memory_mb",
                "trainable_params", "total_params", "steps")
EVAL_OPTIONS = ("model", "task", "dataset", "data_dir", "max_eval_samples", "max_length", "chat_template",
                "train_on_prompt", "eval_batch_size", "quantize", "bf16", "device", "seed")


def _print_json(data: dict[str, Any]) -> None:
    print(json.dumps(data, indent=1))


class TrainCommand:
    help = "fine-tune a model with a PEFT method (or in full) and write the adapter and metrics"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_train_arguments(parser)

    def run(self, args: argparse.Namespace) -> int:
        from peftlab.train.loop import run_training

        metrics = run_training(options_from_args(args))
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one summary
            _print_json({k: metrics[k] for k in SUMMARY_KEYS if k in metrics})
        return 0


class EvalCommand:
    help = "evaluate a model, or a base model with an adapter: accuracy (seq-cls) or perplexity (causal-lm)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--adapter", metavar="DIR", help="adapter folder written by `peftlab train`")
        parser.add_argument("--rank", type=int, metavar="B",
                            help="evaluate the adapter at rank B (methods trained for several ranks: dylora)")
        parser.add_argument("--stride", type=int, metavar="S",
                            help="plain text: start a window of --max-length tokens every S tokens, each scoring only "
                                 "its last S (a sliding-window perplexity; default: --max-length, windows that do not overlap)")
        add_train_arguments(parser, only=EVAL_OPTIONS)
        add_generation_eval_arguments(parser)

    def run(self, args: argparse.Namespace) -> int:
        if getattr(args, "task", None) == GENERATE_TASK:
            return self.run_generation(args)
        from peftlab.train.build import (
            check_max_length, load_eval_dataset, load_trained, make_collator, prepare_rows, saved_num_labels,
            trained_label_names,
        )
        from peftlab.train.distributed import start_processes
        from peftlab.train.evaluate import evaluate, shard_batches

        options = _eval_options(args)
        task, model_name = options.task, options.model
        file_given = hasattr(args, "dataset") and Path(options.dataset).is_file()
        num_labels = saved_num_labels(args.adapter) if args.adapter and task == "seq-cls" else None
        label_names = trained_label_names(args.adapter, model_name) if task == "seq-cls" else None
        data = load_eval_dataset(options, num_labels, label_names, held_out=not file_given, stride=args.stride)
        notice(f"evaluating {len(data)} examples of {getattr(data, 'source', options.dataset)}")
        processes = start_processes(options.device)
        try:
            model, tokenizer = load_trained(model_name, args.adapter, task, getattr(data, "num_labels", None), options.quantize)
            check_max_length(options.max_length, model, tokenizer)
            prepared = prepare_rows(options, {"eval": data}, tokenizer, model)  # causal-LM rows: the cut counted
            options, data = prepared.options, prepared.splits["eval"]
            if args.rank is not None:
                if args.adapter is None:
                    raise OptionsError("--rank sets the rank of an adapter: give --adapter too.")
                model.set_rank(args.rank)
            batches = shard_batches(data, make_collator(options, tokenizer), processes, options.eval_batch_size)
            metrics = evaluate(model.to(processes.device), batches, task, processes, options.bf16)
        finally:
            processes.close()
        if processes.is_main:
            context = {"max_length": options.max_length, **prepared.metrics()} if task == "causal-lm" else {}
            _print_json({**metrics, "examples": len(data), **context})
        return 0

    def run_generation(self, args: argparse.Namespace) -> int:
        """--task generate: the held-out rows' questions answered greedily, scored, the answers written."""
        from peftlab.train.generation import Sampling, check_adapter_is_generative, check_model_is_generative, check_same_base
        from peftlab.train.generation_eval import held_out_questions, score_answers, write_generations
        from peftlab.train.build import load_eval_dataset, load_trained
        from peftlab.train.distributed import pick_device

        if args.adapter:
            check_adapter_is_generative(args.adapter)
            check_same_base(args.adapter, getattr(args, "model", None))
        sampling = Sampling(max_new_tokens=args.max_new_tokens)
        generations = _generations_path(args)
        if generations.exists() and not args.overwrite:  # before the answers, not after
            raise OptionsError(f"{generations} exists; give another --generations file, or --overwrite to replace it.")
        args.task = "causal-lm"
        options = _eval_options(args)
        check_model_is_generative(options.model)
        file_given = hasattr(args, "dataset") and Path(options.dataset).is_file()
        data = load_eval_dataset(options, None, held_out=not file_given)
        questions = held_out_questions(data, getattr(data, "source", options.dataset))
        notice(f"answering {len(questions)} questions of {getattr(data, 'source', options.dataset)}")
        model, tokenizer = load_trained(options.model, args.adapter, "causal-lm", quantization=options.quantize)
        model = model.to(pick_device(options.device))
        scores, rows = score_answers(model, tokenizer, questions, sampling, options.eval_batch_size, args.base)
        write_generations(generations, rows, args.overwrite)
        _print_json({**scores, "examples": len(questions), "max_new_tokens": sampling.max_new_tokens,
                     "generations": str(generations)})
        return 0


#: ``peftlab eval --task generate``: score what the model answers (a causal LM), not its next-token loss.
GENERATE_TASK = "generate"


def add_generation_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """--task also takes ``generate``; its own flags."""
    from peftlab.train.generation_eval import DEFAULT_EVAL_NEW_TOKENS

    task = next(action for action in parser._actions if action.dest == "task")
    task.choices = (*task.choices, GENERATE_TASK)
    task.help += "; generate: a causal LM's greedy answers to the held-out rows, scored by normalised exact match and contains-answer"
    group = parser.add_argument_group("--task generate")
    group.add_argument("--max-new-tokens", type=int, default=DEFAULT_EVAL_NEW_TOKENS, metavar="N",
                       help=f"tokens each answer may take (default: {DEFAULT_EVAL_NEW_TOKENS})")
    group.add_argument("--generations", type=Path, metavar="FILE.jsonl",
                       help="where to write the answers (default: generations.jsonl in the adapter's or model's folder, "
                            "else here)")
    group.add_argument("--overwrite", action="store_true", help="replace the --generations file if it exists")
    group.add_argument("--base", action=argparse.BooleanOptionalAction, default=True,
                       help="with --adapter: also score the base model with the adapter off (default: yes)")


def _generations_path(args: argparse.Namespace) -> Path:
    if args.generations is not None:
        return args.generations
    folder = args.adapter or (args.model if getattr(args, "model", None) and Path(args.model).is_dir() else ".")
    return Path(folder) / "generations.jsonl"


#: What ``eval`` takes from the training run (its metrics.json) unless given: the run's data and length.
REUSED_FROM_RUN = ("max_length", "dataset", "data_dir", "chat_template", "train_on_prompt")


def _eval_options(args: argparse.Namespace) -> TrainOptions:
    """The flags given, else the training run's values (task, max_length, data; the 4-bit base an
    adapter was trained on), else the defaults; each value taken from the run is named on stderr."""
    from peftlab.train.build import base_of, recorded_quantization, saved_run_options

    given = {name: getattr(args, name) for name in EVAL_OPTIONS if hasattr(args, name)}
    run_folder = args.adapter or (given.get("model") if given.get("model") and Path(given["model"]).is_dir() else None)
    saved = saved_run_options(run_folder)
    model_name, task = base_of(given.get("model"), args.adapter, given.get("task") or saved.get("task"))
    taken = {k: saved[k] for k in REUSED_FROM_RUN if saved.get(k) not in (None, False) and k not in given}
    if "dataset" in given:  # another dataset: the run's data folder is not its
        taken.pop("data_dir", None)
    if "task" not in given and saved.get("task"):
        taken["task"] = task
    quantization = given.get("quantize") or recorded_quantization(args.adapter)
    if quantization and not given.get("quantize"):
        taken["quantize"] = quantization
    if taken:
        shown = ", ".join(f"{k}={v}" for k, v in taken.items())
        notice(f"as the training run in {run_folder}: {shown} (give the flags to change them)")
    return TrainOptions(**{**given, **taken, "model": model_name, "task": task})


class MergeCommand:
    help = "fold an adapter into its base model and save a plain transformers model folder"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--adapter", metavar="DIR", required=True, help="adapter folder written by `peftlab train`")
        parser.add_argument("--out", metavar="DIR", required=True, help="folder for the merged model and its tokenizer")
        _add_overwrite_argument(parser)
        # --quantize nf4: the adapter was trained on the 4-bit base (QLoRA); merge it exactly into that
        # base's dequantised weights, not into the original ones the quantization rounded.
        add_train_arguments(parser, only=("model", "task", "quantize"))

    def run(self, args: argparse.Namespace) -> int:
        from peftlab.train.build import recorded_quantization

        out = _output_folder(args, "the merged model", "transformers would load the merged model with the adapter applied a second time")
        quantization = _quantization(args)
        if getattr(args, "quantize", None) and not recorded_quantization(args.adapter):
            _refuse_a_4_bit_base_for_a_full_precision_adapter(args)
        model_name, model, tokenizer = _load_adapter_on_its_base(args, quantization)
        merged = model.merge_and_unload(dequantize=quantization is not None)
        with staged_output(out, "the merged model") as folder:
            merged.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
        notice(f"merged {args.adapter} into {model_name}: wrote {out}")
        return 0


class ExportCommand:
    help = ("write an adapter as a plain LoRA adapter that HF peft, vLLM and SGLang load (exact where the update is low "
            "rank), or as GGUF for llama.cpp / Ollama (--to gguf)")

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--adapter", metavar="DIR", required=True, help="adapter folder written by `peftlab train`")
        parser.add_argument("--out", metavar="DIR", required=True, help="folder for the exported adapter")
        _add_overwrite_argument(parser)
        parser.add_argument("--to", choices=["lora", "gguf"], default="lora",
                            help="the format: plain LoRA (HF PEFT files), or GGUF for llama.cpp / Ollama")
        parser.add_argument("--rank", type=int, metavar="K",
                            help="rank of the export; below the adapter's, or for updates that are not low rank "
                                 "(DoRA, MoRA): a truncated SVD, lossy, its error printed")
        parser.add_argument("--max-rank", type=int, metavar="M",
                            help="the serving engine's rank limit (vLLM's --max-lora-rank: 8, 16, 32, 64, 128, 256, ...)")
        add_gguf_arguments(parser)
        add_train_arguments(parser, only=("model", "task", "quantize"))

    def run(self, args: argparse.Namespace) -> int:
        from peftlab.export import build_lora_export, write_lora_export
        from peftlab.full_precision_gap import full_precision_gap
        from peftlab.model import saved_base_facts
        from peftlab.train.build import base_of, load_trained

        out = _output_folder(args, "the exported adapter", "the export would replace the adapter it is made from")
        if args.to == "gguf":
            return run_gguf_export(args, out, _load_adapter_on_its_base(args, _quantization(args)))
        refuse_gguf_flags(args)
        model_name, model, _ = _load_adapter_on_its_base(args, _quantization(args))
        export = build_lora_export(model, rank=args.rank, max_rank=args.max_rank)
        if export.base_quantization:  # QLoRA: exact on its 4-bit base only; measure it on the full-precision one
            full_base, tokenizer = load_trained(model_name, None, base_of(model_name, args.adapter, getattr(args, "task", None))[1])
            export.full_precision_gap = full_precision_gap(export, model, full_base, tokenizer)
            notice(export.base_statement())
        with staged_output(out, "the exported adapter") as folder:
            write_lora_export(export, folder, metadata=saved_base_facts(model.base_model))
        notice(f"exported {args.adapter} as plain LoRA (r = {export.rank}) to {out}: {export.summary()}")
        return 0


def _refuse_the_adapter_folder(out: Path, adapter: str, why: str) -> None:
    if out.resolve() == Path(adapter).resolve():
        raise OptionsError(f"--out {out} is the adapter's own folder: {why}. Give another folder.")


def _quantization(args: argparse.Namespace) -> str | None:
    """--quantize, else the 4-bit base the adapter was trained on (recorded with it)."""
    from peftlab.train.build import recorded_quantization

    recorded = recorded_quantization(args.adapter)
    if getattr(args, "quantize", None):
        return args.quantize
    if recorded:
        notice(f"the adapter was trained on a {recorded} base: using that base (exact), as --quantize {recorded}")
    return recorded


def _refuse_a_4_bit_base_for_a_full_precision_adapter(args: argparse.Namespace) -> None:
    """--quantize for an adapter that records no 4-bit base: refused when its run says it trained in full
    precision (the result would be NF4-rounded weights it never saw), else said."""
    from peftlab.methods import METHODS
    from peftlab.train.build import saved_run_options

    run = saved_run_options(args.adapter)
    method = METHODS.get(run.get("method") or "")
    if run and not (run.get("quantize") or (method and method.quantization)):
        raise OptionsError(
            f"{args.adapter} was trained on a full-precision base (its run: method {run.get('method')}, no --quantize); "
            f"--quantize {args.quantize} would fold it into NF4-rounded weights it was never trained with. Drop --quantize."
        )
    notice(f"{args.adapter} records no 4-bit base: with --quantize {args.quantize} the result holds NF4-rounded base "
           "weights, exact only if the adapter was trained on such a base")


train = TrainCommand()
evaluate = EvalCommand()
merge = MergeCommand()
export = ExportCommand()


def _add_overwrite_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="replace what --out holds (by default a folder holding anything is refused)")


def _output_folder(args: argparse.Namespace, what: str, why_not_the_adapters: str) -> Path:
    """``--out`` of merge/export: a folder (or nothing yet), never the adapter's own folder, and one
    that holds something only with --overwrite."""
    out = Path(args.out)
    _refuse_the_adapter_folder(out, args.adapter, why_not_the_adapters)
    for given in (args.adapter, getattr(args, "model", None)):  # --overwrite would delete what it reads
        if given and Path(given).exists() and out.resolve() in Path(given).resolve().parents:
            raise OptionsError(f"--out {out} holds {given}, which this command reads; give a folder outside it.")
    check_output_folder(out, args.overwrite, what)
    return out


def _load_adapter_on_its_base(args: argparse.Namespace, quantization):
    """(base model name, the adapted model, tokenizer) for ``--adapter``, its base and task from the run."""
    from peftlab.train.build import base_of, load_trained

    model_name, task = base_of(getattr(args, "model", None), args.adapter, getattr(args, "task", None))
    model, tokenizer = load_trained(model_name, args.adapter, task, quantization=quantization)
    return model_name, model, tokenizer
