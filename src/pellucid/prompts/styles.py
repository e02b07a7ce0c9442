"""Output styles: the concept note's style dimensions as presets, and format enforcement.

A `Style` picks at most one preset per dimension (length, formality, structure, persona,
explanation depth), an optional word limit and an optional format `Skeleton`; it renders
to plain instruction sentences for the system prompt. After generation, `Style.check`
(or `check_format`, `check_word_limit`, `check_bullets`) reports whether a reply followed
the mechanical parts of the style. Tone and depth cannot be checked by rule and are not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pellucid.errors import PellucidError

LENGTH = {
    "concise": "Keep your answers short: a few sentences at most, with no filler.",
    "detailed": "Give detailed answers that explain the reasoning and cover the important cases.",
    "exhaustive": "Give exhaustive answers that cover every relevant aspect, edge case and caveat.",
}
FORMALITY = {
    "casual": "Use a casual, conversational tone.",
    "professional": "Use a clear, professional tone.",
    "academic": "Use a formal, academic tone and precise terminology.",
}
STRUCTURE = {
    "prose": "Write in flowing paragraphs, without bullet points or headings.",
    "lists": "Use bullet points for lists of items or steps.",
    "tables": "Present comparisons and structured data as Markdown tables.",
    "code": "Lead with code in fenced code blocks and keep the explanation around it brief.",
}
PERSONA = {
    "neutral": "Stay neutral and factual.",
    "friendly": "Be warm, friendly and encouraging.",
    "expert": (
        "Respond as a senior expert in the field: be direct, point out issues clearly "
        "and suggest improvements."
    ),
}
DEPTH = {
    "eli5": (
        "Explain things as you would to a curious five-year-old: simple words, everyday "
        "analogies, no jargon."
    ),
    "technical": "Explain at a technical level for a practitioner, using the correct terms.",
    "expert": "Assume expert knowledge: skip the basics and focus on the subtle points.",
}

# dimension name (as in Style and in prompt files) -> preset name -> instruction sentence
DIMENSIONS: dict[str, dict[str, str]] = {
    "length": LENGTH,
    "formality": FORMALITY,
    "structure": STRUCTURE,
    "persona": PERSONA,
    "depth": DEPTH,
}


def style_choice_error(dimension: str, value: object) -> str | None:
    """The message for a bad preset value, or None when `value` is allowed (or None)."""
    if value is None:
        return None
    allowed = DIMENSIONS[dimension]
    if value in allowed:
        return None
    return f"unknown {dimension} style {value!r}; allowed values for {dimension}: " + ", ".join(
        allowed
    )


# ---------------------------------------------------------------------------------------
# format enforcement


@dataclass
class Section:
    """One heading of a skeleton; `hint` says what goes under it."""

    title: str
    hint: str = ""
    optional: bool = False


@dataclass
class Skeleton:
    """A named response layout made of Markdown headings, rendered as an instruction."""

    name: str
    sections: list[Section]
    level: int = 2  # heading level used in the instruction (## = 2)

    def __post_init__(self) -> None:
        if not self.sections:
            raise PellucidError(f"skeleton {self.name!r} has no sections", param="skeleton")
        titles = [s.title.strip().lower() for s in self.sections]
        if len(set(titles)) != len(titles):
            raise PellucidError(
                f"skeleton {self.name!r} repeats a section title: {titles}", param="skeleton"
            )
        if not 1 <= self.level <= 6:
            raise PellucidError(
                f"skeleton level must be 1..6, got {self.level}", param="skeleton.level"
            )

    def render(self) -> str:
        """The instruction text, in the concept note's 'Always structure ...' form."""
        lines = ["Always structure your response as:"]
        for i, s in enumerate(self.sections):
            if i:
                lines.append("")
            lines.append("#" * self.level + " " + s.title)
            hint = s.hint
            if s.optional and "applicable" not in hint.lower():
                hint = f"{hint} (if applicable)" if hint else "If applicable"
            if hint:
                lines.append(f"[{hint}]")
        return "\n".join(lines)


SKELETONS: dict[str, Skeleton] = {
    "summary-details-next-steps": Skeleton(
        "summary-details-next-steps",
        [
            Section("Summary", "1-2 sentences"),
            Section("Details", "Bullet points"),
            Section("Next Steps", "If applicable", optional=True),
        ],
    ),
    "answer-explanation": Skeleton(
        "answer-explanation",
        [
            Section("Answer", "The direct answer in one sentence"),
            Section("Explanation", "Why, in a short paragraph"),
        ],
    ),
}


def get_skeleton(name: str) -> Skeleton:
    """A built-in skeleton by name."""
    try:
        return SKELETONS[name]
    except KeyError:
        raise PellucidError(
            f"unknown skeleton {name!r}; built-in skeletons: " + ", ".join(SKELETONS),
            param="style.skeleton",
        ) from None


@dataclass
class SectionCheck:
    """What `check_format` found for one skeleton section."""

    title: str
    optional: bool
    present: bool
    non_empty: bool
    line: int | None  # 1-based line of its heading in the reply


@dataclass
class FormatReport:
    """Whether a reply followed a skeleton: required sections present, in order, non-empty."""

    skeleton: str
    sections: list[SectionCheck]
    missing: list[str]  # required sections without a heading
    empty: list[str]  # sections whose heading has nothing under it
    in_order: bool  # the sections that are present appear in the skeleton's order
    extra: list[str]  # top-level headings that are not in the skeleton

    @property
    def ok(self) -> bool:
        return not self.missing and not self.empty and self.in_order

    def summary(self) -> str:
        """One line for a person."""
        if self.ok:
            return f"follows {self.skeleton}"
        problems = []
        if self.missing:
            problems.append("missing " + ", ".join(self.missing))
        if self.empty:
            problems.append("empty " + ", ".join(self.empty))
        if not self.in_order:
            problems.append("sections out of order")
        return f"does not follow {self.skeleton}: " + "; ".join(problems)


_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)[ \t]*#*[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")


def _norm_title(title: str) -> str:
    title = re.sub(r"[*_`]", "", title).strip().rstrip(":").strip()
    return re.sub(r"\s+", " ", title).lower()


def _headings(lines: list[str]) -> list[tuple[int, int, str]]:
    """(line index, level, normalized title) of each ATX heading outside code fences."""
    found, in_fence = [], False
    for i, line in enumerate(lines):
        if _FENCE.match(line):
            in_fence = not in_fence
            continue
        m = None if in_fence else _HEADING.match(line)
        if m:
            found.append((i, len(m.group(1)), _norm_title(m.group(2))))
    return found


def check_format(reply: str, skeleton: Skeleton | str) -> FormatReport:
    """Report whether `reply` has the skeleton's Markdown headings (any level), in order.

    A section's content runs from its heading to the next skeleton heading or the next
    heading of the same or a higher level; headings are matched case-insensitively,
    ignoring emphasis and a trailing colon. The first occurrence of a title counts.
    """
    if isinstance(skeleton, str):
        skeleton = get_skeleton(skeleton)
    lines = reply.splitlines()
    heads = _headings(lines)
    wanted = {_norm_title(s.title) for s in skeleton.sections}
    first: dict[str, int] = {}  # title -> index into heads
    for k, (_, _, title) in enumerate(heads):
        if title in wanted and title not in first:
            first[title] = k
    checks: list[SectionCheck] = []
    for s in skeleton.sections:
        k = first.get(_norm_title(s.title))
        if k is None:
            checks.append(SectionCheck(s.title, s.optional, False, False, None))
            continue
        start, level, _ = heads[k]
        end = len(lines)
        for line_no, lvl, title in heads[k + 1 :]:
            if title in wanted or lvl <= level:
                end = line_no
                break
        body = "\n".join(lines[start + 1 : end]).strip()
        checks.append(SectionCheck(s.title, s.optional, True, bool(body), start + 1))
    present = [c.line for c in checks if c.present]
    top = min((lvl for _, lvl, t in heads if t in wanted), default=None)
    extra = [t for _, lvl, t in heads if t not in wanted and top is not None and lvl <= top]
    return FormatReport(
        skeleton=skeleton.name,
        sections=checks,
        missing=[c.title for c in checks if not c.present and not c.optional],
        empty=[c.title for c in checks if c.present and not c.non_empty],
        in_order=present == sorted(present),
        extra=extra,
    )


# ---------------------------------------------------------------------------------------
# simple mechanical checks

_WORD = re.compile(r"\w+(?:['’-]\w+)*")
_BULLET = re.compile(r"^\s*(?:[-*+•]|\d+[.)])\s+\S")
_TABLE_RULE = re.compile(r"^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$")


@dataclass
class Check:
    """One mechanical check of a reply."""

    name: str
    ok: bool
    detail: str


def count_words(text: str) -> int:
    """Words as a reader counts them: Markdown symbols and punctuation are not words."""
    return len(_WORD.findall(text))


def check_word_limit(reply: str, max_words: int) -> Check:
    """Is the reply under `max_words` words (at most that many)?"""
    n = count_words(reply)
    return Check("max_words", n <= max_words, f"{n} words, limit {max_words}")


def check_bullets(reply: str, min_items: int = 2) -> Check:
    """Does the reply use a list: at least `min_items` bullet or numbered lines?"""
    n = sum(1 for line in reply.splitlines() if _BULLET.match(line))
    return Check("bullets", n >= min_items, f"{n} bullet lines, need {min_items}")


def check_table(reply: str) -> Check:
    """Does the reply contain a Markdown table (a header rule such as |---|---|)?"""
    ok = any("|" in line and _TABLE_RULE.match(line) for line in reply.splitlines())
    return Check("table", ok, "Markdown table found" if ok else "no Markdown table")


def check_code(reply: str) -> Check:
    """Does the reply contain a fenced code block?"""
    fences = sum(1 for line in reply.splitlines() if _FENCE.match(line))
    ok = fences >= 2
    return Check("code", ok, "fenced code block found" if ok else "no fenced code block")


def check_prose(reply: str) -> Check:
    """Is the reply free of bullet lines and headings?"""
    lines = reply.splitlines()
    n = sum(1 for line in lines if _BULLET.match(line) or _HEADING.match(line))
    return Check("prose", n == 0, f"{n} bullet or heading lines")


_STRUCTURE_CHECKS = {
    "prose": check_prose,
    "lists": check_bullets,
    "tables": check_table,
    "code": check_code,
}


@dataclass
class StyleReport:
    """The mechanical checks that a style implies, run on one reply."""

    checks: list[Check]
    format: FormatReport | None = None

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


@dataclass
class Style:
    """Presets for the note's style dimensions, a word limit and a format skeleton.

    Every field is optional; `None` leaves that dimension to the model. `skeleton` takes a
    `Skeleton` or the name of a built-in one (see `SKELETONS`).
    """

    length: str | None = None
    formality: str | None = None
    structure: str | None = None
    persona: str | None = None
    depth: str | None = None
    max_words: int | None = None
    skeleton: Skeleton | str | None = field(default=None)

    def __post_init__(self) -> None:
        for dim in DIMENSIONS:
            msg = style_choice_error(dim, getattr(self, dim))
            if msg:
                raise PellucidError(msg, param=f"style.{dim}")
        if self.max_words is not None and (
            isinstance(self.max_words, bool)
            or not isinstance(self.max_words, int)
            or self.max_words < 1
        ):
            raise PellucidError(
                f"style max_words must be a positive integer, got {self.max_words!r}",
                param="style.max_words",
            )
        if isinstance(self.skeleton, str):
            self.skeleton = get_skeleton(self.skeleton)

    @property
    def is_empty(self) -> bool:
        return all(getattr(self, d) is None for d in DIMENSIONS) and (
            self.max_words is None and self.skeleton is None
        )

    def instructions(self) -> list[str]:
        """The instruction sentences, one per chosen dimension, in a fixed order."""
        out = [DIMENSIONS[d][v] for d in DIMENSIONS if (v := getattr(self, d)) is not None]
        if self.max_words is not None:
            out.append(f"Keep your response under {self.max_words} words.")
        return out

    def render(self) -> str:
        """Instruction sentences, one per line, then the skeleton block if any."""
        parts = []
        if lines := self.instructions():
            parts.append("\n".join(lines))
        if isinstance(self.skeleton, Skeleton):
            parts.append(self.skeleton.render())
        return "\n\n".join(parts)

    def check(self, reply: str) -> StyleReport:
        """Run the checks this style implies: word limit, structure, skeleton."""
        checks = []
        if self.max_words is not None:
            checks.append(check_word_limit(reply, self.max_words))
        if self.structure is not None:
            checks.append(_STRUCTURE_CHECKS[self.structure](reply))
        fmt = None
        if isinstance(self.skeleton, Skeleton):
            fmt = check_format(reply, self.skeleton)
            checks.append(Check("format", fmt.ok, fmt.summary()))
        return StyleReport(checks, fmt)
