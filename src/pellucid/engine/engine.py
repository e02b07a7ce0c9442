"""The engine: requests in, tokens out, one step at a time.

`step()` is schedule -> execute -> update. There are no prefill and decode modes: each
request knows how many of its tokens are in the cache, and a step computes, for every
running request, its next tokens: one for a request that is generating, the next chunk of
the prompt for one that is not. Generating requests always get their token; prompts share
what is left of the step's token budget (`step_tokens` while anyone is generating, so a
burst of new prompts never stalls the streams for long; `prefill_chunk` when nobody is).

On a model that runs pellucid's fused CPU ops the whole step is one forward: every
request's tokens as rows of one batch, each row with its own cache slot and position, so
each weight is read once per step and attention covers each sequence's own length. Other
models (hooks attached, GPT-2, bfloat16) run the decode rows as one batch and each prompt
chunk on its own.

Prefix cache: a finished request's slot keeps its keys and values; a new prompt that
starts with the same tokens takes that slot (or copies the prefix from a running request
that has it: a shared system prompt, n choices) and computes only the rest. The reused
positions hold exactly the values a fresh prefill would write (pellucid's kernels give a
row the same bits whatever the batch), so outputs do not change; the cache is on by default
where that holds (the quantized default format) and may be asked for elsewhere.

The engine deals in token ids; the detokenizer and stop matcher at the request's edge
only turn them into text.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from pellucid.engine.kv_cache import KVCache, cache_dtype, lazy_memory
from pellucid.engine.request import Request, RequestOutput, Status, TokenLogprob
from pellucid.errors import PellucidError
from pellucid.models.layers import ForwardContext
from pellucid.runtime import ENGINE
from pellucid.sampling.params import SamplingParams
from pellucid.sampling.sampler import SequenceSampler, sample
from pellucid.steering import Steer
from pellucid.text.detokenizer import Detokenizer


@dataclass
class EngineStats:
    """Counters for /metrics and `pellucid bench`."""

    requests_finished: int = 0
    requests_aborted: int = 0
    requests_failed: int = 0  # ended by an error in their own sampling, grammar or text handling
    prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    ttft: list[float] = field(default_factory=list)  # seconds, per request
    token_latency: list[float] = field(default_factory=list)  # seconds per decode step
    prefix_query_tokens: int = 0  # prompt tokens of admitted requests
    prefix_hit_tokens: int = 0  # of those, taken from the prefix cache
    preempted: int = 0  # requests taken out of the batch when the KV pool was full


@dataclass
class Work:
    """One request's part of a step: `ids` computed at positions start.., the last one sampled if `sample`."""

    req: Request
    start: int
    ids: list[int]
    sample: bool
    decode: bool = False  # one generated token fed back (the others: prompt, or recomputed after a preemption)


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two id lists (slice compares run in C)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def steer_key(req: Request) -> bytes | None:
    return req.steer.key if req.steer is not None else None


MIN_PREFIX = 16  # shorter shared prefixes are computed again (a match must pay for the lookup and copy)


class Engine:
    def __init__(self, lm, *, max_batch: int = ENGINE.max_batch, max_len: int | None = None,
                 prefill_chunk: int = ENGINE.prefill_chunk, step_tokens: int = ENGINE.step_tokens,
                 prefix_cache: bool | None = None, prefix_cache_mib: int = ENGINE.prefix_cache_mib,
                 kv_cache_mib: int | None = None, use_cache: bool = True, device: str | None = None):  # fmt: skip
        """max_len: the context window (default: the model's); kv_cache_mib: the memory all requests'
        keys and values share (default: runtime.ENGINE.kv_memory_fraction of what is available)."""
        self.lm = lm
        self.model = lm.model
        self.tokenizer = lm.tokenizer
        self.cfg = lm.config
        self.device = torch.device(device or next(self.model.parameters()).device)
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk  # prompt tokens per step while no request is generating
        self.step_tokens = step_tokens  # tokens per step (generated + prompt) while some are
        self.use_cache = use_cache
        if kv_cache_mib is not None and kv_cache_mib < 1:
            raise PellucidError(f"kv_cache_mib = {kv_cache_mib} is out of range; allowed: 1 or more (MiB)", param="kv_cache_mib")
        self.kv_cache_asked = kv_cache_mib  # (None: the default share of memory, worked out again by resized())
        kv_dtype = cache_dtype(self.model)
        # Reuse is exact only where a row's values do not depend on its batch (pellucid's integer kernels)
        if prefix_cache is None:
            prefix_cache = bool(getattr(self.model, "batch_invariant", lambda: False)())
        self.prefix_cache = use_cache and prefix_cache
        self.prefix_cache_mib = prefix_cache_mib
        self.max_len = min(ENGINE.context(self.cfg.context_length, max_len), self.model.max_len)
        self.attention_share = self.cfg.attention_share()  # (the schedule's cost of a deep prompt chunk)
        self.cache = None
        if use_cache:
            self.cache = self._make_cache(kv_dtype, max_len is not None, kv_cache_mib)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.stats = EngineStats()
        self.lock = threading.Lock()  # add/abort may come from other threads than step()
        self._stepping = threading.Lock()  # held by the one thread inside step()
        self._forwarding = False  # a forward is writing the cache (an abort's release waits for it)
        self._late: list[tuple] = []  # releases that wait for the forward

    def _make_cache(self, kv_dtype: torch.dtype, asked_len: bool, kv_cache_mib: int | None) -> KVCache:
        """The KV pool: kv_cache_mib of memory, every slot able to reach the whole window where
        memory is spent as written (Linux CPU); elsewhere whole slots sized to fit the budget."""
        bpt = self.cfg.kv_bytes_per_token(kv_dtype.itemsize)
        if kv_cache_mib is None:
            avail = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else None
            kv_cache_mib = ENGINE.kv_cache_mib(avail)
        budget = kv_cache_mib * 2**20 // bpt  # tokens
        self.kv_cache_mib = kv_cache_mib
        held = self.prefix_cache_mib * 2**20 // bpt
        want = self.max_len
        for lazy in dict.fromkeys((lazy_memory(self.device), False)):
            rows = self.max_batch if lazy else max(1, budget // want)  # whole slots must fit in the budget
            fits = min(budget, want) if lazy else min(want, budget // self.max_batch)
            if fits < want and asked_len:
                raise PellucidError(
                    f"a context window of {want:,} tokens needs {want * bpt / 2**20:,.0f} MiB of KV cache "
                    f"{'per request ' if not lazy else ''}and the budget is {kv_cache_mib:,} MiB; lower max_len or raise "
                    f"kv_cache_mib (serve: --kv-cache-mib)", param="max_len")  # fmt: skip
            self.max_len = max(1, fits)
            spare = 2 * self.max_batch if self.prefix_cache else 0  # released slots that keep prompts for reuse
            if not lazy:
                spare = max(0, min(spare, rows - self.max_batch))
            try:
                return KVCache(self.cfg, self.max_batch + spare, self.max_len, kv_dtype, self.device, budget=budget,
                               held_limit=held, lazy=lazy)  # fmt: skip
            except OSError:  # the system refused the address space (vm.overcommit_memory=2): whole slots then
                continue
        raise AssertionError("unreachable: whole slots raise no OSError")

    def memory_line(self) -> str:
        """The KV cache's budget, in words (printed by serve)."""
        if self.cache is None:
            return "no KV cache"
        c = self.cache
        return (f"KV cache {self.kv_cache_mib:,} MiB: {c.budget:,} tokens shared by all requests, "
                f"one up to {self.max_len:,} (--kv-cache-mib)")  # fmt: skip

    def resized(self, max_len: int) -> Engine:
        """A new idle engine like this one with a context window of `max_len` positions."""
        return Engine(self.lm, max_batch=self.max_batch, max_len=max_len, prefill_chunk=self.prefill_chunk,
                      step_tokens=self.step_tokens, prefix_cache=self.prefix_cache, prefix_cache_mib=self.prefix_cache_mib,
                      kv_cache_mib=self.kv_cache_asked, use_cache=self.use_cache, device=str(self.device))  # fmt: skip

    def fused(self) -> bool:
        """Whether a step runs as one forward through pellucid's fused ops (see the module docstring)."""
        runs_fused = getattr(self.model, "runs_fused", None)
        return bool(runs_fused and runs_fused())

    # -- requests -----------------------------------------------------------------------
    def make_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                     constraint=None, stop_when=None, *, steer=None, capture=None) -> Request:  # fmt: skip
        """steer: a pellucid.steering.Steer (resolved); capture: a pellucid.steering.Capture."""
        if not prompt_ids:
            raise PellucidError("the prompt is empty: give at least one token", param="prompt")
        self.tokenizer.check_ids(prompt_ids, "prompt token")
        budget = self.max_len - len(prompt_ids)
        if budget < 1 or (params.max_tokens is not None and params.max_tokens > budget):
            want = params.max_tokens if params.max_tokens is not None else 1
            raise PellucidError(
                f"This model's context window is {self.max_len} tokens; the prompt has {len(prompt_ids)} tokens "
                f"and max_tokens asks for {want} more ({len(prompt_ids) + want} in all). Shorten the prompt or "
                f"lower max_tokens.",
                param="max_tokens" if budget >= 1 else "messages", code="context_length_exceeded",
            )  # fmt: skip
        seq = SequenceSampler(params, vocab_size=self.cfg.vocab_size, prompt_ids=prompt_ids, eog_ids=self.tokenizer.eog_ids,
                                     constraint=constraint)  # fmt: skip
        req = Request(prompt_ids, params, seq, Detokenizer(self.tokenizer), request_id, constraint, stop_when)
        req.max_len = self.max_len
        if steer is not None:
            req.steer = steer
        if capture is not None:
            req.capture = capture
            req.capture_positions = capture.resolve(len(prompt_ids), self.cfg.d_model)
        return req

    def add_request(self, req: Request) -> Request:
        with self.lock:
            if req.request_id in self.requests:
                raise PellucidError(f"request id {req.request_id!r} is already in use")
            self.requests[req.request_id] = req
            self.waiting.append(req)
        return req

    def abort(self, request_id: str) -> None:
        with self.lock:
            req = self.requests.get(request_id)
            if req is None or req.finished:
                return
            self._finish(req, "abort")
            self.stats.requests_aborted += 1

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step -----------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        # one thread at a time: two would each compute and finish the other's requests
        if not self._stepping.acquire(blocking=False):
            raise PellucidError("this engine is already stepping in another thread (an LLM whose engine a server runs "
                                "cannot also generate directly: give the server its own LLM(loaded=llm.loaded, ...))",
                                status=409, code="engine_busy")  # fmt: skip
        try:
            return self._step()
        finally:
            self._stepping.release()

    def _step(self) -> list[RequestOutput]:
        with self.lock:
            self._admit()
            work = self._schedule()
        outputs: list[RequestOutput] = []
        if work:
            t = time.perf_counter()
            outputs = self._execute(work)
            if any(w.decode for w in work):  # a step that generated for running streams
                self.stats.token_latency.append(time.perf_counter() - t)
        self.stats.steps += 1
        with self.lock:
            self.running = [r for r in self.running if not r.finished]
        return outputs

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_batch:
            req = self.waiting[0]
            if req.finished:  # aborted while waiting
                self.waiting.popleft()
                continue
            if self.cache is not None and self.running and self.cache.room < min(req.fill_len, self.prefill_chunk):
                break  # the pool is full: wait for a request to finish rather than take a slot it cannot fill
            self.waiting.popleft()
            if self.cache is not None:
                self._place(req)
            req.status = Status.RUNNING
            self.running.append(req)

    def _place(self, req: Request) -> None:
        """Give `req` a cache slot, with as much of its prompt already in it as the prefix cache has."""
        cache = self.cache
        if not self.prefix_cache or not self.fused():  # hooks attached: rows take the readable path, not bit-equal
            req.slot = cache.allocate()
            return
        ids = req.all_ids
        # the last prompt token is always computed: its logits start the output (a preempted
        # request's last output token is fed by its next decode step)
        limit = req.fill_len if req.output_ids else len(ids) - 1
        if not req.preempted:  # (a request placed again computes its tokens again: no new query)
            self.stats.prefix_query_tokens += len(req.prompt_ids)
        if req.capture is not None:  # what it reads must be computed
            req.slot = cache.allocate()
            return
        key = steer_key(req)  # keys and values computed under other steering are not this request's
        free_slot, n_free = None, 0
        for slot, held in cache.held.items():
            n = common_prefix(ids, held) if cache.held_key.get(slot) == key else 0
            if n > n_free:
                free_slot, n_free = slot, n
        source, n_run = None, 0
        for r in self.running:  # a running request's tokens: copied once they are computed
            n = common_prefix(ids, r.all_ids) if steer_key(r) == key else 0
            if n > n_run:
                source, n_run = r, n
        n_free, n_run = min(n_free, limit), min(n_run, limit)
        if n_free >= MIN_PREFIX and n_free >= n_run:
            req.slot = cache.take(free_slot, n_free)
            req.num_computed = n_free
            self._count_hit(req, n_free)
            return
        req.slot = cache.allocate()
        if n_run >= MIN_PREFIX:
            req.share = (source, n_run)

    def _resolve_share(self, req: Request) -> bool:
        """A request waiting to copy a prefix from a running one: copy it once it is computed. False: wait."""
        source, n = req.share
        if not source.finished and source.slot is not None and source.num_computed < n:
            return False
        req.share = None
        if not source.finished and source.slot is not None and self.cache.copy_prefix(source.slot, req.slot, n):
            req.num_computed = n
            self._count_hit(req, n)
        return True

    def _count_hit(self, req: Request, n: int) -> None:
        """n of req's tokens came from the prefix cache: its prompt's share counts, once per request."""
        if not req.preempted:
            req.cached_tokens = min(n, len(req.prompt_ids))
            self.stats.prefix_hit_tokens += req.cached_tokens

    def _schedule(self) -> list[Work]:
        """This step's work: one token for each generating request, then prompt chunks within the budget.

        Every position a step writes is reserved in the KV pool first. When the pool is full,
        released slots give their memory back, then the most recently admitted requests are
        preempted (their memory freed, their tokens computed again when they return), so the
        oldest requests always move (first come, first served, as vLLM schedules)."""
        work: list[Work] = []
        for r in list(self.running):
            if r.prefill_done and r in self.running and self._room(r, r.num_computed + 1, work):
                work.append(Work(r, r.num_computed, [r.output_ids[-1]], True, decode=True))
        limit = self.step_tokens if work else self.prefill_chunk
        budget = max(limit - len(work), limit // 4)  # prompts always move, even behind many streams
        # the shortest prompts first: a chat's prompt starts streaming at once beside a long document's
        for r in sorted((r for r in self.running if not r.prefill_done), key=lambda r: r.fill_len - r.num_computed):
            if budget <= 0 or r not in self.running:
                continue
            if r.share is not None and not self._resolve_share(r):
                continue
            start = r.num_computed
            end = r.fill_len if self.cache is None else start + self._chunk(start, r.fill_len - start, budget)
            end = self._room(r, end, work, partial=True)
            if end <= start:
                continue
            sample = end == len(r.prompt_ids) and not r.output_ids
            work.append(Work(r, start, r.all_ids[start:end], sample))
            budget -= self._cost(start, end - start)
        return work

    def _cost(self, start: int, n: int) -> float:
        """A prompt chunk's work in tokens' worth of weights: its n tokens, and their attention to
        the positions before each (which, deep in a long prompt, costs more than the weights)."""
        return n * (1 + self.attention_share * (start + (n - 1) / 2))

    def _chunk(self, start: int, left: int, budget: float) -> int:
        """The most of `left` prompt tokens from position `start` whose cost fits `budget` (at least one)."""
        a = self.attention_share
        if self._cost(start, left) <= budget:
            return left
        # n (1 + a (start + (n - 1) / 2)) = budget, a quadratic in n
        b = 1 + a * (start - 0.5)
        n = budget / b if a == 0 else (-b + (b * b + 2 * a * budget) ** 0.5) / a
        return max(1, min(left, int(n)))

    def _room(self, req: Request, end: int, work: list[Work], partial: bool = False) -> int:
        """Reserve `req`'s positions up to `end`, preempting later requests as needed; the end
        reserved (partial: as far as the pool allows), or 0 when `req` itself had to yield."""
        cache = self.cache
        if cache is None or cache.reserve(req.slot, end):
            return end
        at = self.running.index(req)
        while not cache.reserve(req.slot, end):
            later = [r for r in self.running[at + 1 :] if r.slot is not None and cache.extent[r.slot] > 0]
            if later:
                self._preempt(later[-1], work)
                continue
            if partial:
                have = cache.extent[req.slot]
                grant = have + max(0, cache.room)
                return grant if grant > req.num_computed and cache.reserve(req.slot, grant) else 0
            self._preempt(req, work)
            return 0
        return end

    def _preempt(self, req: Request, work: list[Work]) -> None:
        """Take `req` out of the batch to free its memory; it waits at the front of the queue and
        computes its tokens again when it returns (its outputs so far are kept)."""
        work[:] = [w for w in work if w.req is not req]
        self.cache.release(req.slot)
        req.slot, req.share, req.num_computed = None, None, 0
        req.captured = {}
        req.preempted += 1
        req.status = Status.WAITING
        self.running.remove(req)
        self.waiting.appendleft(req)
        self.stats.preempted += 1

    def _execute(self, work: list[Work]) -> list[RequestOutput]:
        with self.lock:  # requests aborted since the schedule have no slot any more
            work = [w for w in work if not w.req.finished]
            slots = [w.req.slot for w in work]
            self._forwarding = bool(work)
        if not work:
            return []
        try:
            if self.cache is None:
                logits = self._forward_uncached(work)
            elif self.fused():
                logits = self._forward_rows(work, slots)
            else:
                logits = self._forward_parts(work, slots)
        finally:
            with self.lock:  # slots of requests aborted meanwhile: free now that nothing writes them
                self._forwarding = False
                for args in self._late:
                    self.cache.release(*args)
                self._late.clear()
        sampled = []
        for w in work:
            w.req.num_computed = w.start + len(w.ids)
            if w.start < len(w.req.prompt_ids):
                self.stats.prompt_tokens += len(w.ids)
            if w.sample:
                sampled.append(w.req)
        return self._sample_and_update(sampled, logits) if sampled else []

    def _forward_rows(self, work: list[Work], slots: list[int]) -> torch.Tensor:
        """Every token of the step as one row of one forward: (N, 1) with per-row slot and position."""
        ids, pos, row_slots, rows, parts = [], [], [], [], []
        for w, slot in zip(work, slots, strict=True):
            parts.append((w.req, len(ids), w.start, len(w.ids)))
            ids += w.ids
            pos += range(w.start, w.start + len(w.ids))
            row_slots += [slot] * len(w.ids)
            if w.sample:
                rows.append(len(ids) - 1)
        dev = self.device
        ctx = ForwardContext(
            input_pos=torch.tensor(pos, device=dev)[:, None], cache=self.cache,
            slots=torch.tensor(row_slots, device=dev), kv_len=max(pos) + 1,
        )  # fmt: skip
        return self._run(torch.tensor(ids, device=dev)[:, None], ctx, parts, rows=torch.tensor(rows, dtype=torch.long, device=dev))

    def _run(self, tokens: torch.Tensor, ctx: ForwardContext, parts: list[tuple[Request, int, int, int]], **kw) -> torch.Tensor:
        """One forward, with the steering and capture its requests ask for.

        parts: (request, its first row of the flattened tokens, its first position, its row count)."""
        if not any(r.steer is not None or r.capture is not None for r, *_ in parts):
            return self.model(tokens, ctx, **kw)  # nothing to do: the plain forward, untouched
        steered: dict[bytes, tuple[Steer, list[int]]] = {}  # the same steering's rows together
        capture: dict[int, list[int]] = {}
        takers: dict[int, list[tuple[Request, int]]] = {}
        for req, row, start, n in parts:
            if req.steer is not None:
                steered.setdefault(req.steer.key, (req.steer, []))[1].extend(range(row, row + n))
            if req.capture is not None:
                lo = max(start, req.num_computed)  # (without a cache, positions read before come again)
                want = [p for p in req.capture_positions if lo <= p < start + n]
                for layer in req.capture.layers if want else ():
                    capture.setdefault(layer, []).extend(row + p - start for p in want)
                    takers.setdefault(layer, []).append((req, len(want)))
        dev = tokens.device
        if steered:
            per_layer: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
            for s, rows in steered.values():
                at = torch.tensor(rows, device=dev)
                for layer, vec in s.layers.items():
                    per_layer.setdefault(layer, []).append((at, vec.expand(len(rows), -1)))
            ctx.steer = {i: got[0] if len(got) == 1 else (torch.cat([r for r, _ in got]), torch.cat([v for _, v in got]))
                         for i, got in per_layer.items()}  # fmt: skip
        if capture:
            ctx.capture = {i: torch.tensor(rows, device=dev) for i, rows in capture.items()}
        out = self.model(tokens, ctx, **kw)
        for layer, reqs in takers.items():
            got, at = ctx.captured[layer].float().cpu(), 0
            for req, k in reqs:
                req.captured.setdefault(layer, []).append(got[at : at + k])
                at += k
        return out

    def _forward_parts(self, work: list[Work], slots: list[int]) -> torch.Tensor:
        """The generating requests as one (B, 1) batch, each prompt chunk as its own (1, T) forward."""
        dev = self.device
        decode = [(w, s) for w, s in zip(work, slots, strict=True) if w.decode]
        logits = {}
        if decode:
            pos = [w.start for w, _ in decode]
            ctx = ForwardContext(
                input_pos=torch.tensor(pos, device=dev)[:, None], cache=self.cache,
                slots=torch.tensor([s for _, s in decode], device=dev), kv_len=max(pos) + 1,
            )  # fmt: skip
            parts = [(w.req, i, w.start, 1) for i, (w, _) in enumerate(decode)]
            out = self._run(torch.tensor([w.ids for w, _ in decode], device=dev), ctx, parts, last_only=True)  # (B, V)
            logits.update({id(w): out[i] for i, (w, _) in enumerate(decode)})
        for w, slot in zip(work, slots, strict=True):
            if id(w) in logits:
                continue
            end = w.start + len(w.ids)
            ctx = ForwardContext(
                input_pos=torch.arange(w.start, end, device=dev)[None], cache=self.cache,
                slots=torch.tensor([slot], device=dev), kv_len=end,
            )  # fmt: skip
            logits[id(w)] = self._run(torch.tensor([w.ids], device=dev), ctx, [(w.req, 0, w.start, len(w.ids))], last_only=True)[0]
        sampled = [logits[id(w)] for w in work if w.sample]
        return torch.stack(sampled) if sampled else None

    def _forward_uncached(self, work: list[Work]) -> torch.Tensor | None:
        """No cache: each sampled request's whole sequence again."""
        reqs = [w.req for w in work if w.sample]
        if not reqs:
            return None
        out = []
        for r in reqs:
            tokens = torch.tensor([r.all_ids], device=self.device)
            out.append(self._run(tokens, ForwardContext.full(tokens), [(r, 0, 0, len(r.all_ids))], last_only=True))
        return torch.cat(out)

    def _sample_and_update(self, reqs: list[Request], logits: torch.Tensor) -> list[RequestOutput]:
        try:
            out = sample(logits, [r.sampler for r in reqs])
        except Exception as e:  # one request's sampler or grammar failed: find it, the others go on
            if len(reqs) == 1:
                return [self._fail(reqs[0], e)]
            return [o for i, r in enumerate(reqs) for o in self._sample_and_update([r], logits[i : i + 1])]
        tokens = out.tokens.tolist()  # the step's one host sync
        lp = out.logprobs.tolist() if out.logprobs is not None else None
        top = (out.top_ids.tolist(), out.top_logprobs.tolist()) if out.top_ids is not None else None
        now = time.perf_counter()
        results = []
        with self.lock:
            for i, (req, tok) in enumerate(zip(reqs, tokens, strict=True)):
                if req.finished:  # aborted during the forward
                    continue
                if req.first_token_time is None:
                    req.first_token_time = now
                    self.stats.ttft.append(now - req.arrival)
                try:
                    req.output_ids.append(tok)
                    req.sampler.accept(tok)
                    self.stats.generated_tokens += 1
                    logprobs = []
                    if lp is not None and req.params.logprobs:
                        k = req.params.top_logprobs
                        pairs = list(zip(top[0][i][:k], top[1][i][:k], strict=True)) if top else []
                        logprobs = [TokenLogprob(tok, lp[i], pairs)]
                    results.append(self._update(req, tok, logprobs))
                except Exception as e:  # its grammar, stop matcher or detokenizer: this request alone fails
                    results.append(self._fail(req, e))
        return results

    def _fail(self, req: Request, e: Exception) -> RequestOutput:
        """End one request on an error inside its own processing; the step and the others continue."""
        req.error = f"request {req.request_id} failed inside the engine: {type(e).__name__}: {e}"
        self._finish(req, "error")
        return RequestOutput(req.request_id, [], "", True, "error", None, [], len(req.prompt_ids), len(req.output_ids),
                             req.cached_tokens, error=req.error)  # fmt: skip

    def _update(self, req: Request, tok: int, logprobs: list[TokenLogprob]) -> RequestOutput:
        """Append one token's text and decide, in this one place, whether the request ends."""
        text, reason, stop_reason = req.check_finish(tok, self.tokenizer.eog_ids)
        if reason is not None:
            req.stop_reason = stop_reason
            self._finish(req, reason)
        req.text += text
        return RequestOutput(
            req.request_id, [tok], text, req.finished, req.finish_reason, req.stop_reason, logprobs,
            len(req.prompt_ids), len(req.output_ids), req.cached_tokens,
        )  # fmt: skip

    def _finish(self, req: Request, reason: str) -> None:
        req.status = Status.FINISHED
        req.finish_reason = reason
        if req.slot is not None and self.cache is not None:
            held = req.all_ids[: req.num_computed] if self.prefix_cache and self.fused() else None
            if self._forwarding:  # the forward still writes its positions: release the slot after it
                self._late.append((req.slot, held, steer_key(req)))
            else:
                self.cache.release(req.slot, held, steer_key(req))
            req.slot = None
        if req in self.running and reason == "abort":
            self.running.remove(req)
        self.requests.pop(req.request_id, None)
        if reason == "error":
            self.stats.requests_failed += 1
        elif reason != "abort":
            self.stats.requests_finished += 1

    # -- convenience --------------------------------------------------------------------
    def run(self, req: Request) -> Iterator[RequestOutput]:
        """Add a request and step until it finishes, yielding its outputs (single-threaded use)."""
        self.add_request(req)
        try:
            while not req.finished:
                for o in self.step():
                    if o.request_id == req.request_id:
                        if o.error is not None:
                            raise PellucidError(o.error, status=500, code="engine_error")
                        yield o
        finally:
            if not req.finished:
                self.abort(req.request_id)
