"""The real default model against transformers loading the same GGUF, both in float32."""

from __future__ import annotations

import pytest
import torch

PROMPTS_CHAT = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a KV cache is in one sentence.",
]
PROMPTS_RAW = [
    "The quick brown fox",
    "def fibonacci(n):\n    ",
    "In 1969, the first humans",
]


@pytest.fixture(scope="module")
def hf_model(real_path):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(real_path.parent, gguf_file=real_path.name, dtype=torch.float32)
    # Generate exactly 32 tokens without suppressing EOS (min_new_tokens would mask it).
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = 0
    return m.eval()


@pytest.fixture(scope="module")
def prompts(real_lm):
    chat = [real_lm.chat_template.render([{"role": "user", "content": p}]) for p in PROMPTS_CHAT]
    return [real_lm.tokenizer.encode(p) for p in chat + PROMPTS_RAW]


def test_logits_match_transformers_at_every_position(real_lm, hf_model, prompts):
    worst = 0.0
    for ids in prompts:
        x = torch.tensor([ids])
        with torch.no_grad():
            ref = hf_model(x).logits[0]
            ours = real_lm.model(x)[0]
        assert torch.equal(ours.argmax(-1), ref.argmax(-1)), ids
        worst = max(worst, (ours - ref).abs().max().item())
    print(f"max |logit difference| over {len(prompts)} prompts: {worst:.2e}")
    assert worst < 2e-3


def test_greedy_tokens_match_transformers(real_llm, hf_model, prompts):
    for ids in prompts:
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)
        ref_new = ref[0, len(ids):].tolist()
        ours = real_llm.generate(ids, temperature=0, max_tokens=32, ignore_eos=True).token_ids
        assert ours == ref_new


def test_chat_answer_is_sensible(real_llm):
    c = real_llm.chat([{"role": "user", "content": "What is the capital of France?"}], temperature=0, max_tokens=24)
    assert "Paris" in c.text
    assert c.finish_reason == "stop"
    assert c.usage["prompt_tokens"] == len(real_llm.tokenizer.encode(real_llm.render_chat(
        [{"role": "user", "content": "What is the capital of France?"}])))


def test_streaming_equals_non_streaming(real_llm):
    a = real_llm.generate("Once upon a time", temperature=0, max_tokens=24)
    b = "".join(real_llm.stream("Once upon a time", temperature=0, max_tokens=24))
    assert a.text == b and a.text


def test_cache_equals_recompute_on_real_model(real_lm):
    from pellucid.engine.kv_cache import KVCache
    from pellucid.models.layers import ForwardContext

    ids = real_lm.tokenizer.encode("The capital of France is Paris, and the capital of Italy is")
    cache = KVCache(real_lm.config, 1, 64, torch.float32)
    with torch.no_grad():
        n = len(ids) - 4
        ctx = ForwardContext(torch.arange(n)[None], cache, torch.tensor([0]), n)
        real_lm.model(torch.tensor([ids[:n]]), ctx)
        for p in range(n, len(ids)):
            ctx = ForwardContext(torch.tensor([[p]]), cache, torch.tensor([0]), p + 1)
            step = real_lm.model(torch.tensor([[ids[p]]]), ctx)[0, -1]
            full = real_lm.model(torch.tensor([ids[: p + 1]]))[0, -1]
            assert (step - full).abs().max() < 1e-3
