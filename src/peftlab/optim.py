"""Optimizers and learning-rate schedules for training what ``requires_grad``.

    optimizer = make_optimizer(model, "adamw", lr=1e-3, weight_decay=0.01)
    scheduler = make_scheduler(optimizer, "cosine", total_steps=1000, warmup_steps=60)

Weight decay goes only to matrices (:mod:`peftlab.weight_decay`). A method may group its adapter's tensors
itself (``Method.param_groups``), e.g. with their own learning rates. Every schedule is a pure function of the
step, so a resumed run continues exactly where the saved one stopped.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from peftlab.api_guard import require_trainable
from peftlab.weight_decay import decay_groups

#: bitsandbytes' 8-bit AdamW (optimizer state in 8 bits; "paged" moves it to CPU memory under GPU
#: memory pressure), by our name -> its class in ``bitsandbytes.optim``. Their kernels are CUDA only.
CUDA_OPTIMIZERS = {"adamw_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit"}
OPTIMIZERS = ("adamw", "sgd", *CUDA_OPTIMIZERS)
SCHEDULERS = ("constant", "linear", "cosine")


def param_groups(model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """The trainable parameters in groups: each active adapter's as its method groups them
    (``Method.param_groups``: LoRA+ gives B its own learning rate), everything else by
    :func:`decay_groups`."""
    from peftlab.model import PeftModel

    groups: list[dict] = []
    if isinstance(model, PeftModel):
        for name in model.active_adapters:
            groups += model.method_of(name).param_groups(model, name, lr, weight_decay)
    grouped = {id(p) for group in groups for p in group["params"]}
    rest = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in grouped]
    groups += decay_groups(rest, lr, weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters: did the method freeze everything?")
    return groups


def make_optimizer(
    model: nn.Module, name: str, lr: float, weight_decay: float = 0.0, momentum: float = 0.9
) -> torch.optim.Optimizer:
    require_trainable(model, f"an {name} optimizer")
    groups = param_groups(model, lr, weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, fused=_fused_adamw_applies(groups) or None)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name in CUDA_OPTIMIZERS:
        return _bitsandbytes_optimizer(name, groups, lr)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}.")


#: Where torch's one-kernel-per-tensor AdamW runs: an adapter's hundreds of small tensors step
#: ~5x faster than with the per-tensor Python loop (17 ms -> 3.5 ms a step for SmolLM2's LoRA).
_FUSED_ADAMW_DTYPES = {"cpu": (torch.float32, torch.float64), "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16)}


def _fused_adamw_applies(groups: list[dict]) -> bool:
    """Plain tensors (not DTensors or other subclasses) on a device and in a dtype fused AdamW takes."""
    return all(
        type(p) in (torch.Tensor, nn.Parameter) and p.dtype in _FUSED_ADAMW_DTYPES.get(p.device.type, ())
        for group in groups for p in group["params"]
    )


def _bitsandbytes_optimizer(name: str, groups: list[dict], lr: float) -> torch.optim.Optimizer:
    devices = sorted({p.device.type for group in groups for p in group["params"]})
    if devices != ["cuda"]:
        raise ValueError(
            f"optimizer {name!r} is bitsandbytes' 8-bit AdamW, which needs a CUDA GPU, but the parameters are on "
            f"{', '.join(devices)}. Use 'adamw' instead (an adapter's optimizer state is small, so 8 bits saves "
            "little), or train on a machine with a GPU (--device cuda)."
        )
    try:
        import bitsandbytes.optim
    except ImportError:
        raise ValueError(f"optimizer {name!r} needs bitsandbytes: pip install bitsandbytes, or use 'adamw'.") from None
    return getattr(bitsandbytes.optim, CUDA_OPTIMIZERS[name])(groups, lr=lr)


def lr_multiplier(name: str, total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """The factor on the base learning rate at each step: linear warmup from 0, then the schedule."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}.")

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if name == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if name == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return multiplier


def make_scheduler(
    optimizer: torch.optim.Optimizer, name: str, total_steps: int, warmup_steps: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(name, total_steps, warmup_steps))
