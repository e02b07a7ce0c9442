"""The fused CPU path on the real default model in its default format (the file's int4 blocks).

What a user relies on: the fused ops give the readable composition's tokens; a row's
logits do not depend on how many rows share a call (decode batch of 1, 5 or 16, a prefill
chunk, a speculative verify), so batched and speculative greedy output equal plain greedy
output bit for bit; and the API, the CLI and the server load this same format.
"""

from __future__ import annotations

import pytest
import torch
from tiny import greedy

from pellucid import kernels, runtime
from pellucid.engine.kv_cache import KVCache
from pellucid.engine.speculative import NgramDrafter, SpeculativeDecoder
from pellucid.models.layers import ForwardContext
from pellucid.sampling.params import SamplingParams

pytestmark = [pytest.mark.real, pytest.mark.skipif(not kernels.available(), reason="needs pellucid's CPU kernels")]

EDIT = ("Fix the two typos in this sentence and reply with the corrected sentence only: "
        "The quick brown fox jumpd over the lazy dog while the farmer watched from the old barn doore.")  # fmt: skip
TEXTS = [
    "The three primary colours are", "def fibonacci(n):", "Once upon a time", "Paris is the capital of",
    "1, 2, 3, 4,", "The KV cache stores", "In 1969, astronauts", "Water boils at", "A haiku about rain:",
    "The mitochondria is", "To be or not to be,", "import numpy as np\n", "Dear Sir or Madam,",
    "The quick brown fox", "Photosynthesis converts", "Rust and Go are",
]  # fmt: skip


@pytest.fixture(scope="module")
def llm():
    from pellucid.api import LLM

    return LLM(max_batch=16, max_len=512)  # the defaults: what `pellucid generate` and `pellucid serve` load


@pytest.fixture(scope="module")
def prompts(llm):
    return [llm.tokenizer.encode(t) for t in TEXTS]


def test_the_default_format_is_one_for_api_cli_and_server(llm):
    from pellucid.cli import common
    from pellucid.server.state import ServerConfig

    assert runtime.DEFAULT_QUANT == common.DEFAULT_QUANT == ServerConfig().quant == "auto"
    assert llm.loaded.quant == "int4"  # "auto" on this model, by its measured quality
    assert common.DEFAULT_DTYPE == ServerConfig().dtype == "auto"
    assert next(llm.model.parameters()).dtype == torch.float32  # "auto" with quantized weights on CPU
    assert all(b.fusable for b in llm.model.blocks)
    # the file's Q8_0 table, in place: the tied head and the embedding read the same mapped bytes
    assert type(llm.model.lm_head).__name__ == "BlockLinear" and llm.model.embed.data is llm.model.lm_head.data
    assert torch.ops.pellucid.cpu_isa() in runtime.kernels()


def test_fused_path_gives_the_reference_compositions_tokens(llm, prompts):
    """A hook that only reads sends every block through the readable composition."""
    fused = greedy(llm.engine, prompts[:3], 24)
    seen = []
    with llm.model.hooks([(lambda n: n.endswith("hook_resid_pre"), lambda x, hook: seen.append(hook.name))]):
        reference = greedy(llm.engine, prompts[:3], 24)
    assert len(seen) >= 30 * 24  # every block, every step went the reference way
    assert reference == fused
    text = llm.tokenizer.decode(fused[0])
    assert "red" in text.lower() or "blue" in text.lower(), text  # the real model answers


def test_the_block_stack_equals_the_python_fused_path_bit_for_bit(llm, prompts):
    """pellucid.Stack (the whole block stack in one C++ call a step) runs the same ops as
    Block.fused: the same tokens and log-probabilities, batched, with chunked prefill, and
    with a steered row (the stack is split at the steered layer)."""
    from dataclasses import replace

    m = llm.model
    assert "_stack" in m.__dict__
    p = SamplingParams(max_tokens=16, temperature=0, logprobs=True, ignore_eos=True)
    steer = [{"vector": [0.01 * ((i % 7) - 3) for i in range(llm.config.d_model)], "layers": [5, 17], "scale": 40.0}]

    def run(chunk: int):
        eng = llm.engine
        eng.prefill_chunk, saved = chunk, eng.prefill_chunk
        try:
            reqs = [llm.request(ids, p) for ids in prompts[:4]] + [llm.request(prompts[0], replace(p), steer=steer)]
            return [(c.token_ids, [x.logprob for x in c.logprobs]) for c in llm._run_batch(reqs, [None] * len(reqs))]
        finally:
            eng.prefill_chunk = saved

    stacked = run(512), run(7)
    stack = m.__dict__.pop("_stack")
    try:
        python = run(512), run(7)
    finally:
        m.__dict__["_stack"] = stack
    assert stacked == python
    assert stacked[0] == stacked[1]  # and chunked prefill gives the same bits
    assert stacked[0][4][0] != stacked[0][0][0]  # the steered row did change


@torch.inference_mode()
def test_a_rows_logits_are_bit_identical_at_batch_1_5_and_16(llm, prompts):
    m, cfg = llm.model, llm.config
    cache = KVCache(cfg, 16, 128, torch.float32)
    for s, ids in enumerate(prompts):  # prefill each sequence into its own slot
        m(torch.tensor([ids]), ForwardContext(torch.arange(len(ids))[None], cache, torch.tensor([s]), len(ids)))
    nxt = torch.tensor([[ids[-1]] for ids in prompts])  # any next token per row
    pos = torch.tensor([[len(ids)] for ids in prompts])

    def step(b: int) -> torch.Tensor:
        ctx = ForwardContext(pos[:b], cache, torch.arange(b), int(pos[:b].max()) + 1)
        return m(nxt[:b], ctx, last_only=True)

    one, five, sixteen = step(1), step(5), step(16)
    assert torch.equal(one[0], five[0]) and torch.equal(one[0], sixteen[0])
    assert torch.equal(five, sixteen[:5])
    assert not torch.equal(sixteen[0], sixteen[1])  # different rows, different logits


@torch.inference_mode()
def test_a_prefill_chunk_equals_one_token_at_a_time(llm, prompts):
    m, cfg = llm.model, llm.config
    ids = prompts[0] + prompts[1]
    T = len(ids)
    a, b = KVCache(cfg, 1, 64, torch.float32), KVCache(cfg, 1, 64, torch.float32)
    slot = torch.tensor([0])
    chunk = m(torch.tensor([ids]), ForwardContext(torch.arange(T)[None], a, slot, T))  # (1, T, V)
    for t in range(T):
        single = m(torch.tensor([[ids[t]]]), ForwardContext(torch.tensor([[t]]), b, slot, t + 1))
        assert torch.equal(single[0, 0], chunk[0, t]), f"position {t}"
    assert torch.equal(a.k[:, :, :, :T], b.k[:, :, :, :T]) and torch.equal(a.v[:, :, :, :T], b.v[:, :, :, :T])


def test_batched_greedy_equals_each_prompt_alone(llm, prompts):
    together = greedy(llm.engine, prompts[:6], 20)
    alone = [greedy(llm.engine, [p], 20)[0] for p in prompts[:6]]
    assert together == alone


def test_speculative_greedy_is_plain_greedy_in_the_default_format(llm):
    """The issue's case: prompt lookup on an edit-this-sentence chat, k = 6."""
    prompt = llm.render_chat([{"role": "user", "content": EDIT}])
    plain = llm.generate(prompt, temperature=0, max_tokens=48)
    dec = SpeculativeDecoder(llm.loaded, NgramDrafter(), num_draft=6, max_len=llm.engine.max_len)
    req = llm.request(prompt, SamplingParams(temperature=0, max_tokens=48))
    list(dec.run(req))
    assert req.output_ids == plain.token_ids
    assert req.text == plain.text
    assert dec.stats.accepted > 0 and dec.stats.rounds < dec.stats.generated
