"""peftlab: parameter-efficient fine-tuning, correct to the papers and interoperable with HF peft."""

from peftlab.config import AdapterConfig
from peftlab.methods import METHODS, Method, MethodOption, make_method_config, register_method
from peftlab.methods.lora import LoraConfig
from peftlab.model import PeftModel, get_peft_model

__all__ = [
    "AdapterConfig", "LoraConfig", "METHODS", "Method", "MethodOption", "PeftModel", "get_peft_model",
    "make_method_config", "register_method",
]
__version__ = "0.1.0"
