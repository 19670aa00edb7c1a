"""Data-driven initialisations in a training run: EVA and CorDA start from the run's own data.

``peftlab train --method-option init_lora_weights=eva`` (or ``corda``) draws up to
:data:`INIT_BATCHES` batches of the training set (a fixed order from ``--seed``, the run's batch
size and collator), runs the base model on them with a progress line, and starts the adapter from
what its layers saw: EVA after the adapter is built (``initialize_lora_eva_weights``), CorDA before
(``preprocess_corda``). The seconds it took are the run's ``init_time_s`` in metrics.json.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import nn

#: Batches drawn for the init: EVA cycles through them until its components settle; CorDA runs them once.
INIT_BATCHES = 32
DATA_DRIVEN = ("eva", "corda")


class DataDrivenInit:
    """The run's data for EVA and CorDA: ``batches(tokenizer)`` collates them once the tokenizer is loaded."""

    def __init__(self, dataset, make_collate: Callable[[Any], Callable], batch_size: int, seed: int) -> None:
        self.dataset, self.make_collate, self.batch_size, self.seed = dataset, make_collate, batch_size, seed
        self.seconds = 0.0

    def batches(self, tokenizer, device: torch.device) -> list[dict[str, torch.Tensor]]:
        collate = self.make_collate(tokenizer)
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed)).tolist()
        count = min(INIT_BATCHES, max(1, len(order) // self.batch_size))
        chunks = [order[i * self.batch_size : (i + 1) * self.batch_size] for i in range(count)]
        return [{k: v.to(device) for k, v in collate([self.dataset[i] for i in chunk]).items()} for chunk in chunks if chunk]

    def before_adapter(self, model: nn.Module, tokenizer, config) -> None:
        """CorDA: decompose each targeted layer against its input covariance on the drawn batches."""
        if getattr(config, "init_lora_weights", None) != "corda":
            return
        from peftlab.methods.lora_init.corda import preprocess_corda

        start = time.perf_counter()
        batches = self.batches(tokenizer, next(model.parameters()).device)

        def run_model() -> None:
            with torch.no_grad():
                for batch in _progress(batches, "CorDA: layer inputs"):
                    model(**_inputs(batch))

        preprocess_corda(model, config, run_model=run_model)
        self.seconds += time.perf_counter() - start

    def after_adapter(self, model: nn.Module, tokenizer) -> None:
        """EVA: fill A with each layer's top input components and move the ranks."""
        if getattr(model.peft_config["default"], "init_lora_weights", None) != "eva":
            return
        from peftlab.methods.lora_init.eva import initialize_lora_eva_weights

        start = time.perf_counter()
        batches = [_inputs(batch, keep_token_labels=True) for batch in self.batches(tokenizer, next(model.parameters()).device)]
        initialize_lora_eva_weights(model, batches, show_progress_bar=True)
        self.seconds += time.perf_counter() - start


def _inputs(batch: dict[str, torch.Tensor], keep_token_labels: bool = False) -> dict[str, torch.Tensor]:
    # The base model's inputs; per-token labels (causal LM) stay for EVA's label mask, a classifier's go.
    labels = batch.get("labels")
    keep = keep_token_labels and labels is not None and labels.shape == batch["input_ids"].shape
    return {k: v for k, v in batch.items() if k != "labels" or keep}


def _progress(batches, desc: str):
    from tqdm import tqdm

    return tqdm(batches, desc=desc, leave=False)


def check_has_data(init_lora_weights: Any, init_data: DataDrivenInit | None) -> None:
    if init_lora_weights in DATA_DRIVEN and init_data is None:
        raise ValueError(
            f"init_lora_weights={init_lora_weights!r} starts from the layers' inputs on sample data, and none was given "
            "to draw from; train with `peftlab train` (it draws from the run's training set), or build the model "
            "with init_data."
        )
