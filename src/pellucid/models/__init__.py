"""Architectures: one module each, found by the name a model file gives.

Adding an architecture is one new module plus one line here. Each module exports MODEL,
CONFIG, GGUF_NAMES, HF_NAMES, config_from_gguf(meta, arch), config_from_hf(config) and
from_gguf_tensor(name, tensor, cfg).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from pellucid.errors import PellucidError

# GGUF `general.architecture` or HF `model_type` -> module
ARCHITECTURES: dict[str, str] = {
    "llama": "pellucid.models.llama",
    "mistral": "pellucid.models.llama",
    "qwen2": "pellucid.models.qwen2",
    "gemma3": "pellucid.models.gemma3",
    "gemma3_text": "pellucid.models.gemma3",
    "gpt2": "pellucid.models.gpt2",
}

# HF `architectures[0]` -> the key above
HF_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Gemma3ForCausalLM": "gemma3_text",
    "GPT2LMHeadModel": "gpt2",
}


def architecture(name: str) -> ModuleType:
    if name not in ARCHITECTURES:
        raise PellucidError(
            f"Unsupported architecture {name!r}. Supported: {', '.join(sorted(ARCHITECTURES))}."
        )
    return importlib.import_module(ARCHITECTURES[name])
