"""The KV cache as one pool under a memory budget: memory spent only on positions written and
given back when freed, the oldest requests moving first when it is full (later ones preempted
and computed again), outputs unchanged by it, and the prefix cache kept within its share."""

from __future__ import annotations

import pytest
import torch
from tiny import greedy, tiny_hf_llama, write_llama_gguf

from pellucid.engine.engine import Engine
from pellucid.engine.kv_cache import KVCache, lazy_memory
from pellucid.errors import PellucidError
from pellucid.sampling.params import SamplingParams

pytestmark = pytest.mark.skipif(not lazy_memory("cpu"), reason="memory on demand needs Linux")


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A tiny Llama in the default format (int4 blocks, fused, batch-invariant): 4 KiB of keys
    and values per token, so one MiB of budget is 256 tokens, its whole context."""
    from pellucid.loading import load_model

    hf = tiny_hf_llama(seed=11, layers=2, d_model=256, heads=4, kv_heads=4, d_ff=256)
    loaded = load_model(write_llama_gguf(hf, tmp_path_factory.mktemp("pool") / "tiny.gguf"), quant="int4")
    assert loaded.model.batch_invariant() and loaded.config.context_length == 256
    return loaded


def resident(t: torch.Tensor) -> int:
    """Bytes of `t`'s pages that are in memory (/proc/self/pagemap: bit 63 of each page's entry)."""
    import mmap
    import struct

    page = mmap.PAGESIZE
    first, end = t.data_ptr() // page, -(-(t.data_ptr() + t.numel() * t.element_size()) // page)
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        entries = f.read((end - first) * 8)
    return page * sum(e >> 63 for e in struct.unpack(f"<{end - first}Q", entries))


def test_memory_is_spent_where_written_and_given_back(lm):
    cfg = lm.config
    cache = KVCache(cfg, n_slots=8, max_len=1 << 16, dtype=torch.float32)  # 4 GiB of address space
    assert cache.k.shape == (2, 8, 4, 1 << 16, 64) and resident(cache.k) == 0
    row = 64 * 4  # bytes per position of one (layer, head)
    assert cache.reserve(3, 100)
    cache.k[:, 3, :, :100] = 1.0
    want = 2 * 4 * -(-100 * row // 4096) * 4096  # layers x heads rows, whole pages
    assert resident(cache.k) == want and cache.used == 100 and cache.nbytes == 100 * cache.bytes_per_token
    cache.trim(3, 40)  # positions 40.. go back in whole pages; 0..39 keep their values
    assert resident(cache.k) == 2 * 4 * -(-40 * row // 4096) * 4096 and cache.used == 40
    assert bool((cache.k[:, 3, :, :40] == 1.0).all())
    cache.trim(3, 0)
    assert resident(cache.k) == 0 and cache.used == 0
    assert bool((cache.k[:, 3, :, :100] == 0).all())  # (reading maps the zero page: no memory, but "present")


def test_budget_and_held_share(lm):
    cache = KVCache(lm.config, n_slots=4, max_len=256, dtype=torch.float32, budget=300, held_limit=150)
    a, b = cache.allocate(), cache.allocate()
    assert cache.reserve(a, 200) and not cache.reserve(b, 101) and cache.reserve(b, 100)
    cache.release(a, list(range(200)))  # kept for reuse, cut to the held share
    assert cache.held[a] == list(range(150)) and cache.held_tokens == 150 and cache.used == 250
    c = cache.allocate()  # an empty slot first: the held one stays
    assert c != a and a in cache.held and cache.room == 300 - 250 + 150
    assert cache.reserve(c, 100)  # needs the held slot's memory: it is given back
    assert a not in cache.held and cache.used == 200 and cache.held_tokens == 0
    cache.release(b, list(range(100)))
    cache.release(c, list(range(100)))  # both kept would be 200 > 150: the older goes
    assert list(cache.held) == [c] and cache.held_tokens == 100


def test_full_pool_preempts_the_latest_and_outputs_do_not_change(lm):
    """Six requests needing ~3x the pool: each gets the tokens and text it gets with room to spare,
    the pool never goes over its budget, and requests were preempted to make that so."""
    prompts = [[(7 * i + j) % 200 + 3 for j in range(n)] for i, n in enumerate((150, 20, 40, 90, 10, 60))]
    roomy = Engine(lm, max_batch=6, kv_cache_mib=64)
    tight = Engine(lm, max_batch=6, kv_cache_mib=1)
    assert tight.cache.budget == 256 and tight.max_len == 256 and tight.memory_line().startswith("KV cache 1 MiB: 256 tokens")
    params = SamplingParams(max_tokens=80, temperature=0.0, ignore_eos=True)
    want = [r for r in (roomy.add_request(roomy.make_request(p, params)) for p in prompts)]
    got = [tight.add_request(tight.make_request(p, params)) for p in prompts]
    peak = 0
    for eng in (roomy, tight):
        while eng.has_unfinished():
            eng.step()
            peak = max(peak, tight.cache.used)
    assert [r.output_ids for r in got] == [r.output_ids for r in want] and all(len(r.output_ids) == 80 for r in got)
    assert [r.text for r in got] == [r.text for r in want]
    assert tight.stats.preempted > 0 and roomy.stats.preempted == 0 and peak <= 256
    assert tight.cache.used == tight.cache.held_tokens  # only what is kept for reuse remains


def test_a_sampled_request_preempted_draws_the_same_tokens(lm):
    """A seeded, penalised, sampled request keeps its sampler state when preempted: its tokens
    are those it draws alone."""
    params = SamplingParams(max_tokens=60, temperature=0.9, top_p=0.9, seed=5, repetition_penalty=1.2, ignore_eos=True)
    long_one = [(5 * j) % 200 + 3 for j in range(200)]
    short = [[(3 * i + j) % 100 + 3 for j in range(30)] for i in range(3)]
    alone = Engine(lm, max_batch=1, kv_cache_mib=64)
    want = [alone.add_request(alone.make_request(p, params)) for p in short]
    while alone.has_unfinished():
        alone.step()
    tight = Engine(lm, max_batch=4, kv_cache_mib=1)
    first = tight.add_request(tight.make_request(long_one, SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)))
    got = [tight.add_request(tight.make_request(p, params)) for p in short]
    while tight.has_unfinished():
        tight.step()
    assert tight.stats.preempted > 0 and len(first.output_ids) == 50
    assert [r.output_ids for r in got] == [r.output_ids for r in want]


def test_the_whole_window_in_a_budget_of_exactly_one(lm):
    assert Engine(lm).max_len == 256  # the model's own window by default
    eng = Engine(lm, kv_cache_mib=1, prefix_cache=True)
    assert eng.cache.budget == eng.max_len == 256
    ids = list(range(3, 253))
    assert greedy(eng, [ids], 6)[0] == greedy(Engine(lm, kv_cache_mib=8), [ids], 6)[0]


def test_a_budget_below_the_window(real_lm):
    """SmolLM2's 8,192 positions take 360 MiB of float32 keys and values: a smaller budget serves
    what fits and says so, and asking for more than fits is an error naming both settings."""
    eng = Engine(real_lm, max_batch=2, kv_cache_mib=100)
    assert eng.max_len == eng.cache.budget == 100 * 2**20 // eng.cache.bytes_per_token < 8192
    with pytest.raises(PellucidError, match="max_len") as e:
        Engine(real_lm, max_len=8192, kv_cache_mib=100)
    assert "100 MiB" in str(e.value) and "kv_cache_mib" in str(e.value)


def test_whole_slots_where_the_system_refuses_address_space(lm, monkeypatch):
    """Under strict overcommit (vm.overcommit_memory=2) the reserved mapping is refused: the
    engine falls back to whole slots sized to the budget, with the same outputs."""
    import mmap

    prompts = [[(3 * i + j) % 200 + 3 for j in range(40)] for i in range(3)]
    want = greedy(Engine(lm, max_batch=2, kv_cache_mib=2), prompts, 12)

    def refuse(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(mmap, "mmap", refuse)
    eng = Engine(lm, max_batch=2, kv_cache_mib=2)
    assert not eng.cache.lazy and eng.cache.n_slots == 2 and eng.max_len == 256
    assert eng.cache.nbytes == 2 * 256 * eng.cache.bytes_per_token <= 2 * 2**20
    assert greedy(eng, prompts, 12) == want


def test_an_abort_during_a_forward_frees_its_slot_after_it(lm):
    """An abort from another thread while the forward writes the request's positions: the slot is
    released once the forward is done, so no written page stays outside the pool's count."""
    eng = Engine(lm, max_batch=2, prefill_chunk=16, kv_cache_mib=8, prefix_cache=True)
    req = eng.add_request(eng.make_request(list(range(3, 43)), SamplingParams(max_tokens=4, temperature=0)))
    eng.step()  # the first chunk
    slot, run, n = req.slot, eng._run, req.num_computed
    assert 0 < n < 40

    def aborting(*args, **kwargs):
        eng.abort(req.request_id)  # (the engine's lock is free during the forward, as for a server thread)
        assert req.slot is None and slot not in eng.cache.free  # not yet: the forward still writes the next chunk
        return run(*args, **kwargs)

    eng._run = aborting
    eng.step()
    assert req.finished and req.finish_reason == "abort" and slot in eng.cache.free
    assert eng.cache.extent[slot] == n and eng.cache.held[slot] == list(range(3, 3 + n))
    assert eng.cache.used == eng.cache.held_tokens == n


def test_a_budget_below_one_mib_is_refused_by_name(lm):
    for bad in (0, -5):
        with pytest.raises(PellucidError, match=f"kv_cache_mib = {bad} is out of range"):
            Engine(lm, kv_cache_mib=bad)
