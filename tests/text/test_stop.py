"""Stop sequences on text: across token boundaries, held-back tails, several stops."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pellucid.text.stop import StopMatcher


def stream(stops, pieces):
    """Push pieces one by one; return (emitted pieces, matched)."""
    m = StopMatcher(stops)
    out = [m.push(p) for p in pieces]
    if m.matched is None:
        out.append(m.flush())
    return out, m.matched


def test_stop_split_across_pieces():
    out, matched = stream(["END"], ["Hello E", "N", "D and more"])
    assert "".join(out) == "Hello "
    assert matched == "END"
    assert out[0] == "Hello "  # " E" could start END: "E" held back, "Hello " emitted at once


def test_partial_match_that_fails_is_released():
    out, matched = stream(["END"], ["Hello E", "N", "o"])
    assert matched is None
    assert out == ["Hello ", "", "ENo", ""]


def test_stop_starting_inside_the_held_back_tail():
    # "aa" is held (a prefix of "aab"); the stop starts at the second 'a'
    out, matched = stream(["aab"], ["xaa", "ab"])
    assert out == ["x", "a"] and matched == "aab"


def test_matching_off_passes_stops_through_but_holds_a_partial_tail():
    m = StopMatcher(["END"])
    assert m.push("a END b E", match=False) == "a END b "  # complete: text; "E" may still grow
    assert m.push("ND", match=True) == "" and m.matched == "END"  # completed once matching is on


def test_stop_in_the_very_first_piece():
    out, matched = stream(["Hi"], ["Hi there"])
    assert out == [""] and matched == "Hi"


def test_several_stops_the_first_to_complete_wins():
    out, matched = stream(["\n\n", "END", "```"], ["a b", "``", "`c END"])
    assert "".join(out) == "a b" and matched == "```"
    # a longer stop that starts earlier but completes later loses to one that completes first
    out, matched = stream(["abcdef", "cd"], ["abcdef"])
    assert "".join(out) == "ab" and matched == "cd"
    # ending at the same place: the longer one (the text is cut where it starts)
    out, matched = stream(["xcd", "cd"], ["abxcd"])
    assert "".join(out) == "ab" and matched == "xcd"


def test_nothing_after_the_match():
    m = StopMatcher(["."])
    assert m.push("One. Two.") == "One"
    assert m.push("more") == "" and m.flush() == ""


def test_no_stops_passes_through():
    m = StopMatcher([])
    assert m.push("abc") == "abc" and m.flush() == ""


def test_unicode_stops():
    out, matched = stream(["→ end"], ["ok →", " e", "nd!"])
    assert "".join(out) == "ok " and matched == "→ end"


alphabet = st.sampled_from("abcE ND\n")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet, max_size=40), st.lists(st.text(alphabet, min_size=1, max_size=4), min_size=1, max_size=3),
       st.lists(st.integers(0, 40), max_size=10))  # fmt: skip
def test_streaming_equals_non_streaming(text, stops, cuts):
    """Whatever the cut into pieces, the emitted text and the matched stop are the same, and
    the text is the input up to the first place where a stop string completes."""
    bounds = sorted({0, len(text), *[c for c in cuts if c <= len(text)]})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    whole, matched_whole = stream(stops, [text])
    parts, matched_parts = stream(stops, pieces)
    assert "".join(parts) == "".join(whole)
    assert matched_parts == matched_whole
    ends = [(text.find(s) + len(s), -len(s), s) for s in stops if s in text]
    if ends:
        end, neg, s = min(ends)
        assert "".join(whole) == text[: end + neg] and matched_whole == s
    else:
        assert "".join(whole) == text and matched_whole is None
    # nothing emitted is ever part of a stop string
    assert not any(s in "".join(parts) for s in stops)
