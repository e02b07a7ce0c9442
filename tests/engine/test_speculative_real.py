"""Speculative decoding on the real default model (float32): greedy output identical to
plain decoding (LLM.generate at temperature 0), with prompt lookup and with draft models."""

from __future__ import annotations

import pytest

from pellucid.engine.speculative import (
    ModelDrafter,
    NgramDrafter,
    SpeculativeConfig,
    SpeculativeDecoder,
    make_drafter,
    truncated,
)
from pellucid.sampling.params import SamplingParams

pytestmark = pytest.mark.real

EDIT = ("Fix the two typos in this sentence and reply with the corrected sentence only: "
        "The quick brown fox jumpd over the lazy dog while the farmer watched from the old barn doore.")  # fmt: skip
RAW = "The three primary colors are red, blue and yellow. The three primary colors are"


@pytest.fixture(scope="module")
def prompts(real_llm):
    return {"edit": real_llm.render_chat([{"role": "user", "content": EDIT}]), "raw": RAW}


@pytest.fixture(scope="module")
def plain(real_llm, prompts):
    """Plain greedy decoding through the engine, once per prompt."""
    return {k: real_llm.generate(v, temperature=0, max_tokens=56) for k, v in prompts.items()}


def _speculate(llm, drafter, prompt, num_draft=5, **kw):
    dec = SpeculativeDecoder(llm.loaded, drafter, num_draft=num_draft, max_len=llm.engine.max_len)
    req = llm.request(prompt, SamplingParams(**kw))
    outs = list(dec.run(req))
    return req, outs, dec


@pytest.mark.parametrize("name", ["edit", "raw"])
def test_prompt_lookup_greedy_is_identical(real_llm, prompts, plain, name):
    req, outs, dec = _speculate(real_llm, NgramDrafter(), prompts[name], temperature=0, max_tokens=56)
    want = plain[name]
    assert req.output_ids == want.token_ids
    assert req.text == want.text == "".join(o.new_text for o in outs)
    assert req.finish_reason == want.finish_reason
    s = dec.stats
    assert s.generated == len(want.token_ids) and s.accepted > 0
    assert s.rounds < s.generated  # some rounds yielded more than one token


def test_prompt_lookup_copies_the_edit_task(real_llm, prompts, plain):
    """The answer repeats the sentence: a round yields more than 2 tokens on average."""
    _, _, dec = _speculate(real_llm, NgramDrafter(), prompts["edit"], num_draft=8, temperature=0, max_tokens=56)
    assert "jumped over the lazy dog" in plain["edit"].text  # the model does fix the sentence
    assert dec.stats.tokens_per_round > 2.0 and dec.stats.mean_accepted > 1.0


def test_truncated_draft_model_greedy_is_identical(real_llm, prompts, plain):
    drafter = ModelDrafter(truncated(real_llm.model, 12), vocab_size=real_llm.config.vocab_size, name="12 layers")
    for name in ("edit", "raw"):
        req, _, dec = _speculate(real_llm, drafter, prompts[name], num_draft=3, temperature=0, max_tokens=56)
        assert req.output_ids == plain[name].token_ids, name
        assert 0 < dec.stats.accepted < dec.stats.drafted


def test_bfloat16_copy_as_draft_model(real_llm, prompts, plain):
    """The same GGUF loaded again in bfloat16 drafts for the float32 target: it agrees on
    nearly every token, and the output is still exactly the float32 model's."""
    drafter = make_drafter(SpeculativeConfig(draft="model", draft_dtype="bfloat16"), real_llm.loaded)
    req, _, dec = _speculate(real_llm, drafter, prompts["edit"], num_draft=4, temperature=0, max_tokens=56)
    assert req.output_ids == plain["edit"].token_ids
    assert dec.stats.acceptance_rate > 0.8


def test_stop_strings_and_eos_end_as_in_the_engine(real_llm, prompts):
    for prompt, kw in ((prompts["edit"], dict(max_tokens=56, stop=["lazy"])), (RAW, dict(max_tokens=40, stop=[". The"]))):
        want = real_llm.generate(prompt, temperature=0, **kw)
        req, outs, _ = _speculate(real_llm, NgramDrafter(), prompt, temperature=0, **kw)
        assert (req.text, req.finish_reason, req.stop_reason) == (want.text, want.finish_reason, want.stop_reason)
        assert req.output_ids == want.token_ids and req.finish_reason == "stop"
    # end of turn: a short chat answer stops on <|im_end|> before max_tokens
    short = real_llm.render_chat([{"role": "user", "content": "Say just the word: yes"}])
    want = real_llm.generate(short, temperature=0, max_tokens=40)
    req, _, _ = _speculate(real_llm, NgramDrafter(), short, temperature=0, max_tokens=40)
    assert want.finish_reason == "stop" and (req.output_ids, req.text, req.finish_reason) == (want.token_ids, want.text, "stop")


def test_sampling_runs_and_is_seeded(real_llm, prompts):
    runs = []
    for _ in range(2):
        req, _, dec = _speculate(real_llm, NgramDrafter(), prompts["edit"], temperature=0.7, top_p=0.9, seed=5, max_tokens=40)
        runs.append(req.output_ids)
    assert runs[0] == runs[1] and dec.stats.drafted > 0


def test_llm_speculative_option_gives_the_same_completion(real_llm, real_lm, prompts, plain):
    from pellucid.api import LLM

    llm = LLM(loaded=real_lm, max_batch=1, max_len=2048, speculative={"draft": "ngram", "num_draft": 6})
    got = llm.generate(prompts["edit"], temperature=0, max_tokens=56)
    assert (got.token_ids, got.text, got.finish_reason) == (plain["edit"].token_ids, plain["edit"].text, plain["edit"].finish_reason)
    assert llm.speculative.stats.accepted > 0
    assert "".join(llm.stream(RAW, temperature=0, max_tokens=56)) == plain["raw"].text


# -- the command line ---------------------------------------------------------------------------

def _cli(*args: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "pellucid", "speculate", *args], capture_output=True, text=True, timeout=600)


def test_cli_shows_the_speculation_and_the_speed_up(real_path):
    r = _cli(EDIT, "--chat", "--dtype", "float32", "--max-tokens", "32", "--num-draft", "6", "--show-speculation", "--compare")
    assert r.returncode == 0, r.stderr
    assert "Draft:" in r.stdout and "Verify:" in r.stdout and "Accept " in r.stdout and "jumped" in r.stdout
    for figure in ("acceptance rate", "mean accepted per round", "tok/s", "speed-up", "same tokens as plain"):
        assert figure in r.stderr
    assert "yes" in r.stderr.split("same tokens as plain")[1].splitlines()[0]


def test_cli_json_and_errors(real_path):
    import json

    r = _cli(RAW, "--dtype", "float32", "--max-tokens", "12", "--json", "--draft", "model", "--draft-layers", "10")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["generated_tokens"] == 12 and 0 <= d["acceptance_rate"] <= 1 and "target" in d["draft"]
    for args, message in ((["--draft", "eagle"], "draft = 'eagle'"), (["--num-draft", "0"], "num_draft = 0")):
        r = _cli("hi", *args)
        assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr
