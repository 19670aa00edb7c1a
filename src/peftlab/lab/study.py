"""``peftlab study NAME``: a rule of thumb put to the test as a preset sweep that ends in verdicts.

    peftlab study alpha                     # lora_alpha = r vs 2r, two seeds each, on the default model
    peftlab study rank --model my-model --dataset my.csv --out runs/rank
    peftlab study all --out runs/studies    # every study, one report with every verdict first
    peftlab study forgetting --general-text my-corpus.txt   # a causal LM's perplexity before and after

A study is a comparison (the same runner, results.json and report as ``peftlab compare``) whose
grid is fixed by the study, always over several seeds so every verdict can be weighed against the
seed-to-seed spread (see :mod:`peftlab.lab.verdict`). The report opens with the verdicts, what the
runs show, and a plot of the effect with each seed's value; the verdicts are also printed and
written to ``verdicts.md``. The options a study sweeps are its own: giving one (``--r`` to the
rank study, ``--seed`` to any) is an error, not silently overridden.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Protocol

from peftlab.lab import forgetting
from peftlab.lab.results import Results
from peftlab.lab.sweep import parse_sweep
from peftlab.lab.verdict import (
    ACCURACY,
    EARLY_LOSS,
    GENERAL_PERPLEXITY,
    METHOD_OPTION,
    PEAK_MEMORY,
    SEED_OPTION,
    Consistency,
    Effect,
    GapNarrowing,
    Interaction,
    Metric,
    Question,
    Verdict,
)
from peftlab.train.options import FULL_FINE_TUNING, OptionsError, TrainOptions

ALL = "all"
VERDICTS_FILE = "verdicts.md"
#: Seeds a study runs unless it says otherwise: two, the fewest that give a spread.
TWO_SEEDS = (0, 1)
#: SGD's learning rate in the scheduler study. SGD needs a far larger step than AdamW, whose update is
#: normalised per parameter; at AdamW's 1e-3 SGD barely moves an adapter that starts at zero.
SGD_LR = 0.1
SMALL_RANK, LARGE_RANK = 8, 256
#: The init study's option and its default start (HF's ``init_lora_weights=True``: A kaiming, B = 0).
INIT, DEFAULT_INIT = "init_lora_weights", True


class StudyWork(Protocol):
    """A study's own work around the runner (forgetting: see :mod:`peftlab.lab.forgetting`)."""

    def check(self, options: TrainOptions, args: argparse.Namespace) -> None: ...  # before any run
    def measure(self, results: Results, args: argparse.Namespace) -> Results: ...  # after the runs, before verdicts
    def findings(self, results: Results) -> list[str]: ...  # sentences for the report


@dataclass(frozen=True)
class Study:
    """A rule of thumb as a preset grid and the questions its verdicts answer.

    ``grid`` is one or more arms, each a tuple of ``--sweep`` texts; every arm runs at every seed and
    the runs of all arms make the study. An arm may also hold ``method=NAME,NAME``: the methods that arm
    runs instead of ``methods`` (QLoRA's arm of the init study). ``budget`` holds options the study starts
    from that the user's flags may change (the swept ones they may not). ``loss_curves``: the report also
    plots the training loss against the steps, one line per setting.
    """

    name: str
    about: str  # what is compared, one line
    methods: str
    grid: tuple[tuple[str, ...], ...]
    questions: tuple[Question, ...]
    seeds: tuple[int, ...] = TWO_SEEDS
    metric: Metric = ACCURACY  # what its plot shows
    budget: dict[str, Any] = field(default_factory=dict)
    note: str = ""  # said after the verdicts: why this many seeds (not the default two), how a metric is measured
    work: StudyWork | None = None
    loss_curves: bool = False

    def swept_options(self) -> list[str]:
        """The options the study sets itself: those of its grid, and the seed."""
        return list(dict.fromkeys([*(parse_sweep(text).option for arm in self.grid for text in arm_sweeps(arm)),
                                   SEED_OPTION]))

    def arm_methods(self, arm: tuple[str, ...]) -> str:
        """The methods ``arm`` runs: its own ``method=...``, else the study's."""
        return next((text.partition("=")[2] for text in arm if _names_methods(text)), self.methods)

    def seed_sweep(self) -> str:
        return f"{SEED_OPTION}={','.join(map(str, self.seeds))}"


def _names_methods(text: str) -> bool:
    return text.partition("=")[0].strip() == METHOD_OPTION


def arm_sweeps(arm: tuple[str, ...]) -> tuple[str, ...]:
    """The ``--sweep`` texts of an arm, without its ``method=...``."""
    return tuple(text for text in arm if not _names_methods(text))


def _converges_faster(name: str, init: str) -> Effect:
    return Effect(f"{name} converges faster: its training loss over the first 10% of the steps is lower than the "
                  "default start's", INIT, DEFAULT_INIT, init, expect="lower", metric=EARLY_LOSS,
                  where={METHOD_OPTION: "lora"}, paired=True)


def _init_note() -> str:
    return ("Every start trains at the same learning rate (the lab's default for adapters). Training loss over the "
            "first 10% of the steps: the mean of each step's training loss over steps 1 to ceil(0.1 x steps) (every "
            "start computes the base model's function at step 1, so they part from step 2 on). The loss verdicts are "
            "paired: at one seed every start trains on the same batches, so the per-seed differences cancel what a "
            "batch's difficulty does to the loss.")


def _memory_note() -> str:
    return ("Two seeds even for memory, which has no training noise: batches are padded to their longest "
            "sentence, so the data order a seed draws changes the activations' size (on a CPU by tens of MB), and "
            "the resident set also moves with the allocator. So memory is compared seed by seed: the two optimizers "
            "at one seed train on the same batches, and the spread to beat is that of the per-seed differences. "
            "Ten steps and 64 evaluation examples suffice: the optimizer's state is allocated at the first step, "
            "and accuracy is not what this study measures.")


STUDIES: dict[str, Study] = {study.name: study for study in (
    Study("alpha", "LoRA's scale: lora_alpha = 2r against lora_alpha = r", "lora", (("lora_alpha=r,2r",),),
          (Effect("alpha = 2r is more accurate than alpha = r", "lora_alpha", "r", "2r"),)),
    Study("rank", "LoRA's rank: r = 2, 8, 32", "lora", (("r=2,8,32",),),
          (Effect("a rank too small underfits: r = 8 is more accurate than r = 2", "r", 2, 8),
           Effect("a rank too large overfits: r = 32 is less accurate than r = 8", "r", 8, 32, expect="lower"))),
    Study("targets", "which layers LoRA adapts: the query and value projections (attn) against every linear "
          "layer of attention and MLP (all-linear)", "lora", (("target_modules=attn,all-linear",),),
          (Effect("adapting every linear layer is more accurate than adapting only the query and value projections",
                  "target_modules", "attn", "all-linear"),)),
    Study("scheduler", f"a cosine learning-rate schedule against a constant one, for SGD (lr {SGD_LR:g}) and "
          "for AdamW (the method's default lr)", "lora",
          (("optimizer=sgd", f"lr={SGD_LR:g}", "scheduler=constant,cosine"),
           ("optimizer=adamw", "scheduler=constant,cosine")),
          (Effect("a cosine schedule makes SGD more accurate than a constant learning rate", "scheduler", "constant",
                  "cosine", where={"optimizer": "sgd"}),
           Effect("a cosine schedule makes no difference to AdamW", "scheduler", "constant", "cosine", expect="same",
                  where={"optimizer": "adamw"}),
           Interaction("a cosine schedule helps SGD more than AdamW", "scheduler", "constant", "cosine", "optimizer",
                       "sgd", "adamw"))),
    Study("optimizer-memory", f"peak training memory of SGD (momentum: one state tensor per parameter) against "
          f"AdamW (two) at r = {SMALL_RANK} and r = {LARGE_RANK}", "lora",
          (("optimizer=adamw,sgd", f"r={SMALL_RANK},{LARGE_RANK}"),),
          (Effect(f"at a small rank (r = {SMALL_RANK}) SGD saves no memory over AdamW", "optimizer", "adamw", "sgd",
                  expect="same", metric=PEAK_MEMORY, where={"r": SMALL_RANK}, paired=True),
           Effect(f"at a large rank (r = {LARGE_RANK}) SGD needs less peak memory than AdamW", "optimizer", "adamw",
                  "sgd", expect="lower", metric=PEAK_MEMORY, where={"r": LARGE_RANK}, paired=True)),
          metric=PEAK_MEMORY, budget={"max_steps": 10, "max_eval_samples": 64}, note=_memory_note()),
    Study("epochs", "training for 1 epoch against 3 over the same data", "lora", (("epochs=1,3",),),
          (Effect("several epochs hurt through overfitting: 3 epochs are less accurate than 1", "epochs", 1, 3,
                  expect="lower"),)),
    Study("consistency", "the same LoRA run over five seeds: how far the seed alone moves the result", "lora", ((),),
          (Consistency("results are consistent across runs: the seed moves accuracy no more than the evaluation "
                       "set's sampling error"),),
          seeds=(0, 1, 2, 3, 4), note="Five seeds: the spread is the result, and two would barely estimate it."),
    Study("forgetting", "full fine-tuning against adapters on a causal LM: accuracy on the task (learning) and "
          "perplexity on held-out general text before and after (forgetting)", forgetting.METHODS, ((),),
          tuple(question for method in forgetting.ADAPTER_METHODS for question in (
              Effect(f"{method} learns less than full fine-tuning: its task accuracy is lower", METHOD_OPTION, FULL_FINE_TUNING,
                     method, expect="lower"),
              Effect(f"{method} forgets less than full fine-tuning: its perplexity on held-out general text rises "
                     "less", METHOD_OPTION, FULL_FINE_TUNING, method, expect="lower", metric=GENERAL_PERPLEXITY))),
          metric=GENERAL_PERPLEXITY, budget=forgetting.BUDGET, work=forgetting.FORGETTING),
    Study("init", "where LoRA starts: the default init against PiSSA, OLoRA and EVA on LoRA, and QLoRA's default "
          "against LoftQ, with LoRA as the reference", "lora",
          ((f"{INIT}=true,pissa,olora,eva",), (f"{METHOD_OPTION}=qlora", f"{INIT}=true,loftq")),
          (_converges_faster("PiSSA", "pissa"),
           Effect("PiSSA reaches a higher final accuracy than the default start", INIT, DEFAULT_INIT, "pissa",
                  where={METHOD_OPTION: "lora"}),
           _converges_faster("OLoRA", "olora"),
           _converges_faster("EVA", "eva"),
           GapNarrowing("LoftQ narrows QLoRA's gap to LoRA: QLoRA started by LoftQ is more accurate than QLoRA's "
                        "default start", INIT, DEFAULT_INIT, "loftq", where={METHOD_OPTION: "qlora"},
                        reference={METHOD_OPTION: "lora", INIT: DEFAULT_INIT})),
          note=_init_note(), loss_curves=True),
)}


def study_named(name: str) -> Study:
    if name not in STUDIES:
        raise OptionsError(f"unknown study {name!r}; the studies are: {', '.join(STUDIES)} (or {ALL}).")
    return STUDIES[name]


def studies_named(name: str) -> list[Study]:
    return list(STUDIES.values()) if name == ALL else [study_named(name)]


def verdicts(study: Study, runs) -> list[Verdict]:
    return [question.judge(runs) for question in study.questions]
