"""EVA, explained variance adaptation (Paischer et al. 2024): A starts as the top right-singular
vectors of each layer's *inputs* on the fine-tuning data, and the rank budget moves to the layers
whose inputs those vectors explain best.

    A_l = top-k_l principal directions of {x : x enters layer l},   B = 0,   Σ_l k_l = Σ_l r_l

``LoraConfig(init_lora_weights="eva", eva_config=EvaConfig(...))`` builds the adapter with B = 0
(A is filled later), then :func:`initialize_lora_eva_weights` (HF's name and arguments) runs the
base model on batches, fits an incremental PCA per layer (layers fed the same input share one)
until the first components stop moving (cosine ≥ ``tau`` between steps), hands out the ranks by
explained variance (each layer at most ``round(r·rho)``), and rebuilds each layer at its rank
(``rank_pattern``/``alpha_pattern`` record them; a layer given rank 0 loses its adapter). With
``adjust_scaling_factors`` alpha follows the rank so the scale stays alpha/r. Every step is HF's,
so the same batches give HF's tensors.

Two differences, on purpose. With ``whiten``, HF divides a group's shared components in place once
per layer of the group (q, k, v: three times); the paper whitens each layer's once, as here. And HF masks tokens with ``labels != -100`` even when ``labels`` are a
classifier's (one per sequence), which broadcasts wrongly or fails; peftlab uses the label mask
only when the labels are per token.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from itertools import cycle
from typing import Callable, Iterable, Mapping

import torch
from tqdm import tqdm

from peftlab.methods.lora_init import (
    LoraInit, burn_layer_inits, fill_sub_config, refuse_embedding, register_init,
)
from peftlab.methods.lora_init.incremental_pca import IncrementalPCA

#: Above this rho, HF caps it at the largest layer dimension over r.
RHO_THRESHOLD = 1000


@dataclass
class EvaConfig:
    """HF's ``EvaConfig``."""

    rho: float = 2.0
    tau: float = 0.99
    use_label_mask: bool = True
    label_mask_value: int = -100
    whiten: bool = False
    adjust_scaling_factors: bool = True

    def __post_init__(self) -> None:
        if self.rho < 1.0:
            raise ValueError(
                f"EvaConfig: rho must be >= 1 (a layer may take up to r·rho ranks; 1 keeps every layer at r), got {self.rho}."
            )
        if not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"EvaConfig: tau is a cosine-similarity threshold in [0, 1], got {self.tau}.")


class Eva(LoraInit):
    key = "eva"

    def check_config(self, config, value):
        fill_sub_config(config, "eva_config", EvaConfig)

    def check_base(self, config, view, path):
        refuse_embedding("eva", view, path)  # HF leaves embeddings at the default init; peftlab says so instead

    def draw(self, adapter, value):
        burn_layer_inits(adapter)  # A keeps nn.Linear's default until initialize_lora_eva_weights fills it
        torch.nn.init.zeros_(adapter.lora_B)


register_init(Eva())


# -- the layer inputs -------------------------------------------------------------------------------


def forward_fn_dict(model, inputs):
    return model(**inputs)


def prepare_model_inputs_fn_language_modeling(model_input: Mapping, peft_config) -> torch.Tensor:
    """The (row, position) indices of the tokens the PCA sees: attended, and not label-masked."""
    if not isinstance(model_input, Mapping):
        raise TypeError("EVA's default input preparation needs each batch as a dict (input_ids, attention_mask, ...).")
    mask = model_input.get("attention_mask", torch.ones_like(model_input["input_ids"])).bool()
    labels = model_input.get("labels")
    if peft_config.eva_config.use_label_mask and labels is not None and labels.shape == mask.shape:
        mask = torch.logical_and(mask, labels != peft_config.eva_config.label_mask_value)
    return mask.nonzero()


def prepare_layer_inputs_fn_language_modeling(layer_input, model_input, layer_name) -> torch.Tensor:
    if isinstance(layer_input, (tuple, list)):
        layer_input = layer_input[0]
    if not isinstance(layer_input, torch.Tensor):
        raise TypeError(f"EVA: layer {layer_name} got a {type(layer_input).__name__}; pass prepare_layer_inputs_fn.")
    if layer_input.dim() == 2:
        # One vector per sequence (BERT's pooler sees the first token's state): every row is a sample. HF indexes
        # it by (row, position) as if it held tokens and fails on the 1-D result; peftlab takes the rows.
        return layer_input
    return layer_input[model_input.T.unbind()]


class _Hook:
    """A forward hook that keeps a layer's prepared inputs: hashed (first batch) or fed to the PCA."""

    def __init__(self, name: str, prepare: Callable) -> None:
        self.name, self.prepare, self.model_input = name, prepare, None
        self.hashes: list[int] = []
        self.svd: IncrementalPCA | None = None
        self.converged: torch.Tensor | None = None

    def start_svd(self, n_components: int, tau: float) -> None:
        self.svd, self.tau = IncrementalPCA(n_components), tau
        self.converged = torch.zeros((n_components,), dtype=torch.bool)

    @torch.no_grad()
    def __call__(self, module, args, output) -> None:
        states = self.prepare(args, self.model_input, self.name)
        if states.ndim > 2:
            states = states.reshape(-1, states.shape[-1])
        if self.svd is None:
            self.hashes.append(hash(tuple(states.reshape(-1).cpu().tolist())))
            return
        if states.size(0) < self.svd.n_components:
            return  # too few tokens in this batch for the components asked (HF skips it too)
        previous = None if self.svd.components_ is None else self.svd.components_.clone()
        self.svd.partial_fit(states.to(torch.float32))
        if previous is not None:
            self.converged = torch.nn.functional.cosine_similarity(self.svd.components_, previous) >= self.tau


def _model_device(model) -> torch.device | None:
    devices = {p.device for p in model.parameters() if p.device.type != "meta"}
    return next(iter(devices)) if len(devices) == 1 else None


def _to_device(inputs, device):
    if device is None:
        return inputs
    if hasattr(inputs, "to"):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return type(inputs)({k: _to_device(v, device) for k, v in inputs.items()})
    return inputs


# -- the state: components per layer ----------------------------------------------------------------


@torch.no_grad()
def get_eva_state_dict(
    model, dataloader: Iterable, peft_config=None, forward_fn: Callable | None = forward_fn_dict,
    prepare_model_inputs_fn: Callable | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Callable | None = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default", gather_distributed_inputs: bool = True, show_progress_bar: bool = True,
) -> dict[str, torch.Tensor]:
    """``{module path: A [k, in]}``: each adapted layer's top-k input components, k its new rank (HF's)."""
    config = peft_config or model.peft_config[adapter_name]
    try:
        batches = len(dataloader)
    except TypeError:
        batches = None
    if batches == 0:
        raise ValueError("EVA needs data to draw layer inputs from, but the dataloader is empty; give it batches of the fine-tuning data.")
    rho = config.eva_config.rho
    if rho > RHO_THRESHOLD:
        rho = min(rho, max(max(p.shape) for p in model.parameters()) // config.r)
    layers = {path: layer for path, layer in model.adapted_layers() if adapter_name in layer.adapters}
    device, training = _model_device(model), model.training
    model.eval()

    def model_input(batch):
        return prepare_model_inputs_fn(batch, config) if prepare_model_inputs_fn is not None else batch

    hooks = {path: _Hook(path, prepare_layer_inputs_fn) for path in layers}
    handles = {path: layers[path].register_forward_hook(hook) for path, hook in hooks.items()}
    max_components = {path: round(config.rank_and_alpha(path)[0] * rho) for path in layers}
    rank_budget = sum(config.rank_and_alpha(path)[0] for path in layers)
    try:
        with model.disable_adapter():
            first = _to_device(next(iter(dataloader)), device)
            for hook in hooks.values():
                hook.model_input = model_input(first)
            forward_fn(model, first)
            # Layers fed the same input (q, k, v) share one PCA: the first of each group keeps its hook.
            by_hash = defaultdict(list)
            for path, hook in hooks.items():
                by_hash[hook.hashes[0]].append(path)
            equal = [paths for paths in by_hash.values() if len(paths) > 1]
            follows = {other: paths[0] for paths in equal for other in paths[1:]}
            for paths in equal:
                top = max(max_components[p] for p in paths)
                for p in paths:
                    max_components[p] = top
            for path in list(hooks):
                handles.pop(path).remove()
                if path in follows:
                    del hooks[path]
                    continue
                hooks[path].start_svd(max_components[path], config.eva_config.tau)
                handles[path] = layers[path].register_forward_hook(hooks[path])
            owner = {**{p: p for p in hooks}, **follows}
            rank_dist = dict(max_components)
            done = {path: False for path in hooks}
            progress = tqdm(cycle(dataloader), desc="EVA: layers converged", leave=False, disable=not show_progress_bar)
            for batch in progress:
                batch = _to_device(batch, device)
                for path, hook in hooks.items():
                    converged = bool(torch.all(hook.converged[: rank_dist[path]]))
                    if not done[path] and converged and path in handles:
                        handles.pop(path).remove()
                        done[path] = True
                        continue
                    if done[path] and not converged:
                        handles[path] = layers[path].register_forward_hook(hook)
                        done[path] = False
                    hook.model_input = model_input(batch)
                progress.set_description(f"EVA: {sum(done.values()) + sum(done[v] for v in follows.values())}/{len(owner)} layers converged")
                if all(done.values()):
                    break
                forward_fn(model, batch)
                if all(hook.svd.components_ is not None for hook in hooks.values()):
                    rank_dist = _rank_distribution(hooks, owner, follows, rank_budget, max_components)
    finally:
        for handle in handles.values():
            handle.remove()
        model.train(training)
    state = {}
    for path, rank in rank_dist.items():
        svd = hooks[owner[path]].svd
        components = svd.components_[:rank]
        if config.eva_config.whiten:
            components = components / svd.singular_values_[:rank].sqrt().reshape(-1, 1)
        state[path] = components if device is None else components.to(device)
    return state


def _rank_distribution(hooks, owner, follows, rank_budget, max_components) -> dict[str, int]:
    """Each layer's rank: the ``rank_budget`` largest explained-variance ratios over all layers (HF's rule)."""
    ratios = {path: hook.svd.explained_variance_ratio_[: max_components[path]] for path, hook in hooks.items()}
    keys, values = zip(*[(path, ratio) for path, hooked in owner.items() for ratio in ratios[hooked]])
    order = torch.stack(values).argsort(descending=True)
    counts = Counter([keys[i] for i in order[:rank_budget]])
    counts = {path: counts.get(path, 0) for path in owner}
    for path, hooked in follows.items():
        if counts[hooked] < counts[path]:  # the hooked layer of a group keeps the highest rank
            counts[hooked], counts[path] = counts[path], counts[hooked]
    return counts


# -- loading the state into the adapter -------------------------------------------------------------


@torch.no_grad()
def initialize_lora_eva_weights(
    model, dataloader: Iterable | None = None, eva_state_dict: dict | None = None,
    forward_fn: Callable | None = forward_fn_dict,
    prepare_model_inputs_fn: Callable | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Callable | None = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default", gather_distributed_inputs: bool = True, show_progress_bar: bool = True,
):
    """HF's ``initialize_lora_eva_weights``: compute (or take) the EVA state and rebuild the adapter from it."""
    if not hasattr(model, "peft_config"):
        raise ValueError("initialize_lora_eva_weights needs a PeftModel (get_peft_model with init_lora_weights='eva').")
    if len(model.active_adapters) > 1:
        raise ValueError("initialize_lora_eva_weights works on one active adapter; set_adapter to the EVA one first.")
    config = model.peft_config[adapter_name]
    if config.init_lora_weights != "eva":
        raise ValueError(f"initialize_lora_eva_weights needs init_lora_weights='eva', adapter {adapter_name!r} has {config.init_lora_weights!r}.")
    if eva_state_dict is None:
        if dataloader is None:
            raise ValueError(
                "EVA needs data to draw layer inputs from: pass dataloader (batches of the fine-tuning data) or an "
                "eva_state_dict computed before."
            )
        eva_state_dict = get_eva_state_dict(
            model, dataloader, None, forward_fn, prepare_model_inputs_fn, prepare_layer_inputs_fn, adapter_name,
            gather_distributed_inputs, show_progress_bar,
        )
    load_eva_state_dict(model, eva_state_dict, adapter_name)
    return model


def load_eva_state_dict(model, eva_state_dict: dict[str, torch.Tensor], adapter_name: str = "default") -> None:
    """Rebuild each layer at its EVA rank with A = its components, B = 0; record ranks and alphas."""
    config = model.peft_config[adapter_name]
    method = model.method_of(adapter_name)
    state = {key.removeprefix("base_model.model."): value for key, value in eva_state_dict.items()}
    rank_pattern, alpha_pattern, kept = {}, {}, []
    for path, layer in list(model.adapted_layers()):
        if adapter_name not in layer.adapters:
            continue
        r, alpha = config.rank_and_alpha(path)
        components = state.pop(path, None)
        if components is None:
            raise ValueError(f"the EVA state has no components for {path}; compute it for this model and adapter.")
        rank = components.shape[0]
        kept.append(path) if rank else None
        if rank == 0:  # HF: the layer keeps no adapter
            layer.remove(adapter_name)
            if not layer.adapters:
                parent, _, child = path.rpartition(".")
                setattr(model.base_model.get_submodule(parent), child, layer.base_layer)
            continue
        if rank != r and config.eva_config.adjust_scaling_factors:
            alpha *= rank / r
        if rank != r:
            adapter = method.make_adapter(config.replace(r=rank, lora_alpha=alpha, rank_pattern={}, alpha_pattern={}),
                                          layer.view, path, None)
            layer.adapters[adapter_name] = adapter.to(layer.adapters[adapter_name].lora_A.device)
        layer.adapters[adapter_name].lora_A.copy_(components)
        if rank != config.r:
            rank_pattern[path] = rank
        if alpha != config.lora_alpha:
            alpha_pattern[path] = alpha
    if state:
        raise ValueError(f"the EVA state names layers this adapter does not adapt: {sorted(state)[:3]}.")
    model.peft_config[adapter_name] = config.replace(
        target_modules=kept, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern
    )
    model._update_trainable()
