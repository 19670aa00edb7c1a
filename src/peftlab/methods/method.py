"""The method protocol: everything the core asks of a PEFT method, in the order of an adapter's life.

A method is one file in ``peftlab/methods/`` that defines a config dataclass, an
:class:`~peftlab.adapter.Adapter` (the per-layer module), a :class:`Method` subclass, and
registers one instance per name users type::

    @dataclass
    class MyConfig(AdapterConfig):          # HF peft's field names where HF has the method
        r: int = 8
        peft_type = "MY_METHOD"             # written to adapter_config.json; loads this config

    class MyMethod(Method):
        config_class = MyConfig
        options = {"r": MethodOption(int, "adapter rank", "positive", lambda v: v > 0)}
        run_defaults = {"lr": 1e-3, "r": 8}
        def make_adapter(self, config, view, path, state): return MyAdapter(view, config.r)

    register_method(MyMethod("my_method"))

The registry (:mod:`peftlab.methods.registry`) imports every module of this package, so the file
is all a new method needs. Every hook below but ``make_adapter`` has a default that does nothing
or does what LoRA needs, so a LoRA-like method overrides little. Hooks marked [Capability] are a
capability's (:mod:`peftlab.methods.capabilities`): ``Method`` does not declare them, a method that has
the capability defines them, and the core calls them only where ``isinstance(method, Capability)``.
The core calls, in order (a test holds this list to the code: every hook is here, and nothing else):

    planning a run (the lab, the training engine)
        make_config(**fields)                 the config from the run's options over this name's preset
        check_model_config(model_config)      [PatchesTheModel] the transformers config, before weights
                                              load: raise ValueError to refuse a family (compare
                                              --methods all leaves the method out)
        for_comparison(options)               a comparison's run options: the lab's choice for an
                                              option a single run must give (LongLoRA's rope_scale)
    get_peft_model / add_adapter
        check_model(model, config)            [PatchesTheModel] the whole model, before its targets are
                                              resolved: raise ValueError to refuse it
        check_base(config, view, path)        every targeted layer, before anything is built:
                                              raise UnsupportedBaseError to refuse (4-bit, Embedding)
        check_targets(config, targets)        all targets at once: refuse a per-module option (a rank
                                              pattern) that matches none of them
        adapter_numel(config, view, path)     values the layer's adapter will hold, checked against
                                              free memory before anything is allocated; default 0
        state = inject(model, name, config, targets)
                                              model-level state shared by the layers (VeRA's
                                              random matrices): an nn.Module or None; the core
                                              registers it at model.method_state[name], so
                                              .to()/.cuda()/state_dict() carry it; it never trains
        make_adapter(config, view, path, state)   one Adapter per targeted layer
    set_adapter / training
        Adapter.trainable_parameters()        which of the adapter's tensors train when it is
                                              active; the rest stay frozen whatever set_adapter does
        param_groups(model, name, lr, weight_decay)   the adapter's optimizer groups (LoRA+, LoRA-FA)
        training_hooks(model, name)           TrainingHook objects (peftlab.hooks) the loop calls
    save_pretrained / from_pretrained
        export_config(model, name, config)    the adapter_config.json dict
        export_tensors(model, name)           {file key: tensor}; default: each layer's
                                              Adapter.saved_tensors() under its module path
        rename_saved_keys(tensors)            keys other writers (older HF versions) used -> ours
        load_tensors(model, name, tensors)    copy the checked file tensors in; default: each
                                              layer's Adapter.load_saved_tensors(), which refuses
                                              a saved tensor that is computed, not stored
        as_low_rank(model, name, rank)        {module path: (A, B) or None}: the update as exact
                                              low-rank factors for ``save_pretrained(as_lora=True)``
                                              (peftlab.export); default: each layer's
                                              Adapter.low_rank(base), whatever ``rank`` asks (the
                                              export cuts it by SVD); a method that runs at several
                                              ranks gives its exact factors at ``rank``; None: not
                                              low rank (export takes a truncated SVD of delta_weight)
    set_rank / the lab
        inference_ranks(model, name)          [RunsAtSeveralRanks] the ranks the trained adapter can
                                              run at (DyLoRA: 1..r; the lab evaluates each)
        set_rank(model, name, rank)           [RunsAtSeveralRanks] PeftModel.set_rank: run at another
                                              rank (without the capability: refused, one rank)
        rank_per_layer(model, name)           [MovesRankBudget] {module path: live rank} where the
                                              method moved its rank budget (the lab plots it)
    delete_adapter
        remove(model, name, state)            undo what inject did outside method_state (the core
                                              drops the state itself)
    merge_and_unload / unload
        unload(model, name, state)            [PatchesTheModel] the plain model is handed out: undo
                                              what must not outlive peftlab (LongLoRA's training
                                              attention), keep what the trained model is (its RoPE scale)

One instance per name: ``LoraMethod("dora", preset={"use_dora": True})`` is DoRA. Several names
may share a config class if they are instances of one Method class (presets of one
implementation); a method whose files are another method's format (LoRA-FA writes plain LoRA
files) sets ``loads_peft_type=False``, and its files load as that other method. Two methods that
both load one ``peft_type`` are an error at import. A method whose trained model is exactly a
plain LoRA adapter of some rank, but whose training state is more (Delta-LoRA: the moved weight
as a second pair of factors), sets ``saves_as_lora = True``: ``save_pretrained`` then always
writes its ``as_lora=True`` export (built from ``as_low_rank``), which loads as LoRA; its
training state travels in checkpoints (the hooks' state), never in adapter files.

Command-line options: ``options`` names the config fields ``peftlab train`` shows as flags
(``lora_alpha`` -> ``--lora-alpha``) and ``run_defaults`` gives their values for a training run
(and its learning rate) where the user set none; several methods may declare one option (each
has its own default). Anything else reaches the config through ``--method-option KEY=VALUE``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator

import torch
from torch import nn

from peftlab import io
from peftlab.base import BaseLayerView
from peftlab.config import AdapterConfig
from peftlab.hooks import TrainingHook
from peftlab.weight_decay import decay_groups
from peftlab.adapter import Adapter

if TYPE_CHECKING:
    from peftlab.model import PeftModel


class UnsupportedBaseError(TypeError):
    """A method cannot run on a targeted layer (its storage or kind); raised before training starts."""


@dataclass(frozen=True)
class MethodOption:
    """A config field shown on the command line: its type, help text, and the range it must be in."""

    kind: type  # int, float, bool or str
    help: str
    requirement: str = ""  # what `valid` checks, for the error: "positive", "in [0, 1)"
    valid: Callable[[Any], bool] | None = None
    #: A sweep may give it as a multiple of this option, e.g. ``lora_alpha=2r`` with ``relative_to="r"``.
    relative_to: str | None = None

    def check(self, name: str, value: Any) -> str | None:
        """The error message for a value out of range, or None."""
        if value is None or self.valid is None or self.valid(value):
            return None
        return f"{name} must be {self.requirement}, got {value}."



#: The adapter-input dropout option: ``lora_dropout`` of the LoRA family, ``vera_dropout``, ``mora_dropout``. A
#: method declares its dropout option with this object, so the lab finds it by :func:`adapter_dropout_option`.
ADAPTER_DROPOUT = MethodOption(float, "dropout on the adapter input", "in [0, 1)", lambda v: 0 <= v < 1)


def adapter_dropout_option(method: Method | None) -> str | None:
    """The name of ``method``'s adapter dropout option (None: it has none, or no method: full fine-tuning)."""
    options = type(method).options if method is not None else {}
    return next((name for name, option in options.items() if option is ADAPTER_DROPOUT), None)

class Method:
    """One PEFT method as the core sees it; see the module docstring for the order of the calls."""

    #: The config dataclass; its ``peft_type`` is what the method's files say and load by.
    config_class: ClassVar[type[AdapterConfig]]
    #: Config fields shown as ``peftlab train`` flags.
    options: ClassVar[dict[str, MethodOption]] = {}
    #: Training-run defaults (``lr`` and values of ``options``) for options the user left unset.
    run_defaults: dict[str, Any] = {"lr": 1e-3}  # the class's; each instance adds its name's own
    #: Its adapter files are always its exact plain-LoRA export (see the module docstring).
    saves_as_lora: ClassVar[bool] = False

    def for_comparison(self, options: dict[str, Any]) -> dict[str, Any]:
        """A comparison's run options for this method: options a single run must give explicitly
        (LongLoRA's context extension) get the comparison's choice here."""
        return options

    def __init__(
        self, name: str, *, preset: dict[str, Any] | None = None, quantization: str | None = None,
        loads_peft_type: bool = True, run_defaults: dict[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.preset = dict(preset or {})  # config fields this name fixes, e.g. {"use_dora": True}
        self.quantization = quantization  # the base is quantized first ("nf4" for qlora)
        self.loads_peft_type = loads_peft_type
        self.run_defaults = {**type(self).run_defaults, **(run_defaults or {})}  # this name's own

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    @property
    def peft_type(self) -> str:
        return self.config_class.peft_type

    def make_config(self, **fields: Any) -> AdapterConfig:
        return self.config_class(**{**self.preset, **fields})

    # -- building ---------------------------------------------------------------------------------

    def check_base(self, config: AdapterConfig, view: BaseLayerView, path: str) -> None:
        """Raise :class:`UnsupportedBaseError` naming ``path`` if the method cannot adapt this layer."""

    def check_targets(self, config: AdapterConfig, targets: dict[str, BaseLayerView]) -> None:
        """Raise if a per-module option of ``config`` (e.g. a rank pattern) matches none of ``targets``."""

    def adapter_numel(self, config: AdapterConfig, view: BaseLayerView, path: str) -> int:
        """How many values the adapter on this layer will hold (0: unknown); checked against free
        memory before anything is allocated."""
        return 0

    def inject(
        self, model: PeftModel, adapter_name: str, config: AdapterConfig, targets: dict[str, BaseLayerView]
    ) -> nn.Module | None:
        """Model-level state shared by the adapter's layers (``targets``: path -> base view), or None."""
        return None

    def remove(self, model: PeftModel, adapter_name: str, state: nn.Module | None) -> None:
        """Undo anything ``inject`` did besides returning ``state`` (the core drops that). Also called
        when building the adapter failed part-way, so it must cope with a missing ``state``."""

    def make_adapter(self, config: AdapterConfig, view: BaseLayerView, path: str, state: nn.Module | None) -> Adapter:
        """The adapter of one layer. It may keep a reference to ``state`` (the module, not its tensors:
        ``.to()`` replaces buffers) but must not register it as a submodule (it would be saved and
        moved once per layer)."""
        raise NotImplementedError

    # -- training ---------------------------------------------------------------------------------

    def param_groups(self, model: PeftModel, adapter_name: str, lr: float, weight_decay: float) -> list[dict]:
        """Optimizer groups of the adapter's trainable tensors; default: matrices decayed, the rest not."""
        return decay_groups(trainable(model.adapter_parameters(adapter_name)), lr, weight_decay)

    def training_hooks(self, model: PeftModel, adapter_name: str) -> list[TrainingHook]:
        """The hooks of the whole adapter; default: each layer's ``Adapter.training_hooks()``."""
        return [hook for _, adapter in model.adapters_of(adapter_name) for hook in adapter.training_hooks()]

    # -- files ------------------------------------------------------------------------------------

    def export_config(self, model: PeftModel, adapter_name: str, config: AdapterConfig) -> dict[str, Any]:
        return config.to_hf_dict()

    def export_tensors(self, model: PeftModel, adapter_name: str) -> dict[str, torch.Tensor]:
        return {
            f"{io.KEY_PREFIX}{path}.{suffix}": tensor
            for path, adapter in model.adapters_of(adapter_name)
            for suffix, tensor in adapter.saved_tensors().items()
        }

    def as_low_rank(
        self, model: PeftModel, adapter_name: str, rank: int | None = None
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor] | None]:
        """Each adapted layer's update as ``(A [k, in], B [out, k])`` with ``B @ A`` the exact weight
        change (scales folded into ``B``), or None where it is not low rank. ``rank`` is the rank the
        export asks for: only a method that runs at several ranks uses it."""
        return {
            path: layer.adapter(adapter_name).low_rank(layer.view)
            for path, layer in model.adapted_layers()
            if adapter_name in layer.adapters
        }

    def rename_saved_keys(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return tensors

    def load_tensors(self, model: PeftModel, adapter_name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Copy file tensors in; the core has checked that their keys and shapes are ``export_tensors``'."""
        for path, adapter in model.adapters_of(adapter_name):
            prefix = f"{io.KEY_PREFIX}{path}."
            adapter.load_saved_tensors({suffix: tensors[prefix + suffix] for suffix in adapter.saved_tensors()})


def trainable(named: Iterator[tuple[str, nn.Parameter]]) -> list[tuple[str, nn.Parameter]]:
    return [(name, param) for name, param in named if param.requires_grad]
