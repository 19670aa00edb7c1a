"""An adapter whose init rewrote the base (PiSSA, OLoRA) as plain LoRA for the *unmodified* base.

    start:   W = W_res + s·B₀A₀          after training:   W_res + s·BA = W + s·(BA − B₀A₀)
    so on W:  A' = [A; A₀]  (2r × in),   B' = [B, −B₀]  (out × 2r),   same scale s

``save_pretrained(dir, path_initial_model_for_weight_conversion=INIT)`` writes that rank-2r adapter
(HF's argument and file: r and lora_alpha doubled, rsLoRA's alpha times √2, patterns doubled,
``init_lora_weights=True``). ``INIT`` is the adapter saved right after ``get_peft_model``, before
training (HF's contract); where it holds no adapter yet, peftlab writes there the initial factors it
kept from the init (``adapter.initial_factors``), so a run in one process needs no extra step. The
export to plain LoRA (``save_pretrained(as_lora=True)``, ``peftlab export --to lora``) uses the kept
factors in the same way, always: an export is for the original base its config names.

Loading such an adapter (``from_pretrained`` on the original base) runs the init again, which
rewrites the base and keeps the factors again: deterministic for "pissa" and "olora"; not for
"pissa_niter_N", whose randomized SVD draws again (as in HF: reload it on its saved residual base, or
convert it before it leaves the process). LoftQ is refused: its base is the quantized W, not W minus
a low-rank part.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from peftlab import io
from peftlab.methods.lora_init import init_for

if TYPE_CHECKING:
    from peftlab.model import PeftModel


class ConversionError(ValueError):
    """The adapter cannot be written for the unmodified base as asked; the message says why and what to do."""


def keep_initial_factors(adapter) -> None:
    """Remember A₀, B₀ (a copy, off the autograd graph) for the conversion."""
    adapter.initial_factors = (adapter.lora_A.detach().clone(), adapter.lora_B.detach().clone())


def rewrites_base(model: PeftModel, adapter_name: str) -> bool:
    config = model.peft_config[adapter_name]
    return init_for(getattr(config, "init_lora_weights", True)).changes_base


def saved_for_original_base(model: PeftModel, adapter_name: str) -> bool:
    """Whether a training run saves the adapter converted for the original base (rank 2r): where a reload
    could not run the init again to the same start (CorDA, "pissa_niter_N")."""
    config = model.peft_config[adapter_name]
    init = init_for(getattr(config, "init_lora_weights", True))
    return init.changes_base and not init.reruns_on_load(config.init_lora_weights)


def _initial_factors(model: PeftModel, adapter_name: str, what: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    config = model.peft_config[adapter_name]
    init = config.init_lora_weights
    if init == "loftq":
        raise ConversionError(
            f"{what}: a LoftQ adapter fits its quantized base deq(Q), which differs from the original weight by more than "
            "a low-rank part, so no plain LoRA on the original base equals it; serve it on its LoftQ base "
            "(merge_and_unload(dequantize=True) gives the merged model)."
        )
    if getattr(config, "use_dora", False):
        raise ConversionError(f"{what}: a DoRA adapter with init_lora_weights={init!r} rescales the rows of W, so it is not W plus a low-rank part.")
    factors = {}
    for path, adapter in model.adapters_of(adapter_name):
        kept = getattr(adapter, "initial_factors", None)
        if kept is None:
            raise ConversionError(
                f"{what}: the {init!r} adapter's initial factors are not at hand ({path}), and without them its update "
                "cannot be told from the part of W it took at the start. Pass path_initial_model_for_weight_conversion="
                "DIR where the adapter was saved right after get_peft_model (before training)."
            )
        factors[path] = kept
    return factors


def against_original_base(
    model: PeftModel, adapter_name: str, factors: dict[str, tuple[torch.Tensor, torch.Tensor] | None]
) -> dict[str, tuple[torch.Tensor, torch.Tensor] | None]:
    """``as_low_rank``'s factors (``ΔW = B A`` on the current base) turned into the change from the
    original base, where the init rewrote it: ``[A; A₀]``, ``[s·B, −s·B₀]``."""
    if not rewrites_base(model, adapter_name):
        return factors
    initial = _initial_factors(model, adapter_name, "exporting to plain LoRA")
    out = {}
    for path, adapter in model.adapters_of(adapter_name):
        a, b = factors[path]
        a0, b0 = (t.to(a.device, a.dtype) for t in initial[path])
        out[path] = torch.cat([a, a0], 0), torch.cat([b, -adapter.scaling * b0], 1)
    return out


def converted_for_original_base(
    model: PeftModel, adapter_name: str, initial_dir: str | os.PathLike, config_data: dict
) -> tuple[dict, dict[str, torch.Tensor]]:
    """HF's conversion: the adapter_config.json and tensors of the rank-2r LoRA for the unmodified base."""
    config = model.peft_config[adapter_name]
    what = "save_pretrained(path_initial_model_for_weight_conversion=...)"
    if not rewrites_base(model, adapter_name):
        raise ConversionError(
            f"{what}: init_lora_weights={config.init_lora_weights!r} leaves the base unchanged, so the adapter already fits "
            "the original base; save it without path_initial_model_for_weight_conversion."
        )
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ConversionError(f"{what} is not possible with use_rslora and rank_pattern/alpha_pattern together (as HF): one alpha cannot keep every layer's scale.")
    initial = _initial_tensors(model, adapter_name, Path(initial_dir), what)
    tensors = model.adapter_state_dict(adapter_name)
    for key in list(tensors):
        if key.endswith("lora_A.weight"):
            tensors[key] = torch.cat([tensors[key], initial[key].to(tensors[key].dtype)], 0)
        elif key.endswith("lora_B.weight"):
            tensors[key] = torch.cat([tensors[key], -initial[key].to(tensors[key].dtype)], 1)
    data = dict(config_data, init_lora_weights=True, r=2 * config.r,
                lora_alpha=config.lora_alpha * (math.sqrt(2) if config.use_rslora else 2),
                rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
                alpha_pattern={k: 2 * v for k, v in config.alpha_pattern.items()})
    data.update(loftq_config={}, eva_config=None, corda_config=None)  # a plain LoRA now: no init sub-config
    return data, tensors


def _initial_tensors(model: PeftModel, adapter_name: str, directory: Path, what: str) -> dict[str, torch.Tensor]:
    """The initial adapter's tensors in ``directory``; written there first from the kept factors where it holds none."""
    expected = {k: v for k, v in model.adapter_state_dict(adapter_name).items() if k.endswith(("lora_A.weight", "lora_B.weight"))}
    if not (directory / io.WEIGHTS_NAME).is_file():
        initial = _initial_factors(model, adapter_name, what)
        tensors = {}
        for path, (a0, b0) in initial.items():
            tensors[f"{io.KEY_PREFIX}{path}.lora_A.weight"], tensors[f"{io.KEY_PREFIX}{path}.lora_B.weight"] = a0, b0
        data = model.finish_saved_config(adapter_name, dataclasses.replace(
            model.peft_config[adapter_name], init_lora_weights=True, corda_config=None).to_hf_dict())
        io.write_adapter(directory, data, tensors)
    saved = io.read_adapter_weights(directory)
    wrong = [k for k, v in expected.items() if k not in saved or saved[k].shape != v.shape]
    if wrong:
        raise ConversionError(
            f"{what}: {directory} does not hold this adapter's initial weights ({wrong[0]} is missing or of another "
            "shape); give the folder where it was saved right after get_peft_model, before training."
        )
    return saved
