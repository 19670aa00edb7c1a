"""Data: load a dataset split as plain lists, and collate its items into batches.

    train = load_dataset_spec("sst2", "train", max_samples=2000, seed=0)
    loader = DataLoader(train, batch_size=16, shuffle=True, collate_fn=ClassificationCollator(tokenizer))

Causal LM: ``load_dataset_spec("chat.jsonl", task="causal-lm")`` tells the format from the keys
(:mod:`.formats`); conversations are a :class:`ChatDataset`, rendered with the model's chat
template by :func:`render_conversation` (ids + the mask of the assistant tokens to learn), and
``CausalLMCollator`` batches them, padded or packed (:mod:`.packing`).
"""

from .chat import ChatDataset, ChatTemplateError, RenderedConversation, check_conversation, render_conversation
from .collate import IGNORE_INDEX, CausalLMCollator, ClassificationCollator
from .datasets import CausalLMDataset, ClassificationDataset, TextDataset, load_dataset_spec
from .errors import DataError

__all__ = [
    "IGNORE_INDEX",
    "CausalLMCollator",
    "CausalLMDataset",
    "ChatDataset",
    "ChatTemplateError",
    "ClassificationCollator",
    "ClassificationDataset",
    "DataError",
    "RenderedConversation",
    "TextDataset",
    "check_conversation",
    "load_dataset_spec",
    "render_conversation",
]
