"""Run by tests/test_train_fsdp.py under torchrun (2 processes, gloo): which dtype mixes FSDP2 accepts.

Writes ``$OUT/rank<r>.json`` with:
  grad_max_diff   bf16 base + fp32 LoRA, sharded: the largest difference between each adapter
                  gradient and the one of an unsharded copy on the whole batch
  grad_dtypes     the dtypes of those gradients
  torch_refuses   torch's own error for a unit with fp32 and bf16 trainable tensors
  peftlab_refuses peftlab's error for the same model, before torch is reached
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import tiny_batch, tiny_llama  # noqa: E402

from peftlab import LoraConfig, get_peft_model  # noqa: E402
from peftlab.train.fsdp import check_trainable_dtypes, full_value, shard_model, transformer_blocks  # noqa: E402
from peftlab.train.options import OptionsError  # noqa: E402


def bf16_base_with_fp32_lora() -> torch.nn.Module:
    model = get_peft_model(tiny_llama().to(torch.bfloat16), LoraConfig(r=4, target_modules="all-linear"))
    torch.manual_seed(1)
    with torch.no_grad():  # B starts at 0: give the adapters a value so that every gradient is non-zero
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.normal_(0, 0.1)
    return model


def summed_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).logits.float().square().sum()


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    report: dict = {}

    model = bf16_base_with_fp32_lora()
    reference = copy.deepcopy(model)
    batch = tiny_batch(model, batch_size=4)
    (summed_loss(reference, batch) / 4).backward()
    shard_model(model, torch.device("cpu"))
    mine = {k: v[2 * rank : 2 * rank + 2] for k, v in batch.items()}
    (summed_loss(model, mine) * world / 4).backward()  # FSDP2 averages over processes
    expected = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    got = {n: full_value(p.grad) for n, p in model.named_parameters() if p.requires_grad}
    report["grad_max_diff"] = max(float((got[n] - expected[n]).abs().max() / expected[n].abs().max()) for n in expected)
    report["grad_dtypes"] = sorted({str(g.dtype) for g in got.values()})

    mixed = bf16_base_with_fp32_lora()
    mixed.base_model.model.layers[0].input_layernorm.weight.requires_grad_(True)  # bf16, trainable, in block 0
    try:
        check_trainable_dtypes(mixed, transformer_blocks(mixed))
    except OptionsError as error:
        report["peftlab_refuses"] = str(error)
    try:
        fully_shard(mixed.base_model.model.layers[0])
        mixed(**mine)  # torch checks dtypes when the unit first runs
    except AssertionError as error:
        report["torch_refuses"] = str(error)
    Path(os.environ["OUT"], f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
