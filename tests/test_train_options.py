"""TrainOptions: one dataclass behind the flags and the YAML file; defaults per method; clear errors."""

from __future__ import annotations

import argparse

import pytest

from peftlab.methods import METHODS
from peftlab.train.options import (
    OptionsError,
    TrainOptions,
    add_train_arguments,
    default_target_modules,
    method_defaults,
    options_from_args,
)


def parse(argv: list[str]) -> TrainOptions:
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return options_from_args(parser.parse_args(argv))


def test_every_field_has_a_flag_with_help():
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    flags = {a.dest: a for a in parser._actions}
    for name in TrainOptions.__dataclass_fields__:
        assert name in flags and flags[name].help, name
    for flag in ["--model", "--task", "--dataset", "--data-dir", "--method", "--out", "--epochs", "--max-steps",
                 "--max-train-samples", "--batch-size", "--grad-accum", "--lr", "--scheduler", "--warmup-ratio",
                 "--max-length", "--seed", "--config", "--r", "--lora-alpha", "--lora-dropout", "--target-modules"]:
        assert flag in parser._option_string_actions, flag


def test_flags_are_typed():
    options = parse(["--lr", "2e-4", "--epochs", "3", "--target-modules", "query,value", "--bf16",
                     "--method-option", "use_rslora=true", "--method-option", "r=4"])
    assert options.lr == 2e-4 and options.epochs == 3 and options.bf16 is True
    assert options.target_modules == ["query", "value"]
    assert options.method_options == {"use_rslora": True} and options.r == 4  # a named option goes to its field


def test_flags_override_the_config_file(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("method: dora\nlr: 1e-3\nepochs: 2\nlora-alpha: 32\nmethod_options: {use_rslora: true}\n")
    options = parse(["--config", str(config), "--epochs", "5", "--method-option", "r=4"])
    assert (options.method, options.lr, options.epochs, options.lora_alpha) == ("dora", 1e-3, 5, 32.0)
    assert options.method_options == {"use_rslora": True} and options.r == 4


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--method-option", "r=4", "--r", "16"], "r is given twice: --r 16 and --method-option r=4; keep one."),
        (["--target-modules", "query", "--method-option", "target_modules=[value]"], "target_modules is given twice"),
        (["--method-option", "lr=0.1"], "lr is a run option, not a method option: give it as --lr 0.1."),
    ],
)
def test_an_option_given_as_a_flag_and_a_method_option_is_refused(argv, message):
    with pytest.raises(OptionsError) as caught:
        parse(argv)
    assert message in str(caught.value)


def test_a_misspelled_config_key_names_the_closest_one(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("learning_rat: 0.001\n")
    with pytest.raises(OptionsError, match="unknown key 'learning_rat'"):
        parse(["--config", str(config)])
    config.write_text("lora_alpah: 16\n")
    with pytest.raises(OptionsError, match="Did you mean 'lora_alpha'"):
        parse(["--config", str(config)])


@pytest.mark.parametrize(
    "line, message",
    [
        ("epochs: two", "option 'epochs' must be an integer, got 'two'"),
        ("lr: fast", "option 'lr' must be a number"),
        ("bf16: 1", "option 'bf16' must be true or false"),
        ("batch_size: 3.5", "option 'batch_size' must be an integer"),
        ("target_modules: {query: 1}", "option 'target_modules' must be a list of names"),
        ("scheduler: step", "option 'scheduler' must be one of constant, linear, cosine"),
    ],
)
def test_a_config_value_of_the_wrong_type_is_a_clear_error(tmp_path, line, message):
    config = tmp_path / "run.yaml"
    config.write_text(line + "\n")
    with pytest.raises(OptionsError, match=message):
        parse(["--config", str(config)])


def test_a_bad_yaml_file_is_a_clear_error(tmp_path):
    with pytest.raises(OptionsError, match="cannot read config file"):
        parse(["--config", str(tmp_path / "missing.yaml")])
    config = tmp_path / "list.yaml"
    config.write_text("- lr\n")
    with pytest.raises(OptionsError, match="must be a mapping"):
        parse(["--config", str(config)])


def test_ranges_are_checked():
    with pytest.raises(OptionsError, match="batch_size must be positive"):
        TrainOptions(batch_size=0)
    with pytest.raises(OptionsError, match="warmup_ratio"):
        TrainOptions(warmup_ratio=1.5)


def test_method_defaults():
    lora = TrainOptions(method="lora").with_method_defaults()
    full = TrainOptions(method="full").with_method_defaults()
    assert lora.lr == method_defaults("lora")["lr"] == 1e-3 and lora.r == 8
    assert full.lr == method_defaults("full")["lr"] and full.r is None and full.lr < lora.lr / 10
    assert TrainOptions(method="dora", lr=5e-4).with_method_defaults().lr == 5e-4  # given values win
    qlora = TrainOptions(method="qlora").with_method_defaults()
    assert (qlora.method, qlora.quantization, qlora.r) == ("qlora", "nf4", 8)
    assert TrainOptions(method="dora", quantize="nf4").quantization == "nf4"


def test_unknown_method_lists_the_registered_ones():
    available = ", ".join(sorted([*METHODS, "full"]))  # every registered method, whichever exist
    assert {"dora", "lora", "qlora", "rslora"} <= set(METHODS)
    with pytest.raises(OptionsError, match=rf"unknown method 'lorra'; available methods: {available}\. Did you mean 'lora'"):
        TrainOptions(method="lorra").with_method_defaults()
    with pytest.raises(OptionsError, match="--quantize needs an adapter method"):
        TrainOptions(method="full", quantize="nf4").with_method_defaults()


def test_default_targets_by_model_family():
    assert default_target_modules("bert") == ["query", "key", "value", "dense"]
    assert default_target_modules("llama") == "all-linear"
    assert default_target_modules("gpt2") == ["c_attn"]
    assert default_target_modules("something-new") == "all-linear"
    assert TrainOptions(target_modules="all-linear").target_modules == "all-linear"
