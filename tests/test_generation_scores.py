"""Scores of generated answers on crafted cases, the number-words data set (seeded, answers verified by an
independent reading back), and the error a causal-LM dataset gives without a causal --model."""

from __future__ import annotations

import pytest
from train_fixtures import bert_dir, prompt_dir  # noqa: F401

from peftlab.cli import main
from peftlab.data import load_dataset_spec
from peftlab.data.synthetic import LARGEST, TRAIN_SIZE, VALIDATION_SIZE, number_in_words, number_words_rows, split_numbers
from peftlab.train.generation_eval import held_out_questions
from peftlab.train.generation_metrics import contains_answer, exact_match, generation_scores, normalize


@pytest.mark.parametrize("generation, reference, exact, contains", [
    ("three hundred forty-seven", "three hundred forty-seven", True, True),
    ("Three hundred forty seven.", "three hundred forty-seven", True, True),   # case, hyphen, full stop
    ("  The answer:   forty-two!", "answer forty two", True, True),            # articles, spacing
    ("It is three hundred forty-seven.", "three hundred forty-seven", False, True),
    ("three hundred and forty-seven", "three hundred forty-seven", False, False),
    ("forty-seventy", "forty-seven", False, False),                            # whole words only
    ("347", "three hundred forty-seven", False, False),
    ("", "seven", False, False),
    ("anything", "", False, False),                                             # nothing to contain
    ("Café", "café", True, True),
])
def test_exact_match_and_contains_on_crafted_cases(generation, reference, exact, contains):
    assert exact_match(generation, reference) is exact
    assert contains_answer(generation, reference) is contains


def test_normalize_and_the_mean_over_a_set():
    assert normalize("The Quick, brown-fox (an) A") == "quick brown fox"
    scores = generation_scores(["one", "it is two", "tree"], ["one", "two", "three"])
    assert scores == {"exact_match": pytest.approx(1 / 3), "contains_answer": pytest.approx(2 / 3)}
    with pytest.raises(ValueError):
        generation_scores([], [])


WORD_VALUES = {word: value for value, word in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen".split())}
WORD_VALUES.update({word: 10 * tens for tens, word in enumerate("_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()) if tens > 1})


def read_back(words: str) -> int:
    """The oracle: words to a number, a reading written apart from the generator (a running total)."""
    total, current = 0, 0
    for word in words.replace("-", " ").split():
        if word == "hundred":
            current *= 100
        elif word == "thousand":
            total, current = total + current * 1000, 0
        else:
            current += WORD_VALUES[word]
    return total + current


def test_number_words_answers_read_back_to_their_numbers():
    assert [number_in_words(n) for n in (7, 15, 40, 99, 100, 347, 1000, 1205, 9999)] == [
        "seven", "fifteen", "forty", "ninety-nine", "one hundred", "three hundred forty-seven", "one thousand",
        "one thousand two hundred five", "nine thousand nine hundred ninety-nine"]
    for split in ("train", "validation"):
        for row in number_words_rows(split):
            user, assistant = row["messages"]
            number = int(user["content"].removeprefix("Write ").removesuffix(" in words."))
            assert user["role"] == "user" and assistant["role"] == "assistant"
            assert read_back(assistant["content"]) == number and 1 <= number <= LARGEST


def test_number_words_is_seeded_and_its_splits_never_share_a_number():
    train, validation = split_numbers("train"), split_numbers("validation")
    assert (len(train), len(validation)) == (TRAIN_SIZE, VALIDATION_SIZE) and not set(train) & set(validation)
    assert number_words_rows("validation") == number_words_rows("validation")
    # Through the dataset loader: the alias's validation rows are the questions eval --task generate asks.
    table_rows = number_words_rows("validation")
    loaded = load_dataset_spec("number-words", "validation", task="causal-lm")
    assert len(loaded) == VALIDATION_SIZE and loaded[0]["messages"] == table_rows[0]["messages"]
    questions = held_out_questions(loaded)
    assert questions[0].prompt == table_rows[0]["messages"][:1] and questions[0].chat
    assert questions[0].reference == table_rows[0]["messages"][1]["content"]
    with pytest.raises(ValueError, match="no question and answer to score"):  # {"text"} rows: documents
        held_out_questions([{"prompt": "", "response": "a whole document"}])


def test_a_causal_lm_dataset_without_a_causal_model_names_the_cause(bert_dir, prompt_dir, tmp_path, capsys):
    # The default --model is an encoder for classification: say so, not "the tokenizer has no EOS token".
    code = main(["train", "--task", "causal-lm", "--dataset", str(prompt_dir), "--out", str(tmp_path / "a"),
                 "--model", str(bert_dir)])
    err = capsys.readouterr().err
    assert code == 2 and "--task causal-lm needs a decoder language model" in err and "--model smollm2-135m" in err
    # Prompt/response rows without --task are causal-LM rows: the same cause named.
    code = main(["train", "--model", str(bert_dir), "--dataset", str(prompt_dir), "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 2 and "is a BertForSequenceClassification, not a causal LM" in err
    # Asked to classify them: they are causal-LM rows, not labelled text.
    with pytest.raises(ValueError, match="chat rows, which a causal LM learns: use --task causal-lm"):
        load_dataset_spec("number-words", "train", task="seq-cls")
