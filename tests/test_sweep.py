"""The comparison's grid: --methods, --set and --sweep grammar, and the runs they plan (no training here)."""

from __future__ import annotations

import pytest

from peftlab.lab.sweep import (
    ATTENTION_TARGETS,
    RelativeToRank,
    SweepAxis,
    collect_overrides,
    expand_methods,
    parse_override,
    parse_sweep,
    plan_runs,
    resolve_target_modules,
    sweepable_options,
)
from peftlab.methods import METHODS
from peftlab.train.options import OptionsError, TrainOptions

SHARED = {"model": "some-bert", "max_train_samples": 100}


def bert_family(model: str) -> str:
    return "bert"


def plan(methods, *sweeps, overrides=None, shared=SHARED):
    return plan_runs(shared, methods, overrides, [parse_sweep(text) for text in sweeps], family_of=bert_family)


# -- grammar ------------------------------------------------------------------------------------------


def test_sweep_values_are_typed_numbers_words_and_rank_multiples():
    assert parse_sweep("r=2,4,8,16") == SweepAxis("r", (2, 4, 8, 16))
    assert parse_sweep("lr=1e-4, 3e-4") == SweepAxis("lr", (1e-4, 3e-4))
    assert parse_sweep("optimizer=sgd,adamw") == SweepAxis("optimizer", ("sgd", "adamw"))
    assert parse_sweep("bf16=true,false") == SweepAxis("bf16", (True, False))
    assert parse_sweep("lora_alpha=r,2r,0.5r,32") == SweepAxis(
        "lora_alpha", (RelativeToRank(1), RelativeToRank(2), RelativeToRank(0.5), 32)
    )
    assert parse_sweep("target_modules=attn,all-linear,query+value").values == ("attn", "all-linear", "query+value")


def test_sweep_accepts_dashed_names_and_drops_repeated_values():
    assert parse_sweep("lora-alpha=8,8,16") == SweepAxis("lora_alpha", (8, 16))


def test_unknown_sweep_option_is_an_error_listing_the_valid_ones():
    with pytest.raises(OptionsError) as error:
        parse_sweep("rank=2,4")
    message = str(error.value)
    assert "unknown option 'rank'" in message
    assert all(name in message for name in ("r,", "lora_alpha", "target_modules", "optimizer", "scheduler", "epochs"))


@pytest.mark.parametrize("option", ["out", "method", "resume", "device"])
def test_options_that_are_not_experiment_settings_cannot_be_swept(option):
    assert option not in sweepable_options()
    with pytest.raises(OptionsError, match="Valid options"):
        parse_sweep(f"{option}=a,b")


@pytest.mark.parametrize("text", ["r", "=2,4", "r=", "r= , "])
def test_malformed_sweep_says_what_to_write(text):
    with pytest.raises(OptionsError, match=r"OPTION=V1,V2|no values"):
        parse_sweep(text)


def test_override_grammar():
    assert parse_override("lora.lr=1e-3") == ("lora", "lr", 1e-3)
    assert parse_override("full.max-grad-norm=0.5") == ("full", "max_grad_norm", 0.5)
    assert parse_override("dora.lora_alpha=2r") == ("dora", "lora_alpha", RelativeToRank(2))
    for bad in ("lr=1e-3", "lora.lr", ".lr=1"):
        with pytest.raises(OptionsError, match="METHOD.OPTION=VALUE"):
            parse_override(bad)
    with pytest.raises(OptionsError, match="Did you mean 'lr'"):
        parse_override("lora.lrr=1")


def test_override_for_a_method_not_compared_is_an_error():
    assert collect_overrides(["lora.lr=1e-3", "lora.r=4", "full.lr=3e-5"], ["full", "lora"]) == {
        "lora": {"lr": 1e-3, "r": 4}, "full": {"lr": 3e-5},
    }
    with pytest.raises(OptionsError, match="'dora' is not among the compared methods"):
        collect_overrides(["dora.lr=1e-3"], ["full", "lora"])


def test_methods_all_and_unknown():
    everything = expand_methods("all")
    assert everything[0] == "full" and set(everything) == {"full", *METHODS}
    assert expand_methods("lora, full,lora") == ["lora", "full"]
    with pytest.raises(OptionsError) as error:
        expand_methods("full,lorra")
    assert "unknown method 'lorra'" in str(error.value)
    assert all(name in str(error.value) for name in everything)
    assert "Did you mean 'lora'" in str(error.value)


# -- the grid ------------------------------------------------------------------------------------------


def test_several_sweeps_make_a_cartesian_grid_in_order():
    runs = plan(["lora"], "r=4,8", "lora_alpha=r,2r")
    assert [run.run_name for run in runs] == [
        "lora[r=4,lora_alpha=r]", "lora[r=4,lora_alpha=2r]", "lora[r=8,lora_alpha=r]", "lora[r=8,lora_alpha=2r]",
    ]
    assert [(run.options["r"], run.options["lora_alpha"]) for run in runs] == [(4, 4), (4, 8), (8, 8), (8, 16)]
    assert runs[1].sweep == {"r": 4, "lora_alpha": "2r"}  # recorded as written, resolved in options


def test_full_fine_tuning_runs_once_when_only_adapter_options_are_swept():
    runs = plan(["full", "lora", "qlora"], "r=2,4")
    assert [run.run_name for run in runs] == ["full", "lora[r=2]", "lora[r=4]", "qlora[r=2]", "qlora[r=4]"]
    assert runs[0].sweep == {}
    both = plan(["full", "lora"], "r=2,4", "epochs=1,2")
    assert [run.run_name for run in both][:2] == ["full[epochs=1]", "full[epochs=2]"]
    assert len(both) == 2 + 4


def test_rank_multiples_use_the_method_default_rank_when_r_is_not_set():
    default_rank = TrainOptions(method="lora").with_method_defaults().r
    (run,) = plan(["lora"], "lora_alpha=2r")
    assert run.options["lora_alpha"] == 2 * default_rank


def test_options_come_from_shared_then_overrides_then_sweep():
    runs = plan(["full", "lora"], "lr=1e-4,1e-3", overrides={"lora": {"lr": 5.0, "r": 2}},
                shared={**SHARED, "epochs": 3, "lr": 7e-5})
    lora = [run for run in runs if run.method == "lora"]
    assert [run.options["lr"] for run in lora] == [1e-4, 1e-3]  # the sweep beats --set
    assert all(run.options["r"] == 2 and run.options["epochs"] == 3 for run in lora)
    assert all(run.options["method"] == run.method for run in runs)
    assert [run.options["lr"] for run in runs if run.method == "full"] == [1e-4, 1e-3]
    assert "r" not in plan(["full"], overrides={"lora": {"r": 2}})[0].options  # --set lora.* is lora's alone


def test_target_module_aliases_resolve_per_model_family():
    runs = plan(["lora"], "target_modules=attn,all-linear,query+key")
    assert [run.options["target_modules"] for run in runs] == [["query", "value"], "all-linear", ["query", "key"]]
    assert [run.sweep["target_modules"] for run in runs] == ["attn", "all-linear", "query+key"]
    assert resolve_target_modules("attn", "gpt2-large", lambda model: "gpt2") == ["c_attn"]
    assert resolve_target_modules(["attn"], "m", lambda model: "llama") == ATTENTION_TARGETS["llama"]
    with pytest.raises(OptionsError, match="no attention layers known for model family 'mamba'"):
        resolve_target_modules("attn", "m", lambda model: "mamba")


def test_family_is_read_only_when_an_alias_needs_it():
    def no_lookup(model):
        raise AssertionError("the model's config was read without need")

    runs = plan_runs(SHARED, ["lora"], None, [parse_sweep("target_modules=query+value")], family_of=no_lookup)
    assert runs[0].options["target_modules"] == ["query", "value"]


def test_invalid_values_fail_at_planning_naming_the_run():
    with pytest.raises(OptionsError, match=r"run lora\[optimizer=rmsprop\]: .*adamw, sgd"):
        plan(["lora"], "optimizer=sgd,rmsprop")
    with pytest.raises(OptionsError, match=r"run lora\[r=0\]: r must be positive"):
        plan(["lora"], "r=0")


def test_the_same_option_swept_twice_is_an_error():
    with pytest.raises(OptionsError, match="given twice"):
        plan(["lora"], "r=2", "r=4")


def test_methods_all_leaves_out_what_cannot_run_on_the_model(tmp_path):
    """--methods all plans only runs that can succeed: a method whose check_model_config refuses the
    model's family (LongLoRA on BERT: no RoPE) is left out with its reason; on a Llama it stays."""
    from transformers import BertConfig, LlamaConfig

    from peftlab.lab.sweep import methods_for_model

    bert, llama = tmp_path / "bert", tmp_path / "llama"
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(bert)
    LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(llama)
    everything = expand_methods("all")
    kept, left_out = methods_for_model(everything, str(bert))
    assert list(left_out) == ["longlora"] and "'bert'" in left_out["longlora"] and "llama" in left_out["longlora"]
    assert kept == [name for name in everything if name != "longlora"]
    assert methods_for_model(everything, str(llama)) == (everything, {})
