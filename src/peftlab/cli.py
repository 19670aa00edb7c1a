"""The ``peftlab`` command: ``peftlab train | eval | merge | export | generate | chat | compare | report | study``.

Each subcommand is an object with ``help`` (its description), ``add_arguments(parser)`` and
``run(args) -> exit code``, named in :data:`SUBCOMMANDS` as ``"module:attribute"``. Only the
chosen one is imported, so ``peftlab --help`` stays quick. A new subcommand is one entry here.

Errors a user can fix (bad options, data, paths, checkpoints) print one line and exit with 2; a
diverged training exits with 1. ``PEFTLAB_TRACEBACK=1`` shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any, Sequence

#: subcommand -> ("module:attribute" of its command object, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("peftlab.train.commands:train", "fine-tune a model with a PEFT method (or in full)"),
    "eval": ("peftlab.train.commands:evaluate", "evaluate a model or base + adapter: accuracy, perplexity, or answers (--task generate)"),
    "merge": ("peftlab.train.commands:merge", "fold an adapter into its base and save a plain model"),
    "export": ("peftlab.train.commands:export", "write an adapter as plain LoRA for serving engines (vLLM, SGLang)"),
    "generate": ("peftlab.train.generate_commands:generate", "answer prompts with a causal LM or base + adapter (JSON lines)"),
    "chat": ("peftlab.train.generate_commands:chat_command", "talk with a causal LM or base + adapter, answers streamed"),
    "compare": ("peftlab.lab.cli:compare", "fine-tune several methods on the same model, data and seed; report them"),
    "report": ("peftlab.lab.cli:report", "rewrite a comparison's report (markdown, HTML, plots) from its results.json"),
    "study": ("peftlab.lab.study_command:study", "test rules of thumb (alpha, rank, targets, scheduler, ...; all) over seeds: verdicts and a report"),
}


def load_command(name: str) -> Any:
    module, _, attribute = SUBCOMMANDS[name][0].partition(":")
    return getattr(importlib.import_module(module), attribute)


def build_parser(chosen: str | None = None) -> argparse.ArgumentParser:
    """The parser, with the flags of the ``chosen`` subcommand only (the others show their help line)."""
    parser = argparse.ArgumentParser(prog="peftlab", description="Parameter-efficient fine-tuning of transformer models.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            command = load_command(name)
            sub.description = command.help  # the longer line, once the command is imported anyway
            command.add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)
    args = build_parser(chosen if chosen in SUBCOMMANDS else None).parse_args(argv)
    from peftlab.assets import AssetError
    from peftlab.termination import EXIT_TERMINATED, Terminated, terminate_as_interrupt
    from peftlab.train.loop import TrainingDiverged

    try:
        with terminate_as_interrupt():  # SIGTERM (kill, timeout, torchrun) cleans up as Ctrl-C does
            return load_command(args.command).run(args)
    except (ValueError, OSError, AssetError, TrainingDiverged) as error:
        if os.environ.get("PEFTLAB_TRACEBACK") == "1":
            raise
        print(f"peftlab {args.command}: error: {error}", file=sys.stderr)
        return 1 if isinstance(error, TrainingDiverged) else 2
    except Terminated:
        print(f"peftlab {args.command}: stopped by SIGTERM", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print(f"peftlab {args.command}: interrupted", file=sys.stderr)
        return 130
