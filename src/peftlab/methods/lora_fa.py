"""LoRA-FA, LoRA with a frozen down-projection (Zhang et al. 2023), method name ``lora_fa``.

    h = x Wᵀ + s · (drop(x) Aᵀ) Bᵀ       A [r, in] frozen at its random init, B [out, r] trained

Only B trains, and B's gradient needs only ``u = drop(x) Aᵀ`` ([N, r]) while x's gradient needs
only the weights. So the layer keeps ``u`` for backward and never the input ``x`` ([N, in]) that
LoRA keeps for A's gradient: the activation memory the paper is about. LoRA's fused node
(``fused.py``) keeps ``x`` (with dropout, the dropped-out ``x``) only when A trains, so LoRA-FA
runs on it unchanged (with dropout it also keeps the mask, as the positions of the dropped
entries, as LoRA does).

The files are plain LoRA files (``peft_type`` LORA; they load in HF peft and here as LoRA, where
``is_trainable=True`` trains A too). On an ``nn.Embedding``, HF's LoRA starts with A = 0, which a
frozen A would keep at zero for ever: here A ~ N(0, 1) and B = 0 instead.

:func:`create_lorafa_optimizer` is HF peft's LoRA-FA optimizer (same name and signature): AdamW
with B's gradient projected as if A trained too, ``g_B ← g_B (A Aᵀ)⁻¹ / s²``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from peftlab.methods.lora import LoraAdapter, LoraConfig, LoraMethod
from peftlab.methods.registry import register_method


@dataclass
class LoraFaConfig(LoraConfig):
    """LoRA's fields (HF's ``LoraConfig``); the adapter is saved as a LoRA adapter."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.use_dora:
            raise ValueError("LoRA-FA with use_dora=True is not supported: DoRA's magnitude needs A's gradient; use dora.")


class LoraFaAdapter(LoraAdapter):
    def reset_parameters(self, init) -> None:
        super().reset_parameters(init)
        if self.is_embedding and init is not False:
            with torch.no_grad():
                nn.init.normal_(self.lora_A)
                nn.init.zeros_(self.lora_B)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [self.lora_B]


class LoraFaMethod(LoraMethod):
    config_class = LoraFaConfig
    adapter_class = LoraFaAdapter
    #: All but MiCA, which freezes B: with A frozen too nothing would train.
    initialisations = (True, False, "gaussian", "orthogonal", "pissa", "olora", "loftq", "eva", "corda")


# Its files are LoRA's: they load as LoRA, so it does not claim the LORA peft_type.
register_method(LoraFaMethod("lora_fa", loads_peft_type=False))


# -- HF peft's LoRA-FA optimizer -------------------------------------------------------------------


class LoraFAOptimizer(torch.optim.Optimizer):
    """HF peft's LoRA-FA optimizer: its AdamW (``eps`` 1e-6, decay applied after the step to the
    updated value) where each B in ``projections`` first has its gradient projected,
    ``g_B ← g_B (A Aᵀ + 1e-8·I)⁺ / s²``. ``projections`` maps a B parameter to ``(A, s)``.

    HF computes that projection under bfloat16 autocast wherever bfloat16 is available (any recent
    CPU or GPU), rounding fp32 gradients to 8 bits of mantissa; peftlab computes it in the
    gradient's dtype. The state is keyed by parameter, so ``state_dict()`` round-trips.
    """

    def __init__(
        self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
        weight_decay: float = 0.0, correct_bias: bool = True,
        projections: dict[nn.Parameter, tuple[torch.Tensor, float]] | None = None,
    ) -> None:
        if lr < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1) or eps < 0:
            raise ValueError(f"invalid LoRA-FA optimizer settings: lr={lr}, betas={betas}, eps={eps}.")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "correct_bias": correct_bias}
        super().__init__(params, defaults)
        self.projections = projections or {}

    def _projected(self, param: nn.Parameter, grad: torch.Tensor) -> torch.Tensor:
        a, scale = self.projections[param]
        gram = a @ a.T
        inverse = torch.linalg.pinv(gram + 1e-8 * torch.eye(a.shape[0], device=a.device, dtype=a.dtype))
        return ((1 / scale**2) * (grad @ inverse.to(grad.dtype))).to(grad.dtype)

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = self._projected(param, param.grad) if param in self.projections else param.grad
                state = self.state[param]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(param), exp_avg_sq=torch.zeros_like(param))
                state["step"] += 1
                state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = state["exp_avg_sq"].sqrt().add_(group["eps"])
                step_size = group["lr"]
                if group["correct_bias"]:
                    step_size *= math.sqrt(1 - beta2 ** state["step"]) / (1 - beta1 ** state["step"])
                param.addcdiv_(state["exp_avg"], denom, value=-step_size)
                if group["weight_decay"] > 0:
                    param.add_(param, alpha=-group["lr"] * group["weight_decay"])
        return loss


def create_lorafa_optimizer(
    model: nn.Module, r: int, lora_alpha: int, lr: float, weight_decay: float = 0.0, use_rslora: bool | None = None
) -> LoraFAOptimizer:
    """HF peft's ``create_lorafa_optimizer``, same signature: freezes every ``lora_A`` of the active
    adapters and returns a :class:`LoraFAOptimizer` over all trainable parameters (one group,
    ``weight_decay`` on all of them, as HF).

    As HF peft 0.21, each layer's projection uses that layer's own scale (``rank_pattern`` and
    ``alpha_pattern`` included); ``r`` and ``lora_alpha`` are kept for the signature. ``use_rslora``
    is deprecated in HF: given, it must match every active adapter's config.
    """
    configs = {name: model.peft_config[name] for name in model.active_adapters}
    if use_rslora is not None:
        mismatched = sorted(name for name, config in configs.items() if bool(getattr(config, "use_rslora", False)) != use_rslora)
        if mismatched:
            raise ValueError(
                f"use_rslora={use_rslora} was passed to create_lorafa_optimizer but adapters {mismatched} are configured "
                "otherwise; set use_rslora in the config and leave the argument out (HF deprecates it)."
            )
        warnings.warn("use_rslora in create_lorafa_optimizer is deprecated (as in HF peft); set it in the config.", FutureWarning, stacklevel=2)
    projections: dict[nn.Parameter, tuple[torch.Tensor, float]] = {}
    for name in configs:
        for _, adapter in model.adapters_of(name):
            if isinstance(adapter, LoraAdapter):
                adapter.lora_A.requires_grad_(False)
                projections[adapter.lora_B] = (adapter.lora_A, adapter.scaling)
    params = [param for param in model.parameters() if param.requires_grad]
    if not projections:
        raise ValueError("create_lorafa_optimizer: the active adapters have no LoRA layers (lora_A, lora_B) to project.")
    return LoraFAOptimizer([{"params": params}], lr=lr, weight_decay=weight_decay, projections=projections)
