"""Speculative decoding for one request: draft, verify in one forward, accept a prefix.

A round, as the concept note draws it:

    Draft  (cheap):         ["The", "cat", "sat", "on", "mat"]
    Verify (one forward):   ["The", "cat", "sat", "on", "the", ...]
    Accept 4, reject "mat"; the target's own "the" replaces it.

1. A drafter proposes up to k tokens after the context: prompt lookup (the tokens that
   followed the latest earlier occurrence of the context's last n-gram) or a draft model
   (any model over the same vocabulary, e.g. a quantized or truncated copy of the target).
2. The target runs once over [last token, d1 .. dk] at their positions with the KV cache,
   giving k + 1 rows of logits: row i is the target's next-token distribution after d1..di.
3. The request's sampling chain turns each row into p_i. Draft token d_i is accepted with
   probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection a token is drawn from
   norm(max(0, p_i - q_i)) and the round ends; if all k are accepted, one more is drawn
   from p_k. For prompt lookup q_i is a point mass. This rule leaves the output
   distributed exactly as the target's own sampling (Leviathan et al. 2023, Chen et al.
   2023); with temperature 0 it reduces to "accept while the draft equals the argmax", so
   greedy output is the target's greedy output, token for token.
4. Rollback is free: the cache keeps what the rejected drafts wrote, but the next round
   overwrites those positions before anything attends to them (attention reads positions
   < kv_len, masked to those at or before each query's own).

Every round costs one target forward and yields between 1 and k + 1 tokens.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from pellucid.engine.kv_cache import KVCache
from pellucid.engine.request import Request, RequestOutput, Status, TokenLogprob
from pellucid.errors import PellucidError
from pellucid.models.layers import ForwardContext
from pellucid.sampling import processors as P
from pellucid.sampling import sampler as sampling

# -- what a round produces ----------------------------------------------------------------


@dataclass
class Draft:
    """Proposed tokens and the distribution each was drawn from (None = point masses)."""

    tokens: list[int]
    probs: torch.Tensor | None = None  # (k, V) q_i, rows sum to 1


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

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(acceptance_rate=self.acceptance_rate, mean_accepted=self.mean_accepted,
                 tokens_per_round=self.tokens_per_round, decode_tok_s=self.decode_tok_s)  # fmt: skip
        return d


# -- the sampling chain, row by row ---------------------------------------------------------

_SCRATCH = torch.Generator()  # forks draw nothing that matters; keep their draws off the request's


def _fork(seq: sampling.SequenceSampler) -> sampling.SequenceSampler:
    """A copy of a request's sampler state that can advance without touching the original
    (its generator and constraint stay behind: forks draw nothing that counts)."""
    gen, con = seq.generator, seq.constraint
    seq.generator = seq.constraint = None
    try:
        f = copy.deepcopy(seq)
    finally:
        seq.generator, seq.constraint = gen, con
    f.generator = _SCRATCH
    return f


def _forks(seq: sampling.SequenceSampler, drafts: list[int]) -> list[sampling.SequenceSampler]:
    """The sampler as it would stand before each of [d1 .. dk, next]: k + 1 forks (one
    shared fork when no step of the chain depends on the tokens so far)."""
    p = seq.params
    if (p.frequency_penalty == 0 and p.presence_penalty == 0 and p.repetition_penalty == 1
            and len(seq.output_ids) >= p.min_tokens and seq.constraint is None):  # fmt: skip
        return [_fork(seq)] * (len(drafts) + 1)
    cur = _fork(seq)
    rows = [cur]
    for d in drafts:
        cur = _fork(cur)
        cur.accept(d)
        rows.append(cur)
    return rows


@dataclass
class ChainOutput:
    greedy: list[int] | None  # temperature 0: the chain's argmax per row
    probs: torch.Tensor | None  # otherwise (T, V): the distribution each row draws from
    final: torch.Tensor | None  # (T, V) processed logits (for greedy rows: after the mask)


def apply_chain(logits: torch.Tensor, seqs: list[sampling.SequenceSampler], *, want_final: bool = False) -> ChainOutput:
    """Run the request's sampling chain (pellucid.sampling) over rows of logits (T, V).

    Row i uses seqs[i] (a fork standing where that row's token would be drawn), so the
    penalties and min_tokens bans see the drafts before it. Greedy rows skip the trace
    (and `final`) unless `want_final`.
    """
    if seqs[0].greedy and not want_final:
        return ChainOutput(sampling.sample(logits, seqs).tokens.tolist(), None, None)
    stages: dict[str, torch.Tensor] = {}
    out = sampling.sample(logits, seqs, trace=lambda stage, x: stages.__setitem__(stage, x))
    if seqs[0].greedy:
        return ChainOutput(out.tokens.tolist(), None, stages["mask"])
    final = stages["min_p"]
    return ChainOutput(None, torch.softmax(final, dim=-1), final)


def accept_reject(p: torch.Tensor, drafts: list[int], q: torch.Tensor | None,
                  uniform: Callable[[], float]) -> tuple[int, int]:  # fmt: skip
    """The speculative sampling rule over target rows p (k + 1, V) and draft rows q (k, V).

    Returns (number of drafts accepted, the token that follows them). q None means each
    draft was certain (prompt lookup): q_i is a point mass on d_i.
    """
    for i, x in enumerate(drafts):
        px = float(p[i, x])
        qx = float(q[i, x]) if q is not None else 1.0
        if uniform() * qx < px:  # u < p/q, i.e. accept with probability min(1, p/q)
            continue
        if q is not None:
            resid = (p[i] - q[i]).clamp_min(0)
        else:
            resid = p[i].clone()
            resid[x] = 0.0
        if float(resid.sum()) <= 0:  # p == q up to rounding: the residual is empty
            resid = p[i]
        return i, _draw(resid, uniform())
    return len(drafts), _draw(p[len(drafts)], uniform())


def _draw(probs: torch.Tensor, u: float) -> int:
    return int(P.draw(probs[None], torch.tensor([u]))[0])


class DraftChain:
    """The request's sampling chain as a drafter sees it: pick the next draft token."""

    def __init__(self, req: Request):
        self.req = req
        self.greedy = req.sampler.greedy

    def pick(self, logits: torch.Tensor, drafts: list[int]) -> tuple[int, torch.Tensor | None]:
        """logits (V,) after the context + drafts -> (token, q (V,) or None when greedy)."""
        seq = _forks(self.req.sampler, drafts)[-1]
        out = apply_chain(logits[None].float(), [seq])
        if out.greedy is not None:
            return out.greedy[0], None
        q = out.probs[0]
        return _draw(q, self.req.sampler.uniform()), q


# -- drafters -------------------------------------------------------------------------------


class Drafter(Protocol):
    name: str

    def begin(self, prompt_ids: list[int], capacity: int) -> None:
        """A new request starts with these prompt ids and may reach `capacity` positions."""

    def propose(self, ids: list[int], k: int, chain: DraftChain) -> Draft:
        """Up to k tokens that might follow ids (the prompt and the output so far)."""


class NgramDrafter:
    """Prompt lookup: find the context's last n-gram earlier in the prompt + output (the
    longest n first, the latest occurrence) and propose the tokens that followed it.

    When the target replaced a drafted token (a fixed typo, a changed word) the context's
    last n-gram is often new; before falling back to a 1-gram the drafter then resumes
    copying just after the replaced token (a one-token substitution), or just after the
    replacement itself when it appears a few tokens further on in the source (a deletion).
    """

    name = "ngram"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise PellucidError(f"n-gram sizes must satisfy 1 <= min ({min_ngram}) <= max ({max_ngram})", param="ngram")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.begin([])

    def begin(self, prompt_ids: list[int], capacity: int = 0) -> None:
        # index[n][n-gram] = position of the token that followed its latest occurrence
        self._index: list[dict[tuple[int, ...], int]] = [{} for _ in range(self.max_ngram + 1)]
        self._ids: list[int] = []
        self._last: tuple[int, int, bool] | None = None  # (copied from, context length then, a confident copy)

    def _extend(self, ids: list[int]) -> None:
        if len(ids) < len(self._ids) or (self._ids and ids[len(self._ids) - 1] != self._ids[-1]):
            self.begin([])  # not a continuation of what we indexed: start over
        start = len(self._ids)
        for end in range(max(start, 1), len(ids)):  # ids[end] follows the n-grams ending before it
            for n in range(1, min(self.max_ngram, end) + 1):
                self._index[n][tuple(ids[end - n : end])] = end
        self._ids = list(ids)

    def _resume(self, ids: list[int]) -> int | None:
        """Where the last copy continues: past the accepted tokens, and past one replaced token."""
        if self._last is None:
            return None
        src, at, confident = self._last
        a = 0
        while at + a < len(ids) and src + a < at and ids[at + a] == ids[src + a]:
            a += 1
        if a == 0 and not confident:  # a 1-gram guess that failed at once: nothing was being copied
            return None
        if at + a == len(ids):  # everything since matched the source: go on copying
            pos = src + a
        elif at + a + 1 == len(ids):  # the last token replaced the source's token at src + a
            pos = src + a + 1
            ahead = ids[src + a + 1 : min(src + a + 4, at)]  # ... or the target skipped ahead to it
            if ids[-1] in ahead:
                pos = src + a + 2 + ahead.index(ids[-1])
        else:
            return None
        return pos if pos < len(ids) else None

    def propose(self, ids: list[int], k: int, chain: DraftChain | None = None) -> Draft:
        self._extend(ids)
        resume = self._resume(ids)
        found, confident = None, False
        for n in range(min(self.max_ngram, len(ids)), self.min_ngram - 1, -1):
            if n == 1 and resume is not None:
                break
            found = self._index[n].get(tuple(ids[-n:]))
            if found is not None:
                confident = n > 1
                break
        if found is None and resume is not None:
            found, confident = resume, True
        self._last = (found, len(ids), confident) if found is not None else None
        return Draft(ids[found : found + k]) if found is not None else Draft([])


class ModelDrafter:
    """A draft model over the target's vocabulary, run autoregressively k steps a round.

    `model` is any callable tokens (1, T) -> logits (1, T, V'), V' >= the target's V. If it
    takes a ForwardContext and has a `cfg` (every pellucid model does), it gets its own
    one-slot KV cache and is fed only the tokens it has not seen; otherwise it recomputes
    the whole context each step.
    """

    name = "model"

    def __init__(self, model, *, vocab_size: int, max_len: int = 4096, prefill_chunk: int = 512,
                 name: str = "model"):  # fmt: skip
        self.model = model.model if hasattr(model, "tokenizer") and hasattr(model, "model") else model
        self.vocab_size = vocab_size
        self.max_len = max_len
        self.prefill_chunk = prefill_chunk
        self.name = name
        self.cfg = getattr(self.model, "cfg", None)
        self.use_cache = isinstance(self.model, nn.Module) and self.cfg is not None and hasattr(self.cfg, "n_kv_heads")
        if self.cfg is not None and getattr(self.cfg, "vocab_size", vocab_size) < vocab_size:
            raise PellucidError(f"the draft model's vocabulary ({self.cfg.vocab_size}) is smaller than the target's "
                                f"({vocab_size}); a draft model must share the target's tokenizer", param="draft_model")  # fmt: skip
        self.cache: KVCache | None = None
        self._computed: list[int] = []  # ids whose keys/values are in the cache, in order
        self.forwards = 0

    def _device(self) -> torch.device:
        if isinstance(self.model, nn.Module):
            return next(self.model.parameters()).device
        return torch.device("cpu")

    def _ensure_cache(self, need: int) -> None:
        if self.cache is not None and self.cache.max_len >= need:
            return
        size = min(self.max_len, -(-need // 256) * 256)
        dtype = next(self.model.parameters()).dtype
        kv = dtype if dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.bfloat16
        self.cache = KVCache(self.cfg, 1, size, kv, self._device())
        self._computed = []

    def begin(self, prompt_ids: list[int], capacity: int = 0) -> None:
        """Size the cache for the request and prefill it with all but the last prompt token."""
        self._computed = []
        if self.use_cache:
            self._ensure_cache(max(capacity, len(prompt_ids) + 1))
            if len(prompt_ids) > 1:
                self._feed(prompt_ids[:-1])

    def _feed(self, ids: list[int]) -> torch.Tensor:
        """Run the not yet computed part of ids through the cached model; last row's logits (V,)."""
        n = 0
        limit = min(len(self._computed), len(ids) - 1)
        while n < limit and self._computed[n] == ids[n]:
            n += 1
        self._computed = self._computed[:n]  # rollback: forget what the target rejected
        dev = self._device()
        logits = None
        while n < len(ids):
            chunk = ids[n : n + self.prefill_chunk]
            ctx = ForwardContext(input_pos=torch.arange(n, n + len(chunk), device=dev)[None], cache=self.cache,
                                 slots=torch.zeros(1, dtype=torch.long, device=dev), kv_len=n + len(chunk))  # fmt: skip
            logits = self.model(torch.tensor([chunk], device=dev), ctx, last_only=True)[0]  # (V',)
            self.forwards += 1
            self._computed += chunk
            n += len(chunk)
        return logits

    def propose(self, ids: list[int], k: int, chain: DraftChain) -> Draft:
        drafts: list[int] = []
        qs: list[torch.Tensor] = []
        if k <= 0:
            return Draft([])
        if self.use_cache:
            self._ensure_cache(len(ids) + k)
            if self.cache.max_len < len(ids) + k:
                k = self.cache.max_len - len(ids)
        dev = self._device()
        for _ in range(k):
            seq = ids + drafts
            if self.use_cache:
                logits = self._feed(seq)
            else:
                out = self.model(torch.tensor([seq], device=dev))
                self.forwards += 1
                logits = out[0, -1] if out.dim() == 3 else out[0]
            tok, q = chain.pick(logits[: self.vocab_size].float(), drafts)
            drafts.append(tok)
            if q is not None:
                qs.append(q)
        return Draft(drafts, torch.stack(qs) if qs else None)


def truncated(model: nn.Module, n_layers: int) -> nn.Module:
    """The same model running only its first n_layers blocks, sharing every weight: a draft
    model that costs no memory (early exit through the final norm and output head)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or not hasattr(model, "cfg"):
        raise PellucidError("only pellucid decoder models (with .blocks and .cfg) can be truncated", param="draft_layers")
    if not 1 <= n_layers <= len(blocks):
        raise PellucidError(f"draft_layers = {n_layers} is out of range; allowed: 1..{len(blocks)}", param="draft_layers")
    d = copy.copy(model)
    d._modules = dict(model._modules)  # its own module table; the modules themselves are shared
    d.blocks = nn.ModuleList(list(blocks)[:n_layers])
    d.cfg = dataclasses.replace(model.cfg, n_layers=n_layers)
    return d


# -- the decoder ----------------------------------------------------------------------------


class SpeculativeDecoder:
    """Batch-1 speculative decoding of a target model with a drafter.

    `lm` is a LoadedModel (or anything with .model, .tokenizer, .config). Requests come from
    Engine.make_request (same validation as plain decoding); `run(req)` yields a
    RequestOutput per round, like Engine.run.
    """

    def __init__(self, lm, drafter: Drafter, *, num_draft: int = 4, max_len: int | None = None,
                 prefill_chunk: int = 512, device: str | torch.device | None = None):  # fmt: skip
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
        self.max_len = min(max_len or min(self.cfg.context_length, 4096), model_len)
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
        dtype = next(self.model.parameters()).dtype
        kv = dtype if dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.bfloat16
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
        chain = apply_chain(logits, _forks(req.sampler, drafts), want_final=want_final)
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


# -- construction from names ---------------------------------------------------------------


@dataclass
class SpeculativeConfig:
    """How to speculate: `draft` "ngram" (prompt lookup) or "model"."""

    draft: str = "ngram"
    num_draft: int = 4
    draft_model: str | None = None  # registry name or path; None = the target's own file
    draft_quant: str | None = None  # "int8" / "int4": load the draft model quantized
    draft_dtype: str | None = None  # None = the target's dtype
    draft_layers: int | None = None  # run only the first N blocks of the draft model
    max_ngram: int = 3
    min_ngram: int = 1
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.draft not in ("ngram", "model"):
            raise PellucidError(f"draft = {self.draft!r} is not one of: ngram, model", param="draft")
        if not 1 <= self.num_draft <= 64:
            raise PellucidError(f"num_draft = {self.num_draft} is out of range; allowed: 1..64", param="num_draft")
        if self.draft_layers is not None and self.draft_layers < 1:
            raise PellucidError(f"draft_layers = {self.draft_layers} is out of range; allowed: 1..the model's layers", param="draft_layers")


def make_drafter(cfg: SpeculativeConfig, lm, *, max_len: int = 4096) -> Drafter:
    """Build the drafter a config asks for, checking that a draft model shares the tokenizer."""
    if cfg.draft == "ngram":
        return NgramDrafter(cfg.max_ngram, cfg.min_ngram)
    quant = cfg.draft_quant
    if cfg.draft_model is None and cfg.draft_dtype is None and quant is None and cfg.draft_layers is None:
        quant = "int4"  # the default draft model: an int4 copy of the target
    if cfg.draft_model is None and cfg.draft_dtype is None and quant is None:
        draft_lm = lm  # the target's own weights (with draft_layers: a truncated view of them)
    else:
        from pellucid.loading import load_model

        first = next(lm.model.parameters())
        dtype = cfg.draft_dtype or ("bfloat16" if quant else str(first.dtype).removeprefix("torch."))
        draft_lm = load_model(cfg.draft_model or lm.path, dtype=dtype, device=str(first.device), quant=quant)
        check_same_vocabulary(lm.tokenizer, draft_lm.tokenizer)
    model = draft_lm.model
    name = str(cfg.draft_model or "target") + (f" {quant}" if quant else f" {cfg.draft_dtype}" if cfg.draft_dtype else "")
    if cfg.draft_layers is not None:
        model = truncated(model, cfg.draft_layers)
        name += f"[:{cfg.draft_layers} layers]"
    return ModelDrafter(model, vocab_size=lm.config.vocab_size, max_len=max_len, name=name)


def check_same_vocabulary(a, b) -> None:
    """Two tokenizers must map ids to the same bytes for a draft model to make sense."""
    if a.vocab_size != b.vocab_size or any(a.token_bytes(i) != b.token_bytes(i) for i in range(0, a.vocab_size, 97)):
        raise PellucidError("the draft model does not share the target's tokenizer "
                            f"(vocabularies of {a.vocab_size} and {b.vocab_size} tokens)", param="draft_model")  # fmt: skip


def from_option(lm, option, *, max_len: int) -> SpeculativeDecoder:
    """LLM(speculative=...): "ngram", "model", a dict of SpeculativeConfig fields, or one."""
    if isinstance(option, str):
        cfg = SpeculativeConfig(draft=option)
    elif isinstance(option, dict):
        try:
            cfg = SpeculativeConfig(**option)
        except TypeError as e:
            raise PellucidError(f"unknown speculative option: {e}", param="speculative") from None
    elif isinstance(option, SpeculativeConfig):
        cfg = option
    else:
        raise PellucidError(f"speculative must be 'ngram', 'model', a dict or a SpeculativeConfig, not {option!r}",
                            param="speculative")  # fmt: skip
    return SpeculativeDecoder(lm, make_drafter(cfg, lm, max_len=max_len), num_draft=cfg.num_draft, max_len=max_len)


@dataclass
class PlainRun:
    """Plain decoding of one request through the engine, timed like a speculative run."""

    token_ids: list[int]
    text: str
    prefill_seconds: float  # to the first token
    decode_seconds: float  # first token to last

    @property
    def decode_tok_s(self) -> float:
        n = len(self.token_ids) - 1  # decode steps after the prefill's token
        return n / self.decode_seconds if self.decode_seconds > 0 and n > 0 else 0.0


def measure_plain(llm, prompt_ids: list[int], params) -> PlainRun:
    """Decode one request plainly with llm.engine: the baseline for a speed-up."""
    req = llm.engine.make_request(prompt_ids, params)
    t0 = time.perf_counter()
    t_first = None
    for o in llm.engine.run(req):
        if t_first is None and o.new_token_ids:
            t_first = time.perf_counter()
    t_end = time.perf_counter()
    t_first = t_first or t_end
    return PlainRun(list(req.output_ids), req.text, t_first - t0, t_end - t_first)
