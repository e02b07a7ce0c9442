"""The context-window budget: the concept note's diagram, made to fit real conversations.

Sections, in the order they appear in the conversation sent to the model:

    system prompt         never dropped (the system message and any few-shot turns)
    retrieved context     chunks dropped lowest score first (without scores: last first);
                          the first chunk that does not fit may be cut to fit when a
                          `truncate(text, n_tokens)` function is given
    conversation history  whole turns dropped oldest first (a user message and the
                          replies after it go together)
    current message       never dropped
    reserved for response tokens kept free for the reply

All counting goes through the caller's `count_messages(messages) -> int`, which for real
models renders the chat template and tokenizes it. Template overhead is not additive per
message, so every decision counts the whole candidate conversation, never a sum of parts.
The report attributes tokens by adding the sections one at a time to a conversation of
empty messages and counting after each step; the steps telescope, so the rows (template
overhead first) add up exactly to the counted prompt.

When history and retrieved context compete for room, `drop_first` says which gives way
first ("history" by default: the retrieved context answers the current question).
When the system prompt, the current message and the reserve cannot fit, `fit` raises a
PellucidError with the numbers; nothing undroppable is ever cut silently.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table

from pellucid.errors import PellucidError
from pellucid.prompts.system import SystemPrompt

Message = dict[str, str]
CountMessages = Callable[[list[Message]], int]
Truncate = Callable[[str, int], str]

OVERHEAD = "template overhead"
SYSTEM = "system prompt"
RETRIEVED = "retrieved context"
HISTORY = "conversation history"
CURRENT = "current message"
RESERVED = "reserved for response"


@dataclass
class Chunk:
    """One piece of retrieved context; a higher `score` is more relevant."""

    text: str
    score: float | None = None
    source: str = ""


@dataclass
class Limits:
    """Optional per-section token limits (None: only the window limits the section).

    A limit on the system prompt or the current message is a check: those are never cut,
    so exceeding it is an error.
    """

    system: int | None = None
    retrieved: int | None = None
    history: int | None = None
    current: int | None = None


@dataclass
class SectionUsage:
    """One row of the allocation report; items are messages, or chunks for retrieval."""

    name: str
    tokens: int
    limit: int | None = None
    kept: int = 0
    dropped: int = 0
    truncated: int = 0  # of the kept items, how many were cut to fit


class BudgetTable(Table):
    """A rich Table that `print()` and `str()` show as plain text (100 columns)."""

    def render_text(self, width: int = 100) -> str:
        console = Console(file=io.StringIO(), width=width, color_system=None)
        console.print(self)
        return console.file.getvalue()  # type: ignore[attr-defined]

    def __str__(self) -> str:
        return self.render_text()


@dataclass
class Allocation:
    """What `ContextBudget.fit` decided: the messages to send and the accounting."""

    messages: list[Message]  # the conversation to render and send
    sections: list[SectionUsage]  # overhead, system, retrieved, history, current, reserved
    prompt_tokens: int  # count_messages(messages)
    reserve: int
    window: int
    chunks: list[Chunk]  # the retrieved chunks kept (one possibly truncated), in input order
    chunk_status: list[str]  # per input chunk: "kept", "truncated" or "dropped"
    history_dropped: int  # how many of the oldest history messages were left out
    history: list[Message] = field(default_factory=list)  # the history messages kept

    @property
    def total(self) -> int:
        """Prompt tokens plus the reserve: never more than the window."""
        return self.prompt_tokens + self.reserve

    @property
    def free(self) -> int:
        return self.window - self.total

    @property
    def max_new_tokens(self) -> int:
        """The most tokens the reply may have (at least the reserve)."""
        return self.window - self.prompt_tokens

    def section(self, name: str) -> SectionUsage:
        for s in self.sections:
            if s.name == name:
                return s
        raise KeyError(name)

    def table(self) -> BudgetTable:
        """The allocation as a table: one row per section, then total and window. It is a
        rich Table (`console.print(alloc.table())`) that prints as plain text too."""
        t = BudgetTable(title=f"Context budget: {self.total:,} of {self.window:,} tokens")
        for col in ("section", "tokens", "limit", "% window", "kept", "dropped"):
            t.add_column(col, justify="left" if col == "section" else "right")
        for s in self.sections:
            kept = str(s.kept) + (f" ({s.truncated} cut)" if s.truncated else "")
            itemized = s.name not in (OVERHEAD, RESERVED)
            t.add_row(
                s.name,
                f"{s.tokens:,}",
                "" if s.limit is None else f"{s.limit:,}",
                f"{100 * s.tokens / self.window:.1f}",
                kept if itemized else "",
                str(s.dropped) if itemized else "",
                end_section=s.name == RESERVED,
            )
        t.add_row("total", f"{self.total:,}", "", f"{100 * self.total / self.window:.1f}")
        t.add_row("free", f"{self.free:,}", "", f"{100 * self.free / self.window:.1f}")
        t.add_row("context window", f"{self.window:,}", "", "100.0")
        return t

    def render_text(self, width: int = 100) -> str:
        """The table as plain text."""
        return self.table().render_text(width)

    def __rich__(self) -> BudgetTable:
        return self.table()


def format_context(chunks: Sequence[Chunk]) -> str:
    """The default layout of retrieved chunks: an instruction, then numbered chunks."""
    parts = ["Use the following retrieved context where it is relevant."]
    for i, c in enumerate(chunks, 1):
        head = f"[{i}]" + (f" ({c.source})" if c.source else "")
        parts.append(f"{head} {c.text}")
    return "\n\n".join(parts)


def group_turns(history: Sequence[Message]) -> list[list[Message]]:
    """Split history into turns: a user message and the messages after it, up to the next."""
    turns: list[list[Message]] = []
    for m in history:
        if m.get("role") == "user" or not turns:
            turns.append([m])
        else:
            turns[-1].append(m)
    return turns


def _limit(name: str, value: int | None) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise PellucidError(
            f"budget limit for {name} must be a non-negative integer or None, got {value!r}",
            param=f"limits.{name}",
        )
    return value


def _check_message(m: object, where: str) -> Message:
    if not (isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m):
        raise PellucidError(
            f"{where} must be a message {{'role': ..., 'content': ...}}, got {m!r}", param=where
        )
    if not isinstance(m["content"], str):
        raise PellucidError(f"{where} content must be text, got {m['content']!r}", param=where)
    return m


@dataclass
class ContextBudget:
    """Fits a conversation into a model's context window by a stated policy.

    `count_messages` counts the tokens of a whole conversation as the model will see it
    (chat template included); `truncate(text, n)` cuts text to at most n tokens at a
    token boundary and enables truncating a retrieved chunk.
    """

    window: int
    count_messages: CountMessages
    reserve: int = 0
    limits: Limits = field(default_factory=Limits)
    truncate: Truncate | None = None
    drop_first: str = "history"  # or "retrieved": which section gives way first
    context_placement: str = "system"  # retrieved context goes into "system" or "user"
    format_context: Callable[[Sequence[Chunk]], str] = format_context
    min_chunk_tokens: int = 16  # a chunk cut shorter than this is dropped instead

    def __post_init__(self) -> None:
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise PellucidError(
                f"context window must be a positive integer, got {self.window!r}",
                param="window",
            )
        if isinstance(self.reserve, bool) or not isinstance(self.reserve, int) or self.reserve < 0:
            raise PellucidError(
                f"reserve must be a non-negative integer, got {self.reserve!r}", param="reserve"
            )
        for name in ("system", "retrieved", "history", "current"):
            _limit(name, getattr(self.limits, name))
        if self.drop_first not in ("history", "retrieved"):
            raise PellucidError(
                f"drop_first must be 'history' or 'retrieved', got {self.drop_first!r}",
                param="drop_first",
            )
        if self.context_placement not in ("system", "user"):
            raise PellucidError(
                f"context_placement must be 'system' or 'user', got {self.context_placement!r}",
                param="context_placement",
            )

    def fit(
        self,
        current: str | Message,
        *,
        system: str | SystemPrompt | Sequence[Message] | None = None,
        history: Sequence[Message] = (),
        retrieved: Sequence[Chunk | str] = (),
    ) -> Allocation:
        """Choose what to send: everything that fits, dropping by the stated policy.

        The steps: check that the parts never dropped fit with the reserve; choose how
        many chunks and turns to keep (the section that gives way last picks first); drop
        by policy until the combination fits (template overhead is not additive); report
        what each section costs.
        """
        layout = _Layout(self, _Parts.of(current, system, history, retrieved))
        _check_undroppable(self, layout.measure([], []))
        return _allocation(layout, _choose(layout))


# ---------------------------------------------------------------------------------------
# fitting: the parts, a choice of what to keep, the layout that counts candidates


@dataclass
class _Parts:
    """The inputs of one fit, checked: messages as dicts, history in turns, chunks ranked."""

    current: Message
    system: list[Message]
    history: list[Message]
    turns: list[list[Message]]
    chunks: list[Chunk]
    priority: list[int]  # chunk indices, most relevant first

    @classmethod
    def of(
        cls,
        current: str | Message,
        system: str | SystemPrompt | Sequence[Message] | None,
        history: Sequence[Message],
        retrieved: Sequence[Chunk | str],
    ) -> _Parts:
        if isinstance(current, str):
            current = {"role": "user", "content": current}
        current = dict(_check_message(current, "current"))
        if system is None:
            sys_msgs: list[Message] = []
        elif isinstance(system, str):
            sys_msgs = [{"role": "system", "content": system}] if system else []
        elif isinstance(system, SystemPrompt):
            sys_msgs = system.prefix_messages()
        else:
            sys_msgs = [dict(_check_message(m, f"system[{i}]")) for i, m in enumerate(system)]
        hist = [dict(_check_message(m, f"history[{i}]")) for i, m in enumerate(history)]
        chunks = [c if isinstance(c, Chunk) else Chunk(str(c)) for c in retrieved]
        # highest score first, unscored after scored, ties by position
        priority = sorted(
            range(len(chunks)),
            key=lambda i: (chunks[i].score is None, -(chunks[i].score or 0.0), i),
        )
        return cls(current, sys_msgs, hist, group_turns(hist), chunks, priority)

    def kept_chunks(self, k: int, cut: str | None) -> list[Chunk]:
        """The k most relevant chunks (plus the next one, cut to `cut`), in input order."""
        keep = {i: self.chunks[i] for i in self.priority[:k]}
        if cut is not None:
            i = self.priority[k]
            keep[i] = Chunk(cut, self.chunks[i].score, self.chunks[i].source)
        return [keep[i] for i in sorted(keep)]

    def kept_history(self, n: int) -> list[Message]:
        """The newest n turns."""
        return [m for turn in self.turns[len(self.turns) - n :] for m in turn] if n else []


@dataclass
class _Choice:
    """What to keep: the k most relevant chunks whole, the next one cut to `cut` (None:
    not at all), and the newest n turns of history."""

    k: int
    cut: str | None
    n: int

    def chunks(self, parts: _Parts) -> list[Chunk]:
        return parts.kept_chunks(self.k, self.cut)

    def history(self, parts: _Parts) -> list[Message]:
        return parts.kept_history(self.n)


class _Layout:
    """Candidate conversations, as the budget lays them out, and their counts.

    Counts are cached: the searches try many candidates that share their prefixes.
    """

    def __init__(self, budget: ContextBudget, parts: _Parts):
        self.b, self.p = budget, parts
        self.cache: dict[str, int] = {}

    def count(self, messages: list[Message]) -> int:
        key = json.dumps(messages, sort_keys=True, ensure_ascii=False)
        if key not in self.cache:
            n = self.b.count_messages([dict(m) for m in messages])
            assert isinstance(n, int) and n >= 0, f"count_messages returned {n!r}"
            self.cache[key] = n
        return self.cache[key]

    def assemble(
        self,
        chunks: list[Chunk],
        history: list[Message],
        *,
        system: list[Message] | None = None,
        current: Message | None = None,
    ) -> list[Message]:
        """System, retrieved context (in the system message or before the current one),
        history, current message; `system` and `current` default to the fit's own."""
        msgs = [dict(m) for m in (self.p.system if system is None else system)]
        ctx = self.b.format_context(chunks) if chunks else ""
        if ctx and self.b.context_placement == "system":
            if msgs and msgs[0]["role"] == "system":
                text = msgs[0]["content"]
                msgs[0]["content"] = f"{text}\n\n{ctx}" if text else ctx
            else:
                msgs.insert(0, {"role": "system", "content": ctx})
        msgs += [dict(m) for m in history]
        cur = dict(self.p.current if current is None else current)
        if ctx and self.b.context_placement == "user":
            cur["content"] = ctx + "\n\n" + cur["content"]
        msgs.append(cur)
        return msgs

    def measure(self, chunks: list[Chunk], history: list[Message]) -> dict[str, int]:
        """Tokens per section, by adding sections one at a time; the values telescope."""
        empty_user = {**self.p.current, "content": ""}
        has_system = bool(self.p.system) and self.p.system[0]["role"] == "system"
        blank = [{"role": "system", "content": ""}] if has_system else []
        steps = [
            (OVERHEAD, self.assemble([], [], system=blank, current=empty_user)),
            (SYSTEM, self.assemble([], [], current=empty_user)),
            (RETRIEVED, self.assemble(chunks, [], current=empty_user)),
            (HISTORY, self.assemble(chunks, history, current=empty_user)),
            (CURRENT, self.assemble(chunks, history)),
        ]
        out, before = {}, 0
        for name, msgs in steps:
            n = self.count(msgs)
            out[name] = n - before
            before = n
        return out

    def room(self) -> int:
        """Tokens the prompt may have: the window less the reserve."""
        return self.b.window - self.b.reserve

    def fits(self, chunks: list[Chunk], history: list[Message]) -> bool:
        """Within the room and within the limits of retrieved context and history."""
        if self.count(self.assemble(chunks, history)) > self.room():
            return False
        lim = self.b.limits
        if lim.retrieved is None and lim.history is None:
            return True
        m = self.measure(chunks, history)
        return (lim.retrieved is None or m[RETRIEVED] <= lim.retrieved) and (
            lim.history is None or m[HISTORY] <= lim.history
        )


def _check_undroppable(b: ContextBudget, base: dict[str, int]) -> None:
    """An error with the numbers when the system prompt, the current message and the
    reserve alone do not fit, or exceed their limits (they are never cut)."""
    base_total = sum(base.values())
    if base_total + b.reserve > b.window:
        raise PellucidError(
            f"the parts that are never dropped do not fit: system prompt {base[SYSTEM]} "
            f"+ current message {base[CURRENT]} + template overhead {base[OVERHEAD]} = "
            f"{base_total} tokens, plus {b.reserve} reserved for the response = "
            f"{base_total + b.reserve}, over the context window of {b.window} by "
            f"{base_total + b.reserve - b.window}; shorten the system prompt or the "
            "message, or reserve fewer tokens",
            param="messages",
        )
    for name, limit, param in (
        (SYSTEM, b.limits.system, "limits.system"),
        (CURRENT, b.limits.current, "limits.current"),
    ):
        if limit is not None and base[name] > limit:
            raise PellucidError(
                f"the {name} is {base[name]} tokens, over its limit of {limit}; it is "
                "never cut, so shorten it or raise the limit",
                param=param,
            )


def _largest(lo: int, hi: int, ok: Callable[[int], bool]) -> int:
    """The largest x in [lo, hi] with ok(x), given ok(lo); binary search."""
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _pick_chunks(layout: _Layout, history: list[Message]) -> tuple[int, str | None]:
    """How many chunks to keep whole, most relevant first, and the cut of the next one."""
    p, b = layout.p, layout.b
    k = _largest(0, len(p.chunks), lambda k: layout.fits(p.kept_chunks(k, None), history))
    if b.truncate is None or k == len(p.chunks):
        return k, None
    # n tokens of the next chunk cost at least n, so the room left bounds n
    kept = p.kept_chunks(k, None)
    hi = layout.room() - layout.count(layout.assemble(kept, history))
    if (limit := b.limits.retrieved) is not None:
        hi = min(hi, limit - layout.measure(kept, history)[RETRIEVED])
    text, truncate = p.chunks[p.priority[k]].text, b.truncate

    def fits_cut(n: int) -> bool:
        return layout.fits(p.kept_chunks(k, truncate(text, n)), history)

    lo = b.min_chunk_tokens
    if hi < lo or not fits_cut(lo):
        return k, None
    cut = truncate(text, _largest(lo, hi, fits_cut))
    return k, (cut if cut.strip() else None)


def _pick_history(layout: _Layout, chunks: list[Chunk]) -> int:
    """How many of the newest turns fit with these chunks."""
    p = layout.p
    return _largest(0, len(p.turns), lambda n: layout.fits(chunks, p.kept_history(n)))


def _choose(layout: _Layout) -> _Choice:
    """The section that gives way last picks first, the other takes the room left; then
    drop by policy until the combination fits (template overhead is not additive)."""
    p, history_first = layout.p, layout.b.drop_first == "history"
    if history_first:
        k, cut = _pick_chunks(layout, [])
        n = _pick_history(layout, p.kept_chunks(k, cut))
    else:
        n = _pick_history(layout, [])
        k, cut = _pick_chunks(layout, p.kept_history(n))
    while not layout.fits(p.kept_chunks(k, cut), p.kept_history(n)):
        if history_first and n > 0:
            n -= 1
        elif cut is not None:
            cut = None
        elif k > 0:
            k -= 1
        else:
            assert n > 0, "the empty selection was checked to fit"
            n -= 1
    return _Choice(k, cut, n)


def _allocation(layout: _Layout, choice: _Choice) -> Allocation:
    """The messages of a choice and the report: tokens, limits, kept and dropped per section."""
    p, b, lim = layout.p, layout.b, layout.b.limits
    chunks, history = choice.chunks(p), choice.history(p)
    messages = layout.assemble(chunks, history)
    used = layout.measure(chunks, history)
    prompt_tokens = layout.count(messages)
    assert sum(used.values()) == prompt_tokens, (used, prompt_tokens)
    assert prompt_tokens <= layout.room(), (prompt_tokens, b.reserve, b.window)

    status = ["dropped"] * len(p.chunks)
    for i in p.priority[: choice.k]:
        status[i] = "kept"
    if choice.cut is not None:
        status[p.priority[choice.k]] = "truncated"
    n_chunks = sum(s != "dropped" for s in status)
    n_dropped = len(p.history) - len(history)
    sections = [
        SectionUsage(OVERHEAD, used[OVERHEAD]),
        SectionUsage(SYSTEM, used[SYSTEM], lim.system, kept=len(p.system)),
        SectionUsage(
            RETRIEVED,
            used[RETRIEVED],
            lim.retrieved,
            kept=n_chunks,
            dropped=len(p.chunks) - n_chunks,
            truncated=int(choice.cut is not None),
        ),
        SectionUsage(HISTORY, used[HISTORY], lim.history, kept=len(history), dropped=n_dropped),
        SectionUsage(CURRENT, used[CURRENT], lim.current, kept=1),
        SectionUsage(RESERVED, b.reserve),
    ]
    return Allocation(
        messages=messages,
        sections=sections,
        prompt_tokens=prompt_tokens,
        reserve=b.reserve,
        window=b.window,
        chunks=chunks,
        chunk_status=status,
        history_dropped=n_dropped,
        history=history,
    )
