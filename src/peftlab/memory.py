"""How much memory is free on a device, to refuse an allocation that cannot succeed before making it."""

from __future__ import annotations

import torch


class AdapterTooLargeError(MemoryError, ValueError):
    """An adapter would not fit in the free memory; raised before anything is allocated. A
    ValueError too, so the command line reports it as an input to fix."""


def available_bytes(device: torch.device | str) -> int | None:
    """Free bytes on ``device``: CUDA's free memory, or Linux's MemAvailable for the CPU; None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024:
            return f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"
