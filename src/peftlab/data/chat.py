"""Conversations, and how a causal LM learns them through its chat template.

    data = ChatDataset([[{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]], "mine")
    rendered = render_conversation(tokenizer, data.conversations[0])
    rendered.input_ids       # the template's text, as token ids
    rendered.assistant_mask  # True on the tokens the loss learns

A conversation is a list of ``{"role", "content"}`` messages: an optional ``system`` message
first, then ``user`` and ``assistant`` turns starting with a user turn, at least one assistant
turn, every content a non-blank string (:func:`check_conversation` refuses anything else, naming
the row).

:func:`render_conversation` applies ``tokenizer.apply_chat_template`` (or a template given as
text, e.g. read from ``--chat-template FILE.jinja``) and finds each assistant turn's tokens by
rendering incrementally: for the assistant message ``k``, the ids of ``messages[:k]`` with the
generation prompt (everything up to and including the assistant header) and the ids of
``messages[:k + 1]``. The turn's tokens are the difference: its content and whatever the
template writes after it before the next message, i.e. its end-of-turn token(s) (ChatML:
``hello<|im_end|>\\n``), so the model learns to stop. Each rendering must be a prefix of the next,
in token ids; a template for which this fails (e.g. one that rewrites earlier turns once a later
one exists) is refused rather than masked wrongly.

The text is tokenized without adding special tokens: the template writes its own BOS (if any),
so a tokenizer that prepends BOS would otherwise double it. A rendering that still starts with
two BOS ids is refused.

``learn_from``: only assistant turns at or after this message index are learnt (TRL's
conversational prompt/completion rows learn the completion only). ``train_on_prompt=True``
learns every token.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from .errors import DataError

ROLES = ("system", "user", "assistant")
Message = dict[str, str]


class ChatTemplateError(DataError):
    """The chat template is missing, raises, or cannot be masked exactly; the message says what to do."""


@dataclass(frozen=True)
class ChatDataset:
    """Conversations to learn; items are ``{"messages", "learn_from"}`` (see the module docstring)."""

    conversations: list[list[Message]]
    source: str
    learn_from: list[int] | None = None  # per conversation; None: every assistant turn is learnt

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"messages": self.conversations[index], "learn_from": self.learn_from[index] if self.learn_from else 0}

    def select(self, indices: Sequence[int]) -> ChatDataset:
        learn_from = [self.learn_from[i] for i in indices] if self.learn_from else None
        return replace(self, conversations=[self.conversations[i] for i in indices], learn_from=learn_from)


@dataclass(frozen=True)
class RenderedConversation:
    input_ids: list[int]
    assistant_mask: list[bool]  # True where the loss learns the token


def check_conversation(messages: Any, where: str) -> list[Message]:
    """The messages as ``[{"role", "content"}]``; a DataError naming ``where`` when they are not a
    conversation peftlab can learn (see the module docstring)."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: expected a non-empty list of {{\"role\", \"content\"}} messages, got {messages!r}")
    checked = []
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: message {number} should be an object with \"role\" and \"content\", got {message!r}")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise DataError(f"{where}: message {number} has unknown role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str) or not content.strip():
            raise DataError(f"{where}: message {number} ({role}) has empty content; give it text or delete the message")
        if role == "system" and number != 1:
            raise DataError(f"{where}: message {number} is a system message; only the first message may be one")
        checked.append({"role": role, "content": content})
    first_turn = checked[1] if checked[0]["role"] == "system" else checked[0]
    if first_turn["role"] == "assistant":
        raise DataError(f"{where}: the conversation starts with an assistant turn; it must start with a user turn "
                        f"(after an optional system message)")
    if not any(message["role"] == "assistant" for message in checked):
        raise DataError(f"{where}: the conversation has no assistant turn, so there is nothing to learn; "
                        f"add the assistant's answer")
    return checked


def require_chat_template(tokenizer: PreTrainedTokenizerBase, chat_template: str | None, source: str) -> None:
    """A ChatTemplateError when neither the tokenizer nor the caller has a chat template."""
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            f"{source}: conversations need a chat template, and the model's tokenizer has none; "
            f"pass --chat-template FILE.jinja (e.g. a ChatML template), or use an instruct model that has one"
        )


def _render_ids(
    tokenizer: PreTrainedTokenizerBase, messages: list[Message], chat_template: str | None, generation_prompt: bool,
    where: str,
) -> list[int]:
    try:
        text = tokenizer.apply_chat_template(
            messages, chat_template=chat_template, tokenize=False, add_generation_prompt=generation_prompt
        )
    except TemplateError as error:
        raise ChatTemplateError(f"{where}: the chat template raised an error: {error}") from None
    if not isinstance(text, str):
        raise ChatTemplateError(f"{where}: the chat template rendered {type(text).__name__}, not text")
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def render_conversation(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[Message],
    *,
    chat_template: str | None = None,
    train_on_prompt: bool = False,
    learn_from: int = 0,
    where: str = "the conversation",
) -> RenderedConversation:
    """The conversation's token ids through the chat template, and which of them the loss learns:
    the tokens of every assistant turn from ``learn_from`` on, each with its end-of-turn token(s);
    all of them with ``train_on_prompt``. ``where`` names the row in errors."""
    require_chat_template(tokenizer, chat_template, where)
    full = _render_ids(tokenizer, messages, chat_template, False, where)
    bos = tokenizer.bos_token_id
    if bos is not None and full[:2] == [bos, bos]:
        raise ChatTemplateError(f"{where}: the rendered conversation starts with two BOS tokens; "
                                f"fix the chat template so that it writes BOS once")
    mask = [train_on_prompt] * len(full)
    if train_on_prompt:
        return RenderedConversation(full, mask)
    for k, message in enumerate(messages):
        if message["role"] != "assistant" or k < learn_from:
            continue
        header = _render_ids(tokenizer, messages[:k], chat_template, True, where)
        through = _render_ids(tokenizer, messages[: k + 1], chat_template, False, where)
        if through[: len(header)] != header or full[: len(through)] != through or len(through) <= len(header):
            raise ChatTemplateError(
                f"{where}: the chat template does not render this conversation turn by turn (the tokens up to "
                f"assistant turn {k + 1} are not a prefix of the whole conversation's), so its assistant tokens "
                f"cannot be found exactly; use a template that renders earlier turns the same way whatever follows, "
                f"or --train-on-prompt"
            )
        mask[len(header) : len(through)] = [True] * (len(through) - len(header))
    return RenderedConversation(full, mask)
