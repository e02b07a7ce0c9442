"""Token counts, truncation, the context budget and chat sessions on the real default model.

Counts are checked against what the engine feeds the model (Completion.prompt_tokens)
with three chat templates over the real SmolLM2 tokenizer: the model's own ChatML
template, a Gemma-style template without a system role, and a Llama-3-style template.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pellucid.errors import PellucidError
from pellucid.prompts import (
    Chunk,
    ContextBudget,
    Example,
    Limits,
    Style,
    SystemPrompt,
    TokenCounter,
    group_turns,
    load_prompt,
    with_system,
)
from pellucid.prompts.budget import CURRENT, HISTORY, RESERVED, RETRIEVED, SYSTEM
from pellucid.text.chat_template import ChatTemplate

# Written for these tests in the layout of Gemma's turns: no system role (a system
# message is refused, so pellucid folds its text into the first user turn), roles must
# alternate, the assistant is called "model".
GEMMA_STYLE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ raise_exception('no system role in this template') }}{% endif %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

# In the layout of Llama 3's headers: a BOS text, a header per message, a blank line,
# the content trimmed, an end-of-turn marker.
LLAMA3_STYLE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

SYSTEM_TEXT = "You are a terse geography tutor. Answer in one sentence."
FEW_SHOT = SystemPrompt(
    role="a terse geography tutor",
    guidelines=["Always answer in one sentence."],
    style=Style(length="concise"),
    examples=[Example("Capital of Spain?", "Madrid.")],
)
CONVERSATIONS = {
    "plain": [{"role": "user", "content": "What is the capital of France?"}],
    "system": [
        {"role": "system", "content": SYSTEM_TEXT},
        {"role": "user", "content": "Capital of Italy?"},
        {"role": "assistant", "content": "Rome."},
        {"role": "user", "content": "  And of Japan — 日本?  "},
    ],
}


@pytest.fixture(scope="module")
def llms(real_lm):
    """An LLM per template, sharing the real float32 weights (one slot, short context)."""
    from pellucid.api import LLM

    bos = real_lm.chat_template.bos_token
    out = {}
    for name, source in (("chatml", None), ("gemma", GEMMA_STYLE), ("llama3", LLAMA3_STYLE)):
        if source is None:
            lm = real_lm
        else:
            template = ChatTemplate(source, bos_token="<bos>" if name == "gemma" else bos)
            lm = dataclasses.replace(real_lm, chat_template=template)
        out[name] = LLM(loaded=lm, max_batch=1, max_len=512)
    return out


@pytest.fixture(scope="module")
def counter(real_lm):
    return TokenCounter.from_loaded(real_lm)


@pytest.mark.parametrize("template", ["chatml", "gemma", "llama3"])
def test_counts_equal_what_the_engine_feeds_the_model(llms, template):
    llm = llms[template]
    c = TokenCounter.from_llm(llm)
    conversations = [*CONVERSATIONS.values(), FEW_SHOT.to_messages("Capital of Peru?")]
    for messages in conversations:
        want = c.count_messages(messages)
        done = llm.chat(messages, max_tokens=1, temperature=0.0)
        assert done.prompt_tokens == want, (template, messages)
        assert done.usage["prompt_tokens"] == want
        assert llm.count_tokens(messages) == want
        # the per-message rows telescope to the same total
        conv = c.count_conversation(messages)
        assert conv.total == want
        assert conv.rows, "these templates render every prefix"
        assert sum(r.tokens for r in conv.rows) + conv.generation_prompt == want
        assert conv.content + conv.overhead == want
        assert all(r.content >= 0 and r.tokens > 0 for r in conv.rows)


def test_system_and_style_through_llm_chat(llms):
    llm = llms["chatml"]
    msgs = [{"role": "user", "content": "Capital of Peru?"}]
    done = llm.chat(msgs, system=FEW_SHOT, max_tokens=1, temperature=0.0)
    assert done.prompt_tokens == llm.count_tokens(msgs, system=FEW_SHOT)
    # few-shot examples are real prior turns of the template, the style is in the system text
    assert "<|im_start|>user\nCapital of Spain?<|im_end|>\n<|im_start|>assistant\nMadrid.<|im_end|>" in done.prompt
    assert "Keep your answers short" in done.prompt
    # a prompt-file reference and a style given separately
    text = llm.render_chat(msgs, system="coding-assistant@1.0.0", style=Style(max_words=40))
    assert "You are a senior software engineer" in text and "under 40 words" in text
    assert text.count("<|im_start|>assistant") == 2  # the example's reply, then the generation prompt


def test_template_without_system_role_folds_the_system_text(llms):
    llm = llms["gemma"]
    assert not llm.chat_template.supports_system
    text = llm.render_chat(CONVERSATIONS["system"])
    assert text.startswith(f"<bos><start_of_turn>user\n{SYSTEM_TEXT}\n\nCapital of Italy?<end_of_turn>")
    assert "<start_of_turn>model\nRome.<end_of_turn>" in text
    assert text.endswith("<start_of_turn>model\n")
    assert llms["llama3"].chat_template.supports_system


def test_count_text_equals_a_raw_prompt(llms, counter):
    text = "The capital of France is"
    done = llms["chatml"].generate(text, max_tokens=1, temperature=0.0)
    assert counter.count_text(text) == done.prompt_tokens == llms["chatml"].count_tokens(text)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.sampled_from(list("ab cdé日本語 \n—.😀x")), max_size=60), n=st.integers(0, 30))
def test_truncate_cuts_at_a_token_boundary(counter, text, n):
    cut = counter.truncate(text, n)
    assert text.startswith(cut)  # a prefix, in whole characters
    assert counter.count_content(cut) <= n
    total = counter.count_content(text)
    if total <= n:
        assert cut == text
    else:
        # short only by the tokens of a character split at the cut (up to 4 bytes)
        assert counter.count_content(cut) >= n - 4


# -- the budget on real conversations ---------------------------------------------------------
QUESTIONS = [
    "What is the tallest mountain in Europe?",
    "How long is the river Danube, roughly?",
    "Which countries does it flow through? List them all, please, from source to mouth.",
    "Why do rivers meander?",
    "Tell me something surprising about glaciers.",
    "What is the difference between weather and climate?",
    "Can you summarize our conversation so far?",
    "Thanks! One more: what is a fjord?",
]
ANSWERS = [
    "Mount Elbrus in Russia, at 5,642 m.",
    "About 2,850 km.",
    "Germany, Austria, Slovakia, Hungary, Croatia, Serbia, Romania, Bulgaria, Moldova and Ukraine.",
    "Because faster water erodes the outer bank of a bend while the inner bank gathers sediment, so bends grow.",
    "Glacier ice can flow like a very slow river, and some glaciers move tens of metres a day.",
    "Weather is the state of the atmosphere now; climate is its long-term average.",
    "We talked about mountains, the Danube, meanders, glaciers, and weather versus climate.",
    "A long, narrow, deep inlet of the sea carved by a glacier.",
]
TALK = [m for q, a in zip(QUESTIONS, ANSWERS, strict=True) for m in (
    {"role": "user", "content": q}, {"role": "assistant", "content": a})]  # fmt: skip
CHUNKS = [
    Chunk("The Danube rises in the Black Forest and flows 2,850 km to the Black Sea. " * 3, 0.9, "danube.txt"),
    Chunk("Fjords were carved by glaciers during ice ages and later flooded by the sea. " * 4, 0.8, "fjord.txt"),
    Chunk("Elbrus is a dormant volcano in the Caucasus mountains. " * 5, 0.5, "elbrus.txt"),
    Chunk("Meanders form where a river erodes its outer banks. " * 2, None, "meander.txt"),
]
CURRENT_MSG = "What is a fjord, and where are the most famous ones?"


def check_allocation(counter, alloc, budget, history, chunks, system_msgs):
    """The invariants every allocation must satisfy."""
    # fits, and the count is what the engine will be fed
    assert alloc.prompt_tokens + budget.reserve <= budget.window
    assert counter.count_messages(alloc.messages) == alloc.prompt_tokens
    # the report adds up
    rows = {s.name: s.tokens for s in alloc.sections}
    assert sum(t for name, t in rows.items() if name != RESERVED) == alloc.prompt_tokens
    assert rows[RESERVED] == budget.reserve and alloc.total + alloc.free == budget.window
    # never dropped: the system prompt (and its few-shot turns) and the current message
    assert alloc.messages[0]["content"].startswith(system_msgs[0]["content"])
    assert alloc.messages[1 : len(system_msgs)] == system_msgs[1:]
    assert alloc.messages[-1]["content"].endswith(CURRENT_MSG)
    # history: whole turns, the newest ones
    kept = alloc.history
    assert kept == history[len(history) - len(kept) :]
    assert not kept or kept[0]["role"] == "user"
    assert alloc.history_dropped == len(history) - len(kept)
    # chunks: kept in priority order (score high to low, unscored last)
    order = sorted(range(len(chunks)), key=lambda i: (chunks[i].score is None, -(chunks[i].score or 0), i))
    status = [alloc.chunk_status[i] for i in order]
    assert status == sorted(status, key=["kept", "truncated", "dropped"].index)
    assert status.count("truncated") <= 1
    for c, s in zip(chunks, alloc.chunk_status, strict=True):
        if s == "truncated":
            cut = next(k for k in alloc.chunks if k.source == c.source)
            assert c.text.startswith(cut.text) and len(cut.text) < len(c.text)


@pytest.mark.parametrize("drop_first", ["history", "retrieved"])
def test_budget_on_a_real_conversation(counter, drop_first):
    system_msgs = FEW_SHOT.prefix_messages()
    fitted = {}
    for window in range(230, 900, 37):
        b = ContextBudget(window, counter.count_messages, reserve=64, truncate=counter.truncate, drop_first=drop_first)
        alloc = b.fit(CURRENT_MSG, system=system_msgs, history=TALK, retrieved=CHUNKS)
        check_allocation(counter, alloc, b, TALK, CHUNKS, system_msgs)
        # the stated order: the section that gives way first is chosen as if the other were empty
        if drop_first == "history":
            alone = b.fit(CURRENT_MSG, system=system_msgs, retrieved=CHUNKS)
            assert alloc.chunk_status == alone.chunk_status
        else:
            alone = b.fit(CURRENT_MSG, system=system_msgs, history=TALK)
            assert alloc.history == alone.history
        fitted[window] = alloc
    # more room never means less of the section that is served first
    windows = sorted(fitted)
    for small, big in zip(windows, windows[1:], strict=False):
        if drop_first == "history":
            assert fitted[big].section(RETRIEVED).tokens >= fitted[small].section(RETRIEVED).tokens
        else:
            assert len(fitted[big].history) >= len(fitted[small].history)
    assert fitted[windows[-1]].history_dropped < len(TALK)
    assert fitted[windows[0]].history_dropped > 0


def test_budget_limits_on_real_counts(counter):
    system_msgs = [{"role": "system", "content": SYSTEM_TEXT}]
    limits = Limits(retrieved=120, history=90)
    b = ContextBudget(4096, counter.count_messages, reserve=256, limits=limits, truncate=counter.truncate)
    alloc = b.fit(CURRENT_MSG, system=system_msgs, history=TALK, retrieved=CHUNKS)
    check_allocation(counter, alloc, b, TALK, CHUNKS, system_msgs)
    assert 0 < alloc.section(RETRIEVED).tokens <= 120
    assert 0 < alloc.section(HISTORY).tokens <= 90
    assert alloc.history_dropped > 0 and "dropped" in alloc.chunk_status
    text = alloc.render_text()
    for name in (SYSTEM, RETRIEVED, HISTORY, CURRENT, RESERVED, "context window"):
        assert name in text


def test_budget_error_names_the_numbers(counter):
    b = counter.budget(200, reserve=100)
    long_message = "Please explain every detail of the water cycle. " * 20
    with pytest.raises(PellucidError) as e:
        b.fit(long_message, system=SYSTEM_TEXT, history=TALK)
    msg = e.value.message
    n_sys = counter.count_messages([{"role": "system", "content": SYSTEM_TEXT}, {"role": "user", "content": ""}])
    n_all = counter.count_messages([{"role": "system", "content": SYSTEM_TEXT}, {"role": "user", "content": long_message}])
    assert f"= {n_all} tokens" in msg and f"{n_all + 100}" in msg and "context window of 200" in msg
    assert f"by {n_all + 100 - 200}" in msg and n_sys < n_all


# -- chat sessions ----------------------------------------------------------------------------
def test_chat_session_stays_inside_a_small_window(llms):
    from pellucid.sampling.params import SamplingParams

    llm = llms["chatml"]
    session = llm.session(system=FEW_SHOT, window=160, params=SamplingParams(max_tokens=4, temperature=0.0))
    dropped = 0
    for q in QUESTIONS[:6]:
        turn = session.prepare(q)
        reply = "".join(session.stream(turn))
        assert reply == turn.reply and turn.done
        assert turn.prompt_tokens + session.reserve <= 160
        assert turn.prompt_tokens == turn.allocation.prompt_tokens == len(llm.tokenizer.encode(turn.prompt))
        assert turn.completion_tokens <= 4
        assert "Capital of Spain?" in turn.prompt  # the few-shot turn is never dropped
        dropped += turn.dropped_messages
        assert turn.dropped_messages == 2 * turn.dropped_turns
    assert dropped > 0 and session.dropped_total == dropped
    # what is left is the newest turns, whole
    assert session.history[-2]["content"] == QUESTIONS[5]
    assert all(len(t) == 2 for t in group_turns(session.history))


def test_chat_session_message_that_cannot_fit_is_an_error(llms):
    llm = llms["chatml"]
    session = llm.session(window=64, reserve=16)
    with pytest.raises(PellucidError, match="never dropped do not fit"):
        session.prepare("word " * 100)
    assert session.history == []


def test_with_system_rejects_two_system_prompts():
    with pytest.raises(PellucidError, match="already start with a system message"):
        with_system(CONVERSATIONS["system"], "Another system prompt")


def test_prompt_file_version_and_examples_in_messages(counter):
    p = load_prompt("json-answer@1.0.0")
    msgs = with_system([{"role": "user", "content": "Capital of Chile?"}], p)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert counter.count_messages(msgs) > counter.count_messages(msgs[:1] + msgs[-1:])
