"""The engine: requests in, tokens out, one step at a time.

`step()` is schedule -> execute -> update. There are no prefill and decode modes: each
request knows how many of its tokens are in the cache. A step prefills the next chunk of
waiting prompts (whole chunks of at most `prefill_chunk` tokens, as many prompts as fit in
`prefill_chunk` tokens, always at least one; so a burst of short prompts starts together and
a long prompt never stalls the others for long) and one decode token for every running
request. The engine deals in token ids; the detokenizer and stop matcher at the request's
edge only turn them into text.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from pellucid.engine.kv_cache import KVCache
from pellucid.engine.request import Request, RequestOutput, Status, TokenLogprob
from pellucid.errors import PellucidError
from pellucid.models.layers import ForwardContext
from pellucid.sampling import sampler as sampling
from pellucid.sampling.params import SamplingParams
from pellucid.text.detokenizer import Detokenizer


@dataclass
class EngineStats:
    """Counters for /metrics and `pellucid bench`."""

    requests_finished: int = 0
    requests_aborted: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    ttft: list[float] = field(default_factory=list)  # seconds, per request
    token_latency: list[float] = field(default_factory=list)  # seconds per decode step


class Engine:
    def __init__(self, lm, *, max_batch: int = 4, max_len: int | None = None, prefill_chunk: int = 512,
                 use_cache: bool = True, device: str | None = None):  # fmt: skip
        self.lm = lm
        self.model = lm.model
        self.tokenizer = lm.tokenizer
        self.cfg = lm.config
        self.device = device or next(self.model.parameters()).device
        self.max_len = min(max_len or min(self.cfg.context_length, 4096), self.model.max_len)
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.use_cache = use_cache
        dtype = next(self.model.parameters()).dtype
        kv_dtype = dtype if dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.bfloat16
        self.cache = KVCache(self.cfg, max_batch, self.max_len, kv_dtype, self.device) if use_cache else None
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.stats = EngineStats()
        self.lock = threading.Lock()  # add/abort may come from other threads than step()

    def resized(self, max_len: int) -> Engine:
        """A new idle engine like this one with a context window of `max_len` positions."""
        return Engine(self.lm, max_batch=self.max_batch, max_len=max_len, prefill_chunk=self.prefill_chunk,
                      use_cache=self.use_cache, device=str(self.device))  # fmt: skip

    # -- requests -----------------------------------------------------------------------
    def make_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                     constraint=None) -> Request:  # fmt: skip
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
        bad_bias = [k for k in params.logit_bias if not 0 <= k < self.cfg.vocab_size]
        if bad_bias:
            raise PellucidError(f"logit_bias token id {bad_bias[0]} is not in the vocabulary (0..{self.cfg.vocab_size - 1})", param="logit_bias")
        seq = sampling.SequenceSampler(params, vocab_size=self.cfg.vocab_size, prompt_ids=prompt_ids, eog_ids=self.tokenizer.eog_ids,
                                     constraint=constraint)  # fmt: skip
        req = Request(prompt_ids, params, seq, Detokenizer(self.tokenizer), request_id, constraint)
        req.max_len = self.max_len
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
        with self.lock:
            self._admit()
            prefills = self._prefill_plan()
            decoding = [r for r in self.running if r.prefill_done]
        outputs: list[RequestOutput] = []
        for req in prefills:
            outputs += self._run_prefill(req)
        if decoding:
            t = time.perf_counter()
            outputs += self._run_decode(decoding)
            self.stats.token_latency.append(time.perf_counter() - t)
        self.stats.steps += 1
        with self.lock:
            self.running = [r for r in self.running if not r.finished]
        return outputs

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_batch:
            req = self.waiting.popleft()
            if req.finished:  # aborted while waiting
                continue
            if self.cache is not None:
                req.slot = self.cache.allocate()
            req.status = Status.RUNNING
            self.running.append(req)

    def _prefill_plan(self) -> list[Request]:
        """Prompts to prefill this step: each its next whole chunk, within prefill_chunk tokens in all."""
        plan, budget = [], self.prefill_chunk
        for r in self.running:
            if r.prefill_done:
                continue
            n = min(len(r.prompt_ids) - r.num_computed, self.prefill_chunk)
            if plan and n > budget:
                break
            plan.append(r)
            budget -= n
        return plan

    def _run_prefill(self, req: Request) -> list[RequestOutput]:
        with self.lock:  # abort() from another thread releases the slot: skip, or read it once
            if req.finished:
                return []
            slot = req.slot
        start = req.num_computed
        chunk = req.prompt_ids[start : start + self.prefill_chunk]
        end = start + len(chunk)
        last = end == len(req.prompt_ids)
        if self.cache is None:
            if not last:
                req.num_computed = end
                return []
            logits = self.model(torch.tensor([req.prompt_ids], device=self.device), last_only=True)
        else:
            tokens = torch.tensor([chunk], device=self.device)  # (1, T)
            ctx = ForwardContext(
                input_pos=torch.arange(start, end, device=self.device)[None],
                cache=self.cache, slots=torch.tensor([slot], device=self.device), kv_len=end,
            )  # fmt: skip
            logits = self.model(tokens, ctx, last_only=True)  # (1, V)
        req.num_computed = end
        self.stats.prompt_tokens += len(chunk)
        if not last:
            return []
        return self._sample_and_update([req], logits)

    def _run_decode(self, reqs: list[Request]) -> list[RequestOutput]:
        with self.lock:  # requests aborted since the schedule have no slot any more
            reqs = [r for r in reqs if not r.finished]
            slots = [r.slot for r in reqs]
        if not reqs:
            return []
        if self.cache is None:
            logits = torch.cat([self.model(torch.tensor([r.all_ids], device=self.device), last_only=True) for r in reqs])
            for r in reqs:
                r.num_computed += 1
            return self._sample_and_update(reqs, logits)
        tokens = torch.tensor([[r.output_ids[-1]] for r in reqs], device=self.device)  # (B, 1)
        pos = [r.num_computed for r in reqs]
        ctx = ForwardContext(
            input_pos=torch.tensor(pos, device=self.device)[:, None],
            cache=self.cache, slots=torch.tensor(slots, device=self.device), kv_len=max(pos) + 1,
        )  # fmt: skip
        logits = self.model(tokens, ctx, last_only=True)  # (B, V)
        for r in reqs:
            r.num_computed += 1
        return self._sample_and_update(reqs, logits)

    def _sample_and_update(self, reqs: list[Request], logits: torch.Tensor) -> list[RequestOutput]:
        out = sampling.sample(logits, [r.sampler for r in reqs])
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
                req.output_ids.append(tok)
                req.sampler.accept(tok)
                self.stats.generated_tokens += 1
                logprobs = []
                if lp is not None and req.params.logprobs:
                    k = req.params.top_logprobs
                    pairs = list(zip(top[0][i][:k], top[1][i][:k], strict=True)) if top else []
                    logprobs = [TokenLogprob(tok, lp[i], pairs)]
                results.append(self._update(req, tok, logprobs))
        return results

    def _update(self, req: Request, tok: int, logprobs: list[TokenLogprob]) -> RequestOutput:
        """Append one token's text and decide, in this one place, whether the request ends."""
        text, reason, stop_reason = req.check_finish(tok, self.tokenizer.eog_ids)
        if reason is not None:
            req.stop_reason = stop_reason
            self._finish(req, reason)
        req.text += text
        return RequestOutput(
            req.request_id, [tok], text, req.finished, req.finish_reason, req.stop_reason, logprobs,
            len(req.prompt_ids), len(req.output_ids),
        )  # fmt: skip

    def _finish(self, req: Request, reason: str) -> None:
        req.status = Status.FINISHED
        req.finish_reason = reason
        if req.slot is not None and self.cache is not None:
            self.cache.release(req.slot)
            req.slot = None
        if req in self.running and reason == "abort":
            self.running.remove(req)
        self.requests.pop(req.request_id, None)
        if reason != "abort":
            self.stats.requests_finished += 1

    # -- convenience --------------------------------------------------------------------
    def run(self, req: Request) -> Iterator[RequestOutput]:
        """Add a request and step until it finishes, yielding its outputs (single-threaded use)."""
        self.add_request(req)
        try:
            while not req.finished:
                for o in self.step():
                    if o.request_id == req.request_id:
                        yield o
        finally:
            if not req.finished:
                self.abort(req.request_id)
