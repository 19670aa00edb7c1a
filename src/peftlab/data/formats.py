"""Which kind of examples a table holds, told from each row's keys, and the dataset it becomes.

    format          keys                               becomes
    chat            messages                           ChatDataset (every assistant turn learnt)
    completion      prompt, completion (TRL)           strings: CausalLMDataset; lists of messages:
                                                       ChatDataset learning the completion only
    prompt-response prompt, response                   CausalLMDataset
    alpaca          instruction, output (+ input)      ChatDataset: one user turn (the instruction,
                                                       then a blank line and the input if any), one
                                                       assistant turn (the output)
    labelled        text (or sentence), label          ClassificationDataset (or, for a causal LM,
                                                       prompt/response: see :mod:`.datasets`)
    text            text                               CausalLMDataset with an empty prompt: each
                                                       row a document learnt whole

The first format whose keys a row has is its format (so ``text`` + ``label`` is labelled, not
text); other keys are ignored, except beside ``text``: a text row has that key alone (``text`` +
``score`` is more likely a misnamed label than documents, and is refused). Every row must have the same format: a file mixing them is
refused, naming the first row that differs, and so is a row that matches none.

Conversations go through the model's chat template; plain strings (prompt/response, TRL's string
prompt/completion, text) stay plain, as TRL does: the model sees exactly the text of the file.
"""

from __future__ import annotations

from typing import Any

from .chat import ChatDataset, check_conversation
from .errors import DataError
from .files import Row, Table

#: Each format and the keys that make a row one of it, in order of precedence.
FORMATS: dict[str, tuple[str, ...]] = {
    "chat": ("messages",),
    "completion": ("prompt", "completion"),
    "prompt-response": ("prompt", "response"),
    "alpaca": ("instruction", "output"),
    "labelled": ("text", "label"),
    "labelled-sentence": ("sentence", "label"),
    "text": ("text",),
}
CAUSAL_LM_FORMATS = ("chat", "completion", "prompt-response", "alpaca", "text")


def row_format(row: Row) -> str | None:
    """The format of one row, or None when its keys match none."""
    keys = set(row.values)
    # a lone text column only: text beside other columns (a score, a misnamed label) is more likely
    # classification data with a mistake than documents to learn
    return next((name for name, wanted in FORMATS.items() if set(wanted) <= keys and (name != "text" or keys == {"text"})), None)


def _describe(name: str) -> str:
    return "labelled" if name.startswith("labelled") else name


def table_format(table: Table) -> str:
    """The one format of every row of ``table``: "labelled" for classification rows, else one of
    :data:`CAUSAL_LM_FORMATS`; a DataError naming the row that matches none, or differs."""
    first: tuple[str, Row] | None = None
    for row in table.rows:
        found = row_format(row)
        if found is None:
            keys = ", ".join(row.values) or "none"
            expected = "; ".join(f"{_describe(n)}: {' + '.join(k)}" for n, k in FORMATS.items() if n != "labelled-sentence")
            expected = expected.replace("labelled: text", "labelled: text (or sentence)")
            raise DataError(f"{row.where}: keys {keys} match no data format; expected one of {expected}")
        found = _describe(found)
        if first is None:
            first = (found, row)
        elif found != first[0]:
            missing = [repr(k) for k in FORMATS[row_format(first[1])] if k not in row.values]
            lacking = f" (no {', '.join(missing)} value)" if missing else ""
            raise DataError(f"{row.where}: a {found} row{lacking}, but {first[1].where} is a {first[0]} row; "
                            f"a file holds one format: split it, or convert the rows")
    if first is None:
        raise DataError(f"{table.source} has no rows")
    return first[0]


def _string(row: Row, key: str, blank_ok: bool = False) -> str:
    value = row.values.get(key)
    if not isinstance(value, str) or (not blank_ok and not value.strip()):
        raise DataError(f"{row.where}: {key!r} should be a non-empty string, got {value!r}")
    return value


def alpaca_conversation(row: Row) -> list[dict[str, str]]:
    """An Alpaca row as one user turn and one assistant turn."""
    instruction, output = _string(row, "instruction"), _string(row, "output")
    extra = row.values.get("input")
    if extra is not None and not isinstance(extra, str):
        raise DataError(f"{row.where}: 'input' should be a string, got {extra!r}")
    user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def causal_lm_dataset(table: Table, format_name: str) -> Any:
    """The table's rows of ``format_name`` (one of :data:`CAUSAL_LM_FORMATS`) as a dataset."""
    from .datasets import CausalLMDataset  # datasets imports this module

    rows, source = table.rows, table.source
    if format_name == "chat":
        return ChatDataset([check_conversation(row.values["messages"], row.where) for row in rows], source)
    if format_name == "alpaca":
        return ChatDataset([check_conversation(alpaca_conversation(row), row.where) for row in rows], source)
    if format_name == "prompt-response":
        return CausalLMDataset([_string(r, "prompt", True) for r in rows], [_string(r, "response") for r in rows], source)
    if format_name == "text":
        return CausalLMDataset([""] * len(rows), [_string(r, "text") for r in rows], f"{source} (documents)")
    return _completion_dataset(table)


def _completion_dataset(table: Table) -> Any:
    """TRL's prompt/completion rows: all strings (plain) or all lists of messages (conversational)."""
    from .datasets import CausalLMDataset

    kinds = {row.where: isinstance(row.values["prompt"], list) or isinstance(row.values["completion"], list)
             for row in table.rows}
    first = table.rows[0]
    for row in table.rows:
        mixed = isinstance(row.values["prompt"], list) != isinstance(row.values["completion"], list)
        if mixed or kinds[row.where] != kinds[first.where]:
            raise DataError(f"{row.where}: prompt and completion must both be strings or both lists of messages, "
                            f"and the same in every row (as in {first.where})")
    if not kinds[first.where]:
        return CausalLMDataset([_string(r, "prompt", True) for r in table.rows],
                               [_string(r, "completion") for r in table.rows], table.source)
    conversations, learn_from = [], []
    for row in table.rows:
        prompt, completion = row.values["prompt"], row.values["completion"]
        if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in completion):
            raise DataError(f"{row.where}: the completion has no assistant message, so there is nothing to learn")
        conversations.append(check_conversation(prompt + completion, row.where))
        learn_from.append(len(prompt))
    return ChatDataset(conversations, table.source, learn_from)
