"""HF peft's optimizer helpers under HF's names (``peft.optimizers``): switching is an import change.

    from peftlab.optimizers import create_lorafa_optimizer, create_loraplus_optimizer
    optimizer = create_lorafa_optimizer(model, r=8, lora_alpha=16, lr=1e-3)
    optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=2e-4, loraplus_lr_ratio=16)

Each lives in its method's file; see there for where peftlab deliberately differs from HF.
"""

from peftlab.methods.lora_fa import LoraFAOptimizer, create_lorafa_optimizer
from peftlab.methods.loraplus import create_loraplus_optimizer

__all__ = ["LoraFAOptimizer", "create_lorafa_optimizer", "create_loraplus_optimizer"]
