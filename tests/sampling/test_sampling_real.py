"""Sampling controls on the real default model: logit_bias, seeds, stop strings, the
stepwise next-token view and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from pellucid.config import merge_params, parse_config
from pellucid.errors import PellucidError
from pellucid.sampling.explain import explain_next_token
from pellucid.sampling.params import SamplingParams
from pellucid.sampling.sampler import SequenceSampler, sample

pytestmark = pytest.mark.real

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def france_logits(real_llm) -> torch.Tensor:
    """The real next-token logits after PROMPT: (1, V)."""
    ids = real_llm.tokenizer.encode(PROMPT)
    with torch.inference_mode():
        return real_llm.model(torch.tensor([ids]), last_only=True).float()


def draw_many(logits: torch.Tensor, params: SamplingParams, n: int = 1000, chunk: int = 250) -> list[int]:
    """n seeded draws from one real logits row: chunks of requests, seeds 0..n-1."""
    out = []
    V = logits.shape[1]
    for start in range(0, n, chunk):
        seqs = [SequenceSampler(SamplingParams(**{**vars(params), "seed": start + i}), vocab_size=V) for i in range(chunk)]
        out += sample(logits.expand(chunk, V), seqs).tokens.tolist()
    return out


def test_logit_bias_minus_100_never_lets_the_token_through(france_logits, real_llm):
    top = int(france_logits.argmax())
    assert real_llm.tokenizer.piece(top) == " Paris"
    free = draw_many(france_logits, SamplingParams(temperature=1.0))
    assert free.count(top) > 500  # ' Paris' is about 75% likely without the bias
    banned = draw_many(france_logits, SamplingParams(temperature=1.0, logit_bias={top: -100}))
    assert top not in banned
    assert real_llm.generate(PROMPT, temperature=0, max_tokens=1, logit_bias={top: -100}).token_ids[0] != top


def test_logit_bias_plus_100_forces_the_token(france_logits):
    rare = int(france_logits[0].argsort(descending=True)[1000])  # the 1001st most likely token
    forced = draw_many(france_logits, SamplingParams(temperature=1.0, top_p=0.9, logit_bias={rare: 100}))
    assert set(forced) == {rare}


def test_same_seed_same_output_different_seeds_differ(real_llm):
    def run(seed):
        return real_llm.generate("Once upon a time", temperature=1.0, max_tokens=8, seed=seed).token_ids

    assert run(7) == run(7)
    assert len({tuple(run(s)) for s in (1, 2, 3)}) > 1


@pytest.fixture(scope="module")
def greedy_run(real_llm):
    """The greedy continuation of PROMPT: its text and the text of each token."""
    c = real_llm.generate(PROMPT, temperature=0, max_tokens=12)
    pieces = [real_llm.tokenizer.decode([t]) for t in c.token_ids]
    assert "".join(pieces) == c.text
    return c, pieces


def stop_case(real_llm, stops):
    p = SamplingParams(temperature=0, max_tokens=12, stop=stops)
    done = real_llm.generate(PROMPT, p)
    streamed = "".join(real_llm.stream(PROMPT, p))
    assert streamed == done.text  # streaming and non-streaming give the same text
    return done


def test_stop_string_split_across_tokens(real_llm, greedy_run):
    c, pieces = greedy_run
    i = next(i for i in range(1, len(pieces) - 1) if len(pieces[i].strip()) >= 2 and len(pieces[i + 1].strip()) >= 2)
    stop = pieces[i][-2:] + pieces[i + 1][:2]  # ends one token, starts the next
    done = stop_case(real_llm, [stop])
    assert done.text == c.text[: c.text.find(stop)]
    assert (done.finish_reason, done.stop_reason) == ("stop", stop)


def test_stop_string_in_the_very_first_token(real_llm, greedy_run):
    c, pieces = greedy_run
    done = stop_case(real_llm, [pieces[0]])
    assert done.text == "" and done.finish_reason == "stop" and len(done.token_ids) == 1
    inner = pieces[0].strip()[1:]  # starts inside the first token
    done = stop_case(real_llm, [inner])
    assert done.text == pieces[0][: pieces[0].find(inner)]


def test_several_stop_strings_the_first_in_the_text_wins(real_llm, greedy_run):
    c, pieces = greedy_run
    words = [w.strip() for w in pieces[1:] if len(w.strip()) >= 2]
    early = words[0]
    late = next(w for w in reversed(words) if c.text.find(w) > c.text.find(early))
    done = stop_case(real_llm, [late, early])
    assert done.text == c.text[: c.text.find(early)] and done.stop_reason == early


def test_stop_string_before_min_tokens_does_not_end_it(real_llm, greedy_run):
    """As vLLM: until min_tokens are out, a stop string is plain text; after, it stops."""
    c, pieces = greedy_run
    stop = pieces[0]  # complete in the first token
    p = SamplingParams(temperature=0, max_tokens=12, min_tokens=3, stop=[stop])
    done = real_llm.generate(PROMPT, p)
    assert "".join(real_llm.stream(PROMPT, p)) == done.text
    assert done.text.startswith(stop) and len(done.token_ids) > 3
    later = c.text.find(stop, len("".join(pieces[:3])))  # its next occurrence past min_tokens, if any
    if later == -1:
        assert done.finish_reason == "length" and done.text == c.text
    else:
        assert done.finish_reason == "stop" and done.text == c.text[:later]


def test_no_stop_runs_to_length(real_llm, greedy_run):
    c, _ = greedy_run
    done = stop_case(real_llm, ["this string never appears"])
    assert done.text == c.text and done.finish_reason == "length"


def test_explain_next_token_shows_each_step(real_llm):
    stages = explain_next_token(real_llm, PROMPT, SamplingParams(temperature=0.8, top_k=3, top_p=0.9, min_p=0.05, seed=1), top=5)
    assert [s.name for s in stages] == ["raw", "bias_penalties", "temperature", "top_k", "top_p", "min_p", "typical_p", "draw"]
    by = {s.name: s for s in stages}
    assert by["raw"].kept == real_llm.config.vocab_size
    assert by["top_k"].kept == 3
    assert sum(c.prob for c in by["top_k"].candidates) == pytest.approx(1.0, abs=1e-5)
    assert by["raw"].candidates[0].text == " Paris" and by["min_p"].candidates[0].kept
    assert by["temperature"].candidates[0].prob > by["raw"].candidates[0].prob  # T < 1 sharpens
    drawn = [c for c in by["draw"].candidates if c.kept]
    assert len(drawn) == 1 and any(c.id == drawn[0].id and c.kept for c in by["min_p"].candidates)


def test_explain_greedy(real_llm):
    stages = explain_next_token(real_llm, PROMPT, SamplingParams(temperature=0), top=3)
    assert [s.name for s in stages] == ["raw", "bias_penalties", "greedy"]
    assert [c.text for c in stages[-1].candidates if c.kept] == [" Paris"]


def test_config_logit_bias_by_text(real_llm):
    tok = real_llm.tokenizer
    cfg = parse_config('control:\n  logit_bias:\n    " Paris": -100\n    9: 5\n', "b.yaml")
    p = merge_params({}, cfg, {"logit_bias": {" London": 2.5}}, tokenizer=tok)
    assert p.logit_bias == {tok.single_token_id(" Paris"): -100.0, 9: 5.0, tok.single_token_id(" London"): 2.5}
    cfg = parse_config('control:\n  logit_bias:\n    9: 5\n    " Paris is": 1\n', "b.yaml")
    with pytest.raises(PellucidError, match=r"^b.yaml:4: control.logit_bias: logit_bias key ' Paris is' is not a single token"):
        merge_params({}, cfg, {}, tokenizer=tok)
    with pytest.raises(PellucidError, match=r"--logit-bias: logit_bias token id 999999 is not in the vocabulary"):
        merge_params({}, None, {"logit_bias": {999999: 1}}, tokenizer=tok)


# -- the CLI, in-process, on the already loaded model ------------------------------------------


def test_cli_next_token_json(real_cli):
    r = real_cli("next-token", PROMPT, "--top-k", "3", "--temperature", "0.7", "--logit-bias", " London=-100", "--seed", "3", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert [s["name"] for s in out["stages"]][-1] == "draw"
    top_k = next(s for s in out["stages"] if s["name"] == "top_k")
    assert top_k["kept"] == 3 and top_k["setting"] == "k=3"
    london = next(c for c in out["stages"][0]["candidates"] if c["text"] == " London")
    assert london["kept"]  # in the raw distribution, cut by the bias:
    assert not next(c for c in out["stages"][1]["candidates"] if c["text"] == " London")["kept"]
    assert out["chosen"]["text"] in {c["text"] for c in top_k["candidates"] if c["kept"]}


def test_cli_next_token_table(real_cli):
    r = real_cli("next-token", PROMPT, "--top-p", "0.5", "--top", "4")
    assert r.exit_code == 0, r.output
    for word in ("' Paris'", "top-p", "p=0.5", "cut", "tokens kept", "chosen:"):
        assert word in r.stdout, word


def test_cli_generate_with_config_and_overrides(real_cli, real_llm, tmp_path):
    conf = tmp_path / "inference.yaml"
    conf.write_text("model:\n  name: smollm2-135m-instruct\n  max_tokens: 40\nsampling:\n  temperature: 0.0\n"
                    "control:\n  stop_sequences: ['this string never appears']\n")  # fmt: skip
    r = real_cli("generate", PROMPT, "--config", str(conf), "--max-tokens", "4")
    assert r.exit_code == 0, r.output
    expected = real_llm.generate(PROMPT, temperature=0, max_tokens=4).text
    assert r.stdout == expected + "\n"  # the flag's 4 tokens, not the config's 40
    r = real_cli("generate", PROMPT, "--config", str(conf), "--max-tokens", "2", "--logit-bias", " Paris=-100")
    assert r.exit_code == 0 and not r.stdout.startswith(" Paris")


def test_cli_config_errors(real_cli, tmp_path):
    conf = tmp_path / "note.yaml"
    conf.write_text("model:\n  name: gpt-4o\n")
    r = real_cli("generate", PROMPT, "--config", str(conf))
    assert isinstance(r.exception, PellucidError) and "gpt-4o" in r.exception.message and ":2:" in r.exception.message
    r = real_cli("generate", PROMPT, "--top-p", "3")
    assert isinstance(r.exception, PellucidError) and r.exception.message.startswith("--top-p: top_p = 3.0")
