"""A streamed token's event is a template filled with its text: the same bytes as encoding
the whole event, whatever the text holds (quotes, backslashes, newlines, control
characters, the placeholder's own characters, non-ASCII)."""

from __future__ import annotations

import pytest

from pellucid.server.openai import _HOLE, _sse, _template

TEXTS = ["Paris", ' "quoted" ', "back\\slash", "line\nbreak\ttab", "\x01pellucid-text\x01", "\x00\x1f", "café ☕ 東京", ""]


@pytest.mark.parametrize("text", TEXTS)
def test_template_gives_the_bytes_of_the_whole_encoding(text):
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": 'a "model"', "usage": None}

    def event(t):
        return {**head, "choices": [{"index": 2, "delta": {"content": t}, "logprobs": None, "finish_reason": None}]}

    assert _template(event(_HOLE))(text) == _sse(event(text))
