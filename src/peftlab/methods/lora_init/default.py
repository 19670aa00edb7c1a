"""HF's random starts: ``True`` (the default), ``False`` and ``"gaussian"``.

    True        A kaiming-uniform (nn.Linear's default), B = 0: the adapter starts as a no-op
    False       A and B kaiming-uniform: not a no-op (for tests and debugging, as HF says)
    "gaussian"  A ~ N(0, 1/r²), B = 0

On an Embedding (HF's convention, after the LoRA paper's code): A = 0, B ~ N(0, 1); ``False`` keeps
both at N(0, 1); "gaussian" is the default there, as in HF.
"""

from __future__ import annotations

from torch import nn

from peftlab.methods.lora_init import LoraInit, burn_layer_inits, draw_default, register_init


class Default(LoraInit):
    key = True


class Random(LoraInit):
    key = False

    def draw(self, adapter, value):
        burn_layer_inits(adapter)  # HF's False is exactly the layers' default draws


class Gaussian(LoraInit):
    key = "gaussian"

    def draw(self, adapter, value):
        if adapter.is_embedding:
            draw_default(adapter, value)
            return
        burn_layer_inits(adapter)
        nn.init.normal_(adapter.lora_A, std=1 / adapter.r)
        nn.init.zeros_(adapter.lora_B)


register_init(Default())
register_init(Random())
register_init(Gaussian())
