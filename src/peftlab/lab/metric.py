"""What a comparison ranks its runs by: one metric, 0..1 and higher better, with the name it is shown under.

    classification                       eval_accuracy         "accuracy"
    causal LM on questions and answers   exact_match           "exact match"   (greedy answers to held-out rows)
    causal LM on plain text              eval_token_accuracy   "token accuracy" (next-token argmax)

Every run's ``val_accuracy`` holds the comparison's metric; ``config["metric"]`` records which, and the
report, findings and plots show its label, so a token accuracy is never called "accuracy". A causal LM
given chat or prompt/response rows is ranked by what it answers, not by how many next tokens it guesses
(which rewards the easy tokens of an answer: a 95% token accuracy was measured beside 76% exact match).
"""

from __future__ import annotations

from typing import Any

from peftlab.train.options import TrainOptions

ACCURACY = {"key": "eval_accuracy", "label": "accuracy"}
EXACT_MATCH = {"key": "exact_match", "label": "exact match"}
TOKEN_ACCURACY = {"key": "eval_token_accuracy", "label": "token accuracy"}


def metric_for(options: TrainOptions) -> dict[str, str]:
    from peftlab.data.text import is_plain_text

    if options.task == "seq-cls":
        return ACCURACY
    return TOKEN_ACCURACY if is_plain_text(options.dataset) else EXACT_MATCH


def metric_label(config: dict[str, Any]) -> str:
    """The label of a comparison's metric (results written before it was recorded: "accuracy")."""
    return (config.get("metric") or ACCURACY)["label"]
