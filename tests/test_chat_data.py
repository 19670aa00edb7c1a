"""Causal-LM data in the formats people have: detection, conversations through the chat template,
the loss mask (checked against transformers' own {% generation %} mask), truncation counts, and
every bad input refused with the file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from chat_fixtures import CHATML, CHATML_GENERATION, CONVERSATION, LLAMA_STYLE, chat_tokenizer, ids

from peftlab.data import (
    IGNORE_INDEX,
    CausalLMCollator,
    CausalLMDataset,
    ChatDataset,
    ChatTemplateError,
    DataError,
    load_dataset_spec,
    render_conversation,
)
from peftlab.data.encoded import choose_max_length, count_truncation, encode_rows, refuse_if_nothing_to_learn


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def chat_row(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


# --- formats -------------------------------------------------------------------------------------


def test_each_format_is_told_from_its_keys(tmp_path: Path) -> None:
    chat = write_jsonl(tmp_path / "chat.jsonl", [chat_row(("user", "hi"), ("assistant", "yes"))] * 2)
    loaded = load_dataset_spec(chat, "train", held_out=False)
    assert isinstance(loaded, ChatDataset) and loaded.conversations[0][1] == {"role": "assistant", "content": "yes"}

    plain = write_jsonl(tmp_path / "trl.jsonl", [{"prompt": "two plus two", "completion": " four"}])
    assert load_dataset_spec(plain, "train", held_out=False)[0] == {"prompt": "two plus two", "response": " four"}

    conversational = write_jsonl(tmp_path / "trl-chat.jsonl", [{
        "prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "no"}, {"role": "user", "content": "again"}],
        "completion": [{"role": "assistant", "content": "yes"}],
    }])
    item = load_dataset_spec(conversational, "train", held_out=False)[0]
    assert item["learn_from"] == 3 and [m["content"] for m in item["messages"]] == ["hi", "no", "again", "yes"]

    alpaca = [{"instruction": "add", "input": "two and two", "output": "four"}, {"instruction": "say yes", "input": "", "output": "yes"}]
    (tmp_path / "alpaca.json").write_text(json.dumps(alpaca, indent=2), encoding="utf-8")
    for path in (tmp_path / "alpaca.json", write_jsonl(tmp_path / "alpaca.jsonl", alpaca)):
        data = load_dataset_spec(path, "train", held_out=False)
        assert data.conversations == [
            [{"role": "user", "content": "add\n\ntwo and two"}, {"role": "assistant", "content": "four"}],
            [{"role": "user", "content": "say yes"}, {"role": "assistant", "content": "yes"}],
        ]

    text = write_jsonl(tmp_path / "docs.jsonl", [{"text": "a whole document"}])
    assert load_dataset_spec(text, "train", held_out=False)[0] == {"prompt": "", "response": "a whole document"}

    responses = write_jsonl(tmp_path / "pr.jsonl", [{"prompt": "p", "response": "r"}])
    assert isinstance(load_dataset_spec(responses, "train", held_out=False), CausalLMDataset)


def test_a_folder_of_chat_splits(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", [chat_row(("user", "hi"), ("assistant", "yes"))] * 3)
    (tmp_path / "validation.json").write_text(json.dumps([chat_row(("user", "ok"), ("assistant", "no"))]), encoding="utf-8")
    assert len(load_dataset_spec(tmp_path, "train")) == 3
    assert load_dataset_spec(tmp_path, "validation").conversations[0][0]["content"] == "ok"


@pytest.mark.parametrize("turns, message", [
    ([("user", "hi"), ("robot", "beep")], "line 1: message 2 has unknown role 'robot'; use one of system, user, assistant"),
    ([("system", "be brief"), ("user", "hi")], "line 1: the conversation has no assistant turn"),
    ([("system", "be brief"), ("assistant", "hi"), ("user", "yes")], "line 1: the conversation starts with an assistant turn"),
    ([("user", "hi"), ("assistant", "  ")], "line 1: message 2 \\(assistant\\) has empty content"),
    ([("user", "hi"), ("system", "late"), ("assistant", "ok")], "line 1: message 2 is a system message"),
])
def test_bad_conversations_name_the_file_and_line(tmp_path: Path, turns, message) -> None:
    path = write_jsonl(tmp_path / "chat.jsonl", [chat_row(*turns)])
    with pytest.raises(DataError, match=f"chat.jsonl, {message}"):
        load_dataset_spec(path, "train", held_out=False)


def test_bad_files_name_the_file_and_line(tmp_path: Path) -> None:
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [chat_row(("user", "hi"), ("assistant", "yes")), {"prompt": "p", "response": "r"}])
    with pytest.raises(DataError, match="mixed.jsonl, line 2: a prompt-response row \\(no 'messages' value\\), but .*line 1 is a chat row"):
        load_dataset_spec(mixed, "train", held_out=False)
    unknown = write_jsonl(tmp_path / "unknown.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match="unknown.jsonl, line 1: keys question, answer match no data format; expected one of chat: messages"):
        load_dataset_spec(unknown, "train", held_out=False)
    (tmp_path / "object.json").write_text('{"instruction": "a", "output": "b"}', encoding="utf-8")
    with pytest.raises(DataError, match="object.json: a .json file must hold a list of objects, got dict"):
        load_dataset_spec(tmp_path / "object.json", "train", held_out=False)
    (tmp_path / "items.json").write_text('[\n {"instruction": "a", "output": "b"},\n\n "loose"\n]', encoding="utf-8")
    with pytest.raises(DataError, match="items.json, line 4 \\(item 2\\): expected an object, got str"):
        load_dataset_spec(tmp_path / "items.json", "train", held_out=False)
    half = write_jsonl(tmp_path / "half.jsonl", [{"prompt": [{"role": "user", "content": "hi"}], "completion": "yes"}])
    with pytest.raises(DataError, match="half.jsonl, line 1: prompt and completion must both be strings or both lists"):
        load_dataset_spec(half, "train", held_out=False)


def test_chat_rows_for_a_classifier_say_to_use_causal_lm(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "chat.jsonl", [chat_row(("user", "hi"), ("assistant", "yes"))])
    with pytest.raises(DataError, match="these are chat rows, which a causal LM learns: use --task causal-lm"):
        load_dataset_spec(path, "train", task="seq-cls", held_out=False)


# --- the template and the mask -------------------------------------------------------------------


def test_the_mask_is_every_assistant_turn_with_its_end_of_turn() -> None:
    rendered = render_conversation(chat_tokenizer(), CONVERSATION)
    expected = ids("<|im_start|> system be brief <|im_end|> <|im_start|> user what is two plus two <|im_end|> "
                   "<|im_start|> assistant four <|im_end|> <|im_start|> user and three plus three <|im_end|> "
                   "<|im_start|> assistant six ok <|im_end|>")
    assert rendered.input_ids == expected
    learnt = [token for token, keep in zip(rendered.input_ids, rendered.assistant_mask) if keep]
    assert learnt == ids("four <|im_end|> six ok <|im_end|>")
    # transformers' own mask of a {% generation %} template marks the same tokens
    oracle = chat_tokenizer(template=CHATML_GENERATION).apply_chat_template(
        CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert oracle["input_ids"] == expected and oracle["assistant_masks"] == [int(m) for m in rendered.assistant_mask]


def test_labels_of_a_batch_are_the_assistant_tokens_only(tmp_path: Path) -> None:
    tokenizer = chat_tokenizer()
    batch = CausalLMCollator(tokenizer, max_length=64)([{"messages": CONVERSATION, "learn_from": 0}])
    labels = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX].tolist()
    assert labels == ids("four <|im_end|> six ok <|im_end|>")
    only_last = CausalLMCollator(tokenizer, max_length=64)([{"messages": CONVERSATION, "learn_from": 3}])["labels"][0]
    assert only_last[only_last != IGNORE_INDEX].tolist() == ids("six ok <|im_end|>")
    everything = CausalLMCollator(tokenizer, max_length=64, train_on_prompt=True)([{"messages": CONVERSATION}])
    assert torch.equal(everything["labels"], everything["input_ids"])


def test_no_double_bos_when_the_tokenizer_and_the_template_both_add_it() -> None:
    tokenizer = chat_tokenizer(adds_bos=True, template=LLAMA_STYLE)
    assert tokenizer("be brief")["input_ids"][0] == ids("<s>")[0]  # this tokenizer does prepend BOS
    rendered = render_conversation(tokenizer, CONVERSATION)
    assert rendered.input_ids[:2] == ids("<s> <|im_start|>")
    twice = chat_tokenizer(adds_bos=True, template="{{ bos_token }}" + LLAMA_STYLE)
    with pytest.raises(ChatTemplateError, match="starts with two BOS tokens"):
        render_conversation(twice, CONVERSATION)


def test_a_response_that_ends_with_eos_gets_no_second_one() -> None:
    collator = CausalLMCollator(chat_tokenizer(), max_length=32)
    ids_once, mask = collator.encode_whole({"prompt": "what is two", "response": "four"})
    ids_spelled, _ = collator.encode_whole({"prompt": "what is two", "response": "four <|im_end|>"})
    assert ids_once == ids_spelled == ids("what is two four <|im_end|>") and mask == [False] * 3 + [True] * 2


def test_template_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ChatTemplateError, match="the conversation: conversations need a chat template, and the model's tokenizer has none; pass --chat-template FILE.jinja"):
        render_conversation(chat_tokenizer(template=None), CONVERSATION)
    assert render_conversation(chat_tokenizer(template=None), CONVERSATION, chat_template=CHATML).input_ids[0] == ids("<|im_start|>")[0]
    raising = "{{ raise_exception('this template takes no system message') }}"
    with pytest.raises(ChatTemplateError, match="row 7: the chat template raised an error: this template takes no system"):
        render_conversation(chat_tokenizer(template=raising), CONVERSATION, where="row 7")
    with pytest.raises(ChatTemplateError, match="^rows, row 2: the conversation: the chat template raised an error"):
        encode_rows(ChatDataset([CONVERSATION[1:3], CONVERSATION], "rows"),
                    CausalLMCollator(chat_tokenizer(template=CHATML.replace("{% for", "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}{% for")), max_length=8))
    # a template that renders the last turn unlike the others: its turns cannot be found exactly
    last_differs = CHATML.replace("{{ m['content'] }}", "{{ m['content'] }}{% if loop.last %} ok{% endif %}")
    with pytest.raises(ChatTemplateError, match="does not render this conversation turn by turn"):
        render_conversation(chat_tokenizer(template=last_differs), CONVERSATION)


# --- truncation and the length ---------------------------------------------------------------------


def test_truncation_is_counted_and_all_masked_data_refused() -> None:
    tokenizer = chat_tokenizer()
    data = ChatDataset([CONVERSATION, CONVERSATION[1:3]], "rows")
    rows = encode_rows(data, CausalLMCollator(tokenizer, max_length=64))
    assert rows.lengths == [29, 12] and choose_max_length(rows, limit=None) == 29 and choose_max_length(rows, limit=20) == 20
    assert count_truncation(rows, CausalLMCollator(tokenizer, max_length=29)).truncated == 0
    cut = count_truncation(rows, CausalLMCollator(tokenizer, max_length=28))  # the last end-of-turn lost
    assert (cut.truncated, cut.nothing_to_learn) == (1, 0)
    # over the length, the prompt and the response each keep their beginning; the response at least half
    collator = CausalLMCollator(tokenizer, max_length=6)
    kept, mask = collator.fit(rows.input_ids[1], rows.label_mask[1])
    assert kept == ids("<|im_start|> user what is four <|im_end|>") and mask == [False] * 4 + [True] * 2
    # rows with no learnt token at all (here: learning only from a turn past the end) are refused
    nothing = count_truncation(encode_rows(ChatDataset([CONVERSATION] * 2, "rows", [9, 9]), collator), collator)
    assert (nothing.rows, nothing.truncated, nothing.nothing_to_learn) == (2, 2, 2)
    with pytest.raises(DataError, match="all 2 rows have every label masked after the cut at --max-length 6 \\(2 truncated"):
        refuse_if_nothing_to_learn(nothing, "rows")


def test_the_task_follows_from_the_data(tmp_path: Path) -> None:
    from peftlab.data.datasets import task_of_dataset

    chat = write_jsonl(tmp_path / "chat.jsonl", [chat_row(("user", "hi"), ("assistant", "yes"))])
    labelled = write_jsonl(tmp_path / "labelled.jsonl", [{"text": "good", "label": 1}])
    assert [task_of_dataset(chat), task_of_dataset(labelled), task_of_dataset("sst2"), task_of_dataset("notes.txt")] == [
        "causal-lm", "seq-cls", "seq-cls", "causal-lm"]
