"""How far an adapter's outputs move when it runs on another base than the one it was trained on.

A QLoRA adapter is trained on the NF4 (4-bit) base: on the full-precision base it computes
something else. ``logit_gap(reference, candidate, probe_inputs(model, tokenizer))`` measures how
much (the largest absolute logit difference, and the relative Frobenius one, on a few short probe
prompts); ``nf4_gap`` does it for one adapter on the NF4 base versus the full-precision base.
Loading (``PeftModel.from_pretrained(..., base_quantization="ignore")``) and the plain-LoRA and
GGUF exports state this figure instead of calling the result exact.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

#: Short prompts of several kinds (prose, a question, code), used when a tokenizer is at hand.
PROBE_PROMPTS = (
    "The capital of France is",
    "Question: what is twelve plus thirty?\nAnswer:",
    "def add(a, b):\n    return",
    "Once upon a time, in a small village,",
)


@dataclass(frozen=True)
class LogitGap:
    """The difference of two models' logits over the probe prompts."""

    max_abs: float  # largest |reference - candidate| over every prompt, position and vocabulary entry
    relative: float  # ‖reference - candidate‖_F / ‖reference‖_F over all prompts
    prompts: int

    def describe(self) -> str:
        return f"max abs logit difference {self.max_abs:.4g}, relative {self.relative:.4g} (over {self.prompts} probe prompts)"


def probe_inputs(model: nn.Module, tokenizer: Any = None, length: int = 16, seed: int = 0) -> list[torch.Tensor]:
    """One ``[1, n]`` id tensor per probe prompt: ``PROBE_PROMPTS`` through ``tokenizer``, else
    ``len(PROBE_PROMPTS)`` rows of ``length`` seeded random ids from the model's vocabulary."""
    if tokenizer is not None:
        return [tokenizer(text, return_tensors="pt")["input_ids"] for text in PROBE_PROMPTS]
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(min(3, vocab - 1), vocab, (1, length), generator=generator) for _ in PROBE_PROMPTS]


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(input_ids=ids.to(device))
    return (out.logits if hasattr(out, "logits") else out[0]).float().cpu()


def logit_gap(reference: nn.Module, candidate: nn.Module, inputs: Sequence[torch.Tensor]) -> LogitGap:
    """How far ``candidate``'s logits are from ``reference``'s on ``inputs`` (both in eval mode)."""
    modes = reference.training, candidate.training
    reference.eval(), candidate.eval()
    try:
        pairs = [(_logits(reference, ids), _logits(candidate, ids)) for ids in inputs]
    finally:
        reference.train(modes[0]), candidate.train(modes[1])
    max_abs = max(float((r - c).abs().max()) for r, c in pairs)
    diff = sum(float((r - c).pow(2).sum()) for r, c in pairs) ** 0.5
    norm = sum(float(r.pow(2).sum()) for r, _ in pairs) ** 0.5
    return LogitGap(max_abs, diff / norm if norm > 0 else 0.0, len(pairs))


def nf4_gap(full_base: nn.Module, attach: Callable[[nn.Module], nn.Module], tokenizer: Any = None) -> LogitGap:
    """The adapter that ``attach(base)`` puts on a base: its logits on an NF4 copy of the
    full-precision ``full_base`` (the QLoRA base, the reference) against those on a full-precision
    copy. ``full_base`` itself is not changed (so the copies take twice its memory for a moment)."""
    from peftlab.quant import quantize_model

    inputs = probe_inputs(full_base, tokenizer)
    quantized = attach(quantize_model(copy.deepcopy(full_base)))
    return logit_gap(quantized, attach(copy.deepcopy(full_base)), inputs)


class BaseMismatchWarning(UserWarning):
    """An adapter was loaded, as asked, on another base than the one it was trained on."""
