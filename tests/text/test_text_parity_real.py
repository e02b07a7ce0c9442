"""Text, not only ids: every way pellucid turns ids into text agrees, with itself and with the
reference decoders, on both real models and on a Hugging Face folder.

- llama.cpp's detokenizer output for 179 texts per model (newlines, tabs, runs of spaces,
  emoji, ZWJ sequences, CJK, Arabic, Devanagari, code, special-token text; tests/data,
  made by benchmarks/make_tokenizer_cases.py) == `Tokenizer.decode(ids)` == the streaming
  detokenizer fed one id at a time (what the engine, the CLI and the server emit).
- Generated text: `LLM.stream` joined == `LLM.generate(...).text` == `decode` of the
  generated ids, for prompts whose continuations hold newlines, indentation and lists.
- A Hugging Face folder: pellucid's decode == transformers' decode of the same ids.
"""

from __future__ import annotations

import json

import pytest
from paths import DATA

from pellucid import registry
from pellucid.text.detokenizer import Detokenizer

pytestmark = pytest.mark.real

MODELS = {"smollm2-135m-instruct": "tokenizer_cases_smollm2.json", "gemma3-270m": "tokenizer_cases_gemma3.json"}
PROMPTS = [  # continuations with newlines, indentation, lists and numbers
    "def fibonacci(n):\n    ",
    "Shopping list:\n1. eggs\n2.",
    "Roses are red,\nviolets are blue,\n",
    "| name | age |\n|---|---|\n| Ann | 31 |\n",
]


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    from pellucid.api import LLM

    cases = json.loads((DATA / MODELS[request.param]).read_text())["cases"]
    return LLM(str(registry.resolve(request.param)), max_batch=1, max_len=512), cases


def stream_text(tok, ids: list[int], *, skip_special: bool) -> str:
    d = Detokenizer(tok, skip_special=skip_special)
    return "".join(d.push(i) for i in ids) + d.flush()


def test_decode_and_streaming_equal_llama_cpps_detokenizer(model):
    llm, cases = model
    tok = llm.tokenizer
    checked = 0
    for c in cases:
        for ids, ref in ((c["ids_special"], c["detok_special"]), (c["ids_plain"], c["detok_plain"])):
            assert tok.decode(ids) == ref, c["text"]
            assert stream_text(tok, ids, skip_special=False) == ref, c["text"]
            # what users see: control tokens (BOS, turn markers) left out, every other piece kept
            shown = stream_text(tok, ids, skip_special=True)
            assert shown == tok.decode(ids, skip_special=True)
            if not set(ids) & tok.special_ids:
                assert shown == ref
            checked += 1
    assert checked == 2 * len(cases) >= 300
    texts = "".join(c["text"] for c in cases)
    assert all(ch in texts for ch in ("\n", "\t", "   ", "😀", "中", "ع", "न"))  # the corpus has them


def test_generated_text_is_the_same_streamed_batched_and_decoded(model):
    llm, _ = model
    tok = llm.tokenizer
    newlines = 0
    for prompt in PROMPTS:
        done = llm.generate(prompt, max_tokens=40, temperature=0)
        streamed = "".join(llm.stream(prompt, max_tokens=40, temperature=0))
        ids = [i for i in done.token_ids if i not in tok.eog_ids]
        assert streamed == done.text == tok.decode(ids, skip_special=True), prompt
        newlines += done.text.count("\n")
    assert newlines > 0  # the continuations did hold line breaks, and they survived


def test_hf_folder_decode_equals_transformers(tmp_path):
    """A Qwen2-style folder (tokenizer.json): pellucid's decode and transformers' on the same ids."""
    transformers = pytest.importorskip("transformers")
    from tiny_hf import save_hf, tiny_qwen2

    from pellucid.loading import load_model

    folder = save_hf(tiny_qwen2(seed=3), tmp_path / "qwen")
    lm = load_model(folder, dtype="float32")
    ref = transformers.AutoTokenizer.from_pretrained(str(folder))
    cases = json.loads((DATA / MODELS["smollm2-135m-instruct"]).read_text())["cases"]
    for c in cases[:120]:
        ids = lm.tokenizer.encode(c["text"], add_bos=False)
        want = ref.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        assert lm.tokenizer.decode(ids) == want == c["text"], c["text"]
        assert stream_text(lm.tokenizer, ids, skip_special=False) == want


def test_special_token_paths_keep_text_and_control_apart(model):
    """stop_token_ids on a text piece, ignore_eos, parse_special=False and the chat template, each
    on the real model: control tokens act and stay out of the text, text pieces stay text."""
    llm, _ = model
    tok = llm.tokenizer
    prompt = PROMPTS[2]
    full = llm.generate(prompt, max_tokens=40, temperature=0)
    nl = next(i for i in full.token_ids if "\n" in tok.decode([i]))  # a piece holding a line break
    cut = llm.generate(prompt, max_tokens=40, temperature=0, stop_token_ids=[nl])
    k = full.token_ids.index(nl)
    assert cut.finish_reason == "stop" and cut.stop_reason == nl and cut.token_ids == full.token_ids[: k + 1]
    assert cut.text == tok.decode(full.token_ids[:k])  # the stop token's own text is not shown

    chat = llm.render_chat([{"role": "user", "content": "Say hello."}])
    eos = {tok.eos_id: 100.0}  # the end of generation, made certain after four tokens of text
    ended = llm.generate(chat, max_tokens=20, temperature=0, logit_bias=eos, min_tokens=4)
    assert ended.finish_reason == "stop" and ended.stop_reason == tok.eos_id and len(ended.token_ids) == 5
    assert ended.text == tok.decode(ended.token_ids[:4])  # the control token is never text
    # with ignore_eos the end token neither stops nor is banned by min_tokens (as in vLLM): it is drawn, not shown
    more = llm.generate(chat, max_tokens=8, temperature=0, logit_bias=eos, min_tokens=4, ignore_eos=True)
    assert more.finish_reason == "length" and more.token_ids == [tok.eos_id] * 8 and more.text == ""

    marker = tok.piece(next(i for i in tok.encode(chat) if i in tok.special_ids))  # e.g. <|im_start|>
    as_control = tok.encode(marker, add_bos=False)
    as_text = tok.encode(marker, add_bos=False, parse_special=False)
    assert len(as_control) == 1 and as_control[0] in tok.special_ids
    assert not set(as_text) & tok.special_ids and tok.decode(as_text) == marker
    ids = tok.encode(chat)
    assert tok.decode(ids) == chat and sum(i in tok.special_ids for i in ids) >= 2  # the turn markers are control
