"""The context budget, with fake token counters that render a chat template.

The counters here stand in for a real tokenizer: each renders the conversation with a
template and counts the result, so template overhead is real and, for some of them,
not additive. Real-model tests come with the model.
"""

import io
import math
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console

from pellucid.errors import PellucidError
from pellucid.prompts import Chunk, ContextBudget, Example, Limits, SystemPrompt, group_turns
from pellucid.prompts.budget import CURRENT, HISTORY, OVERHEAD, RESERVED, RETRIEVED, SYSTEM


def chatml(messages):
    text = "<s>"
    for m in messages:
        text += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
    return text + "<|im_start|>assistant\n"


def smollm_like(messages):
    """Like SmolLM2's template: a default system prompt when the first message is not one."""
    if not messages or messages[0]["role"] != "system":
        messages = [
            {"role": "system", "content": "You are a helpful AI assistant named Bot"},
            *messages,
        ]
    return chatml(messages)


def gemma_like(messages):
    """Like Gemma's template: no system role; the system text opens the first user turn."""
    prefix, rest = "", list(messages)
    if rest and rest[0]["role"] == "system":
        prefix, rest = rest[0]["content"] + "\n\n", rest[1:]
    text = "<bos>"
    for i, m in enumerate(rest):
        role = "model" if m["role"] == "assistant" else m["role"]
        text += f"<start_of_turn>{role}\n{prefix if i == 0 else ''}{m['content']}<end_of_turn>\n"
    return text + "<start_of_turn>model\n"


TOKEN = re.compile(r"<[^>\s]+>|\w+|[^\w\s]")


def word_counter(render=chatml):
    return lambda messages: len(TOKEN.findall(render(messages)))


def char_counter(render=chatml):
    """Non-additive: a token per 4 characters of the rendered text, rounded up."""
    return lambda messages: math.ceil(len(render(messages)) / 4)


COUNTERS = {
    "chatml-words": word_counter(),
    "chatml-chars": char_counter(),
    "smollm-words": word_counter(smollm_like),
    "gemma-chars": char_counter(gemma_like),
}


def cut_words(text, n):
    return " ".join(text.split()[:n])


def conversation(turns, words=6):
    out = []
    for i in range(turns):
        out.append({"role": "user", "content": f"question {i} " + "word " * words})
        out.append({"role": "assistant", "content": f"answer {i} " + "reply " * (words + 3)})
    return out


def assert_adds_up(a, count):
    prompt_rows = [s for s in a.sections if s.name != RESERVED]
    assert [s.name for s in a.sections] == [OVERHEAD, SYSTEM, RETRIEVED, HISTORY, CURRENT, RESERVED]
    assert sum(s.tokens for s in prompt_rows) == a.prompt_tokens == count(a.messages)
    assert sum(s.tokens for s in a.sections) == a.total <= a.window
    assert a.section(RESERVED).tokens == a.reserve
    assert a.total + a.free == a.window
    assert a.max_new_tokens >= a.reserve


@pytest.mark.parametrize("name", list(COUNTERS))
def test_everything_fits_when_there_is_room(name):
    count = COUNTERS[name]
    b = ContextBudget(window=2000, reserve=100, count_messages=count)
    hist = conversation(3)
    a = b.fit("now?", system="Be brief.", history=hist, retrieved=[Chunk("fact one", 0.5)])
    assert a.history_dropped == 0 and a.chunk_status == ["kept"]
    assert a.messages[0]["role"] == "system" and a.messages[0]["content"].startswith("Be brief.")
    assert "fact one" in a.messages[0]["content"]
    assert a.messages[1:-1] == hist
    assert a.messages[-1] == {"role": "user", "content": "now?"}
    assert_adds_up(a, count)
    assert a.section(SYSTEM).tokens > 0 and a.section(RETRIEVED).tokens > 0
    assert a.section(HISTORY).tokens > 0 and a.section(CURRENT).tokens > 0


def test_system_section_is_measured_even_when_the_template_merges_it():
    count = COUNTERS["gemma-chars"]
    long_system = "rule " * 200
    a = ContextBudget(window=4000, count_messages=count).fit("hi", system=long_system)
    assert a.section(SYSTEM).tokens >= len(long_system) / 4 - 1
    assert a.section(CURRENT).tokens <= 2
    assert_adds_up(a, count)


@pytest.mark.parametrize("name", list(COUNTERS))
def test_oldest_turns_go_first_and_pairs_stay_together(name):
    count = COUNTERS[name]
    hist = conversation(30)
    b = ContextBudget(window=300, reserve=60, count_messages=count)
    a = b.fit("what next?", system="You are terse.", history=hist)
    assert 0 < a.history_dropped < len(hist)
    assert a.history_dropped % 2 == 0  # whole turns
    assert a.history == hist[a.history_dropped :]  # a suffix: the newest turns
    assert a.history[0]["role"] == "user"
    assert a.messages[0] == {"role": "system", "content": "You are terse."}
    assert a.messages[-1]["content"] == "what next?"
    # as much as fits: one more turn would not
    one_more = [a.messages[0], *hist[a.history_dropped - 2 :], a.messages[-1]]
    assert count(one_more) + b.reserve > b.window
    assert_adds_up(a, count)


def test_turns_group_user_with_following_messages():
    h = [
        {"role": "assistant", "content": "welcome"},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "tool", "content": "c"},
        {"role": "user", "content": "d"},
    ]
    assert [len(t) for t in group_turns(h)] == [1, 3, 1]


def chunks_budget(window, **kw):
    return ContextBudget(window=window, count_messages=COUNTERS["chatml-words"], **kw)


def test_chunks_drop_lowest_score_first():
    chunks = [Chunk("low " * 20, 0.1, "low"), Chunk("high " * 20, 0.9), Chunk("mid " * 20, 0.5)]
    sizes = {}
    for window in range(40, 200):
        try:
            a = chunks_budget(window).fit("q", retrieved=chunks)
        except PellucidError:
            continue
        sizes[tuple(a.chunk_status)] = window
    # as the window grows, chunks come back in score order: high, then mid, then low
    assert list(sizes) == [
        ("dropped", "dropped", "dropped"),
        ("dropped", "kept", "dropped"),
        ("dropped", "kept", "kept"),
        ("kept", "kept", "kept"),
    ]


def test_chunks_without_scores_drop_last_first_and_keep_input_order():
    chunks = ["first " * 20, "second " * 20, "third " * 20]
    b = chunks_budget(80)
    a = b.fit("q", retrieved=chunks)
    assert a.chunk_status == ["kept", "kept", "dropped"]
    ctx = a.messages[0]["content"]
    assert ctx.index("[1] first") < ctx.index("[2] second")
    assert_adds_up(a, b.count_messages)


def test_a_chunk_is_truncated_only_with_a_truncate_function():
    chunks = [Chunk("alpha " * 30, 0.9), Chunk("beta " * 100, 0.5)]
    no_cut = chunks_budget(100).fit("q", retrieved=chunks)
    assert no_cut.chunk_status == ["kept", "dropped"]
    b = chunks_budget(100, truncate=cut_words)
    a = b.fit("q", retrieved=chunks)
    assert a.chunk_status == ["kept", "truncated"]
    cut = a.chunks[1].text
    assert 16 <= len(cut.split()) < 100 and ("beta " * 100).startswith(cut)
    assert a.section(RETRIEVED).truncated == 1 and a.section(RETRIEVED).kept == 2
    assert "2 (1 cut)" in a.render_text()
    assert a.prompt_tokens == b.window  # the cut fills the room exactly with this counter
    assert_adds_up(a, b.count_messages)
    # too little room for a useful piece: dropped, not cut to a few tokens
    small = chunks_budget(60, truncate=cut_words).fit("q", retrieved=chunks)
    assert small.chunk_status == ["kept", "dropped"]


def test_history_gives_way_before_retrieved_context_by_default():
    hist = conversation(10)
    chunks = [Chunk("doc " * 40, 1.0), Chunk("more " * 40, 0.5)]
    count = COUNTERS["chatml-words"]
    # the chunks and the question take 106 tokens, a turn of history about 25
    a = ContextBudget(window=120, count_messages=count).fit("q", history=hist, retrieved=chunks)
    assert a.chunk_status == ["kept", "kept"] and a.history_dropped == len(hist)
    b = ContextBudget(window=120, count_messages=count, drop_first="retrieved")
    a2 = b.fit("q", history=hist, retrieved=chunks)
    assert a2.chunk_status == ["dropped", "dropped"] and a2.history_dropped < len(hist)
    # with room for some of both, drop_first decides who yields
    a3 = ContextBudget(window=160, count_messages=count).fit("q", history=hist, retrieved=chunks)
    assert a3.chunk_status == ["kept", "kept"] and 0 < a3.history_dropped < len(hist)
    for x in (a, a2, a3):
        assert_adds_up(x, count)


def test_section_limits():
    count = COUNTERS["chatml-words"]
    hist = conversation(20)
    chunks = [Chunk(f"doc{i} " * 30, 1 - i / 10) for i in range(5)]
    b = ContextBudget(window=4000, count_messages=count, limits=Limits(retrieved=100, history=120))
    a = b.fit("q", history=hist, retrieved=chunks)
    assert a.section(RETRIEVED).tokens <= 100 and a.section(HISTORY).tokens <= 120
    assert a.section(RETRIEVED).limit == 100 and a.section(HISTORY).limit == 120
    assert a.chunk_status[:2] == ["kept", "kept"] and a.chunk_status[-1] == "dropped"
    assert 0 < a.history_dropped < len(hist)
    assert_adds_up(a, count)


def test_limits_on_undroppable_parts_are_checks():
    count = COUNTERS["chatml-words"]
    with pytest.raises(PellucidError, match=r"system prompt is \d+ tokens, over its limit of 5"):
        ContextBudget(window=1000, count_messages=count, limits=Limits(system=5)).fit(
            "q", system="a b c d e f g h"
        )
    with pytest.raises(PellucidError, match="current message is"):
        ContextBudget(window=1000, count_messages=count, limits=Limits(current=3)).fit(
            "one two three four"
        )


def test_error_with_numbers_when_the_undroppable_parts_do_not_fit():
    count = COUNTERS["chatml-words"]
    system, current = "s " * 50, "c " * 30
    b = ContextBudget(window=100, reserve=40, count_messages=count)
    with pytest.raises(PellucidError) as e:
        b.fit(current, system=system, history=conversation(2))
    prompt = count([{"role": "system", "content": system}, {"role": "user", "content": current}])
    msg = str(e.value)
    assert f"= {prompt} tokens" in msg
    assert f"plus 40 reserved for the response = {prompt + 40}" in msg
    assert f"context window of 100 by {prompt + 40 - 100}" in msg
    assert "system prompt 5" in msg and "current message 3" in msg
    assert e.value.status == 400
    # the same parts fit once the reserve is small enough
    ContextBudget(window=100, reserve=100 - prompt, count_messages=count).fit(
        current, system=system
    )


def test_few_shot_turns_count_as_system_and_are_never_dropped():
    count = COUNTERS["chatml-words"]
    sp = SystemPrompt(role="a calculator", examples=[Example("2+2?", "4"), Example("3+3?", "6")])
    a = ContextBudget(window=120, count_messages=count).fit(
        "5+5?", system=sp, history=conversation(10)
    )
    assert a.messages[:5] == sp.prefix_messages()
    assert a.section(SYSTEM).kept == 5
    assert a.history_dropped > 0
    assert_adds_up(a, count)


def test_retrieved_context_in_the_user_turn():
    count = COUNTERS["chatml-words"]
    b = ContextBudget(window=500, count_messages=count, context_placement="user")
    a = b.fit("the question", system="sys", retrieved=["a fact"])
    assert a.messages[0] == {"role": "system", "content": "sys"}
    assert a.messages[-1]["content"].endswith("a fact\n\nthe question")
    assert a.section(RETRIEVED).tokens > 0
    assert_adds_up(a, count)


def test_retrieved_context_without_a_system_prompt_gets_its_own_system_message():
    count = COUNTERS["smollm-words"]
    a = ContextBudget(window=500, count_messages=count).fit("q", retrieved=["a fact"])
    assert a.messages[0]["role"] == "system" and "a fact" in a.messages[0]["content"]
    assert_adds_up(a, count)


def test_200_turn_conversation_keeps_fitting():
    """A chat loop: each reply joins the history, the budget keeps the prompt in the window."""
    count = COUNTERS["chatml-chars"]
    sp = SystemPrompt(role="a chatty assistant", guidelines=["Always answer."])
    b = ContextBudget(window=512, reserve=64, count_messages=count)
    history = []
    for turn in range(200):
        a = b.fit(f"message number {turn}: " + "blah " * (turn % 7), system=sp, history=history)
        assert a.total <= b.window
        assert a.messages[0]["content"] == sp.render()
        assert a.messages[-1]["content"].startswith(f"message number {turn}:")
        assert a.history == history[a.history_dropped :]
        reply = "ok " * (turn % 60)  # a reply of up to `reserve` tokens
        assert count(a.messages) + math.ceil(len(reply) / 4) <= b.window
        history += [a.messages[-1], {"role": "assistant", "content": reply}]
    assert a.history_dropped > 300 and len(a.history) >= 2


def test_counts_go_through_the_whole_conversation():
    """Every count is of a complete candidate conversation ending in the current turn's role."""
    seen = []

    def spy(messages):
        seen.append(messages)
        return COUNTERS["chatml-words"](messages)

    ContextBudget(window=200, count_messages=spy).fit(
        "q", system="s", history=conversation(20), retrieved=["x " * 30]
    )
    assert seen and all(m[-1]["role"] == "user" for m in seen)
    assert len(seen) < 60  # binary search, with a cache: not one count per turn and chunk


def test_report_table():
    count = COUNTERS["chatml-words"]
    a = ContextBudget(window=300, reserve=50, count_messages=count, limits=Limits(history=80)).fit(
        "q", system="s", history=conversation(10), retrieved=[Chunk("x " * 20, 0.3)]
    )
    text = a.render_text()
    for name in (OVERHEAD, SYSTEM, RETRIEVED, HISTORY, CURRENT, RESERVED, "total", "free"):
        assert name in text
    assert f"{a.total}" in text and "300" in text


def test_report_table_prints_as_text(capsys):
    count = COUNTERS["chatml-words"]
    a = ContextBudget(window=300, reserve=50, count_messages=count).fit("q", system="s")
    print(a.table())  # not "<rich.table.Table object at ...>"
    shown = capsys.readouterr().out
    assert "object at" not in shown and shown == a.render_text() + "\n"
    assert "Context budget" in shown and "reserved for response" in shown
    assert str(a.table()) == a.render_text()
    # it is still a rich Table, and rich prints an Allocation as its table
    console = Console(file=io.StringIO(), width=100, color_system=None)
    console.print(a.table())
    console.print(a)
    assert console.file.getvalue() == 2 * a.render_text()


@pytest.mark.parametrize(
    ("kw", "param"),
    [
        ({"window": 0}, "window"),
        ({"reserve": -1}, "reserve"),
        ({"drop_first": "system"}, "drop_first"),
        ({"context_placement": "assistant"}, "context_placement"),
        ({"limits": Limits(history=-3)}, "limits.history"),
    ],
)
def test_bad_settings(kw, param):
    args = {"window": 100, "count_messages": COUNTERS["chatml-words"], **kw}
    with pytest.raises(PellucidError) as e:
        ContextBudget(**args)
    assert e.value.param == param


def test_bad_messages():
    b = ContextBudget(window=100, count_messages=COUNTERS["chatml-words"])
    with pytest.raises(PellucidError, match=r"history\[1\]"):
        b.fit("q", history=[{"role": "user", "content": "a"}, {"content": "no role"}])
    with pytest.raises(PellucidError, match="content must be text"):
        b.fit({"role": "user", "content": None})


message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "assistant"]),
        "content": st.text(alphabet="ab <>|\n", max_size=40),
    }
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    history=st.lists(message, max_size=30),
    chunks=st.lists(
        st.builds(
            Chunk,
            st.text(alphabet="xyz ", max_size=60),
            st.one_of(st.none(), st.floats(0, 1)),
        ),
        max_size=6,
    ),
    system=st.text(alphabet="sys \n", max_size=80),
    current=st.text(alphabet="q ?", max_size=40),
    window=st.integers(1, 200),
    reserve=st.integers(0, 60),
    limit_h=st.one_of(st.none(), st.integers(0, 100)),
    limit_r=st.one_of(st.none(), st.integers(0, 100)),
    counter=st.sampled_from(list(COUNTERS)),
    drop_first=st.sampled_from(["history", "retrieved"]),
    truncate=st.booleans(),
)
def test_budget_property(
    history,
    chunks,
    system,
    current,
    window,
    reserve,
    limit_h,
    limit_r,
    counter,
    drop_first,
    truncate,
):
    count = COUNTERS[counter]
    b = ContextBudget(
        window=window,
        reserve=reserve,
        count_messages=count,
        limits=Limits(history=limit_h, retrieved=limit_r),
        drop_first=drop_first,
        truncate=cut_words if truncate else None,
        min_chunk_tokens=1,
    )
    sys_msgs = [{"role": "system", "content": system}] if system else []
    try:
        a = b.fit(current, system=system, history=history, retrieved=chunks)
    except PellucidError:
        # only when the undroppable parts and the reserve cannot fit
        assert count([*sys_msgs, {"role": "user", "content": current}]) + reserve > window
        return
    assert a.total <= window
    assert_adds_up(a, count)
    assert a.messages[-1] == {"role": "user", "content": current}
    if system:
        assert a.messages[0]["content"].startswith(system)
    assert a.history == history[a.history_dropped :]
    assert not a.history or a.history_dropped == 0 or a.history[0]["role"] == "user"
    if limit_h is not None:
        assert a.section(HISTORY).tokens <= limit_h
    if limit_r is not None:
        assert a.section(RETRIEVED).tokens <= limit_r
    assert a.chunk_status.count("truncated") <= (1 if truncate else 0)
