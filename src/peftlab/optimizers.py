"""HF peft's optimizer helpers under HF's names (``peft.optimizers``): switching is an import change.

    from peftlab.optimizers import create_lorafa_optimizer
    optimizer = create_lorafa_optimizer(model, r=8, lora_alpha=16, lr=1e-3)

Each lives in its method's file; see there for where peftlab deliberately differs from HF.
"""

from peftlab.methods.lora_fa import LoraFAOptimizer, create_lorafa_optimizer

__all__ = ["LoraFAOptimizer", "create_lorafa_optimizer"]
