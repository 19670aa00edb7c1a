"""A tiny word-level tokenizer with ChatML-style special tokens, its chat templates, and chat rows.

    tokenizer = chat_tokenizer()                 # template set, no BOS added by the tokenizer
    tokenizer = chat_tokenizer(adds_bos=True)    # Llama-style: the tokenizer prepends <s>, and so does the template
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIALS = ["[PAD]", "[UNK]", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
WORDS = "system user assistant be brief what is two plus three four five six and ok yes no".split()
VOCAB = {token: i for i, token in enumerate(SPECIALS + WORDS)}

#: ChatML with spaces for newlines (the word-level tokenizer splits on whitespace).
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)
#: The same with {% generation %} around what the assistant writes: transformers' own assistant mask.
CHATML_GENERATION = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|im_start|>assistant "
    "{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %} "
    "{% else %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)
LLAMA_STYLE = "{{ bos_token }}" + CHATML

CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "what is two plus two"},
    {"role": "assistant", "content": "four"},
    {"role": "user", "content": "and three plus three"},
    {"role": "assistant", "content": "six ok"},
]


def chat_tokenizer(adds_bos: bool = False, template: str | None = CHATML) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel(dict(VOCAB), unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    if adds_bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", VOCAB["<s>"])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", bos_token="<s>", eos_token="<|im_end|>",
    )
    tokenizer.chat_template = template
    return tokenizer


def ids(text: str) -> list[int]:
    return [VOCAB[word] for word in text.split()]


def write_chat_rows(path: Path, count: int, seed: int = 0) -> Path:
    """``count`` two-turn conversations of the tiny vocabulary, of varied lengths, as .jsonl."""
    numbers = ["two", "three", "four", "five", "six"]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(count):
            a, b = numbers[(i + seed) % 5], numbers[(2 * i + seed) % 5]
            messages = [{"role": "user", "content": f"what is {a} plus {b}"}, {"role": "assistant", "content": "yes " * (1 + i % 4)}]
            if i % 3 == 0:
                messages += [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "no"}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path
