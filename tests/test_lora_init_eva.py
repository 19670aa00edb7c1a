"""EVA (``init_lora_weights="eva"`` + ``initialize_lora_eva_weights``) against HF peft: from the same
batches, the same components in A, the same ranks moved between layers, the same rank and alpha
patterns, on Linear (Llama) and Conv1D (GPT-2) and for the LoRA family."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch

from method_table import METHOD_CASES
from peftlab import EvaConfig, LoraConfig, get_peft_model, initialize_lora_eva_weights
from peftlab.methods import make_method_config
from tiny_models import tiny_gpt2, tiny_llama

MODELS = {
    "llama": (lambda: tiny_llama(hidden=64), "all-linear"),
    "gpt2": (lambda: tiny_gpt2(hidden=64), ["c_attn", "c_proj", "c_fc"]),
}


def batches(count: int = 24, with_labels: bool = False) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(count):
        ids = torch.randint(3, 64, (4, 12), generator=torch.Generator().manual_seed(i))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if with_labels:
            batch["labels"] = torch.where(torch.arange(12) < 4, -100, ids)  # prompt tokens masked
        out.append(batch)
    return out


def build_pair(case_name: str, model_name: str, data, **eva):
    build, targets = MODELS[model_name]
    base = build()
    case = METHOD_CASES[case_name]
    options = dict(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="eva")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        hf = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**case.hf_fields, **options, eva_config=peft.EvaConfig(**eva)))
        peft.initialize_lora_eva_weights(hf, data, show_progress_bar=False)
        torch.manual_seed(0)
        ours = get_peft_model(copy.deepcopy(base), make_method_config(case_name, **options, eva_config=EvaConfig(**eva)))
        initialize_lora_eva_weights(ours, data, show_progress_bar=False)
    return hf, ours


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("case_name", ["lora", "dora"])
def test_eva_equals_hf(case_name, model_name):
    hf, ours = build_pair(case_name, model_name, batches())
    theirs, mine = peft.get_peft_model_state_dict(hf), ours.adapter_state_dict("default")
    assert set(mine) == set(theirs)
    for key, value in mine.items():
        torch.testing.assert_close(value, theirs[key], atol=1e-5, rtol=0, msg=key)
    for field in ("rank_pattern", "alpha_pattern"):
        assert getattr(ours.peft_config["default"], field) == getattr(hf.peft_config["default"], field)


def test_eva_moves_ranks_and_keeps_the_budget_with_label_mask():
    hf, ours = build_pair("lora", "llama", batches(with_labels=True), rho=3.0)
    config = ours.peft_config["default"]
    assert config.rank_pattern, "rho 3 on these inputs moves some rank"
    ranks = [adapter.r for _, adapter in ours.adapters_of("default")]
    assert sum(ranks) == 4 * 14  # 14 adapted layers, budget r each
    theirs = peft.get_peft_model_state_dict(hf)
    for key, value in ours.adapter_state_dict("default").items():
        torch.testing.assert_close(value, theirs[key], atol=1e-5, rtol=0, msg=key)


def test_eva_adapter_saves_and_loads_in_hf(tmp_path):
    _, ours = build_pair("lora", "llama", batches())
    with torch.no_grad():
        for _, adapter in ours.adapters_of("default"):
            adapter.lora_B.normal_(std=0.1)
    ours.save_pretrained(tmp_path)
    base = MODELS["llama"][0]()
    ids = batches(1)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(base, tmp_path)
    torch.testing.assert_close(loaded(**ids).logits, ours(**ids).logits, atol=1e-5, rtol=0)


def test_eva_rho_below_one_is_refused():
    with pytest.raises(ValueError, match="rho must be >= 1"):
        EvaConfig(rho=0.5)
    with pytest.raises(ValueError, match="rho must be >= 1"):
        LoraConfig(init_lora_weights="eva", eva_config={"rho": 0.9})


def test_eva_without_data_is_refused():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="eva", eva_config=EvaConfig()))
    with pytest.raises(ValueError, match="EVA needs data.*dataloader"):
        initialize_lora_eva_weights(model)
    with pytest.raises(ValueError, match="EVA needs data.*empty"):
        initialize_lora_eva_weights(model, [])


def test_eva_init_on_another_init_is_refused():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="needs init_lora_weights='eva'"):
        initialize_lora_eva_weights(model, batches(2))


def test_whitening_divides_each_layer_once():
    """The paper whitens each layer's components once; HF divides a group sharing one input (q, k, v) in
    place once per member, so there it compounds. Layers with an input of their own agree with HF."""
    data = batches()
    hf, ours = build_pair("lora", "llama", data, whiten=True)
    _, plain = build_pair("lora", "llama", data)
    theirs = peft.get_peft_model_state_dict(hf)
    for path, adapter in ours.adapters_of("default"):
        key = f"base_model.model.{path}.lora_A.weight"
        if path.endswith(("o_proj", "down_proj")):
            torch.testing.assert_close(adapter.lora_A.data, theirs[key], atol=1e-5, rtol=0)
        unwhitened = dict(plain.adapters_of("default"))[path].lora_A.data
        ratio = unwhitened / adapter.lora_A.data  # sqrt of each component's singular value, the same along a row
        torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio), atol=1e-4, rtol=1e-4)


def test_eva_on_a_4bit_base_fills_a_with_the_quantized_models_input_components():
    """QLoRA + EVA: the components come from the inputs the 4-bit model gives its layers."""
    from peftlab.quant import quantize_model

    base = quantize_model(MODELS["llama"][0]())
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["down_proj"], init_lora_weights="eva", eva_config=EvaConfig(rho=1.0)))
    initialize_lora_eva_weights(model, batches(8), show_progress_bar=False)
    for _, adapter in model.adapters_of("default"):
        a = adapter.lora_A.data
        assert a.shape[0] == 4 and not adapter.lora_B.any()
        torch.testing.assert_close(a @ a.T, torch.eye(4), atol=1e-4, rtol=0)  # orthonormal principal directions


def test_eva_on_a_layer_that_sees_one_vector_per_sequence_takes_its_rows():
    """BERT's pooler gets the first token's state, [batch, hidden]: each row is one sample (HF indexes it as
    tokens and fails; `peftlab study init` met it on MiniLM, whose default targets include the pooler's dense)."""
    from tiny_models import tiny_bert_seq_cls

    model = get_peft_model(tiny_bert_seq_cls(), LoraConfig(r=2, target_modules=["query", "dense"], init_lora_weights="eva",
                                                           eva_config=EvaConfig(rho=1.0)))
    pooler = dict(model.adapted_layers())["bert.pooler.dense"]
    data = batches(count=8)
    states = []
    handle = pooler.register_forward_hook(lambda module, args, output: states.append(args[0]))
    with torch.no_grad():
        for batch in data:
            model(**batch)
    handle.remove()
    initialize_lora_eva_weights(model, data, show_progress_bar=False)
    a = pooler.adapters["default"].lora_A
    # A's rows lie in the top principal subspace of the pooler's inputs (one per sequence); the incremental
    # PCA stops once its components settle, so up to a few percent (a random direction: ~0.35 of its norm)
    centred = torch.cat(states) - torch.cat(states).mean(0)
    top = torch.linalg.svd(centred, full_matrices=False).Vh[: a.shape[0]]
    inside = (a.detach() @ top.T).norm(dim=1) / a.detach().norm(dim=1)
    assert inside.min() > 0.95, inside
