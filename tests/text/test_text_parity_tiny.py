"""Text, not only ids, for every architecture pellucid loads, on tiny random checkpoints
written by transformers (HF folders) and by our GGUF writers: what the engine streams ==
the completion's text == `Tokenizer.decode` of the generated ids == transformers' decode of
the same ids. Sampled at temperature 1.5 from random weights, the generated ids are a
hostile mix: control tokens between text, bytes that split UTF-8 characters, and byte runs
that are not UTF-8 at all (each becomes U+FFFD in all four, the same way)."""

from __future__ import annotations

import pytest
import tiny_hf as th

from pellucid.api import LLM
from pellucid.loading import load_model
from pellucid.text.detokenizer import Detokenizer

CHECKPOINTS = {  # name -> (builder, GGUF writer or None for the HF folder)
    "gpt2": (lambda: th.tiny_gpt2(seed=1), None),
    "qwen2": (lambda: th.tiny_qwen2(seed=2), None),
    "mistral": (lambda: th.tiny_mistral(seed=4, window=4), None),
    "gemma3": (lambda: th.tiny_gemma3(seed=5, window=4), None),
    "gpt2-gguf": (lambda: th.tiny_gpt2(seed=1), th.write_gpt2_gguf),
    "qwen2-gguf": (lambda: th.tiny_qwen2(seed=2), th.write_qwen2_gguf),
}
PROMPTS = ["def f(x):\n\treturn x\n", "Lists:\n\n- a\n- b", "café 😀 中文", "  spaced   out  "]


@pytest.fixture(scope="module", params=list(CHECKPOINTS))
def checkpoint(request, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    build, write_gguf = CHECKPOINTS[request.param]
    hf = build()
    folder = th.save_hf(hf, tmp_path_factory.mktemp(request.param))
    source = write_gguf(hf, folder / "model.gguf") if write_gguf else folder
    # transformers' fast tokenizer over the folder's tokenizer.json (the vocabulary the GGUF carries too);
    # not AutoTokenizer, which for a gemma3 config swaps in Gemma's own decoder over this byte-level file
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    return LLM(loaded=load_model(source, dtype="float32"), max_batch=2, max_len=64), ref


def test_streamed_generated_decoded_and_transformers_text_agree(checkpoint):
    llm, ref = checkpoint
    tok = llm.tokenizer
    replaced = controls = 0
    for k, prompt in enumerate(PROMPTS):
        n = min(40, 64 - len(tok.encode(prompt)))  # tiny GPT-2 has 64 positions
        kw = {"max_tokens": n, "temperature": 1.5, "seed": k, "ignore_eos": True}
        done = llm.generate(prompt, **kw)
        streamed = "".join(llm.stream(prompt, **kw))
        ids = done.token_ids
        assert len(ids) == n
        want = ref.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert streamed == done.text == tok.decode(ids, skip_special=True) == want, prompt
        # and with control tokens shown, the detokenizer fed one id at a time == decode == transformers
        d = Detokenizer(tok, skip_special=False)
        shown = "".join(d.push(i) for i in ids) + d.flush()
        assert shown == tok.decode(ids) == ref.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        replaced += done.text.count("\ufffd")
        controls += sum(i in tok.special_ids for i in ids)
    assert replaced and controls  # the hostile cases did occur: broken UTF-8 and control tokens mid-text


def test_prompt_text_round_trips_through_both_tokenizers(checkpoint):
    llm, ref = checkpoint
    tok = llm.tokenizer
    for prompt in PROMPTS + ["<|im_start|>user\nhi<|im_end|>\n"]:
        ids = tok.encode(prompt, add_bos=False)
        assert ids == ref.encode(prompt, add_special_tokens=False), prompt
        assert tok.decode(ids) == prompt == ref.decode(ids, clean_up_tokenization_spaces=False)
