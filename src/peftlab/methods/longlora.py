"""LongLoRA (Chen et al. 2023, arXiv 2309.12307), method ``longlora``: extend a RoPE decoder's context.

Three parts, all undone by ``delete_adapter``:

1. Linear RoPE position interpolation by a factor f = ``rope_scale`` (or ``target_length`` / the
   model's ``max_position_embeddings``): position p is rotated as p / f, i.e. every inverse
   frequency is divided by f, so the trained range [0, L) covers [0, f·L)::

       θ_j = rope_theta^(−2j/d) / f          (transformers' ``rope_type: "linear"``)

   The model's config says so (``rope_parameters``, ``max_position_embeddings = f·L``), so a merged
   model saved by transformers reloads extended.
2. LoRA (r 8, alpha 16, no dropout: the paper's recipe) on q, k, v, o, plus the input embedding
   and every norm trained in full (``modules_to_save = ["embed_tokens", "norm"]``: HF's suffix
   match takes ``input_layernorm``, ``post_attention_layernorm`` and the final ``norm``). A tied
   output layer shares the trained embedding (``ensure_weight_tying``), in training, in the file
   and after a merge.
3. Shifted sparse attention (``s2_attention.py``) in training, in groups of a fixed

       G = s2_group_size_ratio · f · L_0        (the paper: 1/4 of the extended context it trains at)

   tokens, rounded up to even, on a grid from position 0 whatever a batch's length: a row computes
   the same whichever rows share its batch (its padding) and however a batch is split across
   processes; a length off the grid is padded there. Ratio 1: full attention in training too.
   In eval mode, ordinary full attention.

The files are HF's LoRA files (``peft_type: "LORA"``, the embeddings and norms as
``modules_to_save``) plus two keys of its own in adapter_config.json, ``rope_scale`` and
``s2_group_size_ratio``: peftlab loads them as LongLoRA (``file_marker``) and restores the
extended model; HF peft loads the LoRA, embeddings and norms, warns that it ignores the two keys,
and needs the RoPE scale set on the base itself (README: "LongLoRA adapters in HF peft").

The RoPE scale and the attention are the model's, not a layer's: one LongLoRA adapter per model,
and ``disable_adapter`` gives the base weights with the extended RoPE (``delete_adapter`` gives back
the original model).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from peftlab.config import default_field
from peftlab.methods.lora import LoraConfig, LoraMethod
from peftlab.methods.method import MethodOption
from peftlab.methods.registry import register_method
from peftlab.methods.s2_attention import disable_s2_attention, enable_s2_attention, group_size

#: ``config.model_type`` -> what it is: the families whose attention calls transformers' attention
#: registry with the shapes S²-Attn expects and whose positions are RoPE.
SUPPORTED_MODEL_TYPES = {
    "llama": "Llama family: Llama 2/3, SmolLM/SmolLM2, TinyLlama",
    "mistral": "Mistral without a sliding window",
    "qwen2": "Qwen2 / Qwen2.5",
}
ATTENTION_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj"]
#: RoPE types whose frequencies are fixed and can be divided by the factor as transformers' "linear" does.
SCALABLE_ROPE_TYPES = ("default", "linear")


@dataclass
class LongLoraConfig(LoraConfig):
    lora_alpha: float = 16
    modules_to_save: list[str] | None = default_field(["embed_tokens", "norm"])
    ensure_weight_tying: bool = True
    #: Linear RoPE interpolation factor (>= 1); None: from ``target_length``, else 1.
    rope_scale: float | None = None
    #: The context length to reach: the factor is this over the model's ``max_position_embeddings``.
    target_length: int | None = None
    #: S²-Attn's group size over the extended context (G = ratio · f · L_0; 1 is full attention).
    s2_group_size_ratio: float = 0.25

    default_target_modules = {model_type: ATTENTION_PROJECTIONS for model_type in SUPPORTED_MODEL_TYPES}
    file_marker = "rope_scale"
    # target_length is resolved into rope_scale, which the file holds.
    peftlab_only_fields = (*LoraConfig.peftlab_only_fields, "target_length")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rope_scale is not None and self.target_length is not None:
            raise ValueError(
                f"give rope_scale ({self.rope_scale}) or target_length ({self.target_length}), not both: the target "
                "length sets the scale (target / the model's max_position_embeddings)."
            )
        if self.rope_scale is not None and not (math.isfinite(self.rope_scale) and self.rope_scale >= 1):
            raise ValueError(
                f"rope_scale must be a number >= 1 (LongLoRA extends the context by this factor; 1 keeps it), "
                f"got {self.rope_scale}."
            )
        if self.target_length is not None and self.target_length <= 0:
            raise ValueError(f"target_length must be a positive number of tokens, got {self.target_length}.")
        if not 0 < self.s2_group_size_ratio <= 1:
            raise ValueError(
                f"s2_group_size_ratio must be in (0, 1] (S²-Attn's groups are ratio · L tokens; the paper uses 0.25, "
                f"1 is full attention), got {self.s2_group_size_ratio}."
            )


class LongLoraState(nn.Module):
    """What LongLoRA changed outside the adapter's layers, to undo it: the RoPE modules' frequencies
    (non-persistent buffers, moved by ``.to()``), the config values and the attention implementation."""

    def __init__(self, factor: float, rotary: list[nn.Module], config) -> None:
        super().__init__()
        self.factor = factor
        self.rotary = rotary  # a plain list: the model owns these modules
        self.previous_rope = [(module.rope_type, module.attention_scaling) for module in rotary]
        for index, module in enumerate(rotary):
            self.register_buffer(f"inv_freq_{index}", module.inv_freq.clone(), persistent=False)
            self.register_buffer(f"original_inv_freq_{index}", module.original_inv_freq.clone(), persistent=False)
        self.config = config
        self.previous_config = (dict(config.rope_parameters), config.max_position_embeddings)
        self.previous_attention: str | None = None
        self.group_size = 0  # S²-Attn's G in tokens (0: off)


def rotary_modules(model: nn.Module) -> list[nn.Module]:
    """The model's RoPE modules (transformers' ``*RotaryEmbedding``: ``inv_freq`` and a ``rope_type``)."""
    return [m for m in model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor) and hasattr(m, "rope_type")]


def _supported() -> str:
    return "; ".join(f"{model_type} ({what})" for model_type, what in SUPPORTED_MODEL_TYPES.items())


def check_supported_config(config) -> None:
    """Refuse a model family LongLoRA cannot extend, from its config alone, saying which it can."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"LongLoRA's S²-Attn is supported on model types {_supported()}; this model is {model_type!r}, which has "
            "no RoPE or whose attention it has not been checked against. Use one of those, or plain LoRA."
        )
    if getattr(config, "sliding_window", None) is not None:
        raise ValueError(
            f"this {model_type} model uses sliding-window attention (sliding_window={config.sliding_window}), which "
            "S²-Attn does not reproduce; LongLoRA supports it without (config.sliding_window=None, as Mistral-7B v0.2+)."
        )
    rope_type = config.rope_parameters.get("rope_type", "default")
    if rope_type not in SCALABLE_ROPE_TYPES:
        raise ValueError(
            f"this model's RoPE is of type {rope_type!r}; LongLoRA's linear position interpolation applies to "
            f"{' and '.join(SCALABLE_ROPE_TYPES)} RoPE only."
        )


def check_supported(model: nn.Module, rotary: list[nn.Module]) -> None:
    """Refuse a model LongLoRA cannot extend: its config, and RoPE modules it can rescale."""
    config = getattr(model, "config", None)
    if not rotary:
        raise ValueError(
            f"LongLoRA extends RoPE position embeddings, and {type(model).__name__} (model type "
            f"{getattr(config, 'model_type', None)!r}) has none. It runs on RoPE decoders: {_supported()}."
        )
    check_supported_config(config)


def scale_rope(config, rotary: list[nn.Module], factor: float) -> None:
    """Linear position interpolation by ``factor`` on top of the model's RoPE (composing with a linear one)."""
    previous = config.rope_parameters.get("factor", 1.0) if config.rope_parameters.get("rope_type") == "linear" else 1.0
    config.rope_parameters = {**config.rope_parameters, "rope_type": "linear", "factor": float(previous * factor)}
    config.max_position_embeddings = round(config.max_position_embeddings * factor)
    for module in rotary:
        # transformers' own function, so the frequencies are bit for bit those of a model built with this config.
        inv_freq, scaling = ROPE_INIT_FUNCTIONS["linear"](config, module.inv_freq.device)
        module.inv_freq = inv_freq
        module.original_inv_freq = inv_freq.clone()
        module.rope_type, module.attention_scaling = "linear", scaling


class LongLoraMethod(LoraMethod):
    config_class = LongLoraConfig
    options = {
        **LoraMethod.options,
        "rope_scale": MethodOption(float, "linear RoPE interpolation: extend the context by this factor", ">= 1",
                                   lambda v: v >= 1),
        "target_length": MethodOption(int, "extend the context to this many tokens (sets the RoPE scale)",
                                      "positive", lambda v: v > 0),
        "s2_group_size_ratio": MethodOption(
            float, "S²-Attn group size over the extended context (the paper trains at that length; 1: full attention)",
            "in (0, 1]", lambda v: 0 < v <= 1,
        ),
    }
    #: The paper's recipe (r 8, alpha 16, no dropout, q/k/v/o); lr 2e-4: the embeddings and norms train in
    #: full at this rate too (the paper uses 2e-5 over 1000 steps; the lab's runs are tens of steps).
    run_defaults = {"lr": 2e-4, "r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "s2_group_size_ratio": 0.25,
                    "target_modules": ATTENTION_PROJECTIONS}

    def check_model_config(self, model_config):
        check_supported_config(model_config)

    def for_comparison(self, options):
        # A comparison runs every method at the model's context unless told to extend it: said, not silent.
        if options.get("rope_scale") is None and options.get("target_length") is None:
            return {**options, "rope_scale": 1.0}
        return options

    def check_model(self, model, config):
        if any(isinstance(state, LongLoraState) for state in model.method_state.values()):
            raise ValueError(
                "this model has a LongLoRA adapter already; its RoPE scale and attention are the whole model's, so "
                "a model takes one LongLoRA adapter. delete_adapter the other first."
            )
        check_supported(model.base_model, rotary_modules(model.base_model))

    def inject(self, model, adapter_name, config, targets):
        base = model.base_model
        rotary = rotary_modules(base)
        original = base.config.max_position_embeddings
        if config.target_length is not None:
            if config.target_length < original:
                raise ValueError(
                    f"target_length {config.target_length} is below the model's {original} positions; LongLoRA "
                    f"extends the context: give {original} or more (or rope_scale)."
                )
            factor = config.target_length / original
        elif config.rope_scale is None:
            raise ValueError(
                f"LongLoRA extends the context, and neither rope_scale nor target_length says how far (the model has "
                f"{original} positions): give target_length (e.g. {2 * original}) or rope_scale (e.g. 2); rope_scale=1 "
                "trains at the model's own length (S²-Attn and LoRA only)."
            )
        else:
            factor = config.rope_scale
        if factor == 1 and not config.inference_mode:
            warnings.warn(f"LongLoRA at rope_scale 1 extends no context: it trains at the model's {original} positions "
                          "(S²-Attn and LoRA only).", stacklevel=4)
        state = LongLoraState(factor, rotary, base.config)
        scale_rope(base.config, rotary, factor)
        if config.s2_group_size_ratio < 1:  # 1: full attention in training too
            state.group_size = group_size(base.config.max_position_embeddings, config.s2_group_size_ratio)  # extended
            state.previous_attention = enable_s2_attention(base, fixed_group_size=state.group_size)
        return state

    def export_config(self, model, adapter_name, config):
        data = config.to_hf_dict()
        data["rope_scale"] = model.method_state[adapter_name].factor
        # HF warns about ensure_weight_tying on a model with nothing tied: write it where it ties something.
        data["ensure_weight_tying"] = config.ensure_weight_tying and ties_embeddings(model.base_model)
        return data

    def unload(self, model, adapter_name, state):
        # The plain model keeps its extended RoPE (the trained model needs it) and gets ordinary attention.
        if state is not None and state.previous_attention is not None:
            disable_s2_attention(model.base_model, state.previous_attention)
            state.previous_attention = None

    def remove(self, model, adapter_name, state):
        if state is None:
            return
        self.unload(model, adapter_name, state)
        rope_parameters, max_positions = state.previous_config
        state.config.rope_parameters, state.config.max_position_embeddings = rope_parameters, max_positions
        for index, (module, (rope_type, scaling)) in enumerate(zip(state.rotary, state.previous_rope)):
            module.inv_freq = getattr(state, f"inv_freq_{index}").clone()
            module.original_inv_freq = getattr(state, f"original_inv_freq_{index}").clone()
            module.rope_type, module.attention_scaling = rope_type, scaling


def ties_embeddings(model: nn.Module) -> bool:
    """Whether the model's output layer holds its input embedding's weight (``tie_word_embeddings``)."""
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    return outputs is not None and outputs.weight is inputs.weight


# Its files are LoRA's plus its RoPE scale: they load as LongLoRA through its file_marker.
register_method(LongLoraMethod("longlora", loads_peft_type=False))
