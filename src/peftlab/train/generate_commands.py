"""The ``peftlab generate`` and ``peftlab chat`` subcommands: a trained causal LM answers.

    peftlab generate --adapter runs/lora "Write 347 in words."          # JSON lines on stdout
    peftlab generate --adapter runs/lora --prompts questions.jsonl --out answers.jsonl
    peftlab generate --model runs/merged --temperature 0.7 --top-p 0.9 --seed 1 "Tell a joke."
    peftlab chat --adapter runs/lora                                     # a conversation on the terminal

The model is a base (alias or folder), a merged or fully fine-tuned folder, or a base with an adapter
(``--adapter``; its recorded base when ``--model`` is not given, quantized to 4 bits when the adapter was
trained on a 4-bit base). See :mod:`peftlab.train.generation` for how prompts become tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TextIO

from peftlab.assets import notice


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="NAME_OR_DIR",
                        help="a causal LM: offline alias (smollm2-135m), a folder (merged or fully fine-tuned), or hub id; "
                             "with --adapter, default: the base the adapter records")
    parser.add_argument("--adapter", metavar="DIR", help="adapter folder written by `peftlab train` (any method)")
    parser.add_argument("--system", metavar="TEXT", help="a system prompt before every conversation (chat models)")
    parser.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="stop after N new tokens (default: 256)")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T",
                        help="0: greedy, the most likely token each time (default); above 0: sample, flatter as it grows")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P", help="sample from the smallest set of tokens holding this "
                        "much probability (nucleus sampling; with --temperature; default: 1, all)")
    parser.add_argument("--seed", type=int, help="seed for sampling, for answers that repeat")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to run (default: auto)")


def _sampling(args: argparse.Namespace):
    from peftlab.train.generation import Sampling

    return Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)


def _load(args: argparse.Namespace):
    from peftlab.train.generation import load_for_generation
    from peftlab.train.distributed import pick_device
    from peftlab.train.options import OptionsError

    if args.model is None and args.adapter is None:
        raise OptionsError("give --model (a causal LM: alias, folder or hub id), --adapter (an adapter folder), or both.")
    return load_for_generation(args.model, args.adapter, pick_device(args.device))


class GenerateCommand:
    help = "answer prompts with a causal LM, or a base + adapter: JSON lines of prompt and generation"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompts to answer (or --prompts FILE)")
        # As llama-cli and others spell it; without it argparse read `--prompt "text"` as --prompts (a file).
        parser.add_argument("-p", "--prompt", dest="prompt_texts", action="append", default=[], metavar="TEXT",
                            help="a prompt to answer, as the PROMPT arguments (may be repeated)")
        parser.add_argument("--prompts", dest="prompt_file", metavar="FILE",
                            help='a .txt file (a prompt per line) or .jsonl ({"prompt": ...} or {"messages": [...]} a line)')
        parser.add_argument("--out", type=Path, metavar="FILE.jsonl", help="write the JSON lines here (default: stdout)")
        parser.add_argument("--overwrite", action="store_true", help="replace the --out file if it exists")
        parser.add_argument("--batch-size", type=int, default=8, metavar="B", help="prompts answered at once (default: 8)")
        add_model_arguments(parser)

    def run(self, args: argparse.Namespace) -> int:
        from peftlab.train.generation import encode_prompt, generate_texts, prompt_text, read_prompt_file
        from peftlab.io import atomic_write_text
        from peftlab.train.options import OptionsError

        sampling = _sampling(args)
        if args.batch_size < 1:
            raise OptionsError(f"--batch-size must be 1 or more, got {args.batch_size}.")
        prompts = [*args.prompts, *args.prompt_texts, *(read_prompt_file(args.prompt_file) if args.prompt_file else [])]
        if not prompts:
            raise OptionsError("no prompts: give them as arguments, or a file with --prompts FILE.")
        if args.out is not None and args.out.exists() and not args.overwrite:
            raise OptionsError(f"{args.out} exists; give another --out, or --overwrite to replace it.")
        model, tokenizer = _load(args)
        ids = [encode_prompt(tokenizer, prompt, args.system) for prompt in prompts]
        answers = generate_texts(model, tokenizer, ids, sampling, args.batch_size, progress=args.out is not None)
        lines = "".join(json.dumps({"prompt": prompt_text(p), "generation": a}, ensure_ascii=False) + "\n"
                        for p, a in zip(prompts, answers))
        if args.out is None:
            sys.stdout.write(lines)
        else:
            atomic_write_text(args.out, lines)
            notice(f"wrote {len(answers)} answers to {args.out}")
        return 0


class ChatCommand:
    help = "talk with a causal LM, or a base + adapter: type a line, read the answer as it is written"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_model_arguments(parser)

    def run(self, args: argparse.Namespace) -> int:
        from peftlab.train.generation import has_chat_template
        from peftlab.train.options import OptionsError

        sampling = _sampling(args)
        model, tokenizer = _load(args)
        if not has_chat_template(tokenizer):
            raise OptionsError("this model's tokenizer has no chat template, so it cannot hold a conversation; "
                               "use `peftlab generate` for plain-text prompts, or a chat model.")
        chat(model, tokenizer, sampling, args.system, sys.stdin, sys.stdout)
        return 0


#: Lines that steer the conversation instead of saying something.
RESET, EXIT = "/reset", "/exit"


def chat(model, tokenizer, sampling, system: str | None, lines: TextIO, out: TextIO) -> list[dict[str, str]]:
    """The conversation loop: each line read is a user turn, answered with its tokens streamed to ``out``;
    ``/reset`` forgets the conversation, ``/exit`` or the end of input ends it. Returns the conversation."""
    from transformers import TextStreamer

    from peftlab.train.generation import encode_prompt, generate_ids

    interactive = lines.isatty()
    messages: list[dict[str, str]] = []
    out.write(f"Type a message; {RESET} starts over, {EXIT} (or Ctrl-D) ends.\n")
    while True:
        if interactive:
            out.write("> ")
            out.flush()
        line = lines.readline()
        if not line or line.strip() == EXIT:
            break
        text = line.strip()
        if not text:
            continue
        if text == RESET:
            messages = []
            out.write("(the conversation starts over)\n")
            continue
        messages.append({"role": "user", "content": text})
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        streamer.on_finalized_text = lambda piece, stream_end=False: (out.write(piece + ("\n" if stream_end else "")),
                                                                      out.flush())
        ids = encode_prompt(tokenizer, messages, system)
        answer = generate_ids(model, tokenizer, [ids], sampling, streamer=streamer)[0]
        messages.append({"role": "assistant", "content": tokenizer.decode(answer, skip_special_tokens=True).strip()})
    return messages


generate = GenerateCommand()
chat_command = ChatCommand()
