"""One sequence through the Engine on the real default model: the prompt in chunks, then one
token at a time through the KV cache, gives the full forward's greedy tokens and stops at
the context window."""

from __future__ import annotations

import pytest
import torch
from tiny import greedy

from pellucid.engine.engine import Engine
from pellucid.errors import PellucidError
from pellucid.models.layers import ForwardContext
from pellucid.sampling.params import SamplingParams


def one_sequence(real_lm, max_len: int) -> Engine:
    """One cache slot, no prefix cache, prompts in chunks of 4: a single sequence, nothing else."""
    return Engine(real_lm, max_batch=1, max_len=max_len, prefill_chunk=4, prefix_cache=False)


def test_chunked_prefill_and_cached_decode_equal_the_full_forward(real_lm, real_llm):
    ids = real_llm.tokenizer.encode("The three primary colours are")
    eng = one_sequence(real_lm, 64)
    assert len(ids) > eng.prefill_chunk  # the prompt goes in more than one chunk
    req = eng.make_request(ids, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
    streamed = [t for o in eng.run(req) for t in o.new_token_ids]
    got = req.output_ids
    assert len(got) == 16 and streamed == got
    # The default engine (whole-prompt prefill, 4 slots) gives the same tokens
    assert got == greedy(real_llm.engine, [ids], 16)[0]
    # and so does the reference: no cache, every position of prompt + output in one forward
    with torch.inference_mode():
        tokens = torch.tensor([ids + got[:-1]])
        logits = real_lm.model(tokens, ForwardContext.full(tokens))  # (1, T, V)
    assert logits[0, len(ids) - 1 :].argmax(-1).tolist() == got
    text = real_llm.tokenizer.decode(got).lower()
    assert "red" in text or "blue" in text, text  # the real model answers


def test_one_sequence_stops_at_the_context_window(real_lm, real_llm):
    ids = real_llm.tokenizer.encode("Count: 1, 2, 3,")
    eng = one_sequence(real_lm, len(ids) + 3)
    with pytest.raises(PellucidError, match="max_tokens asks for 4 more") as e:
        eng.make_request(ids, SamplingParams(max_tokens=4))  # past the window: refused up front
    assert e.value.code == "context_length_exceeded"
    want = greedy(real_llm.engine, [ids], 3)[0]
    to_the_end = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)
    for _ in range(2):  # twice on the one slot: the first request gave it back
        req = eng.make_request(ids, to_the_end)
        outs = list(eng.run(req))
        assert req.output_ids == want and len(req.all_ids) == eng.max_len  # the window, filled
        assert [o.finished for o in outs] == [False, False, True] and req.finish_reason == "length"
        assert not eng.has_unfinished()
