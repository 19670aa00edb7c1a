"""Sharded data parallelism with FSDP2 (``torch.distributed.fsdp.fully_shard``): ``--strategy fsdp``.

    torchrun --nproc_per_node=2 -m peftlab train --strategy fsdp ...

Every parameter (frozen base, trainable adapter, and the 4-bit NF4 storage of a QLoRA base) is
split along its first dimension across the processes. One FSDP unit per transformer block plus
the root (embeddings, final norm, heads): a block's parameters are all-gathered for its forward
and again for its backward, then freed, so one block's full weights exist at a time. Frozen and
trainable tensors of a block share its unit (FSDP2 shards each parameter on its own).

What the rest of the engine sees:

* gradients are averaged over processes, as under DDP (so the loop's loss scaling is the same),
  by a SUM reduce-scatter and a division done by FSDP2 itself, never the backend's ``AVG`` op
  (pytorch issue 162338: gloo's ``AVG`` once summed without dividing, silently);
* trainable parameters and optimizer state are DTensor shards between steps;
  :func:`full_trainable_parameters`, :func:`full_optimizer_state` and
  :func:`load_full_optimizer_state` convert to and from whole tensors, so a checkpoint and an
  adapter file are those of an unsharded run;
* every process must run every forward (each is a collective), evaluation included.
"""

from __future__ import annotations

import contextlib
import os
from collections import defaultdict
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from peftlab.adapter import Adapter
from peftlab.train.hooks import discover_hooks
from peftlab.train.options import OptionsError


def launched_with_fsdp() -> bool:
    """True under ``accelerate launch`` with an FSDP config (accelerate sets these variables)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")


def check_accelerate_config() -> None:
    """Refuse an accelerate FSDP config that asks for what ``peftlab train`` does not do."""
    version = os.environ.get("FSDP_VERSION", "2")
    if version != "2":
        raise OptionsError(
            f"the accelerate config asks for FSDP version {version}; peftlab shards with FSDP2: "
            "set fsdp_version: 2 in the config file (see docs/fsdp2.yaml)."
        )
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if precision not in ("no", ""):
        raise OptionsError(
            f"the accelerate config asks for mixed_precision: {precision}, which peftlab train does not read; "
            "set mixed_precision: 'no' in the config and pass --bf16 to peftlab train instead."
        )


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules that each become one FSDP unit: the model's transformer blocks.

    A transformers model names its block classes in ``_no_split_modules`` (what accelerate's
    TRANSFORMER_BASED_WRAP reads too); any other model: the items of its longest ``ModuleList``.
    """
    classes: set[str] = set()
    for module in model.modules():
        classes.update(getattr(module, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in classes]
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def _unit_parameters(root: nn.Module, blocks: list[nn.Module]) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Each unit's own parameters (a block's, minus those of blocks inside it; the root gets the rest)."""
    owner: dict[int, str] = {}
    names = {id(m): name or "the root" for name, m in root.named_modules()}
    for block in sorted(blocks, key=lambda b: -len(list(b.modules()))):  # outer blocks first, inner win
        for param in block.parameters():
            owner[id(param)] = names[id(block)]
    units: dict[str, list[tuple[str, nn.Parameter]]] = defaultdict(list)
    for name, param in root.named_parameters():
        units[owner.get(id(param), "the root")].append((name, param))
    return units


def check_trainable_dtypes(root: nn.Module, blocks: list[nn.Module]) -> None:
    """FSDP2 reduces a unit's gradients in one collective: its trainable tensors must share a dtype.

    Frozen tensors may have any dtype (a bf16 base with fp32 adapters shards fine); torch 2.13
    stops a unit with mixed trainable dtypes with an AssertionError, said here in words.
    """
    for unit, params in _unit_parameters(root, blocks).items():
        dtypes: dict[torch.dtype, str] = {}
        for name, param in params:
            if param.requires_grad:
                dtypes.setdefault(param.dtype, name)
        if len(dtypes) > 1:
            examples = ", ".join(f"{name} is {str(dtype).removeprefix('torch.')}" for dtype, name in dtypes.items())
            raise OptionsError(
                f"FSDP2 cannot shard {unit}: its trainable tensors mix dtypes ({examples}), and torch reduces a "
                "unit's gradients in one dtype. Keep every trainable tensor in one dtype (e.g. fp32 adapters and "
                "heads on a bf16 base), or train with --strategy ddp."
            )


def check_method_can_shard(model: nn.Module) -> None:
    """Refuse a method whose training hooks work on whole tensors between steps.

    Under FSDP2 a process holds only a shard of each tensor outside a forward or backward, so a
    hook that reads or rewrites adapter weights or gradients after a step (importance scores, rank
    pruning) would see one shard and act on it alone: a silently different method. Hooks declare
    ``works_on_shards`` (:class:`peftlab.hooks.TrainingHook`).
    """
    unfit = sorted({type(hook).__name__ for hook in discover_hooks(model) if not hook.works_on_shards})
    if unfit:
        methods = sorted({model.method_of(name).name for name in getattr(model, "active_adapters", [])})
        raise OptionsError(
            f"method {', '.join(methods)} cannot train with --strategy fsdp: its training hooks ({', '.join(unfit)}) "
            "read or change whole tensors between steps, and under FSDP2 each process holds only a shard of them. "
            "Use --strategy ddp (every process holds the whole model)."
        )


def shard_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Shard ``model`` in place with FSDP2 (one unit per transformer block, plus the root); returns it."""
    from peftlab.quant import Linear4bit

    check_method_can_shard(model)
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.shardable_storage_()
    blocks = transformer_blocks(model)
    check_trainable_dtypes(model, blocks)
    mesh = torch.distributed.device_mesh.init_device_mesh(device.type, (dist.get_world_size(),))
    # Innermost first: fully_shard on a block takes its parameters out of any enclosing unit.
    for block in sorted(blocks, key=lambda b: len(list(b.modules()))):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)  # SUM, then FSDP2 divides by the world size
    return model


def held_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers this process holds between steps: its shards only, under FSDP2.

    FSDP2 leaves the root unit gathered after a forward without backward (an evaluation); it is
    resharded first (no communication), as the next step would.
    """
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in local)


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a collective: every process must call it); other tensors as they are."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@contextlib.contextmanager
def full_trainable_parameters(model: nn.Module) -> Iterator[None]:
    """Inside, every trainable parameter, and every parameter of an adapter (LoRA-FA's frozen A is
    saved too), is a whole, plain tensor (gathered from its shards).

    A collective: every process enters it. The frozen base stays sharded, so only the adapters'
    memory is added. Used to write an adapter or checkpoint from a sharded model.
    """
    in_adapters = {id(p) for module in model.modules() if isinstance(module, Adapter) for p in module.parameters()}
    gathered: dict[int, nn.Parameter] = {}
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None or not isinstance(param, DTensor) or not (param.requires_grad or id(param) in in_adapters):
                continue
            if id(param) not in gathered:
                gathered[id(param)] = nn.Parameter(param.full_tensor(), requires_grad=param.requires_grad)
            swapped.append((module, name, param))
            module._parameters[name] = gathered[id(param)]
    try:
        yield
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param


def full_trainable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter by name, whole (a collective under FSDP2)."""
    return {name: full_value(p.detach()) for name, p in model.named_parameters() if p.requires_grad}


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every sharded state tensor made whole (a collective under FSDP2)."""
    state = optimizer.state_dict()
    state["state"] = {
        index: {key: full_value(value) if isinstance(value, torch.Tensor) else value for key, value in entry.items()}
        for index, entry in state["state"].items()
    }
    return state


def load_full_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a state written by :func:`full_optimizer_state`, sharding each tensor like its parameter."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sharded = {}
    for index, entry in state["state"].items():
        param = params[int(index)]
        if isinstance(param, DTensor):
            entry = {
                key: distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
                if isinstance(value, torch.Tensor) and value.shape == param.shape else value
                for key, value in entry.items()
            }
        sharded[index] = entry
    optimizer.load_state_dict({**state, "state": sharded})


def load_full_tensors(params: dict[str, nn.Parameter], tensors: dict[str, torch.Tensor]) -> None:
    """Copy whole tensors into parameters, sharded or not."""
    with torch.no_grad():
        for name, tensor in tensors.items():
            param = params[name]
            if isinstance(param, DTensor):
                tensor = distribute_tensor(tensor.to(param.device, param.dtype), param.device_mesh, param.placements)
            param.copy_(tensor)
