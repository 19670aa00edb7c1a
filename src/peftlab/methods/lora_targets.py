"""HF peft's default LoRA targets by ``config.model_type``: what ``LoraConfig()`` without
``target_modules`` adapts, so a config means the same layers in both libraries.

peftlab's own table (peft is not a runtime dependency); ``tests/test_hf_compat.py`` checks it
equals HF peft's ``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`` for every type listed.
"""

from __future__ import annotations

_Q_V = ["q_proj", "v_proj"]
_QUERY_VALUE = ["query", "value"]

LORA_DEFAULT_TARGET_MODULES: dict[str, list[str] | str] = {
    # encoders
    "bert": _QUERY_VALUE, "roberta": _QUERY_VALUE, "xlm-roberta": _QUERY_VALUE, "electra": _QUERY_VALUE,
    "layoutlm": _QUERY_VALUE, "deberta-v2": ["query_proj", "value_proj"], "deberta": ["in_proj"],
    # encoder-decoders
    "t5": ["q", "v"], "mt5": ["q", "v"], "bart": _Q_V, "blip-2": ["q", "v", "q_proj", "v_proj"],
    # decoders
    "gpt2": ["c_attn"], "gpt_bigcode": ["c_attn"], "btlm": ["c_proj", "c_attn"], "codegen": ["qkv_proj"],
    "bloom": ["query_key_value"], "gpt_neox": ["query_key_value"], "chatglm": ["query_key_value"],
    "falcon": ["query_key_value"], "RefinedWeb": ["query_key_value"], "RefinedWebModel": ["query_key_value"],
    "mpt": ["Wqkv"], "opt": _Q_V, "gptj": _Q_V, "gpt_neo": _Q_V, "llama": _Q_V, "llama4": _Q_V,
    "mistral": _Q_V, "mixtral": _Q_V, "stablelm": _Q_V, "gemma": _Q_V, "gemma2": _Q_V, "gemma3_text": _Q_V,
    "qwen2": _Q_V, "qwen3": _Q_V, "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"], "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}

#: HF's AdaLoRA table: fewer model types, and wider targets (every projection) for some encoders.
ADALORA_DEFAULT_TARGET_MODULES: dict[str, list[str] | str] = {
    **{
        model_type: LORA_DEFAULT_TARGET_MODULES[model_type]
        for model_type in (
            "gpt2", "bloom", "gptj", "gpt_neox", "gpt_neo", "llama", "llama4", "bert", "gpt_bigcode", "deberta",
            "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3", "nemotron_h",
        )
    },
    "t5": ["q", "k", "v", "o", "wi", "wo"], "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "roberta": ["query", "key", "value", "dense"], "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
}
