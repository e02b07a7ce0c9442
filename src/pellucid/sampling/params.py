"""SamplingParams: every control of a request, validated at construction.

One type for every door (Python API, CLI, HTTP server). Errors name the field, the value
and the valid range. Semantics (order of the chain, penalties, logit_bias, stop, logprobs,
determinism) are in the sampler's docstring and docs/generation.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from pellucid.errors import PellucidError

BIAS_BAN = -100.0  # a logit_bias of exactly -100 bans the token (its logit becomes -inf)
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class Knob:
    """A numeric sampling control, declared once here: its range and the value that turns it
    off, and what every door derives from that: the CLI flag (`--top-p`) and its help, the
    YAML config's key under `sampling:`, an extra field of the HTTP bodies (where OpenAI's
    and Anthropic's own bodies lack it), the inspector's slider and the chain view's setting.
    A new control is its SamplingParams field, its entry in KNOBS and its stage in the sampler."""

    kind: type  # float or int
    low: float
    high: float | None  # None: no upper bound
    off: float  # the value that changes nothing (the field's default)
    help: str  # the CLI flag's help
    label: str  # the chain view's setting: f"{label}={value}"
    slider: tuple[float, float, float, float]  # the inspector's range: min, max, step, start
    low_open: bool = False  # `low` itself is not allowed
    extra: bool = True  # an extra field of the HTTP bodies (not one of OpenAI's own)
    short: str | None = None  # the CLI's short flag

    def check(self, name: str, v) -> None:
        if self.kind is int:
            _int(name, v, int(self.low), None if self.high is None else int(self.high), note=f"{self.off:g} = off")
        else:
            _range(name, v, self.low, self.high, low_open=self.low_open)

    def setting(self, v) -> str:
        """How the chain view names the value: "off" where it changes nothing."""
        return "off" if v == self.off else f"{self.label}={v:g}"


KNOBS: dict[str, Knob] = {
    "temperature": Knob(float, 0.0, 100.0, 1.0, "0 = greedy.", "T", (0, 2, 0.05, 0.7), extra=False, short="-t"),
    "top_k": Knob(int, 0, None, 0, "Keep the k most likely tokens (0 = off).", "k", (0, 200, 1, 40)),
    "top_p": Knob(float, 0.0, 1.0, 1.0, "Keep the smallest set with this much probability (1 = off).", "p",
                  (0.01, 1, 0.01, 0.95), low_open=True, extra=False),
    "min_p": Knob(float, 0.0, 1.0, 0.0, "Keep tokens with p >= min_p * p_max (0 = off).", "min_p", (0, 1, 0.01, 0)),
    "typical_p": Knob(float, 0.0, 1.0, 1.0, "Keep the tokens whose surprisal is closest to the entropy, up to this much "
                      "probability (1 = off).", "typical_p", (0.01, 1, 0.01, 1), low_open=True),
    "frequency_penalty": Knob(float, -2.0, 2.0, 0.0, "logit -= count * this, for generated tokens; -2..2.", "frequency",
                              (-2, 2, 0.1, 0), extra=False),
    "presence_penalty": Knob(float, -2.0, 2.0, 0.0, "logit -= this, for tokens generated at least once; -2..2.", "presence",
                             (-2, 2, 0.1, 0), extra=False),
    "repetition_penalty": Knob(float, 0.0, 10.0, 1.0, "Divide (multiply if negative) logits of tokens in prompt + output; "
                               "1 = off.", "repetition", (0.5, 2, 0.05, 1), low_open=True),
}  # fmt: skip


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    typical_p: float = 1.0  # locally typical sampling; 1 = off
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0  # 1 = off
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> [-100, 100]
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    max_tokens: int | None = 256  # None = up to the context window
    min_tokens: int = 0
    seed: int | None = None  # None = a fresh random seed per request
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0  # 0..20; > 0 turns logprobs on
    processed_logprobs: bool = False  # False: from the raw model distribution
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is None:
            self.stop = []
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        if self.logit_bias is None:
            self.logit_bias = {}
        for name, knob in KNOBS.items():
            knob.check(name, getattr(self, name))
        if self.max_tokens is not None:
            _int("max_tokens", self.max_tokens, 1, None)
        _int("min_tokens", self.min_tokens, 0, self.max_tokens, note="at most max_tokens" if self.max_tokens else "")
        _int("n", self.n, 1, 128)
        _int("top_logprobs", self.top_logprobs, 0, MAX_TOP_LOGPROBS)
        for name in ("logprobs", "processed_logprobs", "ignore_eos"):
            if not isinstance(getattr(self, name), bool):
                raise PellucidError(f"{name} must be true or false, got {getattr(self, name)!r}", param=name)
        if self.top_logprobs > 0:
            self.logprobs = True
        if self.seed is not None:
            _int("seed", self.seed, -(2**63), 2**64 - 1)
        if not isinstance(self.logit_bias, dict):
            raise PellucidError(f"logit_bias must be a mapping of token id -> bias, got {self.logit_bias!r}", param="logit_bias")
        self.logit_bias = {_bias_key(k): v for k, v in self.logit_bias.items()}
        for k, v in self.logit_bias.items():
            check_bias_value(k, v)
            self.logit_bias[k] = float(v)
        if not isinstance(self.stop, list | tuple):
            raise PellucidError(f"stop must be a string or a list of strings, got {self.stop!r}", param="stop")
        self.stop = list(dict.fromkeys(self.stop))  # duplicates change nothing
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise PellucidError(f"stop sequence {s!r} must be a non-empty string", param="stop")
        if not isinstance(self.stop_token_ids, list | tuple | set | frozenset):
            raise PellucidError(f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}", param="stop_token_ids")
        self.stop_token_ids = list(self.stop_token_ids)
        for t in self.stop_token_ids:
            _int("stop_token_ids", t, 0, None, shown=f"stop_token_ids entry {t!r}")

    def check_vocab(self, vocab_size: int) -> None:
        """Every token id in the params must exist in a vocabulary of `vocab_size` tokens."""
        for k in self.logit_bias:
            if k >= vocab_size:
                raise PellucidError(f"logit_bias token id {k} is not in the vocabulary (0..{vocab_size - 1})", param="logit_bias")
        for t in self.stop_token_ids:
            if t >= vocab_size:
                raise PellucidError(f"stop_token_ids entry {t} is not in the vocabulary (0..{vocab_size - 1})", param="stop_token_ids")


def build_params(*layers: Mapping[str, Any] | SamplingParams | None, vocab_size: int | None = None) -> SamplingParams:
    """The one builder of SamplingParams for every door (API, CLI, config, server).

    `layers` go from the lowest priority to the highest (an API's or command's defaults, a
    config file, what the caller gave); each key a layer holds replaces the one below it,
    None included (callers whose None means "not given" leave such keys out). A
    SamplingParams layer holds every field. `vocab_size` also checks the token ids. Errors
    are PellucidErrors naming the field; each door turns them into its own words (a flag,
    a config line, an HTTP 400).
    """
    values: dict[str, Any] = {}
    for layer in layers:
        if layer is None:
            continue
        values.update(asdict(layer) if isinstance(layer, SamplingParams) else layer)
    unknown = sorted(set(values) - FIELDS)
    if unknown:
        raise PellucidError(f"unknown sampling parameter {unknown[0]!r}; known: {', '.join(sorted(FIELDS))}", param=unknown[0])
    params = SamplingParams(**values)
    if vocab_size is not None:
        params.check_vocab(vocab_size)
    return params


FIELDS = frozenset(f.name for f in fields(SamplingParams))


def _bias_key(k) -> int:
    """A logit_bias key: a token id, or its decimal string (JSON object keys are strings)."""
    if isinstance(k, str) and k.strip().isdigit():
        k = int(k.strip())
    if isinstance(k, bool) or not isinstance(k, int):
        raise PellucidError(
            f"logit_bias key {k!r} is not a token id: keys are integers 0..vocab_size-1 "
            "(the CLI and the YAML config also take the text of a single token)",
            param="logit_bias",
        )
    if k < 0:
        raise PellucidError(f"logit_bias key {k} is not a token id: token ids are >= 0", param="logit_bias")
    return k


def check_bias_value(key, v) -> None:
    """A logit_bias value must be a number in [-100, 100] (-100 bans the token)."""
    _range(f"logit_bias[{key!r}]", v, -100.0, 100.0)


def _is_number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, int | float) and v == v


def _range(name: str, v, lo: float, hi: float, *, low_open: bool = False) -> None:
    allowed = f"{'(' if low_open else '['}{lo:g}, {hi:g}]"
    param = name.split("[")[0]
    if not _is_number(v):
        raise PellucidError(f"{name} must be a number in {allowed}, got {v!r}", param=param)
    if v > hi or v < lo or (low_open and v == lo):
        raise PellucidError(f"{name} = {v!r} is out of range; allowed: {allowed}", param=param)


def _int(name: str, v, lo: int, hi: int | None, *, note: str = "", shown: str | None = None) -> None:
    allowed = f"{lo}..{hi if hi is not None else 'inf'}" + (f" ({note})" if note else "")
    shown = shown or name
    if isinstance(v, float) and v.is_integer():
        raise PellucidError(f"{shown} must be an integer in {allowed}, got the float {v!r}", param=name)
    if isinstance(v, bool) or not isinstance(v, int):
        raise PellucidError(f"{shown} must be an integer in {allowed}, got {v!r}", param=name)
    if v < lo or (hi is not None and v > hi):
        raise PellucidError(f"{shown} = {v} is out of range; allowed: {allowed}", param=name)
