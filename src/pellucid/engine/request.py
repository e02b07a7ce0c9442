"""A request's life in the engine: prompt ids, the tokens computed so far, its outputs."""

from __future__ import annotations

import enum
import itertools
import time
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
    finish_reason: str | None  # "stop" | "length" | "abort" | None
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    logprobs: list[TokenLogprob] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0


class Request:
    def __init__(self, prompt_ids: list[int], params: SamplingParams, sampler: SequenceSampler,
                 detokenizer: Detokenizer | None, request_id: str | None = None, constraint=None):  # fmt: skip
        self.request_id = request_id or f"req-{next(_ids)}"
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.sampler = sampler
        self.detok = detokenizer
        self.stop = StopMatcher(params.stop) if params.stop else None
        self.constraint = constraint
        self.output_ids: list[int] = []
        self.num_computed = 0  # tokens whose keys/values are in the cache
        self.slot: int | None = None
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.text = ""  # emitted text so far
        self.arrival = time.perf_counter()
        self.first_token_time: float | None = None
        self.max_len = 0  # set by the engine: the last position this request may reach

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def prefill_done(self) -> bool:
        return self.num_computed >= len(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
