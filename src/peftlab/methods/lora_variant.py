"""LoRA variants: changes to LoRA that a ``LoraConfig`` field turns on, each declared in its own file and
looked up by ``lora.py``, which imports none of them (HF peft's ``LoraVariant`` / ``resolve_lora_variant``)::

    class DoraVariant(LoraVariant):          # dora.py
        def applies(self, config): return config.use_dora
        adapter_class = DoraAdapter
    register_lora_variant(DoraVariant())

A variant changes what it overrides and nothing else; every hook defaults to plain LoRA's behaviour.
Where LoRA starts (``init_lora_weights``) is a registry of its own, ``lora_init/``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from peftlab.adapter import Adapter
from peftlab.base import BaseLayerView

if TYPE_CHECKING:
    from peftlab.model import PeftModel


class LoraVariant:
    #: The per-layer module where the variant applies (None: LoRA's own); at most one applying variant sets one.
    adapter_class: type[Adapter] | None = None

    def applies(self, config: Any) -> bool:
        """Whether ``config`` (a LoraConfig) turns this variant on."""
        raise NotImplementedError

    def check_config(self, config: Any) -> None:
        """Raise ValueError for a value of the variant's fields that it cannot run."""

    def check_base(self, config: Any, view: BaseLayerView, path: str) -> None:
        """Raise UnsupportedBaseError naming ``path`` if the variant cannot adapt this layer."""

    def extra_numel(self, config: Any, view: BaseLayerView) -> int:
        """Values the variant adds to the layer's adapter, beyond LoRA's A and B."""
        return 0

    def param_groups(
        self, model: PeftModel, named: list[tuple[str, nn.Parameter]], lr: float, weight_decay: float, config: Any
    ) -> list[dict] | None:
        """The adapter's optimizer groups, or None for LoRA's (matrices decayed, the rest not)."""
        return None

    def rename_saved_keys(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """File keys other writers (older HF versions) used for the variant's tensors -> ours; applied to
        every LoRA file, since the config that says whether the variant applies is read with them."""
        return tensors


_VARIANTS: list[LoraVariant] = []


def register_lora_variant(variant: LoraVariant) -> LoraVariant:
    if any(type(known) is type(variant) for known in _VARIANTS):
        raise ValueError(f"the LoRA variant {type(variant).__name__} is registered twice.")
    _VARIANTS.append(variant)
    return variant


def lora_variants() -> list[LoraVariant]:
    """Every registered variant, in registration order."""
    return list(_VARIANTS)


def variants_of(config: Any) -> list[LoraVariant]:
    """The variants ``config`` turns on."""
    return [variant for variant in _VARIANTS if variant.applies(config)]
