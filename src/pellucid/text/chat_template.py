"""Chat templates from model files, rendered in a sandbox.

Templates are untrusted input: they run in Jinja's `ImmutableSandboxedEnvironment`, so a
template that reaches for Python internals (`__class__`, `__globals__`, ...) fails with a
clear error instead of running. Templates larger than `MAX_TEMPLATE` are refused.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import meta
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pellucid.errors import PellucidError

MAX_TEMPLATE = 256 << 10
ROLES = ("system", "user", "assistant", "tool")

# Used when a model file carries no template.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _raise(message: str):
    raise TemplateError(message)


class ChatTemplate:
    def __init__(self, source: str | None, *, bos_token: str = "", eos_token: str = ""):
        source = source or CHATML
        if len(source) > MAX_TEMPLATE:
            raise PellucidError(f"chat template is {len(source):,} characters; the limit is {MAX_TEMPLATE:,}")
        self.source = source
        self.bos_token, self.eos_token = bos_token, eos_token
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.Undefined)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.filters["tojson"] = lambda v, indent=None, **_: json.dumps(v, ensure_ascii=False, indent=indent)
        try:
            self._template = env.from_string(source)
        except TemplateError as e:
            raise PellucidError(f"the model's chat template does not parse: {e}") from None
        # Whether the template has a place for a system message of its own.
        self.supports_system = self._probe_system()
        # Whether it renders tools itself (it reads a `tools` variable); else pellucid.text.tools does.

        self.supports_tools = "tools" in meta.find_undeclared_variables(env.parse(source))

    def _probe_system(self) -> bool:
        marker = "\x00pellucid-system\x00"
        try:
            out = self._render([{"role": "system", "content": marker}, {"role": "user", "content": "x"}], False, {})
        except PellucidError:
            return False
        return marker in out

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True, tools: list | None = None,
               **extra: Any) -> str:  # fmt: skip
        """The prompt text. tools: pellucid.text.tools.Tool list, rendered by the template where
        it takes `tools`, else as the default system section; the history may hold assistant
        `tool_calls` and `tool` results either way."""
        if tools or any(isinstance(m, dict) and (m.get("role") == "tool" or m.get("tool_calls")) for m in messages or []):
            # imported here: text.tools brings the grammar engine (llguidance and torch, ~2 s),
            # which rendering and counting a prompt without tools never need
            from pellucid.text.tools import history

            messages = history(messages, tools, native=self.supports_tools)
            if tools and self.supports_tools:
                extra["tools"] = [t.openai() for t in tools]
        msgs = validate_messages(messages)
        if msgs and msgs[0]["role"] == "system" and not self.supports_system:
            # Fold the system text into the first user turn, as such templates expect.
            system, rest = msgs[0]["content"], msgs[1:]
            if rest and rest[0]["role"] == "user":
                rest = [{**rest[0], "content": f"{system}\n\n{rest[0]['content']}"}, *rest[1:]]
            else:
                rest = [{"role": "user", "content": system}, *rest]
            msgs = rest
        return self._render(msgs, add_generation_prompt, extra)

    def _render(self, msgs, add_generation_prompt, extra) -> str:
        try:
            return self._template.render(
                messages=msgs, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token, eos_token=self.eos_token, **extra,
            )  # fmt: skip
        except SecurityError as e:
            raise PellucidError(f"the chat template tried something the sandbox forbids: {e}") from None
        except TemplateError as e:
            raise PellucidError(f"the chat template failed to render: {e}") from None


def validate_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise PellucidError("messages must be a non-empty list of {role, content}", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise PellucidError(f"messages[{i}] must be an object with role and content", param=f"messages[{i}]")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise PellucidError(f"messages[{i}].role is {role!r}; allowed: {', '.join(ROLES)}", param=f"messages[{i}].role")
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            parts = []
            for j, p in enumerate(content):
                if not (isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)):
                    raise PellucidError(f"messages[{i}].content[{j}] must be a text part; only text is supported", param=f"messages[{i}].content")
                parts.append(p["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise PellucidError(f"messages[{i}].content must be a string", param=f"messages[{i}].content")
        out.append({**m, "role": role, "content": content})
    return out
