"""Data parallelism with plain ``torch.distributed`` and DDP or FSDP2: what each process does differently.

    torchrun --nproc_per_node=2 -m peftlab train ...                    # DDP; gloo on CPU, nccl on GPUs
    torchrun --nproc_per_node=2 -m peftlab train --strategy fsdp ...    # FSDP2 (see .fsdp)

Every process holds the whole model and walks the same sequence of global batches; process ``r``
of ``W`` takes the ``r``-th contiguous slice of each. DDP (or FSDP2) averages the gradients over processes,
and the loop divides each process's summed loss by the global number of examples (or label
tokens) times ``1/W``, so the update equals one process's on the whole batch. Without torchrun's
environment (``WORLD_SIZE`` unset or 1) everything here is a no-op.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from peftlab.train.options import OptionsError


def pick_device(choice: str, local_rank: int = 0) -> torch.device:
    """``auto``: the local GPU when there is one, else the CPU."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise OptionsError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu.")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


@dataclass(frozen=True)
class Processes:
    rank: int
    world_size: int
    device: torch.device
    owns_group: bool  # this object started the process group, so it must end it
    strategy: str = "none"  # "none" (one process), "ddp" or "fsdp": --strategy resolved by start_processes

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def sharded(self) -> bool:
        """The model is split across processes: every forward is a collective that all must run."""
        return self.distributed and self.strategy == "fsdp"

    def shard(self, items: Sequence[Any]) -> list[Any]:
        """This process's contiguous slice of ``items``; sizes differ by at most one."""
        base, extra = divmod(len(items), self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return list(items[start : start + base + (self.rank < extra)])

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over all processes (float64 on the CPU for gloo; exact for counts)."""
        values = values.detach().to(torch.float64)
        if self.distributed:
            values = values.to(self.device)
            dist.all_reduce(values)
        return values.cpu()

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order."""
        if not self.distributed:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def wrap(self, model: nn.Module) -> nn.Module:
        if not self.distributed:
            return model
        if self.sharded:
            from peftlab.train.fsdp import shard_model

            return shard_model(model, self.device)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def no_sync(self, model: nn.Module, skip: bool):
        """Skip the gradient all-reduce for a micro-batch that is not the last of its step."""
        return model.no_sync() if skip and isinstance(model, DistributedDataParallel) else contextlib.nullcontext()

    def close(self) -> None:
        if self.owns_group:
            dist.destroy_process_group()


def resolve_strategy(choice: str, world_size: int) -> str:
    """``auto``: fsdp under ``accelerate launch`` with an FSDP config, else ddp; "none" for one process."""
    from peftlab.train.fsdp import check_accelerate_config, launched_with_fsdp

    if launched_with_fsdp():
        check_accelerate_config()
        if choice == "ddp":
            raise OptionsError("--strategy ddp contradicts the accelerate config, which asks for FSDP; drop one of them.")
        choice = "fsdp"
    if choice == "fsdp" and world_size < 2:
        raise OptionsError(
            "--strategy fsdp shards the model across processes, but this run is one process (WORLD_SIZE is "
            f"{os.environ.get('WORLD_SIZE', 'unset')}): launch it with torchrun --nproc_per_node=2 (or more) -m peftlab "
            "train ..., or accelerate launch with docs/fsdp2.yaml; or drop --strategy fsdp to train in this process."
        )
    if world_size < 2:
        return "none"
    return "ddp" if choice == "auto" else choice


def start_processes(device_choice: str, strategy: str = "auto") -> Processes:
    """This process's place among those torchrun started; one process without torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    strategy = resolve_strategy(strategy, world_size)
    device = pick_device(device_choice, local_rank)
    if world_size == 1:
        return Processes(0, 1, device, owns_group=False, strategy=strategy)
    owns_group = not dist.is_initialized()
    if owns_group:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Processes(dist.get_rank(), dist.get_world_size(), device, owns_group, strategy)
