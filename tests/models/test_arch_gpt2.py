"""GPT-2 from a llama.cpp-style GGUF file (fused attn_qkv, transposed Conv1D weights) and
its learned-position limit."""

from __future__ import annotations

import pytest
import torch
from tiny_hf import save_hf, tiny_gpt2, write_gpt2_gguf

from pellucid.api import LLM
from pellucid.errors import PellucidError
from pellucid.loading import load_model


@pytest.fixture(scope="module")
def gguf_pair(tmp_path_factory):
    hf = tiny_gpt2(seed=21)
    folder = tmp_path_factory.mktemp("gpt2-gguf")
    return hf, write_gpt2_gguf(hf, folder / "tiny-gpt2.gguf")


def test_gguf_logits_match_transformers(gguf_pair):
    hf, path = gguf_pair
    lm = load_model(path, dtype="float32")
    assert lm.format == "gguf" and lm.config.arch == "gpt2"
    assert lm.storage["blocks.0.attn.q_proj.weight"] == "F32"
    assert lm.stored_shapes["blocks.0.attn.k_proj.weight"] == (3 * 64, 64)  # stored fused
    x = torch.randint(0, hf.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (lm.model(x) - hf(x).logits).abs().max() < 1e-4


def test_gguf_layout_is_llama_cpps(gguf_pair):
    """transformers' own GGUF reader (which follows llama.cpp's layout) reads the test file
    back into the same model: the writer above is a faithful stand-in for the converter."""
    from transformers import AutoModelForCausalLM

    hf, path = gguf_pair
    # its GGUF config mapping reads context_length into n_ctx only, so n_positions is given
    back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                n_positions=hf.config.n_positions).eval()  # fmt: skip
    x = torch.tensor([[3, 40, 50, 60, 70]])
    with torch.no_grad():
        assert (back(x).logits - hf(x).logits).abs().max() < 1e-4


def test_gguf_tokenizer_round_trip(gguf_pair):
    _, path = gguf_pair
    tok = load_model(path, dtype="float32").tokenizer
    text = "the cat sat there, in the end.\n  then: 42!"
    assert tok.decode(tok.encode(text)) == text
    assert tok.add_bos is False


def test_context_limited_by_learned_positions(tmp_path):
    hf = tiny_gpt2(seed=22, positions=32)
    lm = load_model(save_hf(hf, tmp_path / "g"), dtype="float32", max_len=1000)
    assert lm.model.max_len == 32
    llm = LLM(loaded=lm, max_len=1000)
    assert llm.engine.max_len == 32
    with pytest.raises(PellucidError):
        llm.generate(list(range(3, 23)), max_tokens=20)
    out = llm.generate(list(range(3, 23)), temperature=0, max_tokens=12, ignore_eos=True)
    assert len(out.token_ids) == 12
