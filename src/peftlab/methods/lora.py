"""LoRA (Hu et al. 2021) and rsLoRA (Kalajdzievski 2023).

            ┌──────────┐
    x ──┬──▶│ W frozen │──────────────┐
        │   └──────────┘              ▼
        └──▶ dropout ─▶ A [r,in] ─▶ B [out,r] ─▶ · s ─▶ (+) ─▶ h

    h = x Wᵀ + s · (dropout(x) Aᵀ) Bᵀ,   s = alpha / r   (rsLoRA: alpha / √r)

The low-rank path runs on activations: ``W + BA`` is never built in the forward, and the add of
the low-rank product is fused into one ``addmm``. Merge adds ``s · B A`` to the frozen weight.

Registered names: ``lora``, ``rslora`` (``use_rslora``), ``dora`` (``use_dora``, see ``dora.py``)
and ``qlora`` (LoRA on a base quantized to NF4 first); all write HF's ``LORA`` files.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from peftlab.base import BaseLayerView
from peftlab.config import AdapterConfig, check_regex, default_field
from peftlab.adapter import Adapter
from peftlab.methods import lora_init
from peftlab.methods.fused import LoraLinearFunction, can_fuse
from peftlab.methods.lora_targets import LORA_DEFAULT_TARGET_MODULES
from peftlab.methods.lora_variant import lora_variants, variants_of
from peftlab.methods.method import ADAPTER_DROPOUT, Method, MethodOption
from peftlab.methods.lora_init.corda import CordaConfig
from peftlab.methods.lora_init.eva import EvaConfig
from peftlab.methods.lora_init.loftq import LoftQConfig
from peftlab.methods.registry import register_method


@dataclass
class LoraConfig(AdapterConfig):
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    bias: str = "none"
    #: Where the adapter starts (``lora_init/``): True, False, "gaussian", "orthogonal", "pissa", ...
    init_lora_weights: bool | str = True
    #: HF's sub-config of ``init_lora_weights="loftq"`` (a LoftQConfig, kept as a dict as HF does).
    loftq_config: LoftQConfig | dict = default_field({})
    #: HF's sub-config of ``init_lora_weights="eva"`` (see ``initialize_lora_eva_weights``).
    eva_config: EvaConfig | dict | None = None
    #: HF's sub-config of ``init_lora_weights="corda"`` (see ``preprocess_corda``).
    corda_config: CordaConfig | dict | None = None
    rank_pattern: dict = default_field({})
    alpha_pattern: dict = default_field({})
    #: HF's field: a tied output embedding shares the input embedding's trained copy (``modules_to_save``).
    ensure_weight_tying: bool = False
    #: LoRA+ (``loraplus.py``): B's learning rate over A's, and the rate of adapters on embeddings.
    loraplus_lr_ratio: float | None = None
    loraplus_lr_embedding: float = 1e-6

    peft_type = "LORA"
    default_target_modules = LORA_DEFAULT_TARGET_MODULES
    unsupported_hf_fields = (
        "lora_bias", "use_qalora", "layer_replication", "trainable_token_indices", "alora_invocation_tokens",
        "target_parameters", "use_bdlora",
    )
    peftlab_only_fields = ("loraplus_lr_ratio", "loraplus_lr_embedding")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive("r", self.r, whole=True)
        _check_positive("lora_alpha", self.lora_alpha)
        for key, rank in self.rank_pattern.items():
            check_regex(f"rank_pattern key {key!r}", key)
            _check_positive(f"rank_pattern[{key!r}]", rank, whole=True)
        for key, alpha in self.alpha_pattern.items():
            check_regex(f"alpha_pattern key {key!r}", key)
            _check_positive(f"alpha_pattern[{key!r}]", alpha)
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}; 0 turns dropout off.")
        if self.bias != "none":
            raise ValueError(f"bias={self.bias!r} is not supported: peftlab trains no base biases; use bias='none'.")
        for variant in variants_of(self):
            variant.check_config(self)
        lora_init.check_init_config(self)

    def rank_and_alpha(self, module_path: str) -> tuple[int, float]:
        """The rank and alpha of one module: ``rank_pattern``/``alpha_pattern`` override, as in HF."""
        return (
            _pattern_value(self.rank_pattern, module_path, self.r),
            _pattern_value(self.alpha_pattern, module_path, self.lora_alpha),
        )


class LoraMethod(Method):
    config_class = LoraConfig
    #: The per-layer module (None: LoRA's, or an applying variant's, e.g. DoRA's); a LoRA-based method sets its own.
    adapter_class: type[Adapter] | None = None
    options = {
        "r": MethodOption(int, "adapter rank", "positive", lambda v: v > 0),
        "lora_alpha": MethodOption(float, "LoRA scale numerator, s = alpha / r", "positive", lambda v: v > 0, relative_to="r"),
        "lora_dropout": ADAPTER_DROPOUT,
        "loraplus_lr_ratio": MethodOption(
            float, "LoRA+: B's learning rate over A's (the loraplus method: 16; unset: plain LoRA)", "positive", lambda v: v > 0
        ),
    }
    #: Adapters start at zero and have few parameters, so they want a learning rate ~20-50x that of
    #: full fine-tuning (LoRA paper; HF peft's examples: 1e-3 to 2e-4 vs 2e-5 to 5e-5). r = 8 with
    #: alpha = 2r (scale 2) is HF peft's usual example; light dropout regularises the lab's short runs.
    #: With these and the shared defaults (batch 32, max length 64, linear decay after 6% warmup),
    #: LoRA on MiniLM-L6 reaches 0.85 on SST-2 validation after one epoch over 8000 examples.
    run_defaults = {"lr": 1e-3, "r": 8, "lora_alpha": 16, "lora_dropout": 0.05}
    #: The ``init_lora_weights`` values this method runs (None: every one in ``lora_init/``).
    initialisations: tuple | None = None

    def check_base(self, config, view, path):
        lora_init.init_for(config.init_lora_weights).check_base(config, view, path)
        for variant in variants_of(config):
            variant.check_base(config, view, path)

    def check_targets(self, config, targets):
        lora_init.check_method_runs(self, config)
        # A rank_pattern/alpha_pattern key that matches no adapted module is a typo, not a no-op.
        paths = list(targets)
        for option, patterns in (("rank_pattern", config.rank_pattern), ("alpha_pattern", config.alpha_pattern)):
            for key in patterns:
                if not any(_pattern_matches(key, path) for path in paths):
                    shown = ", ".join(paths[:4]) + (" ..." if len(paths) > 4 else "")
                    raise ValueError(
                        f"{option} key {key!r} matches none of the {len(paths)} adapted modules ({shown}); "
                        "a key is a regex matched against the end of a module path, e.g. 'q_proj' or 'layers.0.*q_proj'."
                    )

    def adapter_numel(self, config, view, path):
        r, _ = config.rank_and_alpha(path)
        return r * (view.in_features + view.out_features) + sum(v.extra_numel(config, view) for v in variants_of(config))

    def make_adapter(self, config, view, path, state):
        r, alpha = config.rank_and_alpha(path)
        adapter = self._adapter_class(config)(view, r, alpha, config.lora_dropout, config.use_rslora, config.init_lora_weights)
        lora_init.start_from_base(adapter, view, config, path)
        return adapter

    def _adapter_class(self, config: LoraConfig) -> type[Adapter]:
        own = [v.adapter_class for v in variants_of(config) if v.adapter_class is not None]
        if len(own) > 1:
            raise ValueError(f"LoRA variants with their own layers cannot combine: {', '.join(c.__name__ for c in own)}.")
        if own and self.adapter_class is not None:
            raise ValueError(f"the {self.name} method has its own layer ({self.adapter_class.__name__}); it cannot run "
                             f"the variant {own[0].__name__} as well.")
        return self.adapter_class or (own[0] if own else LoraAdapter)

    def param_groups(self, model, adapter_name, lr, weight_decay):
        config = model.peft_config[adapter_name]
        own = {id(p) for _, p in model.adapter_parameters(adapter_name)}
        named = [(n, p) for n, p in model.named_parameters() if id(p) in own and p.requires_grad]
        for variant in variants_of(config):
            groups = variant.param_groups(model, named, lr, weight_decay, config)
            if groups is not None:
                return [group for group in groups if group["params"]]
        return super().param_groups(model, adapter_name, lr, weight_decay)

    def as_low_rank(self, model, adapter_name, rank=None):
        from peftlab.methods.lora_init.conversion import against_original_base

        # An init that rewrote the base (PiSSA, OLoRA): the export is for the original base its config names.
        return against_original_base(model, adapter_name, super().as_low_rank(model, adapter_name, rank))

    def rename_saved_keys(self, tensors):
        for variant in lora_variants():
            tensors = variant.rename_saved_keys(tensors)
        return tensors


def _check_positive(name: str, value, whole: bool = False) -> None:
    if isinstance(value, bool) or (whole and not isinstance(value, int)) or not value > 0:
        kind = "a positive integer" if whole else "a positive number"
        raise ValueError(f"{name} must be {kind}, got {value!r}.")


def _pattern_matches(key: str, module_path: str) -> bool:
    # HF semantics: a key is a regex that must match a suffix of the path at a '.' boundary.
    return re.match(rf"(.*\.)?({key})$", module_path) is not None


def _pattern_value(patterns: dict, module_path: str, default):
    return next((value for key, value in patterns.items() if _pattern_matches(key, module_path)), default)


class LoraAdapter(Adapter):
    #: Factors the init keeps frozen (MiCA: lora_B).
    frozen_factors: tuple[str, ...] = ()

    def __init__(self, base: BaseLayerView, r: int, alpha: float, dropout: float, use_rslora: bool, init) -> None:
        super().__init__()
        self.r = r
        # r = 0: a layer that AdaLoRA pruned to nothing (HF allows it); the adapter adds no term.
        self.scaling = 0.0 if r == 0 else alpha / math.sqrt(r) if use_rslora else alpha / r
        self.is_embedding = base.takes_ids
        # HF applies no dropout to token ids.
        self.dropout = nn.Dropout(dropout) if dropout > 0 and not self.is_embedding else None
        dtype = torch.float32 if base.dtype not in (torch.float32, torch.float64) else base.dtype
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=base.device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, r, device=base.device, dtype=dtype))
        self.reset_parameters(init)

    def reset_parameters(self, init) -> None:
        """The random start of ``init_lora_weights=init`` (see ``lora_init/``), in HF's order of draws."""
        with torch.no_grad():
            lora_init.init_for(init).draw(self, init)

    def after_base_init(self, base: BaseLayerView) -> None:
        """Called once an init has set A, B (and maybe rewritten the base) from the frozen weight."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [param for name, param in self.named_parameters() if name not in self.frozen_factors]

    def _adapter_input(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_embedding and x.dtype != self.lora_A.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.dtype)
        return self.dropout(x) if self.dropout is not None else x

    def update_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(A, B, s)`` of the update ``s · B A`` that forward, merge and export use; a method whose
        update is LoRA's on other factors (DyLoRA's first b components, dora_rank's ``diag(c) A``)
        overrides this alone and keeps LoRA's forward, fused node, merge and export."""
        return self.lora_A, self.lora_B, self.scaling

    def forward(self, x, base_out, base):
        a, b, scale = self.update_factors()
        u = base.project_input(self._adapter_input(x), a)
        return add_low_rank(base_out, u, b, scale)

    def active_dropout(self) -> float:
        """The dropout probability this forward applies: 0 in eval mode or without dropout."""
        return self.dropout.p if self.dropout is not None and self.training else 0.0

    def fused_forward(self, x: torch.Tensor, base: BaseLayerView) -> torch.Tensor | None:
        """Base plus adapter in one autograd node (see ``fused.py``); None where it does not apply."""
        a, b, scale = self.update_factors()
        if not can_fuse(x, base, a, b):
            return None
        return LoraLinearFunction.apply(x, a, b, scale, base, self.active_dropout())

    def delta_weight(self, base):
        a, b, scale = self.update_factors()
        return scale * (b @ a)

    def low_rank(self, base):
        a, b, scale = self.update_factors()
        return a.detach(), scale * b.detach()

    def saved_tensors(self):
        if self.is_embedding:
            return {"lora_embedding_A": self.lora_A, "lora_embedding_B": self.lora_B}
        return {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B}


def add_low_rank(out: torch.Tensor, u: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``out + scale · u Bᵀ`` as one fused ``addmm`` (no separate scale or add over ``[N, out]``)."""
    if b.dtype != out.dtype and not torch.is_autocast_enabled(out.device.type):
        return out + (scale * (u @ b.T)).to(out.dtype)
    flat = torch.addmm(out.reshape(-1, out.shape[-1]), u.reshape(-1, u.shape[-1]), b.T, alpha=scale)
    return flat.view(out.shape)


register_method(LoraMethod("lora"))
register_method(LoraMethod("rslora", preset={"use_rslora": True}))
register_method(LoraMethod("dora", preset={"use_dora": True}))
register_method(LoraMethod("qlora", quantization="nf4"))
