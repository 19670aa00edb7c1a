"""Where LoRA starts: the initialisations ``LoraConfig(init_lora_weights=...)`` names, one small
declared piece each, looked up by name (HF peft's names, values and defaults).

    True         A kaiming-uniform, B = 0 (the default)          default.py
    False        A and B kaiming-uniform (not a no-op; debugging)  default.py
    "gaussian"   A ~ N(0, 1/r²), B = 0                             default.py
    "orthogonal" A, B from one random orthogonal r×r matrix         orthogonal.py
    "pissa", "pissa_niter_N"   principal singular vectors; W ← W − s·BA   pissa.py
    "olora"      QR of W; W ← W − s·BA                              olora.py
    "loftq"      alternate NF4 quantization and SVD (LoftQConfig)    loftq.py
    "eva"        top input components on data; ranks redistributed  eva.py
    "corda"      SVD of W·C, C the input covariance on data         corda.py
    "mica"       B = W's minor left singular vectors (frozen), A = 0  mica.py

An init is a :class:`LoraInit` registered with :func:`register_init`. The LoRA adapter calls
``draw`` while it is built (the random part, in HF's order of draws, so one seed gives HF's
tensors) and the method calls ``from_base`` once the adapter exists (the part that reads, and may
rewrite, the frozen weight). Inits that rewrite it (``changes_base``) make an adapter that only
fits the rewritten base: ``conversion.py`` writes it for the unmodified one
(``save_pretrained(path_initial_model_for_weight_conversion=...)``, the plain-LoRA export).
``incremental_pca.py`` is EVA's estimator.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import pkgutil
import warnings
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from peftlab.base import BaseLayerView

if TYPE_CHECKING:
    from peftlab.methods.lora import LoraAdapter, LoraConfig


class LoraInit:
    """One way to start a LoRA adapter; subclasses override what they need."""

    #: The ``init_lora_weights`` value that selects it (True, False or a name).
    key: ClassVar[Any]
    #: For a family of names (``pissa``, ``pissa_niter_N``): the prefix they share, and how the list of
    #: valid values shows them.
    prefix: ClassVar[str | None] = None
    shown: ClassVar[str | None] = None
    #: It rewrites the frozen weight, so the adapter fits only the rewritten base.
    changes_base: ClassVar[bool] = False

    def reruns_on_load(self, value: Any) -> bool:
        """Whether loading a saved adapter on the original base can run the init again to the same start
        (no data, no random draws): False for CorDA and the randomized PiSSA."""
        return True

    def check_config(self, config: LoraConfig, value: Any) -> None:
        """Raise ValueError if ``config`` cannot use this init (a sub-config out of range)."""

    def check_base(self, config: LoraConfig, view: BaseLayerView, path: str) -> None:
        """Raise :class:`~peftlab.methods.method.UnsupportedBaseError` for a layer it cannot start on."""

    def draw(self, adapter: LoraAdapter, value: Any) -> None:
        """The random start; default: HF's default (A kaiming-uniform, B = 0)."""
        draw_default(adapter, value)

    def from_base(self, adapter: LoraAdapter, view: BaseLayerView, config: LoraConfig, path: str, value: Any) -> None:
        """Set A and B from the frozen weight (and rewrite it where the init does); default: nothing."""


#: key (True, False, "pissa", ...) -> init; prefixed families under their prefix.
INITS: dict[Any, LoraInit] = {}


def register_init(init: LoraInit) -> LoraInit:
    name = init.prefix or init.key
    if name in INITS:
        raise ValueError(f"init_lora_weights={name!r} is registered twice.")
    INITS[name] = init
    return init


def valid_values() -> list[str]:
    ordered = sorted(INITS.values(), key=lambda i: (0, not i.key) if isinstance(i.key, bool) else (1, i.key))
    return [init.shown or repr(init.key) for init in ordered]


def init_for(value: Any) -> LoraInit:
    """The init that ``init_lora_weights=value`` selects; a clear error listing the valid values."""
    if isinstance(value, bool) and value in INITS:
        return INITS[value]
    if isinstance(value, str):
        if value in INITS and INITS[value].prefix is None:
            return INITS[value]
        for init in INITS.values():
            if init.prefix and value.startswith(init.prefix):
                return init
    raise ValueError(f"init_lora_weights={value!r} is not an initialisation peftlab knows; choose one of {', '.join(valid_values())}.")


def check_init_config(config: LoraConfig) -> None:
    """Validate ``init_lora_weights`` and its sub-config (``LoraConfig.__post_init__``); as HF, a
    LoftQConfig is kept as a dict, and one given with another init is dropped with a warning."""
    from peftlab.methods.lora_init.corda import CordaConfig
    from peftlab.methods.lora_init.eva import EvaConfig

    if dataclasses.is_dataclass(config.loftq_config):
        config.loftq_config = dataclasses.asdict(config.loftq_config)
    if isinstance(config.eva_config, dict):  # as read from adapter_config.json
        config.eva_config = EvaConfig(**config.eva_config)
    if isinstance(config.corda_config, dict):
        config.corda_config = CordaConfig(**config.corda_config)
    for name in ("eva", "corda"):
        if getattr(config, f"{name}_config") is not None and config.init_lora_weights != name:
            warnings.warn(f"{name}_config is ignored: init_lora_weights is not {name!r} (as HF peft).", stacklevel=4)
    if config.loftq_config and config.init_lora_weights != "loftq":
        warnings.warn("loftq_config is ignored: init_lora_weights is not 'loftq' (as HF peft).", stacklevel=4)
        config.loftq_config = {}
    init_for(config.init_lora_weights).check_config(config, config.init_lora_weights)


def check_method_runs(method: Any, config: LoraConfig) -> None:
    """Refuse an init that ``method`` does not run (``LoraMethod.initialisations``: None runs all)."""
    value = config.init_lora_weights
    allowed = method.initialisations
    if allowed is not None and init_for(value).key not in allowed:
        raise ValueError(
            f"method {method.name!r} does not run init_lora_weights={value!r}; it starts from "
            f"{', '.join(map(repr, allowed))}."
        )


def start_from_base(adapter: LoraAdapter, view: BaseLayerView, config: LoraConfig, path: str) -> None:
    """The part of the init that reads the frozen weight (after the adapter's random draws)."""
    init = init_for(config.init_lora_weights)
    if type(init).from_base is LoraInit.from_base:
        return
    init.from_base(adapter, view, config, path, config.init_lora_weights)
    if init.changes_base:
        from peftlab.methods.lora_init.conversion import keep_initial_factors

        keep_initial_factors(adapter)
    adapter.after_base_init(view)


# -- shared by the inits ---------------------------------------------------------------------------


def burn_layer_inits(adapter: LoraAdapter) -> None:
    """Draw what HF draws before its own init: nn.Linear's default for A [r, in] and B [out, r] (an
    Embedding adapter: randn for both), so that after one seed every init draws HF's numbers.
    Returns nothing: the values are overwritten."""
    if adapter.is_embedding:
        nn.init.normal_(adapter.lora_A), nn.init.normal_(adapter.lora_B)
    else:
        nn.init.kaiming_uniform_(adapter.lora_A, a=math.sqrt(5)), nn.init.kaiming_uniform_(adapter.lora_B, a=math.sqrt(5))


@torch.no_grad()
def draw_default(adapter: LoraAdapter, value: Any) -> None:
    """HF's ``init_lora_weights=True``: A kaiming-uniform (nn.Linear's default), B = 0; on an
    Embedding A = 0, B ~ N(0, 1)."""
    burn_layer_inits(adapter)
    if adapter.is_embedding:
        nn.init.zeros_(adapter.lora_A), nn.init.normal_(adapter.lora_B)
    else:
        nn.init.kaiming_uniform_(adapter.lora_A, a=math.sqrt(5)), nn.init.zeros_(adapter.lora_B)


def base_weight_fp32(view: BaseLayerView) -> torch.Tensor:
    """The frozen weight as ``[out, in]`` in float32 (a 4-bit weight dequantised)."""
    return view.weight(torch.float32)


def store_base_weight(view: BaseLayerView, weight: torch.Tensor) -> None:
    """Replace the frozen weight by ``weight`` ([out, in], any float dtype): cast once to the stored
    dtype, as HF does (a 4-bit weight is re-quantized with the layer's own settings)."""
    module = view.module
    with torch.no_grad():
        if hasattr(module, "requantize_"):
            module.requantize_(weight)
        else:
            stored = weight.T if view.fan_in_fan_out else weight
            module.weight.copy_(stored.to(module.weight.dtype))  # in place: bumps the version DoRA caches by


def set_factors(adapter: LoraAdapter, a: torch.Tensor, b: torch.Tensor) -> None:
    """A [r, in] and B [out, r] into the adapter's own tensors (their dtype and device kept)."""
    with torch.no_grad():
        adapter.lora_A.copy_(a)
        adapter.lora_B.copy_(b)


def fill_sub_config(config: LoraConfig, field: str, default: Any) -> None:
    """HF's rule for EVA's and CorDA's sub-configs: missing, they take their defaults, with a warning."""
    if getattr(config, field) is None:
        warnings.warn(f"init_lora_weights={config.init_lora_weights!r} without {field}: using its defaults (as HF peft).", stacklevel=6)
        setattr(config, field, default())


def refuse_embedding(init_name: str, view: BaseLayerView, path: str) -> None:
    from peftlab.methods.method import UnsupportedBaseError

    if view.takes_ids:
        raise UnsupportedBaseError(
            f"init_lora_weights={init_name!r} on an Embedding layer ({path}) is not supported: it decomposes a linear "
            "weight. Leave embeddings out of target_modules, or use the default init."
        )


def refuse_quantized(init_name: str, view: BaseLayerView, path: str, why: str) -> None:
    from peftlab.methods.method import UnsupportedBaseError

    if hasattr(view.module, "requantize_"):
        raise UnsupportedBaseError(f"init_lora_weights={init_name!r} on the 4-bit layer {path}: {why}")


for _module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    importlib.import_module(f"{__name__}.{_module.name}")
