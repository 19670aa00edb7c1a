"""The initialisations in the training engine: ``peftlab train --method-option init_lora_weights=...``.

LoftQ there runs on the full-precision model and the base is then stored in NF4 without double
quantization, which holds LoftQ's codes exactly; evaluation reloads it the same way.
"""

from __future__ import annotations

import argparse

import torch
from tiny_models import tiny_batch
from train_fixtures import bert_dir, llama_dir, prompt_dir, sentiment_dir, tiny_options  # noqa: F401 (fixtures)

import pytest
from peftlab.assets import load_model_and_tokenizer
from peftlab.methods.lora_init.loftq import loftq_factors
from peftlab.quant import Linear4bit
from peftlab.train.build import build_model, load_trained, save_trained
from peftlab.train.options import OptionsError, add_train_arguments, options_from_args


def _options(llama_dir, prompt_dir, tmp_path, **changes):
    return tiny_options(llama_dir, prompt_dir, tmp_path / "out", task="causal-lm", **changes).with_method_defaults()


def test_qlora_with_loftq_stores_loftqs_codes_and_reloads_them(llama_dir, prompt_dir, tmp_path):
    options = _options(llama_dir, prompt_dir, tmp_path, method="qlora", r=4, lora_alpha=4,
                       method_options={"init_lora_weights": "loftq"})
    model, tokenizer, options = build_model(options, None)
    original, _ = load_model_and_tokenizer(str(llama_dir), "causal-lm")
    layers = dict(model.adapted_layers())
    assert layers and all(isinstance(layer.base_layer, Linear4bit) for layer in layers.values())
    for path, layer in layers.items():
        assert not layer.base_layer.double_quant
        dequantized, low, high = loftq_factors(original.get_submodule(path).weight.float(), 4, 1)
        assert torch.equal(layer.view.weight(torch.float32), dequantized)
        torch.testing.assert_close(layer.adapters["default"].delta_weight(layer.view), low @ high, atol=1e-6, rtol=0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.01 * torch.randn_like(param))
    batch = tiny_batch(model)
    expected = model(**batch).logits
    save_trained(model, tokenizer, tmp_path / "out")
    reloaded, _ = load_trained(str(llama_dir), str(tmp_path / "out"), "causal-lm", quantization="nf4")
    assert all(isinstance(layer.base_layer, Linear4bit) for _, layer in reloaded.adapted_layers())
    torch.testing.assert_close(reloaded(**batch).logits, expected, atol=1e-5, rtol=0)


def test_loftq_without_a_quantized_base_is_refused(llama_dir, prompt_dir, tmp_path):
    options = _options(llama_dir, prompt_dir, tmp_path, method="lora", method_options={"init_lora_weights": "loftq"})
    with pytest.raises(OptionsError, match="loftq fits the adapter to the error of a 4-bit base.*--method qlora"):
        build_model(options, None)


@pytest.mark.parametrize("init", ["pissa", "olora", "orthogonal"])
def test_an_init_from_the_command_line_reaches_the_adapter(llama_dir, prompt_dir, tmp_path, init):
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    options = options_from_args(parser.parse_args([
        "--model", str(llama_dir), "--dataset", str(prompt_dir), "--task", "causal-lm", "--out", str(tmp_path / "out"),
        "--max-length", "16", "--method", "lora", "--method-option", f"init_lora_weights={init}",
    ]))
    assert options.method_options == {"init_lora_weights": init}
    model, _, _ = build_model(options.with_method_defaults(), None)
    assert model.peft_config["default"].init_lora_weights == init
    assert any(layer.adapters["default"].lora_B.abs().sum() > 0 for _, layer in model.adapted_layers())


def test_export_of_a_pissa_run_is_for_the_original_base(llama_dir, prompt_dir, tmp_path):
    """`peftlab export --to lora` reloads the adapter on the original base, where PiSSA runs again and
    keeps its initial factors: the export is the rank-2r LoRA that reproduces the run on that base."""
    import copy
    import warnings

    import peft

    from peftlab.cli import main
    from tiny_models import perturb

    options = _options(llama_dir, prompt_dir, tmp_path, method="lora", method_options={"init_lora_weights": "pissa"})
    model, tokenizer, _ = build_model(options, None)
    perturb(model)
    batch = tiny_batch(model)
    expected = model(**batch).logits
    save_trained(model, tokenizer, tmp_path / "out")
    assert main(["export", "--to", "lora", "--adapter", str(tmp_path / "out"), "--out", str(tmp_path / "lora")]) == 0
    original, _ = load_model_and_tokenizer(str(llama_dir), "causal-lm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        served = peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "lora")
    torch.testing.assert_close(served(**batch).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["vera", "mora"])
def test_an_init_on_a_method_without_it_names_the_methods_with_it(llama_dir, prompt_dir, tmp_path, method):
    options = tiny_options(llama_dir, prompt_dir, tmp_path / "out", task="causal-lm", lora_dropout=None, method=method,
                           method_options={"init_lora_weights": "pissa"}).with_method_defaults()
    with pytest.raises(OptionsError, match=f"method '{method}' does not take.*init_lora_weights.*run on lora, rslora, dora, qlora"):
        build_model(options, None)


@pytest.mark.parametrize("init", ["eva", "corda"])
def test_data_driven_inits_draw_from_the_runs_data(llama_dir, prompt_dir, tmp_path, init, capsys):
    """EVA and CorDA in `peftlab train`: batches of the run's training set, a progress line, the cost in
    metrics.json, and the trained adapter reloads to the same logits."""
    from peftlab.train.loop import run_training

    options = tiny_options(llama_dir, prompt_dir, tmp_path / "out", task="causal-lm", method="lora", r=4, max_steps=2,
                           method_options={"init_lora_weights": init})
    metrics = run_training(options)
    assert metrics["init_time_s"] > 0
    assert ("EVA" if init == "eva" else "CorDA") in capsys.readouterr().err



@pytest.mark.parametrize("init", ["eva", "corda", "pissa_niter_2", "olora"])
def test_a_runs_adapter_reloads_to_the_trained_model(llama_dir, prompt_dir, tmp_path, init):
    """CorDA and the randomized PiSSA cannot run again on reload: the run saves them as the rank-2r LoRA
    of the original base; EVA and OLoRA are saved as HF writes them."""
    from peftlab.train.build import load_datasets, make_collator
    from peftlab.train.data_init import DataDrivenInit
    from tiny_models import perturb

    options = _options(llama_dir, prompt_dir, tmp_path, method="lora", r=4, method_options={"init_lora_weights": init})
    train, _ = load_datasets(options)
    init_data = DataDrivenInit(train, lambda tokenizer: make_collator(options, tokenizer), options.batch_size, options.seed)
    model, tokenizer, _ = build_model(options, None, None, init_data)
    perturb(model)
    batch = tiny_batch(model)
    expected = model(**batch).logits
    save_trained(model, tokenizer, tmp_path / "out")
    reloaded, _ = load_trained(str(llama_dir), str(tmp_path / "out"), "causal-lm")
    converted = init in ("corda", "pissa_niter_2")
    assert reloaded.peft_config["default"].init_lora_weights == (True if converted else init)
    assert (tmp_path / "out" / "initial_adapter").is_dir() == converted
    torch.testing.assert_close(reloaded(**batch).logits, expected, atol=1e-5, rtol=0)


def test_data_driven_init_without_data_is_refused(llama_dir, prompt_dir, tmp_path):
    options = _options(llama_dir, prompt_dir, tmp_path, method_options={"init_lora_weights": "eva"})
    with pytest.raises(ValueError, match="init_lora_weights='eva' starts from the layers' inputs on sample data"):
        build_model(options, None)


def test_the_labs_latency_measure_loads_a_loftq_run_as_training_left_it(bert_dir, sentiment_dir, tmp_path):
    """The lab measures a finished run's latency on its saved adapter; a LoftQ adapter goes on the
    full-precision base, which it quantizes itself (on an already quantized base LoftQ is refused:
    `peftlab study init` met it on MiniLM)."""
    from peftlab.lab.measure import measure_inference
    from peftlab.train.build import load_datasets

    options = tiny_options(bert_dir, sentiment_dir, tmp_path / "out", method="qlora", r=4, lora_alpha=4,
                           method_options={"init_lora_weights": "loftq"}).with_method_defaults()
    model, tokenizer, options = build_model(options, 2)
    save_trained(model, tokenizer, tmp_path / "out")
    _, eval_data = load_datasets(options)
    latency, base_bytes = measure_inference(options, 2, [eval_data[i] for i in range(2)], torch.device("cpu"))
    assert latency.base > 0 and latency.adapter > 0 and base_bytes > 0
