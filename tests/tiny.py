"""Tiny random models that the tests build themselves: a transformers Llama and the same
weights written as a GGUF file the way llama.cpp's converter writes them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_level_vocab(n_merges: int = 40) -> tuple[list[str], list[str], list[int]]:
    """Specials, the 256 byte-level symbols, and a few merges of common English pairs."""
    from pellucid.text.tokenizer import _byte_decoder

    byte_syms = sorted(_byte_decoder(), key=lambda c: _byte_decoder()[c])
    tokens = list(SPECIALS) + byte_syms
    merges = []
    for pair in ["Ġ t", "h e", "Ġt he", "i n", "e r", "a n", "Ġ a", "o n", "r e", "e n", "Ġ s", "Ġ c", "o r", "e s"][:n_merges]:
        a, b = pair.split(" ")
        if a + b not in tokens:
            tokens.append(a + b)
            merges.append(pair)
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    return tokens, merges, types


def tiny_hf_llama(seed: int = 0, *, vocab: int | None = None, layers: int = 2, d_model: int = 64, heads: int = 4,
                  kv_heads: int = 2, d_ff: int = 128, tied: bool = True, rope_theta: float = 10_000.0):  # fmt: skip
    from transformers import LlamaConfig, LlamaForCausalLM

    tokens, _, _ = byte_level_vocab()
    cfg = LlamaConfig(
        vocab_size=vocab or len(tokens), hidden_size=d_model, intermediate_size=d_ff, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
        rms_norm_eps=1e-5, rope_theta=rope_theta, tie_word_embeddings=tied, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger-than-default weights so that differences show
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    return model


def _permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter: rotate-half rows -> interleaved pairs."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model, path: Path, *, qtype: str = "F32", arch: str = "llama", template: str | None = CHATML,
                     extra_meta: dict | None = None) -> Path:  # fmt: skip
    """Write a transformers Llama as a llama.cpp-style GGUF file (tokenizer included)."""
    import gguf

    cfg = model.config
    tokens, merges, types = byte_level_vocab()
    assert cfg.vocab_size == len(tokens), (cfg.vocab_size, len(tokens))
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta if hasattr(cfg, "rope_theta") else cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    if template:
        w.add_chat_template(template)
    for k, v in (extra_meta or {}).items():
        w.add_string(k, v)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_layer = {
        "input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }  # fmt: skip
    for i in range(cfg.num_hidden_layers):
        for a, b in per_layer.items():
            names[f"model.layers.{i}.{a}"] = f"blk.{i}.{b}"
    for hf_name, arr in sd.items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if hf_name.endswith("q_proj.weight"):
            arr = _permute(arr, cfg.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            arr = _permute(arr, cfg.num_key_value_heads)
        t = gguf.GGMLQuantizationType[qtype] if arr.ndim == 2 else gguf.GGMLQuantizationType.F32
        data = gguf.quants.quantize(arr.astype(np.float32), t) if t != gguf.GGMLQuantizationType.F32 else arr.astype(np.float32)
        w.add_tensor(names[hf_name], data, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def greedy(engine, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Run `prompts` together through an Engine, greedy, n tokens each (EOS ignored)."""
    from pellucid.sampling.params import SamplingParams

    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    reqs = [engine.add_request(engine.make_request(p, params)) for p in prompts]
    while not all(r.finished for r in reqs):
        engine.step()
    return [r.output_ids for r in reqs]


def byte_tokenizer():
    """An llguidance tokenizer whose tokens are the 256 bytes and an end token."""
    import llguidance as llg

    class Bytes:
        eos_token_id, bos_token_id, special_token_ids = 256, None, [256]
        tokens = [bytes([i]) for i in range(256)] + [b"<eos>"]

        def __call__(self, s):
            return list(s.encode() if isinstance(s, str) else s)

    return llg.LLTokenizer(llg.TokenizerWrapper(Bytes()))
