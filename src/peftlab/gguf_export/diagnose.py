"""When the engine disagrees: which layer family (attn_q, ffn_down, token_embd ...) carries the difference.

For each family the update is applied alone, on both sides: in peftlab to the plain base model
(``W + B A``, or the merged tensor), in llama.cpp by a GGUF holding only that family's update (a
LoRA subset, or the base with that family's merged tensors). The family's effect (logits with
minus without it) is compared on a few prompts; the families whose effects disagree beyond the
tolerance are named. It runs only after a failed check, so it may take a while.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from peftlab.gguf_export.names import family, gguf_tensor_name, module_name
from peftlab.gguf_export.verify import TOLERANCES, Engine
from peftlab.gguf_export.writer import lora_tensors, model_tensors, write_lora_gguf, write_model_gguf
from peftlab.torch_threads import one_torch_thread

PROMPTS = 3  # a few sequences tell the families apart


def families(reference, base, factors, merged, config, with_files, without_files, dtype, tokenizer_keys, scratch: Path) -> str:
    """A sentence naming the families whose effect differs (or saying none does alone)."""
    # torch and llama.cpp take turns here, as in the check itself: torch's idle OpenMP threads spinning
    # beside llama.cpp's made the check ~9x slower on 2 cores (see verify.peftlab_reference).
    with one_torch_thread():
        return _families(reference, base, factors, merged, config, with_files, without_files, dtype, tokenizer_keys, scratch)


def _families(reference, base, factors, merged, config, with_files, without_files, dtype, tokenizer_keys, scratch: Path) -> str:
    sequences = [p.prompt_ids + p.continuation for p in reference.prompts[:PROMPTS]]
    n_ctx = max(map(len, sequences)) + 8
    base_engine = Engine(*without_files, n_ctx=n_ctx, f32_cache=dtype == "f32")
    try:
        engine_base = [base_engine.logits(s) for s in sequences]
    finally:
        base_engine.close()
    torch_base = [_torch_logits(base, s) for s in sequences]
    parameters = dict(base.named_parameters())
    updates = _updates_by_family(factors, merged, parameters)
    errors = {}
    for name, update in updates.items():
        saved = {key: parameters[key].detach().clone() for key in update}
        with torch.no_grad():
            for key, new in update.items():
                parameters[key].copy_(new)
        torch_with = [_torch_logits(base, s) for s in sequences]
        with torch.no_grad():
            for key, old in saved.items():
                parameters[key].copy_(old)
        files = _engine_files(name, factors, merged, base, config, with_files, dtype, tokenizer_keys, scratch)
        engine = Engine(*files, n_ctx=n_ctx, f32_cache=dtype == "f32")
        try:
            engine_with = [engine.logits(s) for s in sequences]
        finally:
            engine.close()
        diff = max(float(np.abs((ew - eb) - (tw - tb)).max()) for ew, eb, tw, tb in zip(engine_with, engine_base, torch_with, torch_base))
        size = max(float(np.abs(tw - tb).max()) for tw, tb in zip(torch_with, torch_base))
        errors[name] = diff / size if size > 0 else diff
    tolerance = TOLERANCES.get(dtype, TOLERANCES["f32"]).effect
    bad = sorted((n for n, e in errors.items() if e > tolerance), key=lambda n: -errors[n])
    if not bad:
        return "Each layer family's effect agrees when applied alone; the difference comes from their combination."
    shown = ", ".join(f"{n} (its effect off by {errors[n]:.3g} of its size)" for n in bad)
    return f"The layer families that differ: {shown}."


@torch.no_grad()
def _torch_logits(model, ids: list[int]) -> np.ndarray:
    return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def _updates_by_family(factors, merged, parameters) -> dict[str, dict[str, torch.Tensor]]:
    """{family: {HF parameter name: its new value}}: the base plus that family's update only."""
    updates: dict[str, dict[str, torch.Tensor]] = {}
    if factors is not None:
        for path, (a, b) in factors.items():
            key = f"{path}.weight"
            new = parameters[key].detach().float() + b.float() @ a.float()
            updates.setdefault(family(module_name(path) + ".weight"), {})[key] = new.to(parameters[key].dtype)
        return updates
    for key, tensor in merged.state_dict().items():
        if key in parameters and not torch.equal(parameters[key], tensor):
            updates.setdefault(family(gguf_tensor_name(key)), {})[key] = tensor
    return updates


def _engine_files(name, factors, merged, base, config, with_files, dtype, tokenizer_keys, scratch: Path):
    if factors is not None:
        subset = {p: f for p, f in factors.items() if family(module_name(p) + ".weight") == name}
        path = scratch / f"only-{name}.gguf"
        write_lora_gguf(path, config, lora_tensors(config, subset), next(iter(subset.values()))[0].shape[0], dtype, name)
        return with_files[0], path
    state = base.state_dict()
    for key, tensor in merged.state_dict().items():
        if key in state and family(gguf_tensor_name(key)) == name:
            state[key] = tensor
    path = scratch / f"only-{name}.gguf"
    write_model_gguf(path, config, model_tensors(config, state), dtype, name, tokenizer_keys)
    return path, None
