"""Write GGUF files with the ``gguf`` package: a whole model, or a LoRA adapter for llama.cpp.

    write_model_gguf(path, config, state_dict, dtype, tokenizer_keys, name)
    write_lora_gguf(path, config, factors, dtype)      # factors: {HF module path: (A, B)}

Tensors are stored as llama.cpp expects them: its names (:mod:`.names`), q/k rows in its RoPE
order, one-dimensional tensors (norms, biases) always f32, matrices in the asked dtype. A LoRA
GGUF holds ``<tensor>.lora_a`` = A ``[r, in]`` and ``<tensor>.lora_b`` = B ``[out, r]`` and one
``adapter.lora.alpha``; llama.cpp scales each pair by ``alpha / r`` with ``r`` that pair's rank, so
with every pair padded to one rank and ``alpha = r`` the scale is 1 and ``B A`` is applied as is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import torch
from tqdm import tqdm

from peftlab.gguf_export.names import gguf_architecture, gguf_tensor_name, module_name, row_order_for
from peftlab.gguf_export.metadata import GGUFExportError, add_model_keys

#: --dtype -> (the matrices' GGML type, the file type llama.cpp shows).
DTYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
LORA_DTYPES = ("f32", "f16", "bf16")


def encode(array: np.ndarray, dtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """``array`` (float32) as stored for ``dtype``: vectors stay f32; a q8_0 matrix whose rows are not
    a whole number of 32-value blocks is stored f16 (llama.cpp's converter does the same kind of fallback)."""
    qtype = DTYPES[dtype][0]
    if array.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(array, dtype=np.float32), gguf.GGMLQuantizationType.F32
    if qtype == gguf.GGMLQuantizationType.F16:
        return array.astype(np.float16), qtype
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if array.shape[-1] % block:
        return array.astype(np.float16), gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype), qtype


def model_tensors(config, state_dict: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The HF model's tensors under GGUF names, q/k rows reordered, as float32 arrays. The output layer is
    left out only where it holds the input embedding's values (a trained embedding copy unties them)."""
    embedding = state_dict.get("model.embed_tokens.weight")
    out = {}
    for hf_name, tensor in state_dict.items():
        if hf_name == "lm_head.weight" and embedding is not None and torch.equal(tensor, embedding):
            continue  # tied: llama.cpp uses token_embd for the output when output.weight is absent
        try:
            name = gguf_tensor_name(hf_name)
        except KeyError:
            raise GGUFExportError(
                f"the model holds {hf_name!r}, which has no place in a llama.cpp {gguf_architecture(config)} GGUF; "
                "peftlab refuses to write a file that would drop it."
            ) from None
        value = tensor.detach().float().cpu()
        order = row_order_for(name, config)
        if order is not None:
            value = value[order]
        out[name] = value.numpy()
    return out


def lora_tensors(config, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, np.ndarray]:
    """``{HF module path: (A, B)}`` as llama.cpp's ``<tensor>.lora_a`` / ``.lora_b``, B's rows in the GGUF order."""
    out = {}
    for path, (a, b) in factors.items():
        name = f"{module_name(path)}.weight"
        b = b.detach().float().cpu()
        order = row_order_for(name, config)
        if order is not None:
            b = b[order]
        out[f"{name}.lora_a"] = a.detach().float().cpu().numpy()
        out[f"{name}.lora_b"] = b.numpy()
    return out


def write_model_gguf(
    path: Path, config, tensors: dict[str, np.ndarray], dtype: str, name: str,
    tokenizer_keys: Callable[[gguf.GGUFWriter], None],
) -> None:
    """A whole-model GGUF: hyperparameters, tokenizer (``tokenizer_keys(writer)`` adds them), tensors."""
    writer = gguf.GGUFWriter(path, gguf_architecture(config))
    add_model_keys(writer, config, name, DTYPES[dtype][1])
    tokenizer_keys(writer)
    _add_tensors(writer, tensors, dtype)
    _finish(writer, f"writing {Path(path).name}")


def write_lora_gguf(path: Path, config, tensors: dict[str, np.ndarray], rank: int, dtype: str, name: str) -> None:
    """A LoRA adapter GGUF: ``general.type = adapter``, ``adapter.lora.alpha = rank`` (scale 1)."""
    if dtype not in LORA_DTYPES:
        raise GGUFExportError(f"a LoRA GGUF is written in {', '.join(LORA_DTYPES)}, not {dtype}; use --mode merged for {dtype}.")
    writer = gguf.GGUFWriter(path, gguf_architecture(config))
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(rank))
    _add_tensors(writer, tensors, dtype)
    _finish(writer, f"writing {Path(path).name}")


def _add_tensors(writer: gguf.GGUFWriter, tensors: dict[str, np.ndarray], dtype: str) -> None:
    for name, array in tqdm(tensors.items(), desc=f"encoding {dtype}", unit="tensor", leave=False, disable=None):
        data, qtype = encode(array, dtype)
        writer.add_tensor(name, data, raw_dtype=qtype)


def _finish(writer: gguf.GGUFWriter, what: str) -> None:
    from peftlab.io import explain_disk_full

    with explain_disk_full(what):
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=True)
        writer.close()
