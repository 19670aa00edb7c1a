"""The one table of methods that the per-method suites run over.

A new method joins every suite (test_properties, test_multi_adapter, test_qlora, test_interop,
test_qlora_interop) with one line in ``METHOD_TABLE``; a suite that cannot apply to it (no HF twin,
no 4-bit base) leaves it out through the fields below, never through a list of its own.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from peftlab.config import AdapterConfig
from peftlab.methods import make_method_config, method_named
from peftlab.methods.mora import ROPE, square_rank


def _lora_scale(rank: int) -> dict[str, Any]:
    return {"r": rank, "lora_alpha": 2 * rank}


@dataclass(frozen=True)
class MethodCase:
    #: The registered method name (``make_method_config(name)``, ``peftlab train --method name``).
    name: str
    #: Trainable parameters of one adapted layer with ``fan_in`` inputs, ``fan_out`` outputs, rank ``r``.
    per_layer: Callable[[int, int, int], int]
    #: HF peft's config class name for the same adapter (None: HF lacks the method), and the fields it
    #: needs on top of the shared ones (HF has no preset names such as "dora").
    hf: str | None = "LoraConfig"
    hf_fields: dict[str, Any] = field(default_factory=dict)
    #: Adapter tensors (parameter names) that the method never trains, and all the adapter's
    #: parameters of one layer, trained or frozen (default: ``per_layer``).
    frozen: tuple[str, ...] = ()
    stored_per_layer: Callable[[int, int, int], int] | None = None
    #: The config fields that give a small adapter of rank ``r`` (the suites use r = 4 and 2).
    rank_fields: Callable[[int], dict[str, Any]] = _lora_scale
    #: Runs on a 4-bit NF4 base (peftlab.quant.quantize_model).
    on_4bit: bool = True
    #: A ``rank_pattern`` field is LoRA's (module regex -> rank); AdaLoRA's holds a saved mask instead.
    lora_rank_pattern: bool = True
    #: Refuses a second trainable adapter (AdaLoRA, as HF): the suites add the others for inference.
    one_trainable_adapter: bool = False
    #: The method its saved files load as, where that is another's (LoRA-FA's files are LoRA's).
    loads_as: str | None = None
    #: The rank its files hold, as a multiple of the rank trained (Delta-LoRA saves the rank-2r LoRA it equals).
    saved_rank_factor: int = 1
    #: Starts from every ``init_lora_weights`` of ``peftlab.methods.lora_init`` (PiSSA, OLoRA, LoftQ, ...), as its HF twin.
    lora_inits: bool = False

    def config(self, rank: int = 4, **fields: Any) -> AdapterConfig:
        return make_method_config(self.name, **self.rank_fields(rank), **fields)

    def hf_config(self, rank: int = 4, **fields: Any):
        import peft

        return getattr(peft, self.hf)(**self.rank_fields(rank), **self.hf_fields, **fields)

    def has_field(self, name: str) -> bool:
        return name in {f.name for f in dataclasses.fields(method_named(self.name).config_class)}

    def __str__(self) -> str:  # the pytest id
        return self.name


METHOD_TABLE = [
    MethodCase("lora", lambda fan_in, fan_out, r: r * (fan_in + fan_out), lora_inits=True),
    MethodCase("rslora", lambda fan_in, fan_out, r: r * (fan_in + fan_out), hf_fields={"use_rslora": True}, lora_inits=True),
    MethodCase("dora", lambda fan_in, fan_out, r: r * (fan_in + fan_out) + fan_out, hf_fields={"use_dora": True},
               lora_inits=True),
    # d_initial 1 (HF: 0.1): with the suites' perturbation (lambda_b ~ 0.1) VeRA then moves the logits as
    # much as LoRA does; at 0.1 it moves them ~10x less, below the 4-bit suites' quantization noise.
    MethodCase("vera", lambda fan_in, fan_out, r: fan_out + r, hf="VeraConfig", rank_fields=lambda r: {"r": r, "d_initial": 1.0}),
    MethodCase("mora", lambda fan_in, fan_out, r: square_rank(fan_in, fan_out, r, ROPE) ** 2, hf=None, rank_fields=lambda r: {"r": r}),
    # alpha 128r: AdaLoRA's P, Q start at N(0, 0.02²), so under the suites' perturbation its update is
    # ~100x smaller than LoRA's at the same scale, below the merge and 4-bit tests' thresholds.
    MethodCase("adalora", lambda fan_in, fan_out, r: r * (fan_in + fan_out + 1), hf="AdaLoraConfig",
               rank_fields=lambda r: {"init_r": r, "target_r": r, "lora_alpha": 128 * r, "total_step": 10},
               lora_rank_pattern=False, one_trainable_adapter=True),
    MethodCase("dylora", lambda fan_in, fan_out, r: r * (fan_in + fan_out), hf=None),
    MethodCase("dora_rank", lambda fan_in, fan_out, r: math.ceil(1.5 * r) * (fan_in + fan_out + 1), hf=None,
               rank_fields=lambda r: {"r": r, "lora_alpha": 2 * r, "total_step": 10}),
    MethodCase("lora_fa", lambda fan_in, fan_out, r: r * fan_out, frozen=("lora_A",),
               stored_per_layer=lambda fan_in, fan_out, r: r * (fan_in + fan_out), loads_as="lora", lora_inits=True),
    MethodCase("loraplus", lambda fan_in, fan_out, r: r * (fan_in + fan_out), lora_inits=True),  # LoRA + its optimizer groups
    # K = 0: the weight moves from the first step, so every suite sees the moved-weight path; alpha 2r/3:
    # with λ = 2 the product counts (1+λ)·s, so the adapter then moves the logits as LoRA's (alpha 2r) does.
    MethodCase("delta_lora", lambda fan_in, fan_out, r: r * (fan_in + fan_out), hf=None,
               rank_fields=lambda r: {"r": r, "lora_alpha": 2 * r / 3, "delta_start_step": 0}, loads_as="lora",
               saved_rank_factor=2),
]
# Not in the table: longlora. The suites run every method on GPT-2 and BERT, which have no RoPE for it to
# extend (it refuses them), and mix several adapters on one model, while its RoPE scale and attention are the
# model's (one LongLoRA adapter per model). test_longlora.py checks its versions of the properties on Llama.
METHOD_CASES = {case.name: case for case in METHOD_TABLE}
WITH_HF_TWIN = [case for case in METHOD_TABLE if case.hf is not None]
ON_4BIT = [case for case in METHOD_TABLE if case.on_4bit]
WITH_LORA_INITS = [case for case in METHOD_TABLE if case.lora_inits]
