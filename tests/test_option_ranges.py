"""Issue 26, class 2: a numeric option whose value means nothing is refused the same way from a flag,
a YAML file and Python; an option the chosen method lacks (full fine-tuning has none) is refused; an
option given twice with different values is refused; --max-length must leave room for text."""

from __future__ import annotations

import argparse

import pytest
from train_fixtures import bert_dir, sentiment_dir, tiny_options  # noqa: F401

from peftlab.lab.sweep import plan_runs
from peftlab.train.build import build_model
from peftlab.train.option_ranges import OPTION_RANGES
from peftlab.train.options import OptionsError, TrainOptions, add_train_arguments, options_from_args

MEANINGLESS = [("max_grad_norm", -1.0, "max_grad_norm must be >= 0"), ("weight_decay", -0.1, "weight_decay must be >= 0"),
               ("momentum", 1.0, r"momentum must be in \[0, 1\)"), ("momentum", -0.5, r"momentum must be in \[0, 1\)"),
               ("lr", 0.0, "lr must be positive"), ("max_length", 0, "max_length must be positive")]


def parse(argv: list[str]) -> TrainOptions:
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return options_from_args(parser.parse_args(argv))


@pytest.mark.parametrize("name, value, message", MEANINGLESS)
def test_a_meaningless_value_is_refused_from_python_yaml_and_flags(name, value, message, tmp_path):
    with pytest.raises(OptionsError, match=message):
        TrainOptions(**{name: value})
    config = tmp_path / "run.yaml"
    config.write_text(f"{name}: {value}\n")
    with pytest.raises(OptionsError, match=message):
        parse(["--config", str(config)])
    with pytest.raises(OptionsError, match=message):
        parse([f"--{name.replace('_', '-')}", str(value)])


def test_every_value_in_range_is_accepted():
    TrainOptions(max_grad_norm=0.0, weight_decay=0.0, momentum=0.0, warmup_ratio=0.0)  # the edges that mean something
    assert all(name in TrainOptions.__dataclass_fields__ for name in OPTION_RANGES)  # no stale entries in the table


@pytest.mark.parametrize("argv", [["--r", "8"], ["--target-modules", "query"], ["--method-option", "use_rslora=true"]])
def test_full_fine_tuning_refuses_adapter_options(argv):
    with pytest.raises(OptionsError, match=f"method 'full' has no option"):
        parse(["--method", "full", *argv]).with_method_defaults()


def test_a_comparison_still_gives_its_shared_adapter_options_to_the_adapters_only():
    shared = {k: v for k, v in TrainOptions(r=4).to_dict().items() if k not in ("method", "out", "resume", "run_name")}
    full, lora = plan_runs(shared, ["full", "lora"])
    assert "r" not in full.options and lora.options["r"] == 4


@pytest.mark.parametrize("argv, message", [
    (["--r", "4", "--r", "8"], "--r is given twice with different values (4 and 8)"),
    (["--bf16", "--no-bf16"], "--bf16/--no-bf16 is given twice with different values"),
    (["--method-option", "use_rslora=true", "--method-option", "use_rslora=false"], "use_rslora is given twice"),
])
def test_a_flag_given_twice_with_different_values_is_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert parse(["--r", "4", "--r", "4", "--bf16", "--bf16"]).r == 4  # the same value twice is harmless


@pytest.mark.parametrize("text", ["lr: 1.0e-3\nlr: 1.0e-2\n", "lora_alpha: 16\nlora-alpha: 32\n"])
def test_a_config_key_given_twice_with_different_values_is_refused(text, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    with pytest.raises(OptionsError, match="given twice"):
        parse(["--config", str(config)])


@pytest.mark.parametrize("method", ["lora", "full"])
def test_max_length_must_leave_room_for_text(method, bert_dir, sentiment_dir, tmp_path):  # noqa: F811
    # The tiny tokenizer prepends [BOS]: --max-length 1 would hold nothing else.
    options = tiny_options(bert_dir, sentiment_dir, tmp_path, method=method, max_length=1).with_method_defaults()
    with pytest.raises(OptionsError, match="--max-length 1 leaves no room for text: the tokenizer adds 1 special token"):
        build_model(options, 2)
    build_model(tiny_options(bert_dir, sentiment_dir, tmp_path, method=method, max_length=2).with_method_defaults(), 2)
