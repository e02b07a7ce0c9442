import subprocess
import sys

import pytest

from pellucid.errors import PellucidError
from pellucid.inspect.param_count import (
    PRESETS,
    ParamSpec,
    count_params,
    memory_bytes,
    spec_from_hf_config,
)


@pytest.mark.parametrize(
    ("name", "published"),
    [
        ("gpt2-xl", 1_557_611_200),  # HF gpt2-xl num_parameters(), head tied
        ("llama-7b", 6_738_415_616),  # LLaMA 1 7B
        ("llama-70b", 68_976_648_192),  # Llama 2 70B
        ("smollm2-135m", 134_515_008),
        ("gemma3-270m", 268_098_176),  # sum of the GGUF's tensor sizes
    ],
)
def test_presets_hit_published_counts_exactly(name, published):
    assert count_params(PRESETS[name]).total == published


def test_llama_7b_breakdown_by_hand():
    c = count_params(PRESETS["llama-7b"])
    d, ff, v, n = 4096, 11008, 32000, 32
    assert list(c.breakdown) == [
        "token_embeddings", "attn.wq", "attn.wk", "attn.wv", "attn.wo",
        "ffn.gate", "ffn.up", "ffn.down", "block_norms", "final_norm", "output",
    ]
    assert c.breakdown["token_embeddings"] == v * d == c.breakdown["output"]
    assert c.breakdown["attn.wq"] == n * d * d
    assert c.per_layer["ffn.down"] == ff * d
    assert c.per_layer["block_norms"] == 2 * d
    assert c.per_layer_total == 4 * d * d + 3 * d * ff + 2 * d
    assert c.total == 2 * v * d + n * c.per_layer_total + d


def test_gqa_shrinks_k_and_v_only():
    c = count_params(PRESETS["llama-70b"])
    assert c.per_layer["attn.wq"] == 8192 * 8192
    assert c.per_layer["attn.wk"] == c.per_layer["attn.wv"] == 8192 * 8 * 128
    assert c.per_layer["attn.wo"] == 8192 * 8192


def test_gpt2_xl_groups():
    c = count_params(PRESETS["gpt2-xl"])
    d = 1600
    assert c.breakdown["position_embeddings"] == 1024 * d
    assert "ffn.gate" not in c.breakdown
    assert c.per_layer["ffn.fc_in"] == d * 4 * d
    assert c.per_layer["attn.bias"] == 4 * d  # q, k, v and o biases
    assert c.per_layer["ffn.bias"] == 4 * d + d
    assert c.per_layer["block_norms"] == 2 * 2 * d  # LayerNorm weight + bias, twice
    assert c.breakdown["final_norm"] == 2 * d
    assert c.breakdown["output"] == 0 and c.tied_embeddings


def test_gemma3_270m_groups():
    c = count_params(PRESETS["gemma3-270m"])
    assert c.per_layer["attn.wq"] == 640 * 4 * 256
    assert c.per_layer["attn.wk"] == 640 * 256
    assert c.per_layer["attn.qk_norm"] == 2 * 256
    assert c.per_layer["block_norms"] == 4 * 640
    assert c.breakdown["output"] == 0
    # The embedding is most of this small model: 262144 * 640 of 268M.
    assert c.breakdown["token_embeddings"] / c.total == pytest.approx(0.6258, abs=1e-4)


def test_coarse_groups_sum_to_total():
    for spec in PRESETS.values():
        c = count_params(spec)
        assert sum(c.coarse().values()) == c.total
    coarse = count_params(PRESETS["smollm2-135m"]).coarse()
    assert coarse["attention"] == 30 * (2 * 576 * 576 + 2 * 576 * 192)
    assert coarse["output"] == 0


def test_memory_bytes_matches_quantization_table():
    total = PRESETS["llama-7b"]
    n = count_params(total).total
    assert memory_bytes(n, "fp32") == 4 * n
    assert memory_bytes(n, "FP16") == memory_bytes(n, "bf16") == 2 * n
    assert memory_bytes(n, "int8") == n
    assert memory_bytes(n, "int4") == n // 2
    assert memory_bytes(3, "int4") == 2  # half bytes round up
    with pytest.raises(PellucidError, match="int3"):
        memory_bytes(n, "int3")


def test_spec_validation_names_the_field():
    with pytest.raises(PellucidError, match="n_kv_heads"):
        ParamSpec(vocab_size=10, d_model=12, n_layers=1, n_heads=4, n_kv_heads=3, d_ff=8)
    with pytest.raises(PellucidError, match="head_dim"):
        ParamSpec(vocab_size=10, d_model=10, n_layers=1, n_heads=4, d_ff=8)
    with pytest.raises(PellucidError, match="norm"):
        ParamSpec(vocab_size=10, d_model=12, n_layers=1, n_heads=4, d_ff=8, norm="batch")
    with pytest.raises(PellucidError, match="model_type"):
        spec_from_hf_config({"model_type": "bert"})


def test_module_does_not_import_torch():
    code = (
        "import sys, pellucid.inspect.param_count as m; "
        "print(m.count_params(m.PRESETS['gpt2-xl']).total); "
        "assert 'torch' not in sys.modules"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1557611200"


# --- exactness against transformers on tiny random models ---------------------------------

def _tiny_configs():
    import transformers as tf

    small = dict(vocab_size=301, hidden_size=48, intermediate_size=80, num_hidden_layers=3)
    return [
        ("llama-mha-untied", tf.LlamaConfig(**small, num_attention_heads=4)),
        ("llama-gqa-tied", tf.LlamaConfig(**small, num_attention_heads=6, num_key_value_heads=2,
                                          tie_word_embeddings=True)),
        ("llama-biases", tf.LlamaConfig(**small, num_attention_heads=4, num_key_value_heads=2,
                                        attention_bias=True, mlp_bias=True)),
        ("llama-head_dim", tf.LlamaConfig(**small, num_attention_heads=4, num_key_value_heads=1,
                                          head_dim=20)),
        ("mistral", tf.MistralConfig(**small, num_attention_heads=4, num_key_value_heads=2,
                                     head_dim=16)),
        ("qwen2-untied", tf.Qwen2Config(**small, num_attention_heads=4, num_key_value_heads=2)),
        ("qwen2-tied", tf.Qwen2Config(**small, num_attention_heads=6, num_key_value_heads=3,
                                      tie_word_embeddings=True)),
        ("gemma3", tf.Gemma3TextConfig(**small, num_attention_heads=4, num_key_value_heads=1,
                                       head_dim=32)),
        ("gemma3-untied-bias", tf.Gemma3TextConfig(**small, num_attention_heads=2,
                                                   num_key_value_heads=2, head_dim=24,
                                                   tie_word_embeddings=False,
                                                   attention_bias=True)),
        ("gpt2", tf.GPT2Config(vocab_size=301, n_embd=48, n_layer=3, n_head=4, n_positions=64)),
        ("gpt2-n_inner-untied", tf.GPT2Config(vocab_size=301, n_embd=48, n_layer=2, n_head=3,
                                              n_positions=40, n_inner=72,
                                              tie_word_embeddings=False)),
    ]


def test_matches_transformers_num_parameters():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    checked = 0
    for label, config in _tiny_configs():
        model = transformers.AutoModelForCausalLM.from_config(config)
        spec = spec_from_hf_config(config.to_dict())
        counted = count_params(spec)
        assert counted.total == model.num_parameters(), label
        tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        assert (counted.breakdown["output"] == 0) == tied, label
        checked += 1
    assert checked == 11


# --- the real GGUF files, where pulled ------------------------------------------------------

# Gemma 3's 268,098,176 was checked the same way once; GGUFReader takes ~30 s on its
# 262k-token vocabulary, too slow to repeat in every run.
@pytest.mark.real
def test_smollm2_preset_equals_tensor_sizes_in_real_gguf():
    from pellucid import registry

    if not registry.is_pulled("smollm2-135m-instruct"):
        pytest.skip("smollm2-135m-instruct not pulled")
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(registry.resolve("smollm2-135m-instruct", pull_missing=False))
    total = sum(int(t.n_elements) for t in reader.tensors)
    assert total == count_params(PRESETS["smollm2-135m"]).total == 134_515_008
