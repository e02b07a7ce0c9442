"""The system prompt builder: five parts, four patterns, few-shot turns as messages."""

from datetime import UTC, datetime

from pellucid.prompts import AUTO, Example, Style, SystemPrompt, always, never, role_sentence, when


def full_prompt() -> SystemPrompt:
    return SystemPrompt(
        role="a helpful coding assistant",
        domain="Python",
        objective="help users write correct code",
        guidelines=[
            always("cite sources."),
            never("make up information."),
            when("unsure", "say so."),
        ],
        output_format={"answer": "...", "confidence": "0.0-1.0"},
        constraints=["Keep responses under 200 words.", "Use formal tone."],
        context={"today": "2025-01-15", "timezone": "PST"},
        examples=[Example("What is 2+2?", "4"), Example("Capital of France?", "Paris")],
    )


def test_role_pattern():
    assert role_sentence("a tutor") == "You are a tutor."
    assert role_sentence("a tutor", "physics", "help students learn.") == (
        "You are a tutor with expertise in physics. Your goal is to help students learn."
    )
    # a hand-written role definition passes through unchanged
    assert role_sentence("You are a pirate.") == "You are a pirate."
    assert role_sentence("  ") == ""


def test_rules_helpers():
    assert always("cite sources") == "Always cite sources"
    assert never("guess") == "Never guess"
    assert when("asked about dates", "use ISO 8601") == "When asked about dates, use ISO 8601"


def test_render_has_every_part_in_order():
    text = full_prompt().render()
    expected_order = [
        "You are a helpful coding assistant with expertise in Python. "
        "Your goal is to help users write correct code.",
        "Follow these rules:\n1. Always cite sources.\n2. Never make up information.\n"
        "3. When unsure, say so.",
        'Respond in the following format:\n{\n  "answer": "...",\n  "confidence": "0.0-1.0"\n}',
        "Constraints:\n- Keep responses under 200 words.\n- Use formal tone.",
        "Context:\n- Today's date: 2025-01-15\n- User timezone: PST",
    ]
    positions = [text.index(block) for block in expected_order]
    assert positions == sorted(positions)
    assert text == "\n\n".join(expected_order)
    # few-shot examples are turns, never part of the system text
    assert "Paris" not in text


def test_empty_parts_are_left_out():
    assert SystemPrompt().render() == ""
    text = SystemPrompt(role="a poet", guidelines=["", "  "], constraints=[]).render()
    assert text == "You are a poet."
    assert "rules" not in text and "Constraints" not in text and "Context" not in text
    assert SystemPrompt().prefix_messages() == []


def test_style_renders_inside_system_text():
    p = SystemPrompt(
        role="a guide", style=Style(length="concise", formality="casual", max_words=80)
    )
    text = p.render()
    assert "Keep your answers short" in text
    assert "casual, conversational tone" in text
    assert "under 80 words" in text


def test_to_messages_puts_examples_as_real_turns():
    msgs = full_prompt().to_messages("What is 3+3?")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert msgs[1:] == [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"},
        {"role": "user", "content": "What is 3+3?"},
    ]
    assert msgs[0]["content"] == full_prompt().render()


def test_no_system_message_when_there_is_no_system_text():
    p = SystemPrompt(examples=[("hi", "hello")])
    assert p.to_messages("yo") == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "yo"},
    ]


def test_render_examples_uses_the_few_shot_pattern():
    text = full_prompt().render_examples()
    assert text.startswith(
        "Here are examples of good responses:\n\nUser: What is 2+2?\nAssistant: 4"
    )
    assert "User: Capital of France?\nAssistant: Paris" in text


def test_context_helpers_fill_date_and_timezone():
    p = SystemPrompt(role="a scheduler")
    q = p.with_today("2025-01-15").with_timezone("PST")
    assert p.context == {}  # copies, not changes
    assert "- Today's date: 2025-01-15\n- User timezone: PST" in q.render()
    today = datetime.now().date().isoformat()
    assert f"Today's date: {today}" in p.with_today().render()
    assert p.with_timezone().context["timezone"]


def test_auto_context_is_filled_at_render_time():
    p = SystemPrompt(context={"today": AUTO, "timezone": AUTO, "user_name": "Ada"})
    now = datetime(2030, 5, 6, 12, 0, tzinfo=UTC)
    text = p.render(now=now)
    assert "- Today's date: 2030-05-06" in text
    assert "- User timezone: UTC" in text
    assert "- User name: Ada" in text
    assert p.context["today"] == AUTO  # stored content keeps the request, not the date
