"""PeftModel: a transformers (or any torch) model with named adapters injected.

    model = get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    model(**batch)                              # base + active adapter
    model(**batch, adapter_names=["a", "__base__", "b"])   # one adapter per row
    with model.disable_adapter(): ...           # the base alone
    model.merge_adapter(); model.unmerge_adapter(); model.merge_and_unload()
    model.save_pretrained(dir); PeftModel.from_pretrained(base, dir)

Method names and behaviour follow HF peft so users can switch by changing an import.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import os
import warnings
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from peftlab import hf_trainer, io
from peftlab.adapter_errors import on_its_own_base
from peftlab.base import BaseLayerView, Conv1DView, LossyMergeWarning, base_view
from peftlab.base_gap import BaseMismatchWarning, nf4_gap
from peftlab.checkpointing import enable_activation_checkpointing
from peftlab.config import SEQ_CLS_HEAD_NAMES, AdapterConfig
from peftlab.export import build_lora_export, write_lora_export
from peftlab.hooks import TrainingProgress
from peftlab.layer import BASE_ROW, AdaptedLayer, rows_use_adapters
from peftlab.methods import Method, config_class_for, method_for
from peftlab.methods.capabilities import MovesRankBudget, PatchesTheModel, RunsAtSeveralRanks
from peftlab.adapter import Adapter
from peftlab.modules_to_save import (
    TrainedCopy,
    check_tied_tensors_agree,
    embedding_weights,
    tie_output_embedding_copy,
    warn_untied_embedding,
)
from peftlab.quant import dequantize_model, is_quantized, packed_weights, quantize_model
from peftlab.targets import ALL_LINEAR, expand_all_linear, select_targets


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


class PeftModel(nn.Module):
    base_model: Any  # the transformers model (or any nn.Module): its own methods (generate, ...) are called

    def __init__(self, model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> None:
        super().__init__()
        hf_trainer.install(PeftModel)  # HF Trainer / TRL save and resume peftlab models (not done on import)
        self.base_model = model
        self.peft_config: dict[str, AdapterConfig] = {}
        # Model-level state of methods that have some (Method.inject), by adapter name.
        self.method_state = nn.ModuleDict()
        self.active_adapters: list[str] = []
        model.requires_grad_(False)
        self.add_adapter(adapter_name, config)
        self.set_adapter(adapter_name)
        # A subclass whose forward has the base model's signature, so HF Trainer finds `labels`
        # and keeps the dataset columns the model takes.
        self.__class__ = _class_with_signature_of(type(self), model)

    # -- structure -------------------------------------------------------------------------------

    def get_base_model(self) -> nn.Module:
        return self.base_model

    def adapted_layers(self) -> Iterator[tuple[str, AdaptedLayer]]:
        for path, module in self.base_model.named_modules():
            if isinstance(module, AdaptedLayer):
                yield path, module

    def adapters_of(self, adapter_name: str) -> Iterator[tuple[str, Adapter]]:
        """``(module path, adapter)`` of every layer that ``adapter_name`` adapts."""
        for path, layer in self.adapted_layers():
            if adapter_name in layer.adapters:
                yield path, layer.adapter(adapter_name)

    def adapter_parameters(self, adapter_name: str) -> Iterator[tuple[str, nn.Parameter]]:
        """The per-layer parameters of one adapter, named by module path (trainable or not)."""
        for path, adapter in self.adapters_of(adapter_name):
            for name, param in adapter.named_parameters():
                yield f"{path}.{name}", param

    def method_of(self, adapter_name: str) -> Method:
        self._check_known(adapter_name)
        return method_for(self.peft_config[adapter_name])

    def trained_copies(self) -> Iterator[tuple[str, TrainedCopy]]:
        for path, module in self.base_model.named_modules():
            if isinstance(module, TrainedCopy):
                yield path, module

    @property
    def active_adapter(self) -> str:
        return self.active_adapters[0]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # -- adapters --------------------------------------------------------------------------------

    def add_adapter(self, adapter_name: str, config: AdapterConfig) -> None:
        if adapter_name in self.peft_config:
            raise ValueError(
                f"an adapter named {adapter_name!r} exists already; choose another name or delete_adapter({adapter_name!r}) first."
            )
        if not adapter_name or "." in adapter_name or adapter_name == BASE_ROW:
            raise ValueError(f"invalid adapter name {adapter_name!r}: use a non-empty name without '.', not {BASE_ROW!r}.")
        method = method_for(config)
        if isinstance(method, PatchesTheModel):
            method.check_model(self, config)
        if config.target_modules is None:
            config = config.replace(target_modules=_default_targets(self.base_model, config))
        if isinstance(config.target_modules, str) and config.target_modules.lower() == ALL_LINEAR:
            config = config.replace(target_modules=expand_all_linear(self.base_model, config))
        targets = {path: self._base_view(path) for path in select_targets(self.base_model, config)}
        for path, view in targets.items():
            method.check_base(config, view, path)
        method.check_targets(config, targets)
        check_adapter_fits_in_memory(method, config, targets)
        self.peft_config[adapter_name] = config
        try:
            state = method.inject(self, adapter_name, config, targets)
            if state is not None:
                self.method_state[adapter_name] = state.requires_grad_(False)
            for path, view in targets.items():
                layer = self.base_model.get_submodule(path)
                if not isinstance(layer, AdaptedLayer):
                    layer = AdaptedLayer(layer)
                    _set_module(self.base_model, path, layer)
                layer.add(adapter_name, method.make_adapter(config, view, path, state))
            self._add_trained_copies(adapter_name, config)
        except Exception:
            self._remove_adapter_modules(adapter_name)
            del self.peft_config[adapter_name]
            raise
        self._update_trainable()

    def _base_view(self, path: str) -> BaseLayerView:
        module = self.base_model.get_submodule(path)
        return module.view if isinstance(module, AdaptedLayer) else base_view(module)

    def _add_trained_copies(self, adapter_name: str, config: AdapterConfig) -> None:
        wanted = config.with_classifier_heads() or []
        # A saved SEQ_CLS config lists both head names ("classifier", "score"); a model has one.
        optional_heads = set(SEQ_CLS_HEAD_NAMES) if config.task_type == "SEQ_CLS" else set()
        explicit = set(config.modules_to_save or []) - optional_heads
        for name in wanted:
            # HF's rule, so one adapter_config.json means the same modules in both libraries: a plain
            # suffix match with no '.' boundary ("norm" takes "input_layernorm" too).
            paths = [p for p, m in self.base_model.named_modules() if p.endswith(name)]
            paths = [p for p in paths if ".copies." not in p and not p.endswith(".original_module")]
            if not paths and name in explicit:
                raise ValueError(f"modules_to_save {name!r} matches no module of the model.")
            for path in paths:
                self._trained_copy_at(path).add(adapter_name)
        if getattr(config, "ensure_weight_tying", False):
            tie_output_embedding_copy(self.base_model, adapter_name, self._trained_copy_at)
        else:
            warn_untied_embedding(self.base_model, adapter_name, config)

    def _trained_copy_at(self, path: str) -> TrainedCopy:
        module = self.base_model.get_submodule(path)
        if not isinstance(module, TrainedCopy):
            module = TrainedCopy(module)
            _set_module(self.base_model, path, module)
        return module

    def _remove_adapter_modules(self, adapter_name: str) -> None:
        if adapter_name in self.peft_config:
            state = self.method_state[adapter_name] if adapter_name in self.method_state else None
            self.method_of(adapter_name).remove(self, adapter_name, state)
            if state is not None:
                del self.method_state[adapter_name]
        for path, layer in list(self.adapted_layers()):
            if adapter_name in layer.adapters:
                layer.remove(adapter_name)
            if not layer.adapters:
                _set_module(self.base_model, path, layer.base_layer)
        for path, trained in list(self.trained_copies()):
            if adapter_name in trained.copies:
                trained.remove(adapter_name)
            if not trained.copies:
                _set_module(self.base_model, path, trained.original_module)

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name in names:
            self._check_known(name)
        self.active_adapters = names
        for _, layer in self.adapted_layers():
            layer.active = list(names)
        for _, trained in self.trained_copies():
            trained.active = next((n for n in names if n in trained.copies), None)
        self._update_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_known(adapter_name)
        self._remove_adapter_modules(adapter_name)
        del self.peft_config[adapter_name]
        remaining = [n for n in self.active_adapters if n != adapter_name]
        if not remaining and self.peft_config:
            remaining = [next(iter(self.peft_config))]
        self.active_adapters = remaining
        if remaining:
            self.set_adapter(remaining)

    def _check_known(self, name: str) -> None:
        if name not in self.peft_config:
            known = ", ".join(sorted(self.peft_config)) or "none"
            raise ValueError(f"no adapter named {name!r}; the adapters are: {known}. Add it with add_adapter or load_adapter.")

    def _update_trainable(self) -> None:
        """Only the active adapters (and their trained copies) train, unless loaded for inference;
        within an adapter, only what ``Adapter.trainable_parameters()`` declares."""
        for _, layer in self.adapted_layers():
            for name in layer.adapters:
                adapter = layer.adapter(name)
                adapter.requires_grad_(False)
                if name in self.active_adapters and not self.peft_config[name].inference_mode:
                    for param in adapter.trainable_parameters():
                        param.requires_grad_(True)
        for _, trained in self.trained_copies():
            for name, module in trained.copies.items():
                module.requires_grad_(name in self.active_adapters and not self.peft_config[name].inference_mode)

    # -- merging and disabling -------------------------------------------------------------------

    def merge_adapter(self, adapter_names: Sequence[str] | None = None) -> None:
        """Fold the adapters into the frozen weights; into a 4-bit weight this re-quantizes (lossy, warned)."""
        names = list(adapter_names) if adapter_names is not None else self.active_adapters
        for name in names:
            self._check_known(name)
        with _one_warning_for_lossy_layers("merging"):
            for _, layer in self.adapted_layers():
                layer.merge(names)

    def unmerge_adapter(self) -> None:
        with _one_warning_for_lossy_layers("unmerging"):
            for _, layer in self.adapted_layers():
                layer.unmerge()

    def merge_and_unload(self, adapter_names: Sequence[str] | None = None, *, dequantize: bool = False) -> nn.Module:
        """Merge, then hand back the plain model: no peftlab modules left, zero overhead.

        On a 4-bit base the merge re-quantizes every weight (lossy; one warning gives the largest
        error). ``dequantize=True`` first replaces the 4-bit layers by dense ones holding exactly the
        dequantised weights (``peftlab.quant.dequantize_model``), so the merge is exact and the
        merged model computes what the QLoRA model did.
        """
        if dequantize:
            dequantize_model(self.base_model)
        self.merge_adapter(adapter_names)
        return self.unload()

    def unload(self) -> nn.Module:
        """The plain model with merged adapters kept and unmerged ones dropped."""
        for name in self.peft_config:
            state = self.method_state[name] if name in self.method_state else None
            method = self.method_of(name)
            if isinstance(method, PatchesTheModel):
                method.unload(self, name, state)
        for path, layer in list(self.adapted_layers()):
            _set_module(self.base_model, path, layer.base_layer)
        for path, trained in list(self.trained_copies()):
            _set_module(self.base_model, path, trained.current())
        return self.base_model

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        layers = [layer for _, layer in self.adapted_layers()]
        if any(layer.merged for layer in layers):
            warnings.warn("disable_adapter: merged adapters are unmerged first so the base can run alone.", stacklevel=3)
            self.unmerge_adapter()
        wrappers = layers + [trained for _, trained in self.trained_copies()]
        for wrapper in wrappers:
            wrapper.disabled = True
        try:
            yield
        finally:
            for wrapper in wrappers:
                wrapper.disabled = False

    # -- running ---------------------------------------------------------------------------------

    def _row_adapter_context(self, adapter_names: Sequence[str] | None):
        if adapter_names is None:
            return contextlib.nullcontext()
        for name in set(adapter_names) - {BASE_ROW}:
            self._check_known(name)
        return rows_use_adapters(list(adapter_names))

    def forward(self, *args, adapter_names: Sequence[str] | None = None, **kwargs):
        self._refuse_training_while_merged()
        with self._row_adapter_context(adapter_names):
            return self.base_model(*args, **kwargs)

    def _refuse_training_while_merged(self) -> None:
        """A merged adapter is outside the graph: a training step would leave it unchanged (and
        backward would fail with "does not require grad"). Say so at the forward instead."""
        if not (self.training and torch.is_grad_enabled()):
            return
        for path, layer in self.adapted_layers():
            trainable = [n for n in layer.merged if any(p.requires_grad for p in layer.adapters[n].parameters())]
            if trainable:
                raise RuntimeError(
                    f"adapter {trainable[0]!r} is merged into the weights (e.g. {path}), so training would not "
                    "update it; call unmerge_adapter() before training, or model.eval() / torch.no_grad() for inference."
                )

    def generate(self, *args, adapter_names: Sequence[str] | None = None, **kwargs):
        with self._row_adapter_context(adapter_names):
            return self.base_model.generate(*args, **kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """As the base model's, plus inputs that require grad so adapters get gradients (:mod:`peftlab.checkpointing`)."""
        enable_activation_checkpointing(self.base_model, gradient_checkpointing_kwargs, **kwargs)

    def update_and_allocate(self, global_step: int) -> None:
        """HF's call for custom training loops (AdaLoRA's name): after ``optimizer.step()`` and before
        ``zero_grad()``, run the active adapters' ``after_optimizer_step`` training hooks for step
        ``global_step`` (counted from 0). peftlab's loop and its Trainer callback call every hook
        themselves; a custom loop that needs the others (``extra_loss``: AdaLoRA's regulariser, which
        HF adds inside ``forward``) runs them with ``peftlab.train.hooks.HookRunner``."""
        progress = TrainingProgress(step=global_step, total_steps=0, epoch=0.0)  # 0: the loop's length is unknown
        for name in self.active_adapters:
            for hook in self.method_of(name).training_hooks(self, name):
                hook.after_optimizer_step(progress)

    # -- ranks -----------------------------------------------------------------------------------

    def set_rank(self, rank: int, adapter_name: str | None = None) -> None:
        """Run the adapter (default: the active one) at ``rank``, for methods trained to work at
        several ranks (DyLoRA: any ``1 <= rank <= r``); the others refuse."""
        name = adapter_name or self.active_adapter
        method = self.method_of(name)
        if not isinstance(method, RunsAtSeveralRanks):
            raise ValueError(
                f"set_rank: the {method.name} method trains one fixed rank; only methods trained to work at several "
                "ranks (dylora) can change it after training."
            )
        method.set_rank(self, name, rank)

    def rank_per_layer(self, adapter_name: str | None = None) -> dict[str, int] | None:
        """``{module path: live rank}`` for methods that move their rank budget between layers
        (AdaLoRA, dora_rank); None for a fixed rank."""
        name = adapter_name or self.active_adapter
        method = self.method_of(name)
        return method.rank_per_layer(self, name) if isinstance(method, MovesRankBudget) else None

    # -- parameters ------------------------------------------------------------------------------

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        return count_parameters(self)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # -- saving and loading ----------------------------------------------------------------------

    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The adapter's tensors under the HF PEFT file keys: the method's, then the trained copies."""
        return {**self.method_of(adapter_name).export_tensors(self, adapter_name), **self.trained_copy_tensors(adapter_name)}

    def trained_copy_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The ``modules_to_save`` copies of one adapter under the HF PEFT file keys."""
        return {
            f"{io.KEY_PREFIX}{path}.{suffix}": tensor
            for path, trained in self.trained_copies()
            if adapter_name in trained.copies
            for suffix, tensor in trained.saved_tensors(adapter_name).items()
        }

    def _config_to_save(self, adapter_name: str) -> dict[str, Any]:
        config = self.peft_config[adapter_name]
        return self.finish_saved_config(adapter_name, self.method_of(adapter_name).export_config(self, adapter_name, config))

    def finish_saved_config(self, adapter_name: str, data: dict[str, Any]) -> dict[str, Any]:
        """The fields of a saved adapter_config.json that depend on the model, not the method."""
        config = self.peft_config[adapter_name]
        data["inference_mode"] = True
        data["modules_to_save"] = config.with_classifier_heads()
        if data.get("base_model_name_or_path") is None:
            data["base_model_name_or_path"] = getattr(self.base_model, "name_or_path", None) or None
        if "fan_in_fan_out" in data:
            data["fan_in_fan_out"] = any(
                isinstance(layer.view, Conv1DView) for _, layer in self.adapted_layers() if adapter_name in layer.adapters
            )
        return data

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        selected_adapters: Sequence[str] | None = None,
        is_main_process: bool = True,
        *,
        as_lora: bool = False,
        rank: int | None = None,
        max_rank: int | None = None,
        **kwargs: Any,
    ) -> None:
        """Write each adapter as HF peft does (safetensors only); ``is_main_process=False`` writes nothing.

        ``as_lora=True`` writes each as a plain LoRA adapter that serving engines load
        (:mod:`peftlab.export`): exact where the update is low rank, else a truncated SVD at ``rank``
        (error warned and written in the README); ``max_rank`` is the engine's rank limit."""
        if not safe_serialization:
            raise ValueError("save_pretrained(safe_serialization=False): peftlab writes safetensors only (no pickle files); drop the argument.")
        # HF's argument: write a PiSSA/OLoRA adapter as the rank-2r LoRA of the unmodified base (lora_init/conversion.py).
        initial_dir = kwargs.pop("path_initial_model_for_weight_conversion", None)
        _warn_ignored(kwargs)
        if not is_main_process:
            return
        if os.path.isfile(save_directory):
            raise ValueError(f"{save_directory} is a file; save_pretrained needs a directory path.")
        if not as_lora and (rank is not None or max_rank is not None):
            raise ValueError("rank and max_rank apply to save_pretrained(as_lora=True) only.")
        names = list(selected_adapters or self.peft_config)
        for name in names:
            self._check_known(name)
        exported = [name for name in names if as_lora or self.method_of(name).saves_as_lora]
        if exported:
            # Every adapter is checked before anything is written: a refusal leaves the folder as it was.
            exports = {name: build_lora_export(self, name, rank, max_rank) for name in exported}
            for name, export in exports.items():
                write_lora_export(export, save_directory, name, saved_base_facts(self.base_model))
        for name in names:
            if name in exported:
                continue
            config, tensors = self._config_to_save(name), self.adapter_state_dict(name)
            if initial_dir is not None:
                from peftlab.methods.lora_init.conversion import converted_for_original_base

                config, tensors = converted_for_original_base(self, name, initial_dir, config)
            io.write_adapter(io.adapter_dir(save_directory, name), config, tensors, saved_base_facts(self.base_model))

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False,
        config: AdapterConfig | None = None, *, base_quantization: str = "check", **_: Any,
    ) -> "PeftModel":
        """Load a saved adapter onto ``model``; ``config`` (as HF) replaces the saved config, and must be
        of the saved adapter's method.

        ``base_quantization``: what to do when the adapter file records another base than ``model``
        (a QLoRA adapter's NF4 base, on a full-precision model, or the reverse): "check" (default)
        refuses, "apply" quantizes ``model`` in place as recorded, "ignore" loads it anyway with a
        warning that gives the measured logit difference (:mod:`peftlab.base_gap`)."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"PeftModel.from_pretrained needs the base model (a torch nn.Module) first, got {type(model).__name__}.")
        config = load_config(model_id, is_trainable, config)
        check_task(config, model, f"adapter in {model_id}")
        if cls is PeftModel:  # as HF: the task's class, e.g. PeftModelForCausalLM
            cls = peft_model_class(config.task_type)
        match_recorded_base(model, model_id, config, base_quantization, lambda base: PeftModel._attach_unchecked(base, model_id))
        with on_its_own_base(config, model, f"adapter in {model_id}"):
            peft_model = cls(model, config, adapter_name)
            peft_model._load_weights(model_id, adapter_name)
        return peft_model

    def load_adapter(
        self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False, *,
        base_quantization: str = "check", **_: Any,
    ) -> None:
        """Load a saved adapter beside the others; ``base_quantization`` as in ``from_pretrained``
        ("apply" is refused here: quantize the base before the first adapter)."""
        config = load_config(model_id, is_trainable)
        check_task(config, self.base_model, f"adapter in {model_id}")
        match_recorded_base(self, model_id, config, base_quantization, lambda base: PeftModel._attach_unchecked(base, model_id))
        self.add_adapter(adapter_name, config)
        try:
            self._load_weights(model_id, adapter_name)
        except Exception:
            self.delete_adapter(adapter_name)
            raise

    @classmethod
    def _attach_unchecked(cls, base: nn.Module, model_id: str | os.PathLike) -> "PeftModel":
        """The saved adapter on ``base`` whatever base it records (to measure it on another base)."""
        config = load_config(model_id)
        peft_model = peft_model_class(config.task_type)(base, config)
        peft_model._load_weights(model_id, "default")
        return peft_model

    def _load_weights(self, model_id: str | os.PathLike, adapter_name: str) -> None:
        self.load_adapter_tensors(io.read_adapter_weights(io.Path(model_id)), adapter_name, f"adapter in {model_id}")

    def load_adapter_tensors(self, saved: dict[str, torch.Tensor], adapter_name: str, source: str) -> None:
        """Copy ``saved`` (HF PEFT file keys) into the adapter; every key, shape and value is checked first."""
        method = self.method_of(adapter_name)
        saved = method.rename_saved_keys(saved)
        expected = self.adapter_state_dict(adapter_name)
        # HF saves the full embedding weights along with an adapter on an embedding (save_embedding_layers): load them too.
        expected.update({k: v for k, v in embedding_weights(self.base_model).items() if k in saved and k not in expected})
        missing = sorted(set(expected) - set(saved))
        unexpected = sorted(set(saved) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"{source} does not fit this model: missing keys {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                f"unexpected keys {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}. "
                f"{_task_hint(self.peft_config[adapter_name].task_type, self.base_model)}"
                "Load it on the base model it was trained on, with its own adapter_config.json."
            )
        for key, tensor in expected.items():
            if saved[key].shape != tensor.shape:
                raise ValueError(
                    f"{source} does not fit this model: {key} has shape {tuple(saved[key].shape)} in the "
                    f"file but {tuple(tensor.shape)} in the model. {_task_hint(self.peft_config[adapter_name].task_type, self.base_model)}"
                    "Was it trained on another base model or with another r?"
                )
            if saved[key].is_floating_point() and not torch.isfinite(saved[key]).all():
                raise ValueError(f"{source} holds NaN or infinite values in {key}: the adapter is broken; retrain it or restore a good copy.")
        check_tied_tensors_agree(expected, saved, source)
        own = method.export_tensors(self, adapter_name)
        method.load_tensors(self, adapter_name, {key: saved[key] for key in own})
        with torch.no_grad():  # trained copies and embedding weights: plain parameters
            for key, tensor in expected.items():
                if key not in own:
                    tensor.copy_(saved[key].to(tensor.dtype))


@contextlib.contextmanager
def _one_warning_for_lossy_layers(action: str) -> Iterator[None]:
    """Gather the per-layer LossyMergeWarnings of a whole-model merge into one, with the largest error."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    lossy = [w.message for w in caught if isinstance(w.message, LossyMergeWarning)]
    for w in caught:
        if not issubclass(w.category, LossyMergeWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    if lossy:
        error = max(m.max_abs_error for m in lossy)
        warnings.warn(
            LossyMergeWarning(
                f"{action} the adapter re-quantized {len(lossy)} 4-bit layer(s): lossy, max abs weight error "
                f"{error:.4g}. For an exact merge use merge_and_unload(dequantize=True), which merges into "
                "dense layers holding exactly the dequantised weights.",
                max_abs_error=error,
            ),
            stacklevel=4,
        )


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) of any module; a tied tensor counts once, a 4-bit weight (held in
    buffers) by its values, as in HF peft."""
    storage, quantized = packed_weights(model)
    params = [p for p in model.parameters() if id(p) not in storage]  # a tied tensor comes once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params) + quantized


def load_config(model_id: str | os.PathLike, is_trainable: bool = False, config: AdapterConfig | None = None) -> AdapterConfig:
    data = io.read_adapter_config(io.Path(model_id))
    saved_class = config_class_for(data["peft_type"], data)
    if config is None:
        config = saved_class.from_dict(data)
    elif config.peft_type != data["peft_type"]:
        raise ValueError(
            f"the adapter in {model_id} is a {data['peft_type']} adapter but the config given is {type(config).__name__} "
            f"({config.peft_type}); leave config out to load it as the file says."
        )
    elif saved_class.file_marker and not isinstance(config, saved_class):
        raise ValueError(
            f"the adapter in {model_id} is a {saved_class.__name__} adapter (its adapter_config.json has "
            f"{saved_class.file_marker!r}), which a {type(config).__name__} would load without that part; leave config "
            f"out, or give a {saved_class.__name__}."
        )
    elif method_for(config).saves_as_lora:
        raise ValueError(
            f"{type(config).__name__} adapters are saved as the plain LoRA adapter their trained model equals: leave "
            "config out to load it (as LoRA). To continue training, resume from a training checkpoint."
        )
    return config.replace(inference_mode=not is_trainable)


def get_peft_model(model: nn.Module, config: AdapterConfig, adapter_name: str = "default", **_: Any) -> PeftModel:
    """Wrap ``model`` with a new trainable adapter; the base model's parameters are frozen. The
    result is the task's class (``PeftModelForCausalLM`` for ``task_type="CAUSAL_LM"``), as in HF."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"get_peft_model needs a torch model (an nn.Module, e.g. from AutoModel.from_pretrained), got {type(model).__name__}.")
    if not isinstance(config, AdapterConfig):
        hint = " Build one from the dict: LoraConfig(**d)." if isinstance(config, dict) else ""
        raise TypeError(f"get_peft_model needs a peftlab config such as LoraConfig(...), got {type(config).__name__}.{hint}")
    _refuse_stacked_adapters(model)
    return peft_model_class(config.task_type)(model, config, adapter_name)


def _refuse_stacked_adapters(model: nn.Module) -> None:
    if isinstance(model, PeftModel):
        names = ", ".join(model.peft_config)
        raise ValueError(
            f"get_peft_model was given a PeftModel, which already carries the adapter(s) {names}; wrapping it again "
            "would stack adapters in a model no folder can load back. Add another adapter with "
            "model.add_adapter(name, config), or start from the base: get_peft_model(model.unload(), config)."
        )
    if any(isinstance(module, AdaptedLayer) for module in model.modules()):
        raise ValueError(
            "get_peft_model was given the base model of a PeftModel (its layers already carry adapters); pass the "
            "PeftModel's add_adapter(name, config) instead, or unload() it first for a clean base."
        )


def saved_base_facts(model: nn.Module) -> dict[str, str]:
    """What an adapter needs of its base besides the weights, kept in the safetensors metadata (HF
    peft ignores it): the 4-bit quantization it was trained on, and the class names of a classifier."""
    facts = {io.QUANTIZATION_KEY: io.QUANTIZATION_NF4 if is_quantized(model) else io.QUANTIZATION_NONE}
    id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
    names = [str(id2label[i]) for i in sorted(id2label)]
    if names and names != [f"LABEL_{i}" for i in range(len(names))]:  # transformers' placeholder names
        facts[io.LABEL_NAMES_KEY] = json.dumps(names)
    return facts


BASE_QUANTIZATION_CHOICES = ("check", "apply", "ignore")


def match_recorded_base(
    model: nn.Module, model_id: str | os.PathLike, config: AdapterConfig, mode: str, attach: Callable[[nn.Module], nn.Module]
) -> None:
    """Before an adapter is loaded onto ``model``: the base its file records (NF4 or full precision,
    :func:`saved_base_facts`) against ``model``'s. On a mismatch, ``mode`` "check" refuses, "apply"
    quantizes ``model`` as recorded, "ignore" warns with the logit difference of the adapter
    (``attach(base)``) on the two bases. Files without the record (HF peft's) are not checked."""
    if mode not in BASE_QUANTIZATION_CHOICES:
        raise ValueError(f"base_quantization={mode!r}: use one of {', '.join(map(repr, BASE_QUANTIZATION_CHOICES))}.")
    if getattr(config, "init_lora_weights", None) == "loftq":
        return  # LoftQ loads on the full-precision base and rewrites it to its NF4 values itself (lora_init/loftq.py)
    try:
        recorded = io.read_adapter_metadata(io.Path(model_id)).get(io.QUANTIZATION_KEY)
    except ValueError:
        return  # a missing or damaged weights file: loading it says so precisely
    quantized = is_quantized(model)
    if recorded == io.QUANTIZATION_NF4 and not quantized:
        if mode == "apply" and isinstance(model, PeftModel):
            raise ValueError(
                f"base_quantization='apply': this model holds adapters already, so its base cannot be quantized now; "
                "quantize the base (peftlab.quant.quantize_model) before adding the first adapter."
            )
        if mode == "apply":
            quantize_model(model)
        elif mode == "ignore":
            gap = nf4_gap(_bare_copy(model), attach)
            warnings.warn(BaseMismatchWarning(
                f"the adapter in {model_id} was trained on an NF4 (4-bit) base and is loaded on a full-precision one, "
                f"as asked: it computes something else here ({gap.describe()}, NF4 base vs this base)."
            ), stacklevel=3)
        else:
            raise ValueError(
                f"the adapter in {model_id} was trained on an NF4 (4-bit, QLoRA) base, but this base is full precision: "
                "the adapter computes something else on it. Quantize the base first (peftlab.quant.quantize_model(base)), "
                "or pass base_quantization='apply' to do it here; base_quantization='ignore' loads it anyway with a "
                "warning giving the measured logit difference."
            )
    elif recorded == io.QUANTIZATION_NONE and quantized:
        if mode != "ignore":
            raise ValueError(
                f"the adapter in {model_id} was trained on a full-precision base, but this base is quantized to 4 bits: "
                "the adapter computes something else on it. Load it on the full-precision base (its weights cannot be "
                "recovered from the 4-bit ones), or pass base_quantization='ignore' to load it anyway."
            )
        warnings.warn(BaseMismatchWarning(
            f"the adapter in {model_id} was trained on a full-precision base and is loaded on a 4-bit one, as asked: it "
            "computes something else here (not measured: the full-precision weights are not in this model)."
        ), stacklevel=3)


def _bare_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` without adapters (of a PeftModel: its base, adapters unmerged and removed)."""
    if not isinstance(model, PeftModel):
        return copy.deepcopy(model)
    twin = copy.deepcopy(model)
    twin.unmerge_adapter()
    for name in list(twin.peft_config):
        twin.delete_adapter(name)
    return twin.base_model


_TASK_MODEL_SUFFIXES = {"SEQ_CLS": ("ForSequenceClassification",), "CAUSAL_LM": ("ForCausalLM", "LMHeadModel")}


def _task_hint(task_type: str | None, model: nn.Module) -> str:
    """"It was trained for X" when the model's class is made for another task than the adapter's."""
    model_class = type(model).__name__
    other_tasks = [t for t, suffixes in _TASK_MODEL_SUFFIXES.items() if t != task_type and model_class.endswith(suffixes)]
    if task_type not in _TASK_MODEL_SUFFIXES or not other_tasks:
        return ""
    return f"It was trained for task_type={task_type} but this model is a {model_class} ({other_tasks[0]}). "


def check_task(config: AdapterConfig, model: nn.Module, source: str) -> None:
    hint = _task_hint(config.task_type, model)
    if hint:
        raise ValueError(f"{source}: {hint}Load it on a model for its task (e.g. with AutoPeftModel.from_pretrained).")


def _default_targets(model: nn.Module, config: AdapterConfig) -> list[str] | str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    targets = config.default_target_modules.get(model_type or "")
    if targets is None:
        raise ValueError(
            f"target_modules is not set and {type(config).__name__} has no default for model type {model_type!r}: "
            "name the layers to adapt, e.g. target_modules=['q_proj', 'v_proj'], or 'all-linear'."
        )
    return list(targets) if isinstance(targets, list) else targets


def check_adapter_fits_in_memory(method: Method, config: AdapterConfig, targets: dict[str, BaseLayerView]) -> None:
    """Refuse before allocating when the new adapter's weights alone exceed the free memory: a huge
    ``r`` would otherwise fail deep in torch, or get the process killed."""
    from peftlab.memory import AdapterTooLargeError, available_bytes, format_bytes

    needed = 4 * sum(method.adapter_numel(config, view, path) for path, view in targets.items())
    if needed == 0:
        return
    device = next(iter(targets.values())).device
    free = available_bytes(device)
    if free is not None and needed > free:
        raise AdapterTooLargeError(
            f"the adapter needs {format_bytes(needed)} for its weights alone (training needs ~4x that for gradients "
            f"and optimizer states), but only {format_bytes(free)} is free on {device}; lower r or target fewer modules."
        )


def _warn_ignored(kwargs: dict[str, Any]) -> None:
    # HF arguments peftlab has no use for; a value that asks for something is named, never dropped silently.
    inert = {"save_embedding_layers": "auto", "state_dict": None, "push_to_hub": False, "convert_pissa_to_lora": None}
    asked = [k for k, v in kwargs.items() if k != "state_dict" and inert.get(k, object()) != v]
    if asked:
        warnings.warn(f"save_pretrained: peftlab ignores {', '.join(asked)}; it writes the adapter files only.", stacklevel=3)


def _class_with_signature(peft_class: type, base_class: type[nn.Module]) -> type:
    base_sig = inspect.signature(base_class.forward)
    params = list(base_sig.parameters.values())
    names = {p.name for p in params}
    extra = inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None)
    if "adapter_names" not in names:
        var_kw = [i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD]
        params.insert(var_kw[0] if var_kw else len(params), extra)

    def forward(self, *args, adapter_names=None, **kwargs):
        return peft_class.forward(self, *args, adapter_names=adapter_names, **kwargs)

    setattr(forward, "__signature__", base_sig.replace(parameters=params))  # what inspect.signature reports
    name = f"{peft_class.__name__}For{base_class.__name__}"
    namespace = {"forward": forward, "_signature_of": base_class, "__module__": peft_class.__module__, "__qualname__": name}
    return type(name, (peft_class,), namespace)


def _class_with_signature_of(peft_class: type, model: nn.Module) -> type:
    if getattr(peft_class, "_signature_of", None) is type(model):
        return peft_class
    key = (peft_class, type(model))
    if key not in _SIGNATURE_CLASSES:
        _SIGNATURE_CLASSES[key] = _class_with_signature(*key)
    return _SIGNATURE_CLASSES[key]


#: One subclass per (PeftModel class, base model class), made once.
_SIGNATURE_CLASSES: dict[tuple[type, type[nn.Module]], type] = {}


# -- the task classes (HF's names): get_peft_model and from_pretrained return the task's ----------------

class PeftModelForSequenceClassification(PeftModel):
    """A PeftModel on a sequence classifier (``task_type="SEQ_CLS"``: the head trains in full)."""


class PeftModelForCausalLM(PeftModel):
    """A PeftModel on a causal language model (``task_type="CAUSAL_LM"``)."""


class PeftModelForSeq2SeqLM(PeftModel):
    """A PeftModel on an encoder-decoder language model (``task_type="SEQ_2_SEQ_LM"``)."""


class PeftModelForTokenClassification(PeftModel):
    """A PeftModel on a token classifier (``task_type="TOKEN_CLS"``)."""


class PeftModelForQuestionAnswering(PeftModel):
    """A PeftModel on an extractive question-answering model (``task_type="QUESTION_ANS"``)."""


class PeftModelForFeatureExtraction(PeftModel):
    """A PeftModel on an encoder used for its hidden states (``task_type="FEATURE_EXTRACTION"``)."""


PEFT_MODEL_CLASSES: dict[str, type[PeftModel]] = {
    "SEQ_CLS": PeftModelForSequenceClassification,
    "CAUSAL_LM": PeftModelForCausalLM,
    "SEQ_2_SEQ_LM": PeftModelForSeq2SeqLM,
    "TOKEN_CLS": PeftModelForTokenClassification,
    "QUESTION_ANS": PeftModelForQuestionAnswering,
    "FEATURE_EXTRACTION": PeftModelForFeatureExtraction,
}


def peft_model_class(task_type: str | None) -> type[PeftModel]:
    """The class ``get_peft_model`` returns for ``task_type`` (plain PeftModel when none is set)."""
    return PEFT_MODEL_CLASSES.get(task_type or "", PeftModel)
