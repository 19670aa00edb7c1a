"""The published seed run ("PEFT in action": GPT-2 Large on SST-2) and a comparison's figures beside it.

The seed experiment fine-tuned GPT-2 Large on 10,000 SST-2 sentences for 5 epochs (batch 32, 32
tokens, lr 5e-5; LoRA, DoRA and QLoRA with r = 4, alpha = 4 on ``c_attn``) and published, per
method, its validation accuracy and training time (QLoRA: its model size instead of its time). A
comparison is put beside those figures only when its unswept runs of those methods were trained
with that setup; otherwise the report says which settings differ. Training time is compared as a
share of full fine-tuning's, which carries across machines; seconds do not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from peftlab.lab.findings import share
from peftlab.lab.results import Results, RunRecord
from peftlab.train.options import FULL_FINE_TUNING

#: GB as the seed experiment wrote it: 2**30 bytes (GPT-2 Large's 774M fp32 weights are its "2.88 GB").
BYTES_PER_GB = 2**30
SEED_MODELS = ("gpt2-large", "openai-community/gpt2-large")
#: The published setup, as `peftlab compare` options; the adapter options apply to the adapter methods only.
SEED_SETUP: dict[str, Any] = {"dataset": "sst2", "max_train_samples": 10000, "max_length": 32, "batch_size": 32,
                              "grad_accum": 1, "epochs": 5, "lr": 5e-5}
SEED_ADAPTER_SETUP: dict[str, Any] = {"r": 4, "lora_alpha": 4, "target_modules": ["c_attn"]}
SST2_VALIDATION_EXAMPLES = 872


@dataclass(frozen=True)
class Published:
    val_accuracy: float
    train_time_s: float | None  # not published for QLoRA
    model_gb: float | None = None  # the base model in memory, where published


PUBLISHED: dict[str, Published] = {
    FULL_FINE_TUNING: Published(0.89, 1613.6, 2.88),
    "lora": Published(0.90, 1016.6),
    "dora": Published(0.90, 1205.5),
    "qlora": Published(0.86, None, 0.46),
}


def summary() -> str:
    """The published figures in one sentence."""
    full_time = PUBLISHED[FULL_FINE_TUNING].train_time_s
    parts = []
    for method, published in PUBLISHED.items():
        if method == FULL_FINE_TUNING:
            cost = f"in {full_time:,.1f} s"
        elif published.train_time_s:
            cost = f"in {share(published.train_time_s, full_time)} of full's time"
        else:
            cost = f"with a {published.model_gb} GB model vs {PUBLISHED[FULL_FINE_TUNING].model_gb} GB"
        parts.append(f"{method} {published.val_accuracy:.2f} {cost}")
    return "GPT-2 Large on SST-2: " + "; ".join(parts)


def seed_runs(results: Results) -> list[RunRecord]:
    """The runs that stand for a published method: successful, unswept, named as the method."""
    return [run for run in results.ok_runs if run.method in PUBLISHED and run.run_name == run.method and not run.sweep]


def setup_differences(runs: Sequence[RunRecord]) -> list[str]:
    """How the runs' setup differs from the published one, one phrase per setting; [] when it matches."""
    if not runs:
        return [f"no successful unswept run of {', '.join(PUBLISHED)}"]
    differences: dict[str, str] = {}
    for run in runs:
        wanted = {**SEED_SETUP, **({} if run.is_full_fine_tuning else SEED_ADAPTER_SETUP)}
        actual = dict(run.options)
        if actual.get("model") not in SEED_MODELS:
            differences.setdefault("model", f"model {actual.get('model')} (published: gpt2-large)")
        if actual.get("max_eval_samples") not in (None, SST2_VALIDATION_EXAMPLES) or (
                run.eval_examples not in (None, SST2_VALIDATION_EXAMPLES)):
            differences.setdefault("max_eval_samples", f"evaluated on {run.eval_examples or actual.get('max_eval_samples')} "
                                                       f"examples (published: all {SST2_VALIDATION_EXAMPLES})")
        for option, value in wanted.items():
            if actual.get(option) != value:
                shown = "the method's default" if actual.get(option) is None else actual.get(option)
                differences.setdefault(option, f"{option} {shown} (published: {value})")
    return list(differences.values())


def comparison_rows(results: Results) -> list[list[str]] | None:
    """Measured beside published per method, or None when the setup does not match."""
    runs = seed_runs(results)
    if setup_differences(runs):
        return None
    full = next((run for run in runs if run.is_full_fine_tuning), None)
    rows = []
    for run in runs:
        published = PUBLISHED[run.method]
        time_share = (share(run.train_time_s, full.train_time_s) if full and run.train_time_s and full.train_time_s
                      else "–")
        published_share = (share(published.train_time_s, PUBLISHED[FULL_FINE_TUNING].train_time_s)
                           if published.train_time_s else "not published")
        model_gb = f"{run.model_size_bytes / BYTES_PER_GB:.2f}" if run.model_size_bytes else "–"
        rows.append([run.method, f"{run.val_accuracy:.3f} / {published.val_accuracy:.2f}",
                     f"{time_share} / {published_share}",
                     f"{model_gb} / {published.model_gb:.2f}" if published.model_gb else f"{model_gb} / not published"])
    return rows


COLUMNS = ["method", "val accuracy: measured / published", "training time, % of full: measured / published",
           "model in memory, GB: measured / published"]
