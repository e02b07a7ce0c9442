"""The speculative decoder: draft, verify in one forward, accept a prefix, for one request."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from pellucid.engine.kv_cache import KVCache, cache_dtype
from pellucid.engine.request import Request, RequestOutput, Status, TokenLogprob
from pellucid.engine.speculative.drafters import Drafter
from pellucid.engine.speculative.rule import (
    ChainOutput,
    Draft,
    DraftChain,
    accept_reject,
    apply_chain,
    forks,
)
from pellucid.errors import PellucidError
from pellucid.models.layers import ForwardContext
from pellucid.runtime import ENGINE

# -- the decoder ----------------------------------------------------------------------------


@dataclass
class SpecRound:
    """One draft-verify-accept round."""

    index: int
    drafted: list[int]  # the drafter's proposal (what was verified)
    accepted: int  # how many of `drafted` the target accepted (a prefix)
    token: int  # the target's own token after the accepted prefix (replacement or bonus)
    emitted: list[int]  # what the request actually got (cut at a stop condition)
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0

    @property
    def rejected(self) -> int | None:
        """The first draft token the target did not accept, if any."""
        return self.drafted[self.accepted] if self.accepted < len(self.drafted) else None


@dataclass
class SpecStats:
    """Counters for one request; the acceptance rate is accepted / drafted."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    generated: int = 0
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0  # from the end of the prefill to the last token
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    rounds_without_draft: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted(self) -> float:
        """Accepted draft tokens per round."""
        return self.accepted / self.rounds if self.rounds else 0.0

    @property
    def tokens_per_round(self) -> float:
        """Generated tokens per target forward (plain decoding: 1)."""
        return self.generated / self.rounds if self.rounds else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.generated / self.decode_seconds if self.decode_seconds > 0 else 0.0


class SpeculativeDecoder:
    """Batch-1 speculative decoding of a target model with a drafter.

    `lm` is a LoadedModel (or anything with .model, .tokenizer, .config). Requests come from
    Engine.make_request (same validation as plain decoding); `run(req)` yields a
    RequestOutput per round, like Engine.run.
    """

    def __init__(self, lm, drafter: Drafter, *, num_draft: int = 4, max_len: int | None = None,
                 prefill_chunk: int = ENGINE.prefill_chunk, device: str | torch.device | None = None):  # fmt: skip
        if not 1 <= num_draft <= 64:
            raise PellucidError(f"num_draft = {num_draft} is out of range; allowed: 1..64", param="num_draft")
        self.lm = lm
        self.model = lm.model
        self.tokenizer = lm.tokenizer
        self.cfg = lm.config
        self.drafter = drafter
        self.num_draft = num_draft
        self.device = torch.device(device) if device is not None else next(self.model.parameters()).device
        model_len = getattr(self.model, "max_len", None) or self.cfg.context_length
        self.max_len = min(ENGINE.context(self.cfg.context_length, max_len), model_len)
        self.prefill_chunk = prefill_chunk
        self.eog_ids = frozenset(self.tokenizer.eog_ids) if self.tokenizer is not None else frozenset()
        self.cache: KVCache | None = None
        self.rounds: list[SpecRound] = []
        self.stats = SpecStats()

    # -- pieces ---------------------------------------------------------------------------
    def _ensure_cache(self, need: int) -> None:
        if self.cache is not None and self.cache.max_len >= need:
            return
        size = min(self.max_len, -(-need // 256) * 256)
        kv = cache_dtype(self.model)
        self.cache = KVCache(self.cfg, 1, size, kv, self.device)

    def _forward(self, ids: list[int], start: int, *, last_only: bool = False) -> torch.Tensor:
        """Target forward over ids at positions start.. with the cache: (T, V) or (V,)."""
        ctx = ForwardContext(
            input_pos=torch.arange(start, start + len(ids), device=self.device)[None], cache=self.cache,
            slots=torch.zeros(1, dtype=torch.long, device=self.device), kv_len=start + len(ids),
        )  # fmt: skip
        return self.model(torch.tensor([ids], device=self.device), ctx, last_only=last_only)[0]

    def _check(self, req: Request) -> None:
        if req.constraint is not None:
            raise PellucidError("speculative decoding does not support constrained (structured) output yet; "
                                "drop the response format or the speculative option", param="response_format")  # fmt: skip
        if req.params.n != 1:
            raise PellucidError(f"speculative decoding makes one sequence per request; n = {req.params.n}", param="n")
        if not req.max_len:
            req.max_len = self.max_len
        if len(req.prompt_ids) >= min(req.max_len, self.max_len):
            raise PellucidError(f"the prompt has {len(req.prompt_ids)} tokens; the context window is {self.max_len}",
                                param="prompt", code="context_length_exceeded")  # fmt: skip
        req.max_len = min(req.max_len, self.max_len)

    def _logprobs(self, logits: torch.Tensor, chain: ChainOutput, i: int, tok: int, req: Request) -> list[TokenLogprob]:
        p = req.params
        if not p.logprobs:
            return []
        row = chain.final[i] if p.processed_logprobs else logits[i]
        lp = row.float().log_softmax(-1)
        pairs = []
        if p.top_logprobs:
            vals, ids = lp.topk(p.top_logprobs)
            pairs = list(zip(ids.tolist(), vals.tolist(), strict=True))
        return [TokenLogprob(tok, float(lp[tok]), pairs)]

    # -- the loop -------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, req: Request, on_round: Callable[[SpecRound], None] | None = None) -> Iterator[RequestOutput]:
        """Prefill, then draft-verify-accept rounds until a stop condition; one output a round."""
        self._check(req)
        stats = self.stats = SpecStats(prompt_tokens=len(req.prompt_ids))
        self.rounds = []
        p = req.params
        budget = len(req.prompt_ids) + (p.max_tokens if p.max_tokens is not None else req.max_len)
        self._ensure_cache(min(budget, req.max_len) + self.num_draft + 1)
        req.status = Status.RUNNING
        t0 = time.perf_counter()
        # Prefill all but the last prompt token: every round then verifies [last token + drafts].
        prompt = req.prompt_ids
        for s in range(0, len(prompt) - 1, self.prefill_chunk):
            chunk = prompt[s : min(s + self.prefill_chunk, len(prompt) - 1)]
            self._forward(chunk, s, last_only=True)
        req.num_computed = len(prompt) - 1
        self.drafter.begin(prompt, self.cache.max_len)
        t1 = time.perf_counter()
        stats.prefill_seconds = t1 - t0
        try:
            while not req.finished:
                out = self._round(req)
                if on_round is not None:
                    on_round(self.rounds[-1])
                yield out
        finally:
            stats.decode_seconds = time.perf_counter() - t1
            if not req.finished:
                req.status = Status.FINISHED
                req.finish_reason = "abort"

    def _round(self, req: Request) -> RequestOutput:
        p, stats = req.params, self.stats
        ids = req.all_ids
        c = req.num_computed  # == len(ids) - 1: the last token is not in the cache yet
        n_out = len(req.output_ids)
        room = req.max_len - len(ids)
        if p.max_tokens is not None:
            room = min(room, p.max_tokens - n_out)
        k = max(0, min(self.num_draft, room - 1))
        chain_in = DraftChain(req)
        t = time.perf_counter()
        draft = self.drafter.propose(ids, k, chain_in) if k > 0 else Draft([])
        drafts = list(draft.tokens[:k])
        q = draft.probs[: len(drafts)] if draft.probs is not None else None
        t_draft = time.perf_counter() - t

        t = time.perf_counter()
        logits = self._forward([ids[-1]] + drafts, c)  # (k + 1, V)
        want_final = p.logprobs and p.processed_logprobs
        chain = apply_chain(logits, forks(req.sampler, drafts), want_final=want_final)
        if chain.greedy is not None:
            n = 0
            while n < len(drafts) and drafts[n] == chain.greedy[n]:
                n += 1
            token = chain.greedy[n]
        else:
            n, token = accept_reject(chain.probs, drafts, q, req.sampler.uniform)
        t_verify = time.perf_counter() - t
        req.num_computed = c + n + 1  # the last token and the accepted drafts are in the cache

        emitted, text, logprobs = [], "", []
        for i, tok in enumerate(drafts[:n] + [token]):
            req.output_ids.append(tok)
            req.sampler.accept(tok)
            emitted.append(tok)
            logprobs += self._logprobs(logits, chain, i, tok, req)
            piece, reason, stop_reason = req.check_finish(tok, self.eog_ids)
            text += piece
            if reason is not None:
                req.status = Status.FINISHED
                req.finish_reason, req.stop_reason = reason, stop_reason
                break
        req.text += text
        stats.rounds += 1
        stats.drafted += len(drafts)
        stats.accepted += n
        stats.generated += len(emitted)
        stats.rounds_without_draft += not drafts
        stats.draft_seconds += t_draft
        stats.verify_seconds += t_verify
        self.rounds.append(SpecRound(len(self.rounds), drafts, n, token, emitted, t_draft, t_verify))
        return RequestOutput(req.request_id, emitted, text, req.finished, req.finish_reason, req.stop_reason,
                             logprobs, len(req.prompt_ids), len(req.output_ids))  # fmt: skip
