"""The README.md of a GGUF export folder: what the files are, how to run them, how exact they are."""

from __future__ import annotations

from peftlab.gguf_export.modelfile import chatml_default_system


def export_readme(result, tokenizer) -> str:
    files = result.files
    lora = "adapter" in files
    lines = [
        f"# GGUF export ({result.mode}, {result.dtype}) for llama.cpp and Ollama",
        "",
        "Written by `peftlab export --to gguf`.",
        "",
        "| file | what |",
        "|---|---|",
        f"| `{files['model']}` | {'the base model the adapter was trained on' if lora else 'the model with the adapter merged in'} |",
    ]
    if lora:
        lines.append(f"| `{files['adapter']}` | the adapter as a llama.cpp LoRA (one alpha = its rank: scale 1, per-module scales folded in) |")
    lines += [
        "| `Modelfile` | Ollama: `ollama create mymodel -f Modelfile`, then `ollama run mymodel` |",
        "",
        "## Run it",
        "",
        "```",
        f"llama-cli -m {files['model']}" + (f" --lora {files['adapter']}" if lora else "") + " -cnv",
        "python -c \"from llama_cpp import Llama; m = Llama(model_path='" + files["model"] + "'"
        + (f", lora_path='{files['adapter']}'" if lora else "") + "); print(m.create_chat_completion("
        "messages=[{'role': 'user', 'content': 'Hello'}])['choices'][0]['message']['content'])\"",
        "```",
        "",
        "llama.cpp's own `generate` does not stop at the end-of-turn token by itself; the chat commands and Ollama do "
        "(the Modelfile lists the stop tokens).",
    ]
    chatml, system = chatml_default_system(tokenizer)
    lines += ["", f"Chat template in the Modelfile: {'ChatML, translated to a Go template' if chatml else 'none (not ChatML)'}"
              + (f"; the Jinja template's default system prompt is the Modelfile's SYSTEM: {system!r}." if system else ".")]
    lines += ["", "## Fidelity", "", result.fidelity]
    if result.base_match is not None:
        lines += ["", f"`--base-gguf`: {result.base_match.summary()}."]
    if result.parity is not None:
        p = result.parity
        lines += [
            "", "## Parity measured in llama.cpp", "",
            f"{p['engine']} ({p['settings']}), against the trained model in peftlab (float32), on the same token ids; "
            f"tolerance: {p['tolerance']}" + (f" (relative logits {p['logits_tolerance']:.3g}, effect {p['effect_tolerance']:.3g})"
                                             if p.get("logits_tolerance") is not None else "")
            + f"; {'passed' if p['passed'] else 'FAILED'}.",
            "",
            "| measure | value |", "|---|---|",
            f"| positions compared (prompt + greedy continuation) | {p['positions']} |",
            f"| top-1 next token agreement | {p['top1_agree']}/{p['positions']} ({100 * p['top1_agreement']:.2f}%) |",
            f"| max abs logit difference | {p['max_abs_logit_diff']:.4g} |",
            f"| max relative logit difference (of the largest logit) | {p['max_relative_logit_diff']:.4g} |",
            f"| greedy generations identical | {p['generations_identical']}/{p['generations']} |",
            f"| adapter effect (with - without) relative difference | {p['effect_relative_diff']:.4g} |",
            f"| positions whose top-1 the adapter changes: peftlab / llama.cpp | {p['effect_top1_changed_peftlab']} / {p['effect_top1_changed_engine']} |",
            f"| the base alone (no adapter): top-1 agreement, max relative logit difference | "
            f"{p['base_top1_agree']}/{p['positions']} ({100 * p['base_top1_agreement']:.2f}%), {p['base_max_relative_logit_diff']:.4g} |",
            f"| prompts tokenized identically by llama.cpp and transformers | {p['tokenization_agree']}/{p['tokenization_checked']} |",
            "", "The figures are in `parity.json`.",
        ]
    return "\n".join(lines) + "\n"
