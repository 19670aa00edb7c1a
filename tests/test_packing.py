"""Padding-free packing: a packed batch (packed on its own, or sequences of the whole data set
packed before batching) has exactly the loss and gradients of the same rows padded (fp32, 1e-5),
on tiny Llama and Qwen2 models; the data-set packer keeps every token once, never splits a row,
fills bins as TRL's best-fit decreasing does, and is deterministic; a model whose attention mixes
packed examples is refused by name."""

from __future__ import annotations

import random

import pytest
import torch
import transformers
from chat_fixtures import chat_tokenizer
from tiny_models import tiny_llama

from peftlab import LoraConfig, get_peft_model
from peftlab.data import CausalLMCollator, DataError
from peftlab.data.encoded import EncodedRows
from peftlab.data.packing import best_fit_bins, check_packing_is_exact, pack_dataset, pack_rows
from peftlab.train.evaluate import batch_totals, forward_totals, model_inputs, scored_logits_only


def tiny_qwen2(seed: int = 0) -> transformers.Qwen2ForCausalLM:
    config = transformers.Qwen2Config(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0, attention_dropout=0.0,
    )
    torch.manual_seed(seed)
    return transformers.Qwen2ForCausalLM(config).eval()


def rows_of_spread_lengths(count: int = 6, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    items = []
    for _ in range(count):
        length = rng.randint(3, 14)
        prompt = rng.randint(1, length - 1)
        items.append({"input_ids": [rng.randrange(4, 64) for _ in range(length)],
                      "label_mask": [False] * prompt + [True] * (length - prompt)})
    return items


def loss_and_grads(model, batch) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss as the training loop defines it: summed over label tokens, divided by their count."""
    model.zero_grad()
    totals = batch_totals("causal-lm", model(**model_inputs(batch, torch.device("cpu"))).logits, batch["labels"])
    loss = totals.loss_sum / totals.count
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2"])
@pytest.mark.parametrize("train_on_prompt", [False, True])
@pytest.mark.parametrize("where", ["batch", "dataset"])
def test_a_packed_batch_has_the_loss_and_gradients_of_the_padded_one(build, train_on_prompt, where) -> None:
    model = build()
    items = rows_of_spread_lengths()
    if train_on_prompt:
        items = [{**item, "label_mask": [True] * len(item["label_mask"])} for item in items]
    tokenizer = chat_tokenizer()
    padded = CausalLMCollator(tokenizer, max_length=24)(items)
    collator = CausalLMCollator(tokenizer, max_length=24, packing=True)
    if where == "batch":
        packed = collator(items)
    else:
        rows = EncodedRows([i["input_ids"] for i in items], [i["label_mask"] for i in items], "rows")
        sequences = pack_dataset(rows, collator.fit, 24, seed=0)
        packed = collator([sequences[i] for i in range(len(sequences))])
    assert "attention_mask" not in packed and packed["input_ids"].numel() < padded["input_ids"].numel()
    assert packed["input_ids"].shape[0] < len(items)  # several examples share a row
    loss, grads = loss_and_grads(model, padded)
    packed_loss, packed_grads = loss_and_grads(model, packed)
    assert abs(loss - packed_loss) < 1e-5
    for name, grad in grads.items():
        assert torch.allclose(grad, packed_grads[name], atol=1e-5, rtol=0), name


def rows_of_lengths(lengths: list[int]) -> EncodedRows:
    """Rows whose every token says which row it belongs to and where: (row, position)."""
    return EncodedRows([[(row, at) for at in range(n)] for row, n in enumerate(lengths)],
                       [[at % 2 == 1 for at in range(n)] for n in lengths], "rows")


def test_the_dataset_packer_keeps_every_token_once_in_order_and_never_splits_a_row() -> None:
    rng = random.Random(1)
    lengths = [int(rng.lognormvariate(3.5, 0.8)) + 1 for _ in range(300)]
    cut = 128  # rows over it are cut first, as without packing: kept whole, never split

    def fit(ids, mask):
        return ids[:cut], mask[:cut]

    packed = pack_dataset(rows_of_lengths(lengths), fit, cut, seed=0)
    assert max(packed.lengths) <= cut and packed.examples == 300
    seen = []
    for index in range(len(packed)):
        item = packed[index]
        assert sum(item["example_lengths"]) == len(item["input_ids"]) == len(item["label_mask"])
        at = 0
        for length in item["example_lengths"]:
            tokens = item["input_ids"][at : at + length]
            row = tokens[0][0]
            assert tokens == [(row, p) for p in range(min(lengths[row], cut))]  # one row, whole, in order
            assert item["label_mask"][at : at + length] == [p % 2 == 1 for p in range(length)]
            seen.append(row)
            at += length
    assert sorted(seen) == list(range(300))  # every row exactly once
    assert packed.efficiency == sum(min(n, cut) for n in lengths) / (len(packed) * cut) > 0.97


def test_the_dataset_packer_is_deterministic_for_a_seed() -> None:
    rows = rows_of_lengths([5, 3, 5, 2, 5, 3, 1, 4] * 10)

    def same(ids, mask):
        return ids, mask

    first, again, other = (pack_dataset(rows, same, 8, seed) for seed in (0, 0, 1))
    assert first == again
    chosen = first.select([2, 0])
    assert (chosen[0], chosen[1]) == (first[2], first[0]) and chosen.examples == len(first.example_lengths[2] + first.example_lengths[0])
    assert first.example_lengths == other.example_lengths  # the seed only orders rows of equal length
    assert first.input_ids != other.input_ids


def test_best_fit_bins_are_trls_best_fit_decreasing() -> None:
    datasets = pytest.importorskip("datasets")
    trl_data_utils = pytest.importorskip("trl.data_utils")
    rng = random.Random(2)
    lengths = [rng.randint(1, 40) for _ in range(200)]
    rows = datasets.Dataset.from_dict({"input_ids": [[index] * n for index, n in enumerate(lengths)]})
    theirs = trl_data_utils.pack_dataset(rows, seq_length=64, strategy="bfd")
    their_bins = []
    for sequence, sizes in zip(theirs["input_ids"], theirs["seq_lengths"]):
        starts = [sum(sizes[:k]) for k in range(len(sizes))]
        their_bins.append([sequence[s] for s in starts])
    assert best_fit_bins(lengths, 64) == their_bins


def test_best_fit_bins_choose_the_fullest_bin_that_fits() -> None:
    # 7 opens a bin (room 3), 6 another (room 4), 5 a third (room 5); 3 goes where it fits best, the room of 3
    assert best_fit_bins([7, 6, 5, 3, 4], 10) == [[0, 3], [1, 4], [2]]
    with pytest.raises(ValueError, match="longer than max_length 10; cut it first"):
        best_fit_bins([11], 10)


def test_pack_rows_restarts_positions_and_ignores_each_first_label() -> None:
    rows = [([5, 6, 7], [False, True, True]), ([8, 9], [True, True]), ([10, 11, 12, 13], [False, False, True, True])]
    batch = pack_rows(rows, max_length=6, pad_id=0)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 13, 8, 9], [5, 6, 7, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]]
    assert batch["labels"].tolist() == [[-100, -100, 12, 13, -100, 9], [-100, 6, 7, -100, -100, -100]]


def test_packing_is_refused_for_attention_that_mixes_examples() -> None:
    check_packing_is_exact(tiny_llama())
    check_packing_is_exact(tiny_qwen2())
    config = transformers.OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                    num_attention_heads=2, word_embed_proj_dim=16)
    torch.manual_seed(0)
    with pytest.raises(DataError, match="--packing: opt with attention 'sdpa' does not keep packed examples apart"):
        check_packing_is_exact(transformers.OPTForCausalLM(config))


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2"])
@pytest.mark.parametrize("packing", [False, True])
def test_logits_only_where_labels_are_give_the_full_loss_and_gradients(build, packing) -> None:
    """forward_totals runs the output layer on the label positions only: the same loss, accuracy and
    gradients as the model's full logits, padded or packed, on a LoRA model (its head frozen)."""
    model = get_peft_model(build(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; make the adapter's gradients non-trivial
            torch.nn.init.normal_(parameter, std=0.1)
    batch = CausalLMCollator(chat_tokenizer(), max_length=24, packing=packing)(rows_of_spread_lengths())
    cpu = torch.device("cpu")
    results = []
    for forward in (lambda: batch_totals("causal-lm", model(**model_inputs(batch, cpu)).logits, batch["labels"]),
                    lambda: forward_totals(model, batch, "causal-lm", cpu)):
        model.zero_grad()
        totals = forward()
        totals.loss_sum.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((totals.loss_sum.item(), totals.count, totals.correct, grads))
    (full_loss, full_count, full_correct, full_grads), (loss, count, correct, grads) = results
    assert count == full_count and correct == full_correct and abs(loss - full_loss) < 1e-5 * max(1.0, full_loss)
    for name, grad in full_grads.items():
        assert torch.allclose(grad, grads[name], atol=1e-5, rtol=0), name
    with scored_logits_only(model, batch["labels"][:, 1:] != -100) as selection:
        logits = model(**model_inputs(batch, cpu)).logits
    assert selection.applied and logits.shape == (count, 64)
