"""CorDA, context-oriented decomposition adaptation (Yang et al. 2024): PiSSA on the weight as the
data sees it. With C the covariance of a layer's inputs on sample data,

    W C = U S Vᵀ,   V_C = (Vᵀ C⁻¹)ᵀ,   A = √(S_r/s) V_Cᵀ,   B = U_r √(S_r/s),   W_res = W − s·B A

``corda_method="ipm"`` (instruction-previewed) takes the r largest components: the directions the
task's inputs use most, which converges fastest; ``"kpm"`` (knowledge-preserved) takes the r
smallest, leaving what the sample data relies on in the frozen residual. Then ``W_res + s·BA = W``:
the model starts unchanged.

HF's flow, same names: :func:`preprocess_corda` (``model``, ``LoraConfig`` with
``init_lora_weights="corda"``, ``run_model`` a callback that runs the sample data) stores each
targeted layer's decomposition, then ``get_peft_model`` starts the adapter from it. The covariance
is HF's: per forward call, ``xᵀx`` of the inputs divided by their largest value, averaged over calls,
damped by 1% of its mean diagonal (doubled until its inverse is accurate). Two differences: a batch of
several sequences is taken as all its tokens (HF squeezes the batch dimension, so it needs batches of
one, where the two agree), and ``cache_file``/``covariance_file`` are safetensors files (HF pickles).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm
from transformers.pytorch_utils import Conv1D

from peftlab import io
from peftlab.methods.lora_init import (
    LoraInit, base_weight_fp32, burn_layer_inits, fill_sub_config, refuse_embedding, refuse_quantized, register_init,
    set_factors, store_base_weight,
)

METHODS = ("ipm", "kpm")


@dataclass
class CordaConfig:
    """HF's ``CordaConfig``."""

    cache_file: str | None = None
    covariance_file: str | None = None
    corda_method: str = "ipm"
    verbose: bool = False
    use_float16_for_covariance: bool = False
    prune_temporary_fields: bool = True

    def __post_init__(self) -> None:
        if self.corda_method not in METHODS:
            raise ValueError(f"CordaConfig: corda_method must be 'ipm' or 'kpm', got {self.corda_method!r}.")


@dataclass
class CordaEigens:
    S_WC: torch.Tensor
    U_WC: torch.Tensor
    V_WC: torch.Tensor


class Corda(LoraInit):
    key = "corda"
    changes_base = True

    def reruns_on_load(self, value):
        return False  # it needs the sample data again

    def check_config(self, config, value):
        fill_sub_config(config, "corda_config", CordaConfig)

    def check_base(self, config, view, path):
        refuse_embedding("corda", view, path)
        refuse_quantized("corda", view, path, "CorDA rewrites the base to its residual; run it on the full-precision model.")
        if not hasattr(view.module, "eigens"):
            raise ValueError(
                f"init_lora_weights='corda' needs the layers' decompositions from sample data, and {path} has none: "
                "run preprocess_corda(model, config, run_model=...) first, with a callback that runs the model on "
                "examples of the fine-tuning data."
            )

    def draw(self, adapter, value):
        burn_layer_inits(adapter)

    @torch.no_grad()
    def from_base(self, adapter, view, config, path, value):
        eigens = view.module.eigens
        u, s, v = eigens.U_WC, eigens.S_WC.clone(), eigens.V_WC
        shape = (view.out_features, adapter.r), (adapter.r,), (view.in_features, adapter.r)
        if (tuple(u.shape), tuple(s.shape), tuple(v.shape)) != shape:
            raise ValueError(
                f"{path}: the CorDA decomposition has shapes U {tuple(u.shape)}, S {tuple(s.shape)}, V {tuple(v.shape)} "
                f"but this adapter needs {shape}; run preprocess_corda with the same model and LoraConfig (r, rank_pattern)."
            )
        if not all(torch.isfinite(t).all() for t in (u, s, v)):
            raise ValueError(f"{path}: the CorDA decomposition holds NaN or infinite values; give more varied sample data.")
        weight = base_weight_fp32(view)
        s /= adapter.scaling
        a = v.t().mul(s.sqrt().view(-1, 1))
        b = u.mul(s.sqrt())
        set_factors(adapter, a, b)
        store_base_weight(view, weight - adapter.scaling * b @ a)
        del view.module.eigens


register_init(Corda())


# -- preprocessing ----------------------------------------------------------------------------------


def _targets(model: nn.Module, config) -> Iterator[tuple[str, nn.Module]]:
    from peftlab.targets import ALL_LINEAR, expand_all_linear, select_targets

    if config.target_modules is None:  # as get_peft_model: the method's default for the model type
        model_type = getattr(getattr(model, "config", None), "model_type", "")
        if model_type not in config.default_target_modules:
            raise ValueError(f"preprocess_corda: target_modules is not set and LoRA has no default for model type {model_type!r}; name the layers.")
        config = config.replace(target_modules=config.default_target_modules[model_type])
    if isinstance(config.target_modules, str) and config.target_modules.lower() == ALL_LINEAR:
        config = config.replace(target_modules=expand_all_linear(model, config))
    for path in select_targets(model, config):
        module = model.get_submodule(path)
        if isinstance(module, (nn.Linear, Conv1D)):
            yield path, module


@torch.no_grad()
def preprocess_corda(
    model: nn.Module, lora_config, run_model: Callable[[], None] | None = None, hooked_model: nn.Module | None = None,
) -> None:
    """HF's ``preprocess_corda``: each targeted layer of ``model`` gets ``eigens`` (its decomposition
    against the input covariance that ``run_model()`` produces), which ``get_peft_model`` then uses."""
    settings = lora_config.corda_config or CordaConfig()
    targets = dict(_targets(model, lora_config))
    if settings.cache_file and Path(settings.cache_file).is_file():
        cache = load_file(settings.cache_file)
        for path, module in targets.items():
            module.eigens = CordaEigens(*(cache[f"{path}.eigens.{k}"] for k in ("S_WC", "U_WC", "V_WC")))
        return
    covariances = _covariances(model, lora_config, targets, run_model, hooked_model)
    progress = tqdm(targets.items(), desc="CorDA: decomposing layers", disable=not settings.verbose)
    for path, module in progress:
        rank = lora_config.rank_and_alpha(path)[0]
        module.eigens = _crop(_decompose(module, covariances.pop(path)), rank, settings.corda_method)
    if settings.cache_file:
        tensors = {f"{path}.eigens.{k}": getattr(module.eigens, k) for path, module in targets.items() for k in ("S_WC", "U_WC", "V_WC")}
        os.makedirs(os.path.dirname(os.path.abspath(settings.cache_file)), exist_ok=True)
        io.atomic_save_tensors(settings.cache_file, tensors)


def _covariances(model, config, targets, run_model, hooked_model) -> dict[str, torch.Tensor]:
    settings = config.corda_config or CordaConfig()
    if settings.covariance_file and Path(settings.covariance_file).is_file():
        saved = load_file(settings.covariance_file)
        return {path: saved[path] for path in targets}
    if run_model is None:
        raise ValueError(
            "CorDA needs data to measure the layers' inputs: pass run_model, a callback that runs the model on examples "
            "of the fine-tuning data (or a covariance_file/cache_file made before)."
        )
    hooked = hooked_model if hooked_model is not None else model
    hooked.eval()
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(targets, 0)

    def hook_for(path):
        def hook(module, args, output):
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1])  # HF: squeeze(0), i.e. batches of one sequence
            if not settings.use_float16_for_covariance:
                x = x.float()
            x = x / torch.max(x).abs()
            if not torch.isfinite(x).all():
                raise ValueError(f"CorDA: the inputs of {path} hold NaN or infinite values; check the sample data.")
            sums[path] = sums[path] + x.t() @ x if path in sums else x.t() @ x
            counts[path] += 1
        return hook

    hooked_targets = dict(_targets(hooked, config))
    handles = [hooked_targets[path].register_forward_hook(hook_for(path)) for path in targets if path in hooked_targets]
    try:
        run_model()
    finally:
        for handle in handles:
            handle.remove()
    silent = [path for path, count in counts.items() if count == 0]
    if silent:
        raise ValueError(f"CorDA: run_model never ran {silent[0]} (and {len(silent) - 1} other layer(s)); it must run the model on sample data.")
    covariances = {path: sums[path] / counts[path] for path in targets}
    if settings.covariance_file:
        os.makedirs(os.path.dirname(os.path.abspath(settings.covariance_file)), exist_ok=True)
        io.atomic_save_tensors(settings.covariance_file, covariances)
    return covariances


def _decompose(module: nn.Module, covariance: torch.Tensor) -> CordaEigens:
    """SVD of W C (C damped until invertible within 5%), with V mapped back through C⁻¹ (HF's)."""
    w = module.weight.data.float()
    if isinstance(module, Conv1D):
        w = w.T
    covariance = covariance.float()
    damp = 0.01
    while True:
        fixed = covariance + torch.diag(torch.ones(covariance.size(0), device=covariance.device) * torch.mean(torch.diag(covariance)) * damp)
        inverse = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inverse, torch.eye(covariance.size(0), device=covariance.device)).item() < 0.05:
            break
        damp *= 2
    u, s, vh = torch.linalg.svd(w @ fixed, full_matrices=False)
    return CordaEigens(S_WC=s, U_WC=u, V_WC=(vh @ inverse).transpose(0, 1))


def _crop(eigens: CordaEigens, rank: int, method: str) -> CordaEigens:
    keep = slice(None, rank) if method == "ipm" else slice(-rank, None)
    return CordaEigens(S_WC=eigens.S_WC[keep].clone(), U_WC=eigens.U_WC[:, keep].clone(), V_WC=eigens.V_WC[:, keep].clone())
