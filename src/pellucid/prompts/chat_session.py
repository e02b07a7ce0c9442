"""A multi-turn conversation that stays inside the model's context window.

Each turn fits the conversation with a `ContextBudget`: the system prompt (and its
few-shot turns) and the new user message are never dropped, room for the reply is
reserved, and the oldest whole turns of history give way first. Turns that had to be
dropped are forgotten for good and reported on the `Turn`, so a caller can tell the user.

    session = ChatSession(llm, system="tutor@1.1.0", window=2048)
    turn = session.prepare("What is a prime number?")
    for piece in session.stream(turn):
        print(piece, end="")
    turn.report  # the style checks of the reply, when the style implies any
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pellucid.errors import PellucidError
from pellucid.prompts.budget import Allocation, ContextBudget, Limits, group_turns
from pellucid.prompts.compose import SystemLike, effective_style, system_messages
from pellucid.prompts.counting import TokenCounter
from pellucid.prompts.store import PromptStore
from pellucid.prompts.styles import Style, StyleReport
from pellucid.sampling.params import SamplingParams

Message = dict[str, Any]


@dataclass
class Turn:
    """One exchange: what was sent, what was dropped to fit, and the reply."""

    user: str
    allocation: Allocation
    prompt: str  # the exact text the model receives
    prompt_ids: list[int]
    max_tokens: int | None  # for the reply (None: up to the window)
    dropped_messages: int  # history messages dropped by this turn (forgotten for good)
    dropped_turns: int
    reply: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    report: StyleReport | None = None  # style checks of the reply (None: the style implies none)
    done: bool = False

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)


@dataclass
class ChatSession:
    """A conversation on an `LLM` with a system prompt, a style and a context budget.

    `window` defaults to the engine's context length and is capped by the model's own;
    `reserve` (room kept for each reply) defaults to `params.max_tokens`, so a reply is
    never cut by the window before it reaches max_tokens.
    """

    llm: Any
    system: SystemLike = None
    style: Style | None = None
    params: Any = None  # SamplingParams; default greedy, 512 tokens
    window: int | None = None
    reserve: int | None = None
    limits: Limits = field(default_factory=Limits)
    store: PromptStore | None = None
    now: datetime | None = None
    history: list[Message] = field(default_factory=list)
    dropped_total: int = 0  # history messages dropped so far
    steer: Any = None  # steering for every reply (pellucid.steering.resolve's input)

    def __post_init__(self) -> None:
        if self.params is None:
            self.params = SamplingParams(max_tokens=512, temperature=0.0)
        self.counter = TokenCounter.from_llm(self.llm)
        limit = self.counter.context_length
        assert limit is not None
        if self.window is None:
            self.window = min(self.llm.engine.max_len, limit)
        if (
            isinstance(self.window, bool)
            or not isinstance(self.window, int)
            or not 1 <= self.window <= limit
        ):
            raise PellucidError(f"context window must be 1..{limit} tokens (the model's context length), "
                                f"got {self.window!r}", param="window")  # fmt: skip
        if self.reserve is None:
            self.reserve = self.params.max_tokens or 0
        self.resolved_steer = None
        if self.steer is not None:
            from pellucid import steering

            self.resolved_steer = steering.resolve(self.steer, self.llm.config, self.llm.steering,
                                                   dtype=self.llm.engine_dtype, device=self.llm.engine.device)  # fmt: skip
        # fixed for the whole conversation: resolved once, so 'today' does not move mid-chat
        self.prefix = system_messages(self.system, self.style, now=self.now, store=self.store)
        self.check_style = effective_style(self.system, self.style, self.store)
        self.budget = ContextBudget(self.window, self.counter.count_messages, reserve=self.reserve,
                                    limits=self.limits, truncate=self.counter.truncate)  # fmt: skip

    def messages(self, user_text: str) -> list[Message]:
        """The whole conversation for `user_text`, before any fitting."""
        return [*self.prefix, *self.history, {"role": "user", "content": user_text}]

    def prepare(self, user_text: str) -> Turn:
        """Fit the conversation plus `user_text` into the window (an error with the numbers
        when the system prompt, the message and the reserve alone do not fit)."""
        alloc = self.budget.fit(user_text, system=self.prefix, history=self.history)
        dropped = alloc.history_dropped
        turns = len(group_turns(self.history[:dropped]))
        if dropped:  # the budget drops whole turns from the front: forget them for good
            self.history = self.history[dropped:]
            self.dropped_total += dropped
        prompt = self.counter.render(alloc.messages)
        ids = self.counter.encode(prompt)
        assert len(ids) == alloc.prompt_tokens, (len(ids), alloc.prompt_tokens)
        max_tokens = self.params.max_tokens
        room = self.window - len(ids)
        max_tokens = room if max_tokens is None else min(max_tokens, room)
        return Turn(user_text, alloc, prompt, ids, max_tokens, dropped, turns)

    def stream(self, turn: Turn | str) -> Iterator[str]:
        """Generate the reply of a prepared turn (or of a user text), streamed as text."""
        if isinstance(turn, str):
            turn = self.prepare(turn)
        if turn.done:
            raise PellucidError("this turn was already answered; prepare a new one", param="turn")
        self._make_room(turn.prompt_tokens + (turn.max_tokens or 0))
        params = dataclasses.replace(self.params, max_tokens=turn.max_tokens)
        req = self.llm.engine.make_request(turn.prompt_ids, params, steer=self.resolved_steer)
        for out in self.llm.engine.run(req):
            if out.new_text:
                yield out.new_text
        turn.reply, turn.finish_reason = req.text, req.finish_reason
        turn.completion_tokens = len(req.output_ids)
        turn.done = True
        self.history += [
            {"role": "user", "content": turn.user},
            {"role": "assistant", "content": turn.reply},
        ]
        if self.check_style is not None:
            report = self.check_style.check(turn.reply)
            turn.report = report if report.checks else None

    def keep_partial(self, turn: Turn, text: str) -> None:
        """A reply stopped before its end (Ctrl-C): what was shown stays in the conversation."""
        if turn.done:
            return
        turn.reply, turn.finish_reason, turn.done = text, "interrupted", True
        self.history += [{"role": "user", "content": turn.user}, {"role": "assistant", "content": text}]

    def send(self, user_text: str) -> Turn:
        """One whole exchange; the reply is in `turn.reply`."""
        turn = self.prepare(user_text)
        for _ in self.stream(turn):
            pass
        return turn

    def _make_room(self, need: int) -> None:
        """Grow the engine's context (one slot) when this window needs more than it has."""
        eng = self.llm.engine
        if need > eng.max_len:
            if eng.running or eng.waiting:
                raise PellucidError(f"this conversation needs {need:,} positions and the engine has "
                                    f"{eng.max_len:,} while it serves other requests; create the LLM "
                                    f"with max_len={self.window}", param="window")  # fmt: skip
            self.llm.engine = eng.resized(self.window)
