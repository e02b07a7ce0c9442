"""AsyncEngine (the engine on a background thread) and the scheduling it relies on, on a tiny model."""

from __future__ import annotations

import asyncio
import random
import threading

import pytest
from tiny import tiny_hf_llama, write_llama_gguf

from pellucid.engine.async_engine import AsyncEngine
from pellucid.engine.engine import Engine
from pellucid.errors import PellucidError
from pellucid.sampling.params import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROMPTS = [[5, 60, 61, 62, 70], [9, 8, 7], [100, 120, 140, 160, 180, 200, 220], [33, 34], [50] * 9]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from pellucid.loading import load_model

    hf = tiny_hf_llama(seed=11, layers=2, d_model=64, heads=4, kv_heads=2, d_ff=128)
    return load_model(write_llama_gguf(hf, tmp_path_factory.mktemp("async") / "tiny.gguf"), dtype="float32")


def _sync_greedy(lm, prompts, params=GREEDY) -> list[list[int]]:
    out = []
    for p in prompts:  # one at a time: the reference
        eng = Engine(lm, max_batch=1, max_len=64)
        req = eng.make_request(p, params)
        list(eng.run(req))
        out.append(req.output_ids)
    return out


def test_concurrent_requests_match_one_at_a_time(tiny_lm):
    ref = _sync_greedy(tiny_lm, PROMPTS)
    ae = AsyncEngine(Engine(tiny_lm, max_batch=4, max_len=64)).start()

    async def one(p):
        await asyncio.sleep(random.random() * 0.01)  # arrive at different steps
        group = ae.add(ae.engine.make_request(p, GREEDY))
        ids, texts = [], []
        async for out in group:
            ids += out.new_token_ids
            texts.append(out.new_text)
        assert out.finished and out.finish_reason == "length"
        return ids

    async def main():
        return await asyncio.gather(*(one(p) for p in PROMPTS))

    try:
        random.seed(3)
        assert asyncio.run(main()) == ref  # 5 requests through 4 slots: one waited and joined later
        assert ae.engine.cache.used_slots == 0 and not ae.engine.has_unfinished()
    finally:
        ae.shutdown()


def test_group_of_requests_shares_one_queue(tiny_lm):
    ref = _sync_greedy(tiny_lm, PROMPTS[:3])
    ae = AsyncEngine(Engine(tiny_lm, max_batch=4, max_len=64)).start()

    async def main():
        eng = ae.engine
        group = ae.add_many([eng.make_request(p, GREEDY) for p in PROMPTS[:3]])
        ids = [[] for _ in range(3)]
        while not group.done:
            out = await group.get()
            ids[group.index[out.request_id]] += out.new_token_ids
        return ids

    try:
        assert asyncio.run(main()) == ref
    finally:
        ae.shutdown()


def test_outputs_that_pile_up_while_the_loop_is_busy_all_arrive_and_each_loop_gets_its_own(tiny_lm):
    """The engine thread hands outputs over through a pipe the loop watches: steps made while
    the loop is blocked arrive together and in order, and a second event loop (a later
    asyncio.run) gets its own; the first one's pipe is closed once its loop has closed."""
    import time

    ref = _sync_greedy(tiny_lm, PROMPTS[:2])
    ae = AsyncEngine(Engine(tiny_lm, max_batch=4, max_len=64)).start()

    async def main(p):
        group = ae.add(ae.engine.make_request(p, GREEDY))
        time.sleep(0.3)  # the loop blocked: every step of the request is made meanwhile
        ids, outs = [], 0
        async for out in group:
            ids += out.new_token_ids
            outs += 1
        return ids, outs

    try:
        ids, outs = asyncio.run(main(PROMPTS[0]))
        assert ids == ref[0] and outs >= 2  # one output per step, none lost or merged away
        (first,) = ae._wakers.values()
        ids, _ = asyncio.run(main(PROMPTS[1]))
        assert ids == ref[1]
        assert first.closed and first not in ae._wakers.values() and len(ae._wakers) == 1
    finally:
        ae.shutdown()


def test_a_waker_delivers_what_was_posted_before_it_closes_and_nothing_after():
    from pellucid.engine.async_engine import _Waker

    async def main():
        w = _Waker(asyncio.get_running_loop())
        q: asyncio.Queue = asyncio.Queue()
        t = threading.Thread(target=w.post, args=([(q, 1), (q, 2)],))  # from another thread, as the engine
        t.start()
        t.join()
        w.close()  # on the loop's thread, before the loop has read the pipe
        w.post([(q, 3)])  # after: dropped, and nothing is written to the released fds
        return [q.get_nowait() for _ in range(q.qsize())], w.closed, (w.rfd, w.wfd)

    assert asyncio.run(main()) == ([1, 2], True, (-1, -1))


def test_a_step_fills_its_token_budget_with_prompt_chunks(tiny_lm):
    eng = Engine(tiny_lm, max_batch=4, max_len=64, prefill_chunk=16, step_tokens=8)
    eng.attention_share = 0  # tokens alone (what attention adds to a chunk's cost: the next test)
    prompts = [[1] * 5, [2] * 5, [3] * 5, [4] * 20]
    reqs = [eng.add_request(eng.make_request(p, GREEDY)) for p in prompts]
    eng.step()  # nobody generates yet: prompts fill prefill_chunk (16) = 5 + 5 + 5 + the long one's first token
    assert [len(r.output_ids) for r in reqs] == [1, 1, 1, 0] and reqs[3].num_computed == 1
    for k, done in enumerate((6, 11, 16), start=2):  # three generate a token each; the long prompt takes 5 of step_tokens
        eng.step()
        assert [len(r.output_ids) for r in reqs] == [k, k, k, 0] and reqs[3].num_computed == done
    eng.step()
    assert len(reqs[3].output_ids) == 1 and reqs[3].num_computed == 20
    while eng.has_unfinished():
        eng.step()
    assert [r.output_ids for r in reqs] == _sync_greedy(tiny_lm, prompts)



def test_short_prompts_go_first_and_deep_chunks_are_shorter(tiny_lm):
    """A long prompt admitted first does not hold back a short one behind it; the further into
    a prompt, the fewer tokens a chunk takes (their attention counts toward the step's budget)."""
    eng = Engine(tiny_lm, max_batch=4, max_len=256, prefill_chunk=64, step_tokens=64)
    eng.attention_share = 0.02  # one position attended costs 2% of a token's weights
    long_req = eng.add_request(eng.make_request([5] * 200, GREEDY))
    short = eng.add_request(eng.make_request([6] * 10, GREEDY))
    eng.step()
    assert len(short.output_ids) == 1 and 0 < long_req.num_computed < 54  # 64 - 10, less the attention's share
    chunks, last = [], long_req.num_computed
    while not long_req.prefill_done:
        eng.step()
        chunks.append(long_req.num_computed - last)
        last = long_req.num_computed
    assert chunks[-2] < chunks[0] and all(c >= 1 for c in chunks)
    assert eng._cost(0, 10) == 10 * (1 + 0.02 * 4.5)
    for start, budget in ((0, 64), (100, 64), (180, 7.5)):
        n = eng._chunk(start, 1000, budget)
        assert eng._cost(start, n) <= budget < eng._cost(start, n + 1)

def test_aborts_from_another_thread_while_stepping(tiny_lm):
    """Requests aborted at random moments from another thread: no step fails, every slot comes back."""
    eng = Engine(tiny_lm, max_batch=4, max_len=64, prefill_chunk=4)
    ae = AsyncEngine(eng).start()
    rng = random.Random(0)
    params = SamplingParams(max_tokens=30, temperature=0.8, ignore_eos=True)

    async def main():
        groups = []
        for _ in range(40):
            groups.append(ae.add(eng.make_request([rng.randrange(3, 200) for _ in range(rng.randrange(1, 12))], params)))
            await asyncio.sleep(rng.random() * 0.003)
            if rng.random() < 0.6:
                victim = rng.choice(groups)
                threading.Thread(target=victim.abort).start()  # from a thread that is neither loop nor engine
        for g in groups:
            while not g.done and not all(r.finished for r in g.requests):
                await asyncio.sleep(0.005)

    try:
        asyncio.run(main())
        assert ae.error is None
        assert eng.cache.used_slots == 0 and not eng.has_unfinished()
        assert eng.stats.requests_aborted + eng.stats.requests_finished == 40
    finally:
        ae.shutdown()


def test_a_second_thread_stepping_the_same_engine_is_refused(tiny_lm):
    """While one thread is inside step(), another thread's step() is an error that says what to do
    (two would compute and finish each other's requests), and the engine goes on afterwards."""
    eng = Engine(tiny_lm, max_batch=2, max_len=64)
    req = eng.make_request([5, 6, 7], SamplingParams(max_tokens=3, temperature=0))
    eng.add_request(req)
    inside, leave = threading.Event(), threading.Event()
    real = eng._step

    def slow_step():  # the first thread waits inside its step until the second has tried
        inside.set()
        leave.wait(10)
        return real()

    eng._step = slow_step
    t = threading.Thread(target=eng.step)
    t.start()
    try:
        assert inside.wait(10)
        with pytest.raises(PellucidError, match="already stepping in another thread.*LLM\\(loaded=") as e:
            eng.step()
        assert e.value.code == "engine_busy"
    finally:
        leave.set()
        t.join(10)
    eng._step = real
    while eng.has_unfinished():
        eng.step()
    assert req.finished and len(req.output_ids) == 3


def test_full_waiting_queue_is_429(tiny_lm):
    eng = Engine(tiny_lm, max_batch=1, max_len=64)
    ae = AsyncEngine(eng, max_waiting=1).start()
    long = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)

    async def main():
        a = ae.add(eng.make_request([5, 6], long))
        await a.get()  # running, in the one slot
        b = ae.add(eng.make_request([5, 7], long))  # waiting
        with pytest.raises(PellucidError) as e:
            ae.add(eng.make_request([5, 8], long))
        assert e.value.status == 429 and "waiting" in e.value.message
        a.abort()
        b.abort()

    try:
        asyncio.run(main())
    finally:
        ae.shutdown()
    assert eng.cache.used_slots == 0


def test_an_error_in_one_requests_grammar_fails_that_request_alone(tiny_lm):
    """A fault inside one request's constraint (injected: its accept raises on the first token) ends that
    request with finish_reason "error" naming it; the requests batched with it run on, unchanged."""
    from pellucid.sampling.constraints import from_response_format

    eng = Engine(tiny_lm, max_batch=4, max_len=64)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    ref = _sync_greedy(tiny_lm, prompts)
    reqs = [eng.add_request(eng.make_request(p, GREEDY)) for p in prompts]
    c = from_response_format(tiny_lm.tokenizer, {"type": "json_object"})
    bad = eng.add_request(eng.make_request([14, 15], SamplingParams(max_tokens=8, temperature=0), constraint=c))
    real_accept = c.accept

    def faulty(token):
        if c.num_accepted == 0:
            raise RuntimeError("injected fault")
        real_accept(token)

    c.accept = faulty
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    assert bad.finish_reason == "error" and "injected fault" in bad.error and bad.request_id in bad.error
    assert [o.finish_reason for o in outs if o.request_id == bad.request_id][-1] == "error"
    assert [r.output_ids for r in reqs] == ref and all(r.finish_reason == "length" for r in reqs)
    assert eng.stats.requests_failed == 1 and eng.cache.used_slots == 0
