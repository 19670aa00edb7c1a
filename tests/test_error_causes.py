"""Issue 26, class 9: errors that used to point at the wrong cause name the real one -- a base model
that is not the adapter's base, a full fine-tuning folder given as --adapter, a hub adapter id."""

from __future__ import annotations

import pytest
from train_fixtures import bert_dir, gpt2_dir, llama_dir, sentiment_dir, tiny_options  # noqa: F401

from tiny_models import tiny_llama
from transformers import LlamaForCausalLM

from peftlab import LoraConfig, PeftModel, get_peft_model
from peftlab.cli import main
from peftlab.train.loop import run_training


@pytest.fixture(scope="module")
def adapter(bert_dir, sentiment_dir, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("run") / "adapter"
    run_training(tiny_options(bert_dir, sentiment_dir, out, max_steps=1))
    return out


def error_of(capsys, *argv: str) -> str:
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    return err.strip().splitlines()[-1]


def test_an_adapter_on_another_base_names_the_base(adapter, gpt2_dir, bert_dir, sentiment_dir, capsys):  # noqa: F811
    error = error_of(capsys, "eval", "--adapter", str(adapter), "--model", str(gpt2_dir), "--dataset", str(sentiment_dir))
    assert error.startswith(f"peftlab eval: error: the adapter in {adapter} was trained on the base model {bert_dir}, "
                            f"but it was put on {gpt2_dir}, which it does not fit (target_modules")
    assert error.endswith(f"Load it onto its own base (on the command line: drop --model, or give --model {bert_dir}).")


def test_an_adapter_on_a_base_of_another_size_names_the_base(llama_dir, tmp_path):  # noqa: F811
    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    get_peft_model(LlamaForCausalLM.from_pretrained(llama_dir), config).save_pretrained(tmp_path / "adapter")
    tiny_llama(hidden=32).save_pretrained(tmp_path / "smaller")
    with pytest.raises(ValueError, match=rf"trained on the base model {llama_dir}, but it was put on {tmp_path}/smaller"):
        PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp_path / "smaller"), tmp_path / "adapter")
    PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(llama_dir), tmp_path / "adapter")  # its own base: fine


@pytest.mark.parametrize("command", ["eval", "merge"])
def test_a_whole_model_given_as_adapter_says_so(command, bert_dir, sentiment_dir, tmp_path, capsys):  # noqa: F811
    full = tmp_path / "full"
    run_training(tiny_options(bert_dir, sentiment_dir, full, max_steps=1, method="full"))
    flags = ["--dataset", str(sentiment_dir)] if command == "eval" else ["--out", str(tmp_path / "merged")]
    assert error_of(capsys, command, "--adapter", str(full), *flags) == (
        f"peftlab {command}: error: {full} holds a whole model (config.json and its weights: a full fine-tuning run or a "
        "merged model), not an adapter: give it as the model (--model on the command line), without an adapter.")


def test_a_hub_adapter_id_says_adapters_are_local_folders(sentiment_dir, capsys):  # noqa: F811
    error = error_of(capsys, "eval", "--adapter", "someone/lora-sst2", "--dataset", str(sentiment_dir))
    assert error == ("peftlab eval: error: someone/lora-sst2: no such folder. If it is a hub id: peftlab loads adapters "
                     "from local folders only (it works offline), so fetch it where the hub is reachable "
                     "(huggingface-cli download someone/lora-sst2 --local-dir DIR) and pass DIR.")
