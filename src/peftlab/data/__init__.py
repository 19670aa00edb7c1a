"""Data: load a dataset split as plain lists, and collate its items into batches.

    train = load_dataset_spec("sst2", "train", max_samples=2000, seed=0)
    loader = DataLoader(train, batch_size=16, shuffle=True, collate_fn=ClassificationCollator(tokenizer))
"""

from .collate import IGNORE_INDEX, CausalLMCollator, ClassificationCollator
from .datasets import CausalLMDataset, ClassificationDataset, TextDataset, load_dataset_spec
from .errors import DataError

__all__ = [
    "IGNORE_INDEX",
    "CausalLMCollator",
    "CausalLMDataset",
    "ClassificationCollator",
    "ClassificationDataset",
    "DataError",
    "TextDataset",
    "load_dataset_spec",
]
