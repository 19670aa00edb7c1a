"""The key/value metadata of a GGUF model file: the architecture's hyperparameters and the tokenizer.

llama.cpp builds the model from these keys alone (it never reads config.json), so each one a
transformers config sets must be carried: sizes, heads, RMS-norm epsilon, RoPE base and scaling
(LongLoRA's linear position interpolation becomes ``rope.scaling.type = linear``).

The tokenizer: where a GGUF of the same model exists (``--base-gguf``, or the GGUF an offline alias
was made from) its ``tokenizer.*`` keys are copied as they are, which keeps llama.cpp's own
pre-tokenizer name. Otherwise they are built from the HF tokenizer with the ``gguf`` package's
vocab readers; the pre-tokenizer name comes from a short table of known families, else "default",
and ``--verify`` checks that llama.cpp then tokenizes the prompts as transformers does.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import gguf

from peftlab.gguf_export.names import gguf_architecture, head_dim

#: RoPE types llama.cpp reads from these keys; others (llama3, yarn, dynamic) are refused by name.
SUPPORTED_ROPE_TYPES = ("default", "linear")
#: (model_type, vocabulary size) -> llama.cpp's pre-tokenizer name, for tokenizers without a GGUF to copy from.
KNOWN_PRE_TOKENIZERS = {("llama", 49152): "smollm", ("llama", 128256): "llama-bpe"}
KNOWN_PRE_BY_TYPE = {"qwen2": "qwen2"}


class GGUFExportError(ValueError):
    """The model or adapter cannot be written as asked; the message says why and what to do."""


def rope_scaling(config) -> tuple[str, float]:
    """("none"|"linear", factor) of the model's RoPE, refusing types llama.cpp would read differently."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in SUPPORTED_ROPE_TYPES:
        raise GGUFExportError(
            f"the model's RoPE is of type {kind!r}; peftlab's GGUF export writes only "
            f"{' and '.join(SUPPORTED_ROPE_TYPES)} RoPE (LongLoRA's linear scaling included)."
        )
    return ("linear", float(params.get("factor", 1.0))) if kind == "linear" else ("none", 1.0)


def rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def add_model_keys(writer: gguf.GGUFWriter, config, name: str, file_type: gguf.LlamaFileType) -> None:
    """The hyperparameters llama.cpp builds the ``llama``/``qwen2`` graph from."""
    gguf_architecture(config)  # refuses other families
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_rope_dimension_count(head_dim(config))
    if head_dim(config) != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    kind, factor = rope_scaling(config)
    if kind == "linear" and factor != 1.0:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(factor)
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_file_type(file_type)


def copy_tokenizer_keys(writer: gguf.GGUFWriter, reference: gguf.GGUFReader) -> None:
    """Copy every ``tokenizer.*`` key of another GGUF of the same model."""
    for key, field in reference.fields.items():
        if not key.startswith("tokenizer."):
            continue
        kind = field.types[0]
        value = field.contents()
        writer.add_key_value(key, value, kind, sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)


def add_tokenizer_keys(writer: gguf.GGUFWriter, tokenizer, config) -> str:
    """Build the ``tokenizer.*`` keys from a transformers tokenizer; returns the pre-tokenizer name used."""
    with tempfile.TemporaryDirectory(prefix="peftlab-tokenizer-") as folder:
        tokenizer.save_pretrained(folder)
        vocab = _read_vocab(Path(folder))
        tokens, scores, types = [], [], []
        for text, score, kind in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(kind)
        _mark_special_tokens(tokenizer, tokens, types)
        while len(tokens) < config.vocab_size:  # embedding rows beyond the tokenizer's (padding): unused
            tokens.append(f"[PAD{len(tokens)}]".encode())
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model(vocab.tokenizer_model)
        pre = _pre_tokenizer(config, vocab)
        if pre is not None:
            writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(folder, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=len(tokens))
        special.add_to_gguf(writer, quiet=True)
    return pre or "(none: SentencePiece)"


def _read_vocab(folder: Path):
    for reader in (gguf.vocab.BpeVocab, gguf.vocab.LlamaHfVocab):
        try:
            return reader(folder)
        except (FileNotFoundError, TypeError, ValueError, KeyError):
            continue
    raise GGUFExportError(
        "the model's tokenizer is neither a byte-level BPE nor a Llama (SentencePiece-style) tokenizer.json, the two "
        "kinds peftlab writes into a GGUF; pass --base-gguf with a GGUF of the base model (its tokenizer is copied)."
    )


def _mark_special_tokens(tokenizer, tokens: list, types: list) -> None:
    """Tokens transformers treats as special are CONTROL in llama.cpp (so ``<|im_end|>`` ends a turn)."""
    for token_id in getattr(tokenizer, "all_special_ids", []):
        if token_id < len(types):
            types[token_id] = gguf.TokenType.CONTROL


def _pre_tokenizer(config, vocab) -> str | None:
    if vocab.tokenizer_model != "gpt2":
        return None
    return KNOWN_PRE_BY_TYPE.get(config.model_type) or KNOWN_PRE_TOKENIZERS.get((config.model_type, config.vocab_size), "default")
