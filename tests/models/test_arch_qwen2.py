"""Qwen2 from a llama.cpp-style GGUF file (Q/K biases, no Q/K row permutation)."""

from __future__ import annotations

import torch
from tiny_hf import tiny_qwen2, write_qwen2_gguf

from pellucid.loading import load_model


def test_qwen2_gguf_logits_match_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    hf = tiny_qwen2(seed=31)
    path = write_qwen2_gguf(hf, tmp_path / "tiny-qwen2.gguf")
    lm = load_model(path, dtype="float32")
    assert lm.config.arch == "qwen2" and lm.config.rope_base == 50_000.0
    assert lm.storage["blocks.1.attn.k_proj.bias"] == "F32"
    x = torch.randint(0, hf.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (lm.model(x) - hf(x).logits).abs().max() < 1e-4
        # transformers' own GGUF reader agrees that this is llama.cpp's layout
        back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
        assert (back(x).logits - hf(x).logits).abs().max() < 1e-4
