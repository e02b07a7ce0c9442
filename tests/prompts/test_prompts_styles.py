"""Output styles: presets, validation, format skeletons and the checks after a reply."""

import pytest

from pellucid.errors import PellucidError
from pellucid.prompts import (
    SKELETONS,
    Section,
    Skeleton,
    Style,
    check_bullets,
    check_code,
    check_format,
    check_table,
    check_word_limit,
    count_words,
)
from pellucid.prompts.styles import DIMENSIONS

GOOD = """## Summary
Paris is the capital of France.

## Details
- It has been the capital since 987.
- About 2 million people live there.

## Next Steps
Visit the Louvre.
"""


def test_every_preset_renders_a_distinct_sentence():
    sentences = []
    for dim, presets in DIMENSIONS.items():
        for value in presets:
            lines = Style(**{dim: value}).instructions()
            assert len(lines) == 1 and lines[0].endswith(".")
            sentences.append(lines[0])
    assert len(set(sentences)) == len(sentences) == 3 + 3 + 4 + 3 + 3


def test_style_combines_dimensions_in_a_fixed_order():
    s = Style(depth="eli5", length="concise", persona="friendly", max_words=100)
    assert s.instructions() == [
        DIMENSIONS["length"]["concise"],
        DIMENSIONS["persona"]["friendly"],
        DIMENSIONS["depth"]["eli5"],
        "Keep your response under 100 words.",
    ]
    assert Style().render() == "" and Style().is_empty


@pytest.mark.parametrize(
    ("dim", "bad"),
    [
        ("length", "short"),
        ("formality", "rude"),
        ("structure", "poem"),
        ("persona", "pirate"),
        ("depth", "phd"),
    ],
)
def test_bad_preset_names_dimension_value_and_allowed(dim, bad):
    with pytest.raises(PellucidError) as e:
        Style(**{dim: bad})
    msg = str(e.value)
    assert dim in msg and repr(bad) in msg
    for allowed in DIMENSIONS[dim]:
        assert allowed in msg
    assert e.value.param == f"style.{dim}"


@pytest.mark.parametrize("bad", [0, -5, 2.5, True])
def test_bad_max_words(bad):
    with pytest.raises(PellucidError, match="max_words"):
        Style(max_words=bad)


def test_skeleton_renders_the_notes_layout():
    text = Style(skeleton="summary-details-next-steps").render()
    assert text == (
        "Always structure your response as:\n## Summary\n[1-2 sentences]\n\n"
        "## Details\n[Bullet points]\n\n## Next Steps\n[If applicable]"
    )
    sk = Skeleton("x", [Section("A"), Section("B", "more", optional=True)], level=3)
    assert (
        sk.render() == "Always structure your response as:\n### A\n\n### B\n[more (if applicable)]"
    )


def test_unknown_skeleton_lists_builtins():
    with pytest.raises(PellucidError) as e:
        Style(skeleton="nope")
    for name in SKELETONS:
        assert name in str(e.value)


def test_check_format_accepts_a_good_reply():
    r = check_format(GOOD, "summary-details-next-steps")
    assert r.ok and r.missing == [] and r.empty == [] and r.in_order
    assert [c.line for c in r.sections] == [1, 4, 8]
    assert r.summary() == "follows summary-details-next-steps"


def test_optional_section_may_be_missing():
    reply = GOOD.split("## Next Steps")[0]
    r = check_format(reply, SKELETONS["summary-details-next-steps"])
    assert r.ok
    assert r.sections[2].optional and not r.sections[2].present


def test_check_format_reports_missing_empty_and_order():
    r = check_format("## Details\n- a\n- b\n", "summary-details-next-steps")
    assert not r.ok and r.missing == ["Summary"]
    assert "missing Summary" in r.summary()

    r = check_format("## Summary\n\n## Details\n- a\n", "summary-details-next-steps")
    assert r.empty == ["Summary"] and not r.ok

    r = check_format("## Details\n- a\n\n## Summary\nok\n", "summary-details-next-steps")
    assert r.missing == [] and not r.in_order and not r.ok
    assert "out of order" in r.summary()


def test_check_format_is_lenient_about_heading_spelling_but_not_fences():
    reply = "# **summary:**\nshort\n### Details ###\n- x\n#### sub heading\nmore\n"
    r = check_format(reply, "summary-details-next-steps")
    assert r.ok, r
    fenced = "```\n## Summary\n```\nno headings here\n"
    assert check_format(fenced, "summary-details-next-steps").missing == ["Summary", "Details"]


def test_extra_headings_are_listed():
    r = check_format(GOOD + "\n## Appendix\nstuff\n", "summary-details-next-steps")
    assert r.ok and r.extra == ["appendix"]


def test_word_limit_and_bullets():
    assert count_words("## Hello, world! It's a well-known test - really.") == 7
    assert check_word_limit("one two three", 3).ok
    c = check_word_limit("one two three four", 3)
    assert not c.ok and c.detail == "4 words, limit 3"
    assert check_bullets("- a\n* b\n1. c").ok
    assert not check_bullets("just prose, no list").ok
    assert not check_bullets("- only one").ok
    assert check_bullets("- only one", min_items=1).ok
    assert check_table("| a | b |\n|---|:--:|\n| 1 | 2 |").ok
    assert not check_table("a | b").ok
    assert check_code("```py\nx = 1\n```").ok and not check_code("x = 1").ok


def test_style_check_runs_the_implied_checks():
    style = Style(structure="lists", max_words=30, skeleton="summary-details-next-steps")
    report = style.check(GOOD)
    assert [c.name for c in report.checks] == ["max_words", "bullets", "format"]
    assert report.ok and report.format is not None and report.format.ok
    bad = style.check("Paris. " * 40)
    assert not bad.ok
    assert {c.name for c in bad.checks if not c.ok} == {"max_words", "bullets", "format"}
