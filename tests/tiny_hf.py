"""Tiny random checkpoints written by transformers itself (GPT-2, Qwen2, Mistral, Gemma 3),
a byte-level BPE tokenizer.json for them, and GPT-2 written as a llama.cpp-style GGUF."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tiny import CHATML, SPECIALS, byte_level_vocab

VOCAB = len(byte_level_vocab()[0])


def _randomize(model, seed: int, *, norm_offset: bool = False) -> None:
    """Larger-than-default weights so that differences show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            else:  # norm weights: around 1, or around 0 where the norm adds 1 itself (Gemma)
                p.copy_(torch.rand(p.shape, generator=g) - (0.5 if norm_offset else -0.5))


def tiny_gpt2(seed: int = 0, *, layers: int = 2, d_model: int = 64, heads: int = 4, positions: int = 64):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_positions=positions, n_embd=d_model, n_layer=layers, n_head=heads,
                     attn_implementation="eager", bos_token_id=0, eos_token_id=0)  # fmt: skip
    model = GPT2LMHeadModel(cfg).eval()
    _randomize(model, seed)
    return model


def tiny_qwen2(seed: int = 0, *, tied: bool = False):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, rope_theta=50_000.0, rms_norm_eps=1e-6,
                      tie_word_embeddings=tied, attn_implementation="eager")  # fmt: skip
    model = Qwen2ForCausalLM(cfg).eval()
    _randomize(model, seed)
    return model


def tiny_mistral(seed: int = 0, *, window: int | None = 4):
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, rope_theta=20_000.0,
                        sliding_window=window, tie_word_embeddings=False, attn_implementation="eager")  # fmt: skip
    model = MistralForCausalLM(cfg).eval()
    _randomize(model, seed)
    return model


def tiny_gemma3(seed: int = 0, *, window: int = 4, layers: int = 6):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=32, max_position_embeddings=128,
                           query_pre_attn_scalar=24, sliding_window=window, rms_norm_eps=1e-6,
                           rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 100_000.0},
                                            "sliding_attention": {"rope_type": "default", "rope_theta": 1_000.0}},
                           attn_implementation="eager", bos_token_id=0, eos_token_id=2, pad_token_id=None)  # fmt: skip
    model = Gemma3ForCausalLM(cfg).eval()
    _randomize(model, seed, norm_offset=True)
    return model


def write_tokenizer(folder: Path, *, chat_template: str | None = CHATML, add_bos: bool | None = False) -> None:
    """A byte-level BPE tokenizer.json (GPT-2 style) plus tokenizer_config.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens, merges, _ = byte_level_vocab()
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ")) for m in merges]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.save(str(folder / "tokenizer.json"))
    cfg = {"bos_token": SPECIALS[0], "eos_token": SPECIALS[2]}
    if add_bos is not None:
        cfg["add_bos_token"] = add_bos
    if chat_template:
        cfg["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))


def save_hf(model, folder: Path, *, max_shard_size: str | int | None = None, **tok_kw) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kw)
    write_tokenizer(folder, **tok_kw)
    return folder


def write_gpt2_gguf(model, path: Path) -> Path:
    """A transformers GPT-2 as llama.cpp's converter writes it: Conv1D weights transposed to
    (out, in), fused attn_qkv kept fused, the head written out as output.weight."""
    import gguf

    cfg = model.config
    tokens, merges, types = byte_level_vocab()
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(cfg.n_layer)
    w.add_context_length(cfg.n_positions)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(4 * cfg.n_embd)
    w.add_head_count(cfg.n_head)
    w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    names = {"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
             "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias"}  # fmt: skip
    per_layer = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
                 "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}  # fmt: skip
    for i in range(cfg.n_layer):
        for a, b in per_layer.items():
            for s in ("weight", "bias"):
                names[f"transformer.h.{i}.{a}.{s}"] = f"blk.{i}.{b}.{s}"
    for hf_name, arr in sd.items():
        if hf_name not in names:
            continue
        if arr.ndim == 2 and hf_name.startswith("transformer.h."):
            arr = arr.T  # Conv1D (in, out) -> (out, in)
        w.add_tensor(names[hf_name], np.ascontiguousarray(arr, dtype=np.float32))
    w.add_tensor("output.weight", sd["transformer.wte.weight"].astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_qwen2_gguf(model, path: Path) -> Path:
    """A transformers Qwen2 as llama.cpp's converter writes it: Q and K rows as they are
    (rotate-half layout, no permutation), q/k/v biases as attn_{q,k,v}.bias."""
    import gguf

    cfg = model.config
    tokens, merges, types = byte_level_vocab()
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(2)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}  # fmt: skip
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}  # fmt: skip
    for i in range(cfg.num_hidden_layers):
        for a, b in per_layer.items():
            for s in ("weight", "bias"):
                names[f"model.layers.{i}.{a}.{s}"] = f"blk.{i}.{b}.{s}"
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        w.add_tensor(names[hf_name], t.detach().float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
