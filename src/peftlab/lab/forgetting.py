"""``peftlab study forgetting``: does LoRA learn less and forget less than full fine-tuning?

    peftlab study forgetting                                   # SmolLM2-135M on SST-2, Shakespeare held out
    peftlab study forgetting --model my-llm --dataset chat.jsonl --general-text my-corpus.txt

Each method (full fine-tuning and the adapters) fine-tunes the same causal LM on a task, two seeds
each, through the comparison runner. Then the study scores every trained model, and the base model
once, on held-out general text the task never shows: the perplexity there before and after
training. Biderman et al. (2024), "LoRA Learns Less and Forgets Less", measured the same trade with
benchmarks; here:

    learning     the task's validation token accuracy (``val_accuracy``: for labelled data given to
                 a causal LM, the label word and the end-of-text token of each response)
    forgetting   the perplexity on the general text after training (``general_perplexity``); the
                 base model's, the same for every run, is in results.json's config["forgetting"],
                 so comparing two methods' perplexities after training compares their rises

The general text defaults to the held-out part (the last ~10%, 157,746 SmolLM2 tokens) of the
``shakespeare`` alias, scored in windows of 256 tokens; 8 windows (2,040 tokens) drawn with a fixed
seed, the same for every model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean
from typing import Any, Callable

from peftlab.assets import load_tokenizer, notice
from peftlab.lab.results import Results
from peftlab.train.options import FULL_FINE_TUNING, OptionsError, TrainOptions

#: The adapter methods set against full fine-tuning; each gets two verdicts (the questions are in
#: :mod:`peftlab.lab.study`, the metric ``general_perplexity`` in :mod:`peftlab.lab.verdict`).
ADAPTER_METHODS = ("lora", "dora")
METHODS = ",".join((FULL_FINE_TUNING, *ADAPTER_METHODS))
#: The default task and budget; the user's flags change any of them. Every run trains 12 steps of 8
#: examples on SST-2 as prompt/response and is evaluated on 64 validation sentences.
BUDGET: dict[str, Any] = {"model": "smollm2-135m", "task": "causal-lm", "dataset": "sst2", "max_train_samples": 96,
                          "max_eval_samples": 64, "batch_size": 8, "max_length": 64, "epochs": 1}
GENERAL_TEXT = "shakespeare"
CONTEXT_LENGTH = 256
WINDOWS = 8
#: Where the study puts its measurements in results.json's config.
CONFIG_KEY = "forgetting"
#: A config's architectures that predict the next token (LlamaForCausalLM, GPT2LMHeadModel, ...).
CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")

@dataclass(frozen=True)
class GeneralText:
    """The held-out general text and how it is scored: windows of ``context_length`` tokens,
    ``windows`` of them drawn with a fixed seed."""

    name: str = GENERAL_TEXT
    context_length: int = CONTEXT_LENGTH
    windows: int = WINDOWS

    def text(self) -> str:
        """The text scored: an alias's held-out part, or a ``.txt`` file whole."""
        from peftlab.perplexity import read_text_split

        return read_text_split(self.name, "all" if Path(self.name).suffix.lower() == ".txt" else "validation")


def causal_lm_config(model: str, task: str) -> Any:
    """The model's config; refuses, before any run, a model that is not a causal LM or another task."""
    from peftlab.lab.sweep import model_config

    if task != "causal-lm":
        raise OptionsError(f"study forgetting fine-tunes a causal LM (--task causal-lm) and measures its perplexity "
                           f"on general text; drop --task {task}.")
    config = model_config(model)
    architectures = config.architectures or []
    if not any(name.endswith(CAUSAL_LM_SUFFIXES) for name in architectures):
        found = ", ".join(architectures) or f"a {config.model_type} model with no recorded architecture"
        raise OptionsError(
            f"study forgetting needs a causal LM, a model that predicts the next token (e.g. smollm2-135m), to "
            f"measure perplexity on general text; {model} is {found}, a classifier or encoder. Give --model a "
            f"causal LM (its config.json's architectures end in ForCausalLM or LMHeadModel)."
        )
    return config


def general_text_for(name: str, config: Any) -> GeneralText:
    """The general text ``name`` scored in windows of 256 tokens, or of the model's limit if shorter."""
    limit = getattr(config, "max_position_embeddings", None) or CONTEXT_LENGTH
    return GeneralText(name, min(CONTEXT_LENGTH, limit))


def check_general_text(general: GeneralText, model: str) -> None:
    """Fail before any run when the general text cannot give ``general.windows`` windows for this model."""
    from peftlab.data.text import cut_windows, tokenize_stream

    windows = cut_windows(tokenize_stream(load_tokenizer(model), general.text()), general.context_length,
                          source=f"the general text {general.name}")
    if len(windows) < general.windows:
        raise OptionsError(f"the general text {general.name} has {len(windows)} windows of {general.context_length} "
                           f"tokens; study forgetting scores {general.windows}: give a longer text.")


def general_perplexity(options: TrainOptions | None, model: str, general: GeneralText) -> tuple[float, int]:
    """(perplexity, tokens scored) on the general text of a finished run (``options``), or of the base
    ``model`` when ``options`` is None."""
    from peftlab.assets import load_model_and_tokenizer
    from peftlab.perplexity import perplexity
    from peftlab.train.build import load_run

    loaded, tokenizer = load_run(options) if options else load_model_and_tokenizer(model, "causal-lm")
    result = perplexity(loaded, tokenizer, general.text(), general.context_length, max_windows=general.windows)
    return result.perplexity, result.tokens


def measure_forgetting(results: Results, general: GeneralText, log: Callable[[str], None] = notice) -> Results:
    """``results`` with each successful run's ``general_perplexity`` and, in config["forgetting"],
    the base model's perplexity on the same windows."""
    model = results.config["model"]
    base, tokens = general_perplexity(None, model, general)
    log(f"study forgetting: base {model}: perplexity {base:.3f} on {tokens:,} tokens of {general.name}")
    runs = []
    for run in results.runs:
        if run.ok:
            after, _ = general_perplexity(TrainOptions(**run.options), model, general)
            log(f"study forgetting: {run.run_name}: perplexity {after:.3f} ({after / base - 1:+.1%})")
            run = dataclasses.replace(run, general_perplexity=after)
        runs.append(run)
    facts: dict[str, Any] = {"general_text": general.name, "context_length": general.context_length,
                             "windows": general.windows, "tokens_scored": tokens, "base_perplexity": base}
    return dataclasses.replace(results, runs=runs, config={**results.config, CONFIG_KEY: facts})


def forgetting_findings(results: Results) -> list[str]:
    """The general text's perplexity before training and, per method, after (mean over seeds)."""
    facts = results.config.get(CONFIG_KEY)
    if not facts:
        return []
    base = facts["base_perplexity"]
    after: dict[str, list[float]] = {}
    for run in results.ok_runs:
        if run.general_perplexity is not None:
            after.setdefault(run.method, []).append(run.general_perplexity)
    means = ", ".join(f"{method} {mean:.3f} ({mean / base - 1:+.1%})"
                      for method, mean in ((method, fmean(values)) for method, values in after.items()))
    return [f"Perplexity on {facts['general_text']} ({facts['tokens_scored']:,} tokens in windows of "
            f"{facts['context_length']}) was {base:.3f} before training; after it (mean over seeds): {means}."]


@dataclass(frozen=True)
class ForgettingWork:
    """What the forgetting study does around the comparison runner: checks before any run, the
    general text's perplexity after them, and the sentence that states it."""

    def check(self, options: TrainOptions, args: Any) -> None:
        check_general_text(self.general(options.model, options.task, args), options.model)

    def measure(self, results: Results, args: Any) -> Results:
        model, task = results.config["model"], results.config["task"]
        return measure_forgetting(results, self.general(model, task, args))

    def findings(self, results: Results) -> list[str]:
        return forgetting_findings(results)

    @staticmethod
    def general(model: str, task: str, args: Any) -> GeneralText:
        """The general text for this model (a causal LM, else an error): --general-text, else shakespeare."""
        return general_text_for(getattr(args, "general_text", None) or GENERAL_TEXT, causal_lm_config(model, task))


FORGETTING = ForgettingWork()
