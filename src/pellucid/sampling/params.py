"""SamplingParams: every control of a request, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from pellucid.errors import PellucidError


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    max_tokens: int | None = 256  # None = up to the context window
    min_tokens: int = 0
    seed: int | None = None
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0
    processed_logprobs: bool = False
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        _range("temperature", self.temperature, 0.0, 100.0)
        _int("top_k", self.top_k, 0, None)
        _range("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _range("min_p", self.min_p, 0.0, 1.0)
        _range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _range("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _range("repetition_penalty", self.repetition_penalty, 0.0, 10.0, low_open=True)
        if self.max_tokens is not None:
            _int("max_tokens", self.max_tokens, 1, None)
        _int("min_tokens", self.min_tokens, 0, self.max_tokens)
        _int("n", self.n, 1, 128)
        _int("top_logprobs", self.top_logprobs, 0, 20)
        if self.seed is not None:
            _int("seed", self.seed, -(2**63), 2**63 - 1)
        for k, v in self.logit_bias.items():
            if not isinstance(k, int) or isinstance(k, bool):
                raise PellucidError(f"logit_bias key {k!r} must be a token id (integer)", param="logit_bias")
            _range(f"logit_bias[{k}]", v, -100.0, 100.0)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise PellucidError(f"stop sequence {s!r} must be a non-empty string", param="stop")


def _range(name: str, v, lo: float, hi: float, *, low_open: bool = False) -> None:
    if isinstance(v, bool) or not isinstance(v, int | float) or v != v:
        raise PellucidError(f"{name} must be a number, got {v!r}", param=name.split("[")[0])
    if v > hi or v < lo or (low_open and v == lo):
        lo_s = f"({lo}" if low_open else f"[{lo}"
        raise PellucidError(f"{name} = {v} is out of range; allowed: {lo_s}, {hi}]", param=name.split("[")[0])


def _int(name: str, v, lo: int, hi: int | None) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise PellucidError(f"{name} must be an integer, got {v!r}", param=name)
    if v < lo or (hi is not None and v > hi):
        raise PellucidError(f"{name} = {v} is out of range; allowed: {lo}..{hi if hi is not None else 'inf'}", param=name)
