"""Activation (gradient) checkpointing of a transformers model, set up one way for the model wrapper,
the training engine and ``prepare_model_for_kbit_training``.

Reentrant checkpointed blocks recompute only when their input needs grad; with a frozen embedding it
does not, and the adapters inside would silently get no gradient. So the embedding's output is made
to require grad too (transformers' ``enable_input_require_grads``).
"""

from __future__ import annotations

from typing import Any


def enable_activation_checkpointing(model: Any, checkpointing_kwargs: dict | None = None, **kwargs: Any) -> None:
    """Checkpoint ``model``'s blocks (a transformers model) with ``checkpointing_kwargs`` (e.g.
    ``{"use_reentrant": False}``), and make its inputs require grad."""
    renamed = getattr(model, "activation_checkpointing_enable", None)  # transformers 5's name; the old one is an alias
    if renamed is not None:
        renamed(checkpointing_kwargs, **kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs, **kwargs)
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
