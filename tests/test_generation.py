"""Generation: greedy answers equal a hand-written greedy loop; chat prompts; the generate and chat commands
on a tiny Llama (base, adapter, merged folder, 4-bit base, LongLoRA); eval --task generate; bad input."""

from __future__ import annotations

import copy
import io
import json

import pytest
import torch
from test_cli import run_cli
from train_fixtures import llama_dir, prompt_dir, save_tiny_model  # noqa: F401

from peftlab import get_peft_model
from peftlab.train.generate_commands import chat
from peftlab.train.generation import Sampling, encode_prompt, generate_ids, generate_texts, load_for_generation
from peftlab.methods import method_named
from peftlab.quant import Linear4bit
from peftlab.train.options import OptionsError
from tiny_models import perturb, tiny_llama

#: A ChatML-like template over the tiny tokenizer's words: each turn "[BOS] role : content [EOS]".
TEMPLATE = ("{% for m in messages %}[BOS] {{ m['role'] }} : {{ m['content'] }} [EOS] {% endfor %}"
            "{% if add_generation_prompt %}[BOS] assistant : {% endif %}")
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def greedy_by_hand(model, prompt: list[int], new_tokens: int, eos: int) -> list[int]:
    """The oracle: the whole sequence through the model each step, the argmax appended, until EOS."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if token == eos:
                break
            ids.append(token)
    return ids[len(prompt):]


def trained_looking(model, seed: int = 0):
    """A tiny Llama with an adapter whose update is not zero (a fresh one changes nothing)."""
    config = method_named("lora").make_config(task_type="CAUSAL_LM", target_modules=ATTENTION, r=4, lora_alpha=8)
    adapted = get_peft_model(model, config)
    perturb(adapted, seed=seed)
    return adapted.eval()


def test_greedy_batches_equal_a_greedy_loop_by_hand(tiny_tokenizer):
    model = trained_looking(tiny_llama(seed=3))
    prompts = [tiny_tokenizer("the movie was")["input_ids"], tiny_tokenizer("a good film is great")["input_ids"], [2]]
    expected = [greedy_by_hand(model, ids, 12, tiny_tokenizer.eos_token_id) for ids in prompts]
    # One batch, padded on the left to the longest prompt, and one prompt at a time: the same tokens.
    assert generate_ids(model, tiny_tokenizer, prompts, Sampling(max_new_tokens=12)) == expected
    assert [generate_ids(model, tiny_tokenizer, [ids], Sampling(max_new_tokens=12))[0] for ids in prompts] == expected
    assert any(expected) and all(len(ids) <= 12 for ids in expected)


def test_sampling_is_seeded_and_differs_from_greedy(tiny_tokenizer):
    model = tiny_llama(seed=4)
    prompt = [tiny_tokenizer("the movie")["input_ids"]]
    sampled = Sampling(max_new_tokens=10, temperature=5.0, seed=7)
    assert generate_ids(model, tiny_tokenizer, prompt, sampled) == generate_ids(model, tiny_tokenizer, prompt, sampled)
    draws = {tuple(generate_ids(model, tiny_tokenizer, prompt, Sampling(10, 5.0, seed=s))[0]) for s in range(4)}
    assert len(draws) > 1


def test_the_chat_template_is_applied_once_with_the_assistant_header(chat_tokenizer):
    ids = encode_prompt(chat_tokenizer, "the movie was good", system="review")
    words = chat_tokenizer.convert_ids_to_tokens(ids)
    # The template writes every [BOS] itself: one per turn and one for the answer, none added on top (the
    # role names are not in the tiny vocabulary: [UNK]).
    assert words == ["[BOS]", "[UNK]", ":", "review", "[EOS]", "[BOS]", "[UNK]", ":", "the", "movie", "was", "good",
                     "[EOS]", "[BOS]", "[UNK]", ":"]


@pytest.mark.parametrize("bad", [{"max_new_tokens": 0}, {"max_new_tokens": -3}, {"temperature": -1.0},
                                 {"temperature": 1.0, "top_p": 0.0}, {"top_p": 0.5}])
def test_bad_sampling_is_refused(bad):
    with pytest.raises(OptionsError):
        Sampling(**bad)


# -- on disk: the commands ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter_dir(llama_dir, tmp_path_factory):
    from transformers import LlamaForCausalLM

    folder = tmp_path_factory.mktemp("adapter")
    adapted = trained_looking(LlamaForCausalLM.from_pretrained(llama_dir))
    adapted.peft_config["default"].base_model_name_or_path = str(llama_dir)
    adapted.save_pretrained(folder)
    return folder


def generate_lines(capsys, *argv: str) -> list[dict]:
    code, out, err = run_cli(capsys, "generate", "--max-new-tokens", "8", *argv)
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


def test_generate_with_an_adapter_equals_the_merged_folder_and_generate_by_hand(llama_dir, adapter_dir, tmp_path, capsys):
    prompts = ["the movie was", "a bad film"]
    with_adapter = generate_lines(capsys, "--adapter", str(adapter_dir), *prompts)
    assert run_cli(capsys, "merge", "--adapter", str(adapter_dir), "--out", str(tmp_path / "merged"))[0] == 0
    merged = generate_lines(capsys, "--model", str(tmp_path / "merged"), *prompts)
    base = generate_lines(capsys, "--model", str(llama_dir), *prompts)
    model, tokenizer = load_for_generation(str(llama_dir), str(adapter_dir))
    by_hand = [tokenizer.decode(greedy_by_hand(model, tokenizer(p)["input_ids"], 8, tokenizer.eos_token_id),
                                skip_special_tokens=True).strip() for p in prompts]
    assert [line["prompt"] for line in with_adapter] == prompts
    assert generate_lines(capsys, "--adapter", str(adapter_dir), "--prompt", prompts[0], "-p", prompts[1]) == with_adapter
    assert [line["generation"] for line in with_adapter] == [line["generation"] for line in merged] == by_hand
    assert [line["generation"] for line in base] != by_hand  # the adapter changes the answers


def test_a_4bit_adapter_is_put_on_its_4bit_base(llama_dir, tmp_path, tiny_tokenizer):
    from transformers import LlamaForCausalLM

    from peftlab.quant import quantize_model

    base = LlamaForCausalLM.from_pretrained(llama_dir)
    quantize_model(base)
    adapted = trained_looking(base)
    adapted.save_pretrained(tmp_path)
    model, tokenizer = load_for_generation(str(llama_dir), str(tmp_path))
    assert any(isinstance(module, Linear4bit) for module in model.modules())
    ids = [tokenizer("the movie was")["input_ids"]]
    assert generate_ids(model, tokenizer, ids, Sampling(8)) == generate_ids(adapted, tokenizer, ids, Sampling(8))


def test_a_longlora_adapter_brings_its_rope_scale(llama_dir, tmp_path, capsys):
    from transformers import LlamaForCausalLM

    config = method_named("longlora").make_config(task_type="CAUSAL_LM", rope_scale=2.0, target_modules=ATTENTION)
    adapted = get_peft_model(LlamaForCausalLM.from_pretrained(llama_dir), config)
    perturb(adapted)
    adapted.save_pretrained(tmp_path / "longlora")
    model, tokenizer = load_for_generation(str(llama_dir), str(tmp_path / "longlora"))
    assert model.config.max_position_embeddings == 64 and model.config.rope_parameters["factor"] == 2.0
    # 40 prompt tokens: past the base's 32 positions, within the 64 the scale gives.
    prompt = [tokenizer(" ".join(["the movie was good"] * 10))["input_ids"]]
    assert generate_ids(model, tokenizer, prompt, Sampling(8)) == [greedy_by_hand(adapted.eval(), prompt[0], 8, 3)]


def test_prompt_files_txt_and_jsonl(llama_dir, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("the movie was\n\na bad film\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "the movie was"}\n{"prompt": "a bad film"}\n')
    from_txt = generate_lines(capsys, "--model", str(llama_dir), "--prompts", str(tmp_path / "p.txt"))
    from_jsonl = generate_lines(capsys, "--model", str(llama_dir), "--prompts", str(tmp_path / "p.jsonl"))
    assert from_txt == from_jsonl and [line["prompt"] for line in from_txt] == ["the movie was", "a bad film"]
    assert run_cli(capsys, "generate", "--model", str(llama_dir), "--prompts", str(tmp_path / "p.txt"),
                   "--out", str(tmp_path / "out.jsonl"))[0] == 0
    assert [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()] == from_txt


@pytest.mark.parametrize("line, expected", [
    ("{not json", "line 2: not valid JSON"),
    ('{"text": "the movie"}', 'line 2: expected {"prompt": "non-empty text"}'),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}',
     "line 2: the last message is the assistant's"),
    ('{"messages": [{"role": "robot", "content": "a"}]}', 'line 2: "messages" must be a list'),
])
def test_a_bad_prompt_line_is_refused_by_file_and_line(llama_dir, tmp_path, capsys, line, expected):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "the movie"}\n' + line + "\n")
    code, out, err = run_cli(capsys, "generate", "--model", str(llama_dir), "--prompts", str(path))
    assert code == 2 and f"{path}, {expected}" in err and not out


def test_bad_generate_input_is_refused(llama_dir, adapter_dir, tmp_path, tiny_tokenizer, capsys):
    code, _, err = run_cli(capsys, "generate", "--model", str(llama_dir), "--max-new-tokens", "0", "the movie")
    assert code == 2 and "--max-new-tokens must be 1 or more" in err
    code, _, err = run_cli(capsys, "generate", "--model", str(llama_dir))
    assert code == 2 and "no prompts" in err

    other_base = save_tiny_model(tmp_path / "other", tiny_tokenizer, "llama", seed=5)  # the same shapes
    code, _, err = run_cli(capsys, "generate", "--model", str(other_base), "--adapter", str(adapter_dir), "the movie")
    assert code == 2 and f"was trained on {llama_dir}, not on {other_base}" in err
    code, _, err = run_cli(capsys, "eval", "--task", "generate", "--model", str(other_base), "--adapter", str(adapter_dir))
    assert code == 2 and f"was trained on {llama_dir}, not on {other_base}" in err

    bert = save_tiny_model(tmp_path / "bert", tiny_tokenizer, "bert")
    classifier = method_named("lora").make_config(task_type="SEQ_CLS", target_modules=["query", "value"],
                                                  base_model_name_or_path=str(bert))
    from transformers import BertForSequenceClassification

    get_peft_model(BertForSequenceClassification.from_pretrained(bert), classifier).save_pretrained(tmp_path / "cls")
    code, _, err = run_cli(capsys, "generate", "--adapter", str(tmp_path / "cls"), "the movie")
    assert code == 2 and "task_type=SEQ_CLS (a classifier), not a causal LM" in err
    code, _, err = run_cli(capsys, "generate", "--model", str(bert), "the movie")
    assert code == 2 and "is a BertForSequenceClassification, not a causal LM" in err
    code, _, err = run_cli(capsys, "eval", "--task", "generate", "--adapter", str(tmp_path / "cls"))
    assert code == 2 and "not a causal LM" in err
    code, _, err = run_cli(capsys, "generate", "--model", str(llama_dir), "--system", "review", "the movie")
    assert code == 2 and "has no chat template" in err


def test_chat_keeps_the_conversation_and_resets(chat_tokenizer):
    model = trained_looking(tiny_llama(seed=3))
    out = io.StringIO()
    conversation = chat(model, chat_tokenizer, Sampling(6), None, io.StringIO("the movie\ngood\n/reset\nbad\n"), out)
    # After /reset only the last exchange is kept, and it is answered as a fresh conversation would be.
    fresh = generate_texts(model, chat_tokenizer, [encode_prompt(chat_tokenizer, "bad")], Sampling(6))
    assert [m["role"] for m in conversation] == ["user", "assistant"] and conversation[0]["content"] == "bad"
    assert conversation[1]["content"] == fresh[0]
    # The second turn saw the first: it is the answer to the whole conversation so far.
    first = generate_texts(model, chat_tokenizer, [encode_prompt(chat_tokenizer, "the movie")], Sampling(6))[0]
    history = [{"role": "user", "content": "the movie"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "good"}]
    second = generate_texts(model, chat_tokenizer, [encode_prompt(chat_tokenizer, history)], Sampling(6))[0]
    assert out.getvalue().split("\n")[1:4] == [first, second, "(the conversation starts over)"]


def test_chat_ends_at_exit(chat_tokenizer):
    model = tiny_llama(seed=3)
    conversation = chat(model, chat_tokenizer, Sampling(4), None, io.StringIO("/exit\nthe movie\n"), io.StringIO())
    assert conversation == []


def test_eval_generate_scores_the_answers_it_writes(llama_dir, adapter_dir, prompt_dir, tmp_path, capsys):
    from peftlab.train.generation_metrics import generation_scores

    written = tmp_path / "answers.jsonl"
    code, out, err = run_cli(capsys, "eval", "--task", "generate", "--adapter", str(adapter_dir), "--dataset",
                             str(prompt_dir), "--max-new-tokens", "4", "--generations", str(written))
    assert code == 0, err
    scores, rows = json.loads(out), [json.loads(line) for line in written.read_text().splitlines()]
    assert scores["examples"] == len(rows) == 8 and scores["generations"] == str(written)
    assert {k: scores[k] for k in ("exact_match", "contains_answer")} == generation_scores(
        [row["generation"] for row in rows], [row["reference"] for row in rows])
    base = generation_scores([row["base_generation"] for row in rows], [row["reference"] for row in rows])
    assert scores["base_exact_match"] == base["exact_match"]
    code, _, err = run_cli(capsys, "eval", "--task", "generate", "--adapter", str(adapter_dir), "--dataset",
                           str(prompt_dir), "--generations", str(written))
    assert code == 2 and "exists; give another --generations file, or --overwrite" in err
