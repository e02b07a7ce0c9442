"""The system prompt builder: the concept note's five parts and four patterns.

Parts, rendered in this order, each only when set:

1. role definition, by the role pattern
   ("You are [role] with expertise in [domain]. Your goal is to [objective].")
2. behavioural guidelines, by the rules pattern ("Follow these rules:" and numbered
   "Always ..." / "Never ..." / "When ..., ..." lines; see `always`, `never`, `when`)
3. output format, by the format pattern ("Respond in the following format:" and a template)
4. constraints (a bulleted list) followed by the output style's instructions
5. context/knowledge (a bulleted list: today's date, the user's timezone, anything else)

The fourth pattern, few-shot examples, is not part of the system text: `to_messages`
returns the examples as real prior user/assistant turns, for the chat template to render.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from datetime import datetime

from pellucid.prompts.styles import Style

Message = dict[str, str]

# A context value that is filled in at render time (keys "today" and "timezone" only).
AUTO = "auto"
_CONTEXT_LABELS = {"today": "Today's date", "timezone": "User timezone"}


@dataclass
class Example:
    """One few-shot example: a user turn and the assistant turn we want in reply."""

    user: str
    assistant: str


def always(action: str) -> str:
    """A rule of the rules pattern: 'Always [do X]'."""
    return f"Always {action}"


def never(action: str) -> str:
    """A rule of the rules pattern: 'Never [do Y]'."""
    return f"Never {action}"


def when(condition: str, action: str) -> str:
    """A rule of the rules pattern: 'When [condition], [action]'."""
    return f"When {condition}, {action}"


def role_sentence(role: str, domain: str = "", objective: str = "") -> str:
    """The role pattern. `role` is a noun phrase; a leading 'You are' and final '.' are
    tolerated, so a hand-written role definition passes through unchanged."""
    role = role.strip()
    if role.lower().startswith("you are "):
        role = role[len("you are ") :]
    role = role.rstrip().rstrip(".")
    if not role:
        return ""
    text = f"You are {role}"
    if domain.strip():
        text += f" with expertise in {domain.strip().rstrip('.')}"
    text += "."
    if objective.strip():
        text += f" Your goal is to {objective.strip().rstrip('.')}."
    return text


def format_template(template: str | dict | list) -> str:
    """The format pattern's template: text as given, a dict or list as indented JSON."""
    if isinstance(template, str):
        return template.strip()
    return json.dumps(template, indent=2, ensure_ascii=False)


def local_timezone(now: datetime | None = None) -> str:
    """The machine's timezone name, e.g. 'UTC' or 'PST'."""
    now = (now or datetime.now()).astimezone()
    return now.tzname() or now.strftime("%z")


@dataclass
class SystemPrompt:
    """A system prompt built from the note's five parts, plus style and few-shot examples.

    `context` maps a key to a value; the value "auto" for "today" or "timezone" is filled
    in when rendering (or once, by `with_today` / `with_timezone`).
    """

    role: str = ""
    domain: str = ""
    objective: str = ""
    guidelines: list[str] = field(default_factory=list)
    output_format: str = ""
    constraints: list[str] = field(default_factory=list)
    context: dict[str, str] = field(default_factory=dict)
    style: Style | None = None
    examples: list[Example] = field(default_factory=list)

    def __post_init__(self) -> None:
        # (user, assistant) pairs are accepted too
        self.examples = [e if isinstance(e, Example) else Example(*e) for e in self.examples]
        if not isinstance(self.output_format, str):
            self.output_format = format_template(self.output_format)

    # -- context helpers ----------------------------------------------------------------

    def with_today(self, date: str | None = None) -> SystemPrompt:
        """A copy with context 'today' set (default: today's date, ISO 8601)."""
        return self.with_context(today=date or datetime.now().date().isoformat())

    def with_timezone(self, tz: str | None = None) -> SystemPrompt:
        """A copy with context 'timezone' set (default: this machine's timezone)."""
        return self.with_context(timezone=tz or local_timezone())

    def with_context(self, **values: str) -> SystemPrompt:
        """A copy with the given context entries added or replaced."""
        return dataclasses.replace(self, context={**self.context, **values})

    def resolved_context(self, now: datetime | None = None) -> dict[str, str]:
        """The context with 'auto' values filled in from `now` (default: the clock)."""
        out = {}
        for key, value in self.context.items():
            if value == AUTO and key == "today":
                value = (now or datetime.now()).date().isoformat()
            elif value == AUTO and key == "timezone":
                value = local_timezone(now)
            out[key] = value
        return out

    # -- rendering ----------------------------------------------------------------------

    def render(self, now: datetime | None = None) -> str:
        """The system text; empty parts are left out, parts are separated by a blank line."""
        blocks = []
        if text := role_sentence(self.role, self.domain, self.objective):
            blocks.append(text)
        if rules := [g.strip() for g in self.guidelines if g.strip()]:
            blocks.append(
                "Follow these rules:\n" + "\n".join(f"{i}. {r}" for i, r in enumerate(rules, 1))
            )
        if self.output_format.strip():
            blocks.append("Respond in the following format:\n" + self.output_format.strip())
        if constraints := [c.strip() for c in self.constraints if c.strip()]:
            blocks.append("Constraints:\n" + "\n".join(f"- {c}" for c in constraints))
        if self.style is not None and (text := self.style.render()):
            blocks.append(text)
        if context := self.resolved_context(now):
            lines = [f"- {_context_label(k)}: {v}" for k, v in context.items() if str(v).strip()]
            if lines:
                blocks.append("Context:\n" + "\n".join(lines))
        return "\n\n".join(blocks)

    def render_examples(self) -> str:
        """The few-shot examples as text, in the note's few-shot pattern (for display)."""
        if not self.examples:
            return ""
        turns = [f"User: {e.user}\nAssistant: {e.assistant}" for e in self.examples]
        return "Here are examples of good responses:\n\n" + "\n\n".join(turns)

    def prefix_messages(self, now: datetime | None = None) -> list[Message]:
        """The system message (if any text) followed by the few-shot turns."""
        out: list[Message] = []
        if text := self.render(now):
            out.append({"role": "system", "content": text})
        for e in self.examples:
            out.append({"role": "user", "content": e.user})
            out.append({"role": "assistant", "content": e.assistant})
        return out

    def to_messages(self, user_message: str, now: datetime | None = None) -> list[Message]:
        """[system, user ex1, assistant ex1, ..., user]: ready for a chat template."""
        return self.prefix_messages(now) + [{"role": "user", "content": user_message}]


def _context_label(key: str) -> str:
    return _CONTEXT_LABELS.get(key) or key.replace("_", " ").strip().capitalize()
