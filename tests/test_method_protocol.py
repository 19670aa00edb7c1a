"""The method protocol (peftlab.methods.method): the core calls each hook at its stage, through a toy
method that uses every one of them -- model-level state, a refused base, a frozen tensor inside the
adapter, its own optimizer groups, model-level tensors in its files -- and the registry refuses
conflicts instead of overwriting.
"""

from __future__ import annotations

import dataclasses
import pkgutil
import sys
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import peftlab.methods
from peftlab import LoraConfig, PeftModel, get_peft_model
from peftlab.base import BaseLayerView
from peftlab.config import AdapterConfig
from peftlab.io import KEY_PREFIX
from peftlab.methods import Method, UnsupportedBaseError, method_for, register_method, unregister_method
from peftlab.adapter import Adapter
from peftlab.methods.capabilities import CAPABILITIES, hooks_of
from peftlab.methods.lora import LoraMethod
from peftlab.optim import make_optimizer
from peftlab.train.options import OptionsError, TrainOptions
from tiny_models import logits, max_diff, tiny_batch, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


@dataclass
class ToyConfig(AdapterConfig):
    r: int = 2
    seed: int = 0  # of the shared matrix; not saved, so only the saved matrix can restore it
    peft_type = "TOY"
    peftlab_only_fields = ("seed",)


class ToyState(nn.Module):
    """One random matrix shared by every layer (as VeRA's), sized for the widest input."""

    def __init__(self, r: int, max_in: int, seed: int) -> None:
        super().__init__()
        self.register_buffer("shared", torch.randn(r, max_in, generator=torch.Generator().manual_seed(seed)))


class ToyAdapter(Adapter):
    """Δ = up · diag(lam) · shared[:, :in]; ``up`` is frozen at init, ``lam`` trains (starts at 0)."""

    def __init__(self, view: BaseLayerView, state: ToyState, r: int) -> None:
        super().__init__()
        self.state = [state]  # a reference, not a submodule: the model owns and moves it
        self.fan_in = view.in_features
        self.lam = nn.Parameter(torch.zeros(r))
        self.up = nn.Parameter(torch.randn(view.out_features, r) * 0.1)

    def trainable_parameters(self):
        return [self.lam]

    def _down(self) -> torch.Tensor:
        return self.state[0].shared[:, : self.fan_in]

    def forward(self, x, base_out, base):
        return base_out + ((x @ self._down().T) * self.lam) @ self.up.T

    def delta_weight(self, base):
        return self.up @ (self.lam[:, None] * self._down())

    def saved_tensors(self):
        return {"toy_lambda": self.lam, "toy_up": self.up}


class ToyMethod(Method):
    config_class = ToyConfig
    calls: list[str] = []

    def check_base(self, config, view, path):
        if view.takes_ids:
            raise UnsupportedBaseError(f"toy cannot adapt the Embedding {path}")

    def inject(self, model, adapter_name, config, targets):
        self.calls.append(f"inject {adapter_name} {len(targets)}")
        return ToyState(config.r, max(view.in_features for view in targets.values()), config.seed)

    def make_adapter(self, config, view, path, state):
        return ToyAdapter(view, state, config.r)

    def remove(self, model, adapter_name, state):
        self.calls.append(f"remove {adapter_name}")

    def param_groups(self, model, adapter_name, lr, weight_decay):
        params = [p for _, p in model.adapter_parameters(adapter_name) if p.requires_grad]
        return [{"params": params, "lr": 10 * lr, "weight_decay": 0.0}]

    def export_tensors(self, model, adapter_name):
        shared = {f"{KEY_PREFIX}toy_shared": model.method_state[adapter_name].shared}
        return {**super().export_tensors(model, adapter_name), **shared}

    def load_tensors(self, model, adapter_name, tensors):
        model.method_state[adapter_name].shared.copy_(tensors[f"{KEY_PREFIX}toy_shared"])
        super().load_tensors(model, adapter_name, tensors)


@pytest.fixture
def toy():
    ToyMethod.calls.clear()
    register_method(ToyMethod("toy"))
    yield
    unregister_method("toy")


def toy_model(**fields) -> PeftModel:
    model = get_peft_model(tiny_llama(), ToyConfig(target_modules=TARGETS, **fields))
    with torch.no_grad():
        for _, param in model.adapter_parameters("default"):
            param.add_(0.5)
    return model.eval()


def test_state_is_injected_once_registered_on_the_model_and_moved_with_it(toy):
    model = toy_model()
    assert ToyMethod.calls == ["inject default 6"]  # 2 layers x 3 targets, one shared state
    state = model.method_state["default"]
    assert all(a.state[0] is state for _, a in model.adapters_of("default"))
    assert sorted(k for k in model.state_dict() if "shared" in k) == ["method_state.default.shared"]
    batch = tiny_batch(model)
    expected = logits(model, batch).double()
    model.to(torch.float64)
    assert state.shared.dtype == torch.float64
    assert max_diff(logits(model, batch), expected) < 1e-5  # the layers compute with the moved state
    model.delete_adapter("default")
    assert ToyMethod.calls[-1] == "remove default" and "default" not in model.method_state


def test_a_refused_base_layer_is_named_before_anything_is_built(toy):
    base = tiny_llama()
    with pytest.raises(UnsupportedBaseError, match="toy cannot adapt the Embedding model.embed_tokens"):
        get_peft_model(base, ToyConfig(target_modules=["embed_tokens", "q_proj"]))
    assert ToyMethod.calls == []  # refused before inject
    assert not any(type(m).__module__.startswith("peftlab") for m in base.modules())


def test_declared_frozen_tensors_never_train(toy):
    model = toy_model()
    model.add_adapter("other", ToyConfig(target_modules=TARGETS))
    for active in ("other", "default", ["default", "other"]):
        model.set_adapter(active)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(n.endswith(".lam") for n in trainable)
        assert not any(p.requires_grad for p in model.method_state.parameters())
    model.set_adapter("default")
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = make_optimizer(model, "adamw", lr=1e-2)
    batch = tiny_batch(model)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.endswith("default.lam") for n in changed)


def test_the_optimizer_takes_the_methods_groups(toy):
    model = toy_model(modules_to_save=["model.norm"])
    groups = make_optimizer(model, "adamw", lr=1e-3, weight_decay=0.1).param_groups
    own = {id(p) for _, p in model.adapter_parameters("default") if p.requires_grad}
    assert groups[0]["lr"] == 1e-2 and {id(p) for p in groups[0]["params"]} == own
    # The rest (the trained copy of the norm) by the default rule, at the base learning rate.
    assert all(g["lr"] == 1e-3 for g in groups[1:]) and sum(len(g["params"]) for g in groups[1:]) == 1


def test_model_level_tensors_round_trip_through_the_files(toy, tmp_path):
    model = toy_model(seed=1)
    batch = tiny_batch(model)
    model.save_pretrained(tmp_path)
    # Loading builds the shared matrix from seed 0; the saved one (seed 1) must replace it.
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert loaded.peft_config["default"].seed == 0
    assert torch.equal(loaded.method_state["default"].shared, model.method_state["default"].shared)
    assert max_diff(logits(loaded, batch), logits(model, batch)) == 0
    assert max_diff(logits(model, batch), logits(tiny_llama(), batch)) > 1e-3


def test_a_computed_saved_tensor_refuses_to_load(toy, tmp_path, monkeypatch):
    model = toy_model()
    model.save_pretrained(tmp_path)
    monkeypatch.setattr(ToyAdapter, "saved_tensors", lambda self: {"toy_lambda": self.lam * 1, "toy_up": self.up})
    with pytest.raises(TypeError, match="saves toy_lambda as a computed tensor.*override load_saved_tensors"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_an_adapter_of_one_method_loaded_as_another_is_refused(toy, tmp_path):
    toy_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="is a TOY adapter but the config given is LoraConfig"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path, config=LoraConfig(target_modules=TARGETS))
    with pytest.raises(ValueError, match="config is of a TOY adapter, not LORA"):
        LoraConfig.from_dict({"peft_type": "TOY", "r": 2})
    assert type(PeftModel.from_pretrained(tiny_llama(), tmp_path).peft_config["default"]) is ToyConfig


def test_conflicting_registrations_are_errors(toy):
    @dataclass
    class OtherLoraConfig(AdapterConfig):
        peft_type = "LORA"

    class OtherLora(ToyMethod):
        config_class = OtherLoraConfig

    with pytest.raises(ValueError, match="methods 'lora' and 'other' both load peft_type 'LORA'"):
        register_method(OtherLora("other"))
    with pytest.raises(ValueError, match="method name 'toy' is registered twice"):
        register_method(ToyMethod("toy"))
    class LoraWithOwnGroups(LoraMethod):
        param_groups = ToyMethod.param_groups

    with pytest.raises(ValueError, match="share the config class LoraConfig"):
        register_method(LoraWithOwnGroups("lora_own_groups"))
    # Nothing was half-registered: LoRA files still load as LoRA.
    assert type(method_for(LoraConfig())) is LoraMethod and "other" not in peftlab.methods.METHODS


def test_every_method_file_is_imported_without_a_central_list():
    names = [m.name for m in pkgutil.iter_modules(peftlab.methods.__path__)]
    assert {"lora", "dora", "method", "registry"} <= set(names)
    assert all(f"peftlab.methods.{name}" in sys.modules for name in names)


def test_options_a_method_does_not_declare_are_refused(toy):
    with pytest.raises(OptionsError, match="method 'toy' has no option 'lora_alpha'; its options: none"):
        TrainOptions(method="toy", lora_alpha=4.0).with_method_defaults()
    assert TrainOptions(method="toy").with_method_defaults().r is None  # LoRA's default is not toy's
    assert TrainOptions(method="lora").with_method_defaults().r == 8


def test_lora_family_options_are_flags_from_the_methods():
    names = [f.name for f in dataclasses.fields(TrainOptions)]
    assert {"r", "lora_alpha", "lora_dropout"} <= set(names)
    assert TrainOptions(method="dora", r=4).adapter_options() == {"r": 4}


def test_the_documented_call_order_names_every_hook_and_nothing_else():
    """The module docstring's call order is the protocol a new method reads: it lists each public method of
    ``Method`` and of each capability (marked with the capability's name), and no hook the code lacks."""
    import inspect
    import re

    import peftlab.methods.method as protocol

    order = protocol.__doc__.split("The core calls, in order")[1].split("\n\n", 2)[1]
    documented = dict(re.findall(r"^ {8}(?:state = )?([a-z_]+)\(.*?\)\s+(?:\[([A-Za-z]+)\])?", order, flags=re.MULTILINE))
    def public(cls: type) -> set[str]:
        return {name for name, _ in inspect.getmembers(cls, inspect.isfunction) if not name.startswith("_")}
    hooks = {name: "" for name in public(Method)}
    for capability in CAPABILITIES:
        hooks.update({name: capability.__name__ for name in hooks_of(capability)})
    assert documented == hooks, (f"hooks missing from the docstring: {sorted(hooks.keys() - documented.keys())}; "
                                 f"documented but not on Method: {sorted(documented.keys() - hooks.keys())}; "
                                 f"capability marks: {documented} vs {hooks}")


def test_a_method_with_part_of_a_capability_is_refused_at_registration():
    """Defining set_rank without inference_ranks would be silently ignored (the core asks for the whole
    capability), so registering such a method is an error that names the missing hook."""

    class HalfRanks(LoraMethod):
        def set_rank(self, model, adapter_name, rank):
            pass

    with pytest.raises(ValueError, match="RunsAtSeveralRanks capability but not inference_ranks"):
        register_method(HalfRanks("half_ranks"))
    assert "half_ranks" not in peftlab.methods.METHODS


def test_each_capability_is_asked_of_the_methods_that_have_it():
    from peftlab.methods.capabilities import MovesRankBudget, PatchesTheModel, RunsAtSeveralRanks

    having = {capability: sorted(name for name, method in peftlab.methods.METHODS.items() if isinstance(method, capability))
              for capability in CAPABILITIES}
    assert having[RunsAtSeveralRanks] == ["dylora"]
    assert having[MovesRankBudget] == ["adalora", "dora_rank"]
    assert having[PatchesTheModel] == ["longlora"]
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="trains one fixed rank"):
        model.set_rank(1)
    assert model.rank_per_layer() is None


def test_lora_variants_are_looked_up_from_their_own_files():
    """DoRA and LoRA+ are declared in dora.py and loraplus.py (lora.py imports neither: the import contract);
    a config turns them on, and two variants that each bring their own layer refuse to combine."""
    from peftlab.methods import lora_variant
    from peftlab.methods.dora import DoraAdapter, DoraVariant
    from peftlab.methods.loraplus import LoraPlusVariant

    config = LoraConfig(r=3, use_dora=True, loraplus_lr_ratio=16.0, target_modules=["q_proj"])
    assert [type(v) for v in lora_variant.variants_of(config)] == [DoraVariant, LoraPlusVariant]
    model = get_peft_model(tiny_llama(), config)
    assert all(isinstance(a, DoraAdapter) for _, a in model.adapters_of("default"))
    assert sorted({g["lr"] for g in model.method_of("default").param_groups(model, "default", 1e-3, 0.0)}) == [1e-3, 16e-3]

    class OtherLayer(lora_variant.LoraVariant):
        adapter_class = DoraAdapter

        def applies(self, config):
            return config.r == 3

    other = lora_variant.register_lora_variant(OtherLayer())
    try:
        with pytest.raises(ValueError, match="cannot combine"):
            get_peft_model(tiny_llama(), config)
    finally:
        lora_variant._VARIANTS.remove(other)
