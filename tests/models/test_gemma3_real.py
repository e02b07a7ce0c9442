"""Gemma 3 270M on its real weights (registry "gemma3-270m", Q4_K_M GGUF), against
transformers' Gemma3ForCausalLM holding the same weights, and its tokenizer against llama.cpp.

The reference is built without pellucid's loader: tensors named by llama.cpp's own table
(gguf.get_tensor_name_map), dequantized by the gguf package, norms minus one (the converter
stores Gemma's 1 + weight; transformers' GGUF loader subtracts it the same way). Both models
run in float32 and are built once for the module.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from paths import DATA

from pellucid.api import LLM
from pellucid.loading import load_model

pytestmark = pytest.mark.real


PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, there was a little",
    "1, 2, 3, 4, 5,",
    "Water boils at a temperature of",
]
# Gemma 3 270M as published (google/gemma-3-270m config.json)
PUBLISHED = dict(vocab_size=262_144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                 num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
                 query_pre_attn_scalar=256, rms_norm_eps=1e-6, max_position_embeddings=32_768)  # fmt: skip


@pytest.fixture(scope="module")
def gemma():
    from pellucid import registry

    return load_model(registry.resolve("gemma3-270m"), dtype="float32")


@pytest.fixture(scope="module")
def reference(gemma):
    import gguf
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from pellucid.weights.gguf import GGUFFile

    cfg = Gemma3TextConfig(**PUBLISHED, tie_word_embeddings=True, attn_implementation="eager",
                           rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                                            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})  # fmt: skip
    model = Gemma3ForCausalLM(cfg)  # on the CPU: its rotary and scale buffers are made here
    f = GGUFFile(gemma.path)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, cfg.num_hidden_layers)
    state = {}
    for key, p in model.state_dict().items():
        if key == "lm_head.weight":
            continue  # tied
        src = names.get_name(key, try_suffixes=(".weight", ".bias"))
        info = f.tensors[src]
        raw = np.asarray(f.raw(src))
        if info.qtype == gguf.GGMLQuantizationType.F32:
            arr = raw.view(np.float32)
        else:
            arr = gguf.quants.dequantize(raw.reshape(info.shape[0], -1), info.qtype)
        w = torch.from_numpy(np.array(arr, dtype=np.float32).reshape(p.shape))
        state[key] = w - 1.0 if "norm" in key else w
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected, (missing, unexpected)
    model.tie_weights()
    return model.float().eval()


def test_config_read_from_gguf(gemma):
    c = gemma.config
    assert (c.vocab_size, c.d_model, c.d_ff, c.n_layers) == (262_144, 640, 2048, 18)
    assert (c.n_heads, c.n_kv_heads, c.head_dim) == (4, 1, 256)
    assert (c.sliding_window, c.query_pre_attn_scalar, c.rope_base, c.rope_local_base) == (512, 256.0, 1e6, 1e4)
    assert c.global_layers == (5, 11, 17) and c.tied_embeddings and c.final_logit_softcap is None
    assert [b.attn.window for b in gemma.model.blocks].count(None) == 3
    assert gemma.storage["blocks.0.attn.o_proj.weight"] == "Q4_K"


def test_norms_in_the_file_carry_the_plus_one(gemma):
    """Read as 1 + weight already (what we do), the text is likely; read as the offset alone,
    it is not: the converter did add the one."""
    ids = torch.tensor([gemma.tokenizer.encode(
        "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
        "It is named after the engineer Gustave Eiffel, whose company designed and built the tower."
    )])  # fmt: skip

    def loss() -> float:
        with torch.no_grad():
            logits = gemma.model(ids)[0, :-1]
        return float(torch.nn.functional.cross_entropy(logits, ids[0, 1:]))

    norms = [m.weight for m in gemma.model.modules() if getattr(m, "offset", 0) == 1.0]  # (1 + w) norms
    saved = [w.detach().clone() for w in norms]
    ours = loss()
    try:
        with torch.no_grad():
            for w in norms:
                w.add_(1.0)
        other = loss()
    finally:
        with torch.no_grad():
            for w, s in zip(norms, saved, strict=True):
                w.copy_(s)
    assert ours < 3.0 and other > ours + 2.0, (ours, other)


def test_logits_match_transformers(gemma, reference):
    """Every position of five prompts and of one prompt longer than the 512-token window."""
    tok = gemma.tokenizer
    long_text = " ".join(f"Item {i}: the {['red', 'green', 'blue'][i % 3]} box holds {i * 7} stones." for i in range(40))
    seqs = [tok.encode(p) for p in PROMPTS] + [tok.encode(long_text)]
    assert len(seqs[-1]) > 512  # past the sliding window
    diffs = []
    with torch.no_grad():
        for ids in seqs:
            x = torch.tensor([ids])
            ours, ref = gemma.model(x), reference(x).logits
            assert torch.equal(ours.argmax(-1), ref.argmax(-1)), f"top-1 differs for {tok.decode(ids)[:40]!r}"
            diffs.append(float((ours - ref).abs().max()))
    print(f"max |logit diff|: short prompts {max(diffs[:-1]):.2e}, {len(seqs[-1])} tokens {diffs[-1]:.2e}")
    assert max(diffs[:-1]) < 2e-4 and diffs[-1] < 0.1, diffs


def test_32_greedy_tokens_match_transformers(gemma, reference):
    llm = LLM(loaded=gemma, max_batch=len(PROMPTS), max_len=256)
    ours = llm.generate(PROMPTS, temperature=0, max_tokens=32, ignore_eos=True)
    for prompt, out in zip(PROMPTS, ours, strict=True):
        ids = torch.tensor([gemma.tokenizer.encode(prompt)])
        with torch.no_grad():
            ref = reference.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, ids.shape[1] :]
        assert out.token_ids == ref.tolist(), (prompt, out.text, gemma.tokenizer.decode(ref.tolist()))


@pytest.fixture(scope="module")
def cases():
    return json.loads((DATA / "tokenizer_cases_gemma3.json").read_text())


def test_tokenizer_ids_equal_llama_cpp(gemma, cases):
    tok = gemma.tokenizer
    for key, special in (("ids_special", True), ("ids_plain", False)):
        bad = [c["text"] for c in cases["cases"] if tok.encode(c["text"], add_bos=False, parse_special=special) != c[key]]
        assert not bad, f"{key}: {len(bad)} of {len(cases['cases'])} differ, e.g. {bad[:3]!r}"
    assert tok.encode("Hello") == cases["example_hello_with_add_bos"] == [2, 9259]


def test_tokenizer_round_trip(gemma, cases):
    tok = gemma.tokenizer
    for c in cases["cases"]:
        assert tok.decode(tok.encode(c["text"], add_bos=False)) == c["text"]
        assert tok.decode(tok.encode(c["text"], add_bos=False, parse_special=False)) == c["text"]


def test_special_tokens_and_end_of_generation(gemma):
    tok = gemma.tokenizer
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (2, 1, True)
    assert {1, 106} <= tok.eog_ids  # <eos>, <end_of_turn>
    assert tok.encode("<start_of_turn>user", add_bos=False) == [105, 2364]
    assert 105 not in tok.encode("<start_of_turn>user", add_bos=False, parse_special=False)


def test_chat_template_and_chat_door(gemma):
    llm = LLM(loaded=gemma, max_batch=1, max_len=256)
    text = llm.render_chat([{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2 + 2?"}])
    assert text == "<bos><start_of_turn>user\nAnswer briefly.\n\nWhat is 2 + 2?<end_of_turn>\n<start_of_turn>model\n"
    ids = llm.encode_prompt(text)
    assert ids[:2] == [2, 105] and ids.count(2) == 1  # one BOS, though the template writes it
    out = llm.chat([{"role": "user", "content": "Say hello."}], temperature=0, max_tokens=8)
    assert out.text and out.finish_reason in ("stop", "length")


def test_newlines_survive_in_generated_text(gemma):
    """Gemma's user-defined pieces ("\\n", "\\n\\n", whitespace runs) are text: generate, stream,
    decode and the tokenizer all give the same string, newlines included; control tokens are not text."""
    llm = LLM(loaded=gemma, max_batch=1, max_len=256)
    tok = llm.tokenizer
    out = llm.generate("The three primary colors are", temperature=0, max_tokens=12)
    assert 108 in out.token_ids or 107 in out.token_ids, out.token_ids  # a newline token is generated
    assert "\n" in out.text
    streamed = "".join(llm.stream("The three primary colors are", temperature=0, max_tokens=12))
    assert streamed == out.text == tok.decode(out.token_ids)
    assert tok.decode(tok.encode("a\n\n  b\tc ☀️ 日本", add_bos=False)) == "a\n\n  b\tc ☀️ 日本"
    assert tok.eos_id in tok.special_ids and tok.encode("\n\n", add_bos=False)[0] not in tok.special_ids


def test_a_newline_stop_string_and_a_bias_by_text_see_gemmas_newline_pieces(gemma):
    """Stop strings match the text the user sees, so "\\n" stops Gemma at its first newline piece;
    a logit bias named by that piece's text bans it."""
    llm = LLM(loaded=gemma, max_batch=1, max_len=256)
    full = llm.generate("The three primary colors are", temperature=0, max_tokens=12)
    cut = llm.generate("The three primary colors are", temperature=0, max_tokens=12, stop=["\n"])
    assert "\n" in full.text and cut.text == full.text.split("\n")[0]
    assert cut.finish_reason == "stop"
    nl = llm.tokenizer.encode("\n\n", add_bos=False)
    assert len(nl) == 1
    banned = llm.generate("The three primary colors are", temperature=0, max_tokens=12, logit_bias={nl[0]: -100})
    assert nl[0] not in banned.token_ids
