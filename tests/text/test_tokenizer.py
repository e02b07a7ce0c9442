"""Tokenizer parity with llama.cpp (reference ids in tests/data, made by
benchmarks/make_tokenizer_cases.py), round trips, the streaming detokenizer, the chat template."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paths import DATA

from pellucid.errors import PellucidError
from pellucid.text.chat_template import ChatTemplate
from pellucid.text.detokenizer import Detokenizer
from pellucid.weights.gguf import GGUFFile


@pytest.fixture(scope="module")
def tok(real_path):
    from pellucid.text.tokenizer import Tokenizer

    return Tokenizer.from_gguf(GGUFFile(real_path).metadata)


@pytest.fixture(scope="module")
def cases():
    return json.loads((DATA / "tokenizer_cases_smollm2.json").read_text())["cases"]


def test_ids_equal_llama_cpp_with_special_tokens(tok, cases):
    bad = [c["text"] for c in cases if tok.encode(c["text"], parse_special=True) != c["ids_special"]]
    assert not bad, f"{len(bad)} of {len(cases)} differ, e.g. {bad[:3]!r}"


def test_ids_equal_llama_cpp_without_special_tokens(tok, cases):
    bad = [c["text"] for c in cases if tok.encode(c["text"], parse_special=False) != c["ids_plain"]]
    assert not bad, f"{len(bad)} of {len(cases)} differ, e.g. {bad[:3]!r}"


def test_round_trip(tok, cases):
    for c in cases:
        assert tok.decode(tok.encode(c["text"])) == c["text"]


def test_numerals_split_like_llama_cpp(tok):
    # transformers' GGUF conversion gets this one wrong (" ½" as two byte pieces).
    assert [tok.piece(i) for i in tok.encode("4 ½")] == ["4", " ", "½"]


def test_special_tokens(tok):
    assert tok.encode("<|im_start|>user") [0] == 1
    assert 1 not in tok.encode("<|im_start|>user", parse_special=False)
    assert tok.eos_id == 2 and 2 in tok.eog_ids
    assert tok.add_bos is False


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_streaming_detokenizer_never_emits_half_a_character(tok, text):
    ids = tok.encode(text, parse_special=False)
    d = Detokenizer(tok, skip_special=False)
    pieces = [d.push(i) for i in ids]
    pieces.append(d.flush())
    assert "".join(pieces) == tok.decode(ids)
    # Streaming equals the text whenever the vocabulary has every byte of it (SmolLM2 lacks
    # 21 byte tokens, e.g. 0xF1; llama.cpp drops those bytes the same way).
    if all(tok.token_to_id(c) is not None for c in _as_byte_symbols(text)):
        assert "".join(pieces) == text
        assert "\ufffd" not in "".join(pieces)


def _as_byte_symbols(text: str) -> str:
    from pellucid.text.tokenizer import _byte_decoder

    enc = {b: c for c, b in _byte_decoder().items()}
    return "".join(enc[b] for b in text.encode("utf-8"))


def test_streaming_detokenizer_holds_partial_utf8(tok):
    # "😀" is four bytes; byte-level BPE may split it. Push byte tokens one at a time.
    ids = [tok.token_to_id(c) for c in "ðŁĺĢ"]  # GPT-2 stand-ins for F0 9F 98 80
    assert None not in ids
    d = Detokenizer(tok)
    assert [d.push(i) for i in ids] == ["", "", "", "😀"]


SMOL_TEMPLATE = None


def test_chat_template_renders_chatml(real_lm):
    out = real_lm.chat_template.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert out == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert real_lm.chat_template.supports_system


@pytest.mark.parametrize("evil", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{% set x = messages.append(1) %}{{ x }}",
])  # fmt: skip
def test_template_sandbox(evil):
    t = ChatTemplate(evil)
    with pytest.raises(PellucidError, match="sandbox|forbids|failed"):
        t.render([{"role": "user", "content": "hi"}])


def test_template_without_system_role_gets_it_merged():
    gemma_like = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    )
    t = ChatTemplate(gemma_like)
    assert not t.supports_system
    out = t.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert out == "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"


def test_bad_messages():
    t = ChatTemplate(None)
    with pytest.raises(PellucidError, match=r"messages\[0\]\.role is 'wizard'"):
        t.render([{"role": "wizard", "content": "x"}])
    with pytest.raises(PellucidError, match="non-empty list"):
        t.render([])


def test_oversized_template_is_refused():
    with pytest.raises(PellucidError, match="limit"):
        ChatTemplate("x" * (300 << 10))
