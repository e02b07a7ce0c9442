"""A request's life in the engine: prompt ids, the tokens computed so far, its outputs."""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pellucid.sampling.params import SamplingParams
from pellucid.sampling.sampler import SequenceSampler
from pellucid.text.detokenizer import Detokenizer
from pellucid.text.stop import StopMatcher

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RequestOutput:
    """What one engine step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" | None
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    logprobs: list[TokenLogprob] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens taken from the prefix cache
    error: str | None = None  # with finish_reason "error": what failed


class Request:
    def __init__(self, prompt_ids: list[int], params: SamplingParams, sampler: SequenceSampler,
                 detokenizer: Detokenizer | None, request_id: str | None = None, constraint=None,
                 stop_when: Callable[[str], bool] | None = None):  # fmt: skip
        self.request_id = request_id or f"req-{next(_ids)}"
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.sampler = sampler
        self.detok = detokenizer
        self.stop = StopMatcher(params.stop) if params.stop else None
        self.constraint = constraint
        self.stop_when = stop_when  # fed the text as it comes; True ends the request (tool calls: a repeated call)
        self.output_ids: list[int] = []
        self.num_computed = 0  # tokens whose keys/values are in the cache
        self.cached_tokens = 0  # of the prompt, found in the prefix cache
        self.share: tuple[Request, int] | None = None  # (running request, n): copy its first n positions when computed
        self.slot: int | None = None
        self.preempted = 0  # times taken out of the batch to free KV memory (its tokens computed again)
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.error: str | None = None  # set when the request failed inside the engine
        self.stop_reason: str | int | None = None
        self.text = ""  # emitted text so far
        self.arrival = time.perf_counter()
        self.first_token_time: float | None = None
        self.max_len = 0  # set by the engine: the last position this request may reach
        self.steer = None  # pellucid.steering.Steer: vectors added to its rows' residual stream
        self.capture = None  # pellucid.steering.Capture: what of its residual stream to read
        self.capture_positions: list[int] = []  # the prompt positions read, ascending
        self.captured: dict[int, list] = {}  # layer -> (rows, E) pieces, in position order

    def activations(self) -> dict:
        """What was captured: layer -> (positions, E) tensor."""
        import torch

        return {i: torch.cat(parts) for i, parts in sorted(self.captured.items())}

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def fill_len(self) -> int:
        """Tokens computed before the next one is decoded: the prompt, or after a preemption every
        token but the last output (which the next decode step feeds)."""
        return len(self.prompt_ids) + max(0, len(self.output_ids) - 1)

    @property
    def prefill_done(self) -> bool:
        return self.num_computed >= self.fill_len

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def check_finish(self, tok: int, eog_ids) -> tuple[str, str | None, str | int | None]:
        """`tok` was just appended to output_ids: (text to emit, finish reason, stop reason).

        In order: a stop token id or an end-of-generation id, else the token's text through
        the detokenizer and the stop-string matcher, a completed grammar, `stop_when`,
        max_tokens, the context window. Before min_tokens no stop of any kind ends the request (stop strings
        included, as in vLLM); a partial stop string is still held back across the boundary.
        """
        p = self.params
        n_out = len(self.output_ids)
        reason, stop_reason, text = None, None, ""
        can_stop = n_out > p.min_tokens or p.min_tokens == 0
        if tok in p.stop_token_ids and can_stop:
            reason, stop_reason = "stop", tok
        elif tok in eog_ids and not p.ignore_eos and can_stop:
            reason, stop_reason = "stop", tok
        else:
            piece = self.detok.push(tok) if self.detok is not None else ""
            text = self.stop.push(piece, match=can_stop) if self.stop else piece
            if self.stop and self.stop.matched is not None:
                reason, stop_reason = "stop", self.stop.matched
            elif self.constraint is not None and self.constraint.is_finished():
                reason = "stop"  # the grammar is complete: nothing but end-of-generation may follow
            elif self.stop_when is not None and text and can_stop and self.stop_when(text):
                reason = "stop"
            elif p.max_tokens is not None and n_out >= p.max_tokens:
                reason = "length"
            elif len(self.prompt_ids) + n_out >= self.max_len:
                reason = "length"
        if reason is not None:
            tail = self.detok.flush() if self.detok is not None else ""
            if self.stop:
                matched = reason == "stop" and stop_reason == self.stop.matched
                tail = "" if matched else self.stop.push(tail, match=can_stop) + self.stop.flush()
            text += tail
        return text, reason, stop_reason
