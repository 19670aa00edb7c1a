"""Capabilities that one method has and the others lack, as protocols the core checks with ``isinstance``.

A method opts in by defining the protocol's methods in its own file; :class:`~peftlab.methods.method.Method`
declares none of them, so the protocol every method implements stays the hooks all of them use, and a
reader of the core sees where a capability is asked for::

    if isinstance(method, RunsAtSeveralRanks):
        method.set_rank(model, name, rank)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from torch import nn

from peftlab.config import AdapterConfig

if TYPE_CHECKING:
    from peftlab.model import PeftModel


@runtime_checkable
class RunsAtSeveralRanks(Protocol):
    """One trained adapter that runs at any of several ranks (DyLoRA); the lab evaluates each."""

    def inference_ranks(self, model: PeftModel, adapter_name: str) -> list[int]:
        """The ranks the trained adapter can run at through ``set_rank``."""
        ...

    def set_rank(self, model: PeftModel, adapter_name: str, rank: int) -> None:
        """Make the adapter compute at ``rank`` from now on (inference, merge, export)."""
        ...


@runtime_checkable
class MovesRankBudget(Protocol):
    """A rank budget moved between layers while training (AdaLoRA, dora_rank); the lab plots where it went."""

    def rank_per_layer(self, model: PeftModel, adapter_name: str) -> dict[str, int]:
        """Each layer's live rank."""
        ...


@runtime_checkable
class PatchesTheModel(Protocol):
    """Changes the model beyond its adapted layers (LongLoRA: the RoPE scale and the training attention),
    so it must check the model first and undo the change when the model is handed out (and in ``remove``,
    every method's undoing of ``inject``)."""

    def check_model_config(self, model_config: Any) -> None:
        """Raise ValueError if no model of this ``transformers`` config can take the change (its family, its
        attention): read before weights load, so ``compare --methods all`` leaves the method out."""
        ...

    def check_model(self, model: PeftModel, config: AdapterConfig) -> None:
        """Raise ValueError if this model cannot take the change (its family, its other adapters)."""
        ...

    def unload(self, model: PeftModel, adapter_name: str, state: nn.Module | None) -> None:
        """The peftlab modules are about to be taken out (``unload``, ``merge_and_unload``): undo what would
        make the plain model need peftlab, keep what the trained model is."""
        ...


#: Every capability; the registry refuses a method that defines part of one, which would be silently ignored.
CAPABILITIES: tuple[type, ...] = (RunsAtSeveralRanks, MovesRankBudget, PatchesTheModel)


def hooks_of(capability: type) -> set[str]:
    """The methods a class must define to have ``capability``."""
    return {name for name in vars(capability) if not name.startswith("_") and callable(vars(capability)[name])}


def check_capabilities(method: object) -> None:
    """Raise ValueError if ``method`` defines some of a capability's hooks but not all."""
    for capability in CAPABILITIES:
        hooks = hooks_of(capability)
        defined = {name for name in hooks if callable(getattr(method, name, None))}
        if defined and defined != hooks:
            raise ValueError(
                f"{type(method).__name__} defines {', '.join(sorted(defined))} of the {capability.__name__} capability "
                f"but not {', '.join(sorted(hooks - defined))}: the core calls a capability's hooks only when all "
                "are there; define the rest."
            )
