"""Perplexity of a causal LM on a plain text at a chosen context length.

    from peftlab.perplexity import perplexity, read_text_split
    text = read_text_split("shakespeare")                    # the held-out part (last ~10%) of the alias
    result = perplexity(model, tokenizer, text, context_length=2048, max_windows=16)
    result.perplexity, result.tokens                         # exp(mean token NLL), tokens scored

The text is cut as :mod:`peftlab.data.text` says (windows of ``context_length`` tokens, one token
stream, non-overlapping unless ``stride`` is given) and scored by the same evaluation as
``peftlab eval --task causal-lm``: the mean negative log-likelihood of every scored token, over all
windows together (not a mean of per-window means).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn
from transformers import PreTrainedTokenizerBase

from peftlab.data.collate import CausalLMCollator
from peftlab.data.splits import sample
from peftlab.data.text import cut_windows, read_plain_text, tokenize_stream
from peftlab.train.distributed import Processes
from peftlab.train.evaluate import evaluate


@dataclass(frozen=True)
class Perplexity:
    perplexity: float  # exp(loss)
    loss: float  # mean negative log-likelihood per scored token, nats
    tokens: int  # tokens scored
    windows: int
    context_length: int


def read_text_split(name_or_path: str | Path, split: str = "validation") -> str:
    """A text alias or ``.txt`` file's split: "validation" (the held-out last ~10%), "train", or "all"."""
    if split == "all":
        return read_plain_text(name_or_path, held_out=False)[0]
    return read_plain_text(name_or_path, split)[0]


def perplexity(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    context_length: int,
    *,
    stride: int | None = None,
    max_windows: int | None = None,
    seed: int = 0,
    batch_size: int = 1,
    bf16: bool = False,
) -> Perplexity:
    """The perplexity of ``model`` on ``text`` in windows of ``context_length`` tokens.

    ``max_windows``: score that many windows, drawn with ``seed`` (default: all). Runs where the
    model is. Raises DataError when the text is too short for one window.
    """
    windows = cut_windows(tokenize_stream(tokenizer, text), context_length, stride)
    windows = windows.select(sample(len(windows), max_windows, seed))
    device = next(model.parameters()).device
    collate = CausalLMCollator(tokenizer, max_length=context_length)
    batches = (collate([windows[i] for i in range(start, min(start + batch_size, len(windows)))])
               for start in range(0, len(windows), batch_size))
    metrics = evaluate(model, batches, "causal-lm", Processes(0, 1, device, owns_group=False), bf16)
    return Perplexity(metrics["eval_perplexity"], metrics["eval_loss"], metrics["eval_tokens"], len(windows),
                      context_length)

