"""Hugging Face tensor names -> llama.cpp (GGUF) tensor names, for the decoder families llama.cpp runs.

    gguf_architecture(config)          "llama" (Llama, SmolLM2, Mistral) or "qwen2"; others refused by name
    gguf_tensor_name("model.layers.3.self_attn.q_proj.weight")  ->  "blk.3.attn_q.weight"
    rope_row_order(n_heads, head_dim)  the row order llama.cpp's "llama" architecture wants for q/k

The RoPE row order: transformers rotates a head's dimension ``i`` together with ``i + d/2``
(``rotate_half``); llama.cpp's ``llama`` architecture rotates adjacent pairs ``2i, 2i+1`` (its
"normal" RoPE). So the GGUF of a Llama holds ``q_proj`` and ``k_proj`` with the rows of each head
interleaved: GGUF row ``2i`` is HF row ``i``, GGUF row ``2i+1`` is HF row ``i + d/2``. A weight
update ``ΔW = B A`` moves with the rows of ``W``: ``B``'s rows take the same order, ``A`` is untouched.
Qwen2's GGUF uses the "neox" RoPE, which is transformers' own, so nothing is reordered there.
"""

from __future__ import annotations

import re

import torch


class UnsupportedArchitectureError(ValueError):
    """The model's family is not one llama.cpp runs from peftlab's GGUF export."""


#: transformers' ``model_type`` -> the llama.cpp architecture its GGUF declares.
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
#: llama.cpp architectures whose q/k rows are stored in the interleaved RoPE order.
INTERLEAVED_ROPE = {"llama"}

#: Per-block modules: HF path inside ``model.layers.N`` -> GGUF name inside ``blk.N``.
BLOCK_MODULES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
#: Modules outside the blocks.
TOP_MODULES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
#: The linear layers a LoRA GGUF may adapt (llama.cpp applies ``lora_a``/``lora_b`` to their matmuls).
LINEAR_FAMILIES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")

_BLOCK = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def gguf_architecture(config) -> str:
    """The llama.cpp architecture of a transformers config; refuses families it cannot run."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"peftlab's GGUF export writes {', '.join(sorted(ARCHITECTURES))} models (llama.cpp's llama and qwen2 "
            f"architectures); this model is {model_type!r}. Use `peftlab export --to lora` (HF PEFT files) or "
            "`peftlab merge` instead."
        )
    return ARCHITECTURES[model_type]


def module_name(hf_module: str) -> str:
    """``model.layers.3.mlp.up_proj`` -> ``blk.3.ffn_up``; raises KeyError for a module GGUF has no place for."""
    block = _BLOCK.match(hf_module)
    if block:
        return f"blk.{block.group(1)}.{BLOCK_MODULES[block.group(2)]}"
    return TOP_MODULES[hf_module]


def gguf_tensor_name(hf_name: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight`` (``.weight`` or ``.bias``)."""
    module, _, kind = hf_name.rpartition(".")
    if kind not in ("weight", "bias"):
        raise KeyError(hf_name)
    return f"{module_name(module)}.{kind}"


def family(gguf_name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``attn_q``; ``output_norm.weight`` -> ``output_norm``."""
    parts = gguf_name.split(".")
    return parts[2] if parts[0] == "blk" else parts[0]


def rope_row_order(n_heads: int, head_dim: int) -> torch.Tensor:
    """Indices ``idx`` with ``W_gguf = W_hf[idx]`` for a q or k projection of ``n_heads`` heads."""
    half = head_dim // 2
    within = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).reshape(-1)  # 0, h, 1, h+1, ...
    return (torch.arange(n_heads)[:, None] * head_dim + within[None, :]).reshape(-1)


def row_order_for(gguf_name: str, config) -> torch.Tensor | None:
    """The row order of this tensor's (or its ``lora_b``'s) rows in the GGUF, or None when unchanged."""
    if gguf_architecture(config) not in INTERLEAVED_ROPE:
        return None
    kind = family(gguf_name)
    if kind not in ("attn_q", "attn_k"):
        return None
    heads = config.num_attention_heads if kind == "attn_q" else config.num_key_value_heads
    return rope_row_order(heads, head_dim(config))


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
