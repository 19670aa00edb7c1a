"""peftlab: parameter-efficient fine-tuning, correct to the papers and interoperable with HF peft."""

from peftlab.config import AdapterConfig
from peftlab.hf_compat import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
    PeftConfig,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    PeftType,
    TaskType,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    prepare_model_for_kbit_training,
    set_peft_model_state_dict,
)
from peftlab.methods import METHODS, Method, MethodOption, make_method_config, register_method
from peftlab.methods.lora import LoraConfig
from peftlab.methods.lora_init.corda import CordaConfig, preprocess_corda
from peftlab.methods.lora_init.eva import EvaConfig, get_eva_state_dict, initialize_lora_eva_weights
from peftlab.methods.lora_init.loftq import LoftQConfig
from peftlab.model import PeftModel, get_peft_model

# The configs of every method, under HF peft's names where HF has the method, and HF's tuner classes.
from peftlab.api_guard import hf_tuner_class
from peftlab.methods.adalora import AdaLoraConfig
from peftlab.methods.delta_lora import DeltaLoraConfig
from peftlab.methods.dora_rank import DoraRankConfig
from peftlab.methods.dylora import DyLoraConfig
from peftlab.methods.longlora import LongLoraConfig
from peftlab.methods.lora_fa import LoraFaConfig
from peftlab.methods.mora import MoraConfig
from peftlab.methods.vera import VeraConfig

LoraModel = hf_tuner_class("LoraModel", "LoraConfig")
AdaLoraModel = hf_tuner_class("AdaLoraModel", "AdaLoraConfig")
VeraModel = hf_tuner_class("VeraModel", "VeraConfig")

__all__ = [
    "AdaLoraConfig", "AdaLoraModel", "DeltaLoraConfig", "DoraRankConfig", "DyLoraConfig", "LongLoraConfig",
    "LoraFaConfig", "LoraModel", "MoraConfig", "VeraConfig", "VeraModel",
    "AdapterConfig", "AutoPeftModel", "AutoPeftModelForCausalLM", "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering", "AutoPeftModelForSeq2SeqLM", "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification", "CordaConfig", "EvaConfig", "LoftQConfig", "LoraConfig", "METHODS", "Method", "MethodOption", "PeftConfig", "PeftModel",
    "PeftModelForCausalLM", "PeftModelForFeatureExtraction", "PeftModelForQuestionAnswering", "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification", "PeftModelForTokenClassification", "PeftType", "TaskType",
    "get_eva_state_dict", "get_peft_model", "get_peft_model_state_dict", "initialize_lora_eva_weights", "preprocess_corda", "inject_adapter_in_model", "make_method_config",
    "prepare_model_for_kbit_training", "register_method", "set_peft_model_state_dict",
]
__version__ = "0.1.0"
