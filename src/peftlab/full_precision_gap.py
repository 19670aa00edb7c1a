"""A QLoRA adapter's plain-LoRA export on the full-precision base, where HF peft, vLLM and SGLang
put it: how far its logits there are from the adapter's on the NF4 base it was trained on. The
export's README and metadata state the figure (``LoraExport.full_precision_gap``); the GGUF export
can state the same one.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from peftlab.base_gap import LogitGap, logit_gap, probe_inputs
from peftlab.export import LoraExport
from peftlab.methods.lora import LoraConfig
from peftlab.model import PeftModel, get_peft_model


def full_precision_gap(export: LoraExport, nf4_model: PeftModel, full_base: nn.Module, tokenizer: Any = None) -> LogitGap:
    """``full_base`` (the full-precision base; the export is put on it) with the exported LoRA,
    against ``nf4_model`` (the QLoRA adapter on its NF4 base), on the probe prompts."""
    on_full = get_peft_model(full_base, LoraConfig.from_dict(export.config))
    on_full.load_adapter_tensors(export.tensors, "default", "the export")
    return logit_gap(nf4_model, on_full, probe_inputs(full_base, tokenizer))
