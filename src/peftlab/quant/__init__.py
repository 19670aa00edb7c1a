"""4-bit NF4 quantization of frozen base layers (QLoRA), byte-compatible with bitsandbytes."""

from peftlab.base import register_base_view, supported_types
from peftlab.quant.linear4bit import (
    Linear4bit,
    Linear4bitView,
    dequantize_model,
    is_quantized,
    model_size_bytes,
    packed_weights,
    quantize_model,
)
from peftlab.quant.nf4 import SUPPORTED_BLOCKSIZES, NF4State, dequantize_nf4, quantize_nf4

# Importing peftlab.quant is what makes adapters (and "all-linear") see 4-bit layers.
if Linear4bit not in supported_types():
    register_base_view(Linear4bit, Linear4bitView)

__all__ = [
    "SUPPORTED_BLOCKSIZES",
    "Linear4bit",
    "Linear4bitView",
    "NF4State",
    "dequantize_model",
    "dequantize_nf4",
    "is_quantized",
    "model_size_bytes",
    "packed_weights",
    "quantize_model",
    "quantize_nf4",
]
