"""The Ollama ``Modelfile`` of an export: ``FROM`` the model, ``ADAPTER`` the LoRA, template, stops.

Ollama's templates are Go templates, not the Jinja templates of transformers, so only templates
peftlab recognises are translated: ChatML (``<|im_start|>role ... <|im_end|>``, SmolLM2, Qwen2),
recognised by rendering a probe conversation with the tokenizer's own template and comparing, so
a default system prompt the Jinja template inserts (SmolLM2's) becomes the Modelfile's ``SYSTEM``.
Any other template is left out (the GGUF still carries the Jinja one in ``tokenizer.chat_template``)
and the Modelfile says so. Stop tokens: the tokenizer's end-of-sequence and end-of-turn tokens.
"""

from __future__ import annotations

import json

CHATML_TEMPLATE = (
    "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
    "<|im_start|>assistant\n"
)
_PROBE = "PEFTLAB-PROBE"


def chatml_default_system(tokenizer) -> tuple[bool, str | None]:
    """(is the tokenizer's template ChatML, the system prompt it inserts when the chat has none)."""
    if not getattr(tokenizer, "chat_template", None):
        return False, None
    try:
        shown = tokenizer.apply_chat_template([{"role": "user", "content": _PROBE}], tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that needs other fields is not one we translate
        return False, None
    turn = f"<|im_start|>user\n{_PROBE}<|im_end|>\n<|im_start|>assistant\n"
    if shown == turn:
        return True, None
    prefix, end = "<|im_start|>system\n", "<|im_end|>\n"
    if shown.endswith(turn) and shown.startswith(prefix) and shown[: -len(turn)].endswith(end):
        return True, shown[len(prefix): -len(turn) - len(end)]
    return False, None


def stop_tokens(tokenizer) -> list[str]:
    stops = []
    for token in (tokenizer.eos_token, "<|im_end|>" if "<|im_end|>" in tokenizer.get_vocab() else None):
        if token and token not in stops:
            stops.append(token)
    return stops


def modelfile(tokenizer, files: dict[str, str]) -> str:
    lines = [f"FROM {_path(files['model'])}"]
    if "adapter" in files:
        lines.append(f"ADAPTER {_path(files['adapter'])}")
    chatml, system = chatml_default_system(tokenizer)
    if chatml:
        lines.append(f'TEMPLATE """{CHATML_TEMPLATE}"""')
        if system:
            lines.append(f"SYSTEM {json.dumps(system)}")
    else:
        lines.append("# No TEMPLATE: the tokenizer's chat template is not one peftlab translates to Go (ChatML);"
                     " Ollama reads the GGUF's tokenizer.chat_template where it knows it.")
    lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in stop_tokens(tokenizer)]
    return "\n".join(lines) + "\n"


def _path(name: str) -> str:
    return name if name.startswith("/") else f"./{name}"
