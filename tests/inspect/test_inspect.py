"""pellucid.inspect on the real default model: weights table, attention, logit lens,
ablation, the pictures, and the CLI that formats them."""

from __future__ import annotations

import json

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pellucid.errors import PellucidError
from pellucid.inspect import plots
from pellucid.inspect.ablate import ablate_layers
from pellucid.inspect.attention import attention_patterns
from pellucid.inspect.logit_lens import lens_report
from pellucid.inspect.param_count import PRESETS, count_params
from pellucid.inspect.subject import load_subject, next_token_loss
from pellucid.inspect.weights_table import weights_report
from pellucid.weights.gguf import GGUFFile

PROMPT = "The capital of France is"
SMOLLM2_PARAMS = 134_515_008


@pytest.fixture(scope="module")
def report(real_path):
    return weights_report(real_path)


@pytest.fixture(scope="module")
def att(real_lm):
    return attention_patterns(real_lm, PROMPT)


@pytest.fixture(scope="module")
def lens(real_lm):
    return lens_report(real_lm, PROMPT)


@pytest.fixture(scope="module")
def ablation(real_lm):
    return ablate_layers(
        real_lm, "Water boils at one hundred degrees Celsius at sea level.", mode="zero"
    )


@pytest.fixture(scope="module")
def cli(real_lm, monkeypatch_module):
    """The CLI, with its model loader handing out the already loaded real model."""
    from pellucid.cli import _register, app
    from pellucid.cli import inspect as cli_inspect

    _register()
    monkeypatch_module.setattr(cli_inspect, "_load", lambda model, *a, **k: load_subject(real_lm))
    runner = CliRunner()
    return lambda *args: runner.invoke(app, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


# -- weights table ------------------------------------------------------------------------


def test_weights_table_counts_the_loaded_model_exactly(report, real_lm):
    loaded = sum(p.numel() for p in real_lm.model.parameters())
    assert report.total_params == loaded == SMOLLM2_PARAMS
    assert report.total_params == count_params(PRESETS["smollm2-135m"]).total
    # every stored tensor is used once (the output head is tied): bytes add up to the directory
    f = GGUFFile(real_lm.path)
    assert report.total_stored_bytes == sum(t.nbytes for t in f.tensors.values())
    assert report.total_stored_bytes < report.file_bytes == real_lm.path.stat().st_size
    assert report.total_memory_bytes == 2 * SMOLLM2_PARAMS  # bfloat16 by default


def test_weights_table_from_loaded_model_agrees(report, real_lm):
    loaded = weights_report(real_lm)
    assert loaded.total_params == report.total_params
    assert loaded.total_stored_bytes == report.total_stored_bytes  # from the storage types alone
    assert loaded.total_memory_bytes == 4 * SMOLLM2_PARAMS  # float32
    assert loaded.memory_dtype == "float32"


def test_architecture(report):
    a = report.arch
    assert (a.n_layers, a.d_model, a.n_heads, a.n_kv_heads, a.head_dim, a.d_ff) == (
        30,
        576,
        9,
        3,
        64,
        1536,
    )
    assert (a.vocab_size, a.context_length, a.rope_base, a.tied_embeddings) == (
        49152,
        8192,
        100000.0,
        True,
    )
    assert a.norm.startswith("RMSNorm") and a.activation == "SwiGLU (SiLU)"


def test_groups_as_the_note_draws_them(report):
    groups = report.groups()
    assert [g.label for g in groups] == [
        "token embeddings",
        "blocks.0-29 (x30)",
        "final norm",
        "output layer",
    ]
    emb, layers, norm, out = groups
    assert (
        emb.rows[0].storage == "Q8_0"
        and emb.rows[0].shape == (49152, 576)
        and emb.params == 49152 * 576
    )
    comps = [r.component for r in layers.rows]
    assert comps[:7] == ["Wq", "Wk", "Wv", "Wo", "W_gate", "W_up", "W_down"]
    wq = layers.rows[0]
    assert wq.shape == (576, 576) and wq.storage == "Q4_1" and wq.params == 30 * 576 * 576
    assert wq.layers == list(range(30)) and wq.name == "blocks.{0-29}.attn.q_proj.weight"
    assert {r.storage for r in layers.rows if r.part == "norms"} == {"F32"}
    assert out.params == 0 and out.rows[0].tied_to == "embed.weight"
    assert sum(g.params for g in groups) == SMOLLM2_PARAMS
    per_layer = report.groups(per_layer=True)
    assert len(per_layer) == 3 + 30 and per_layer[1].label == "blocks.0"
    assert sum(g.params for g in per_layer) == SMOLLM2_PARAMS


def test_untied_quantized_tiny_model(tmp_path):
    from tiny import tiny_hf_llama, write_llama_gguf

    from pellucid.loading import load_model

    path = write_llama_gguf(
        tiny_hf_llama(seed=3, tied=False), tmp_path / "untied.gguf", qtype="Q8_0"
    )
    r = weights_report(path, dtype="float32")
    lm = load_model(path, dtype="float32")
    assert r.total_params == sum(p.numel() for p in lm.model.parameters())
    out = [g for g in r.groups() if g.section == "output layer"][0]
    assert out.params == lm.config.vocab_size * lm.config.d_model and out.rows[0].storage == "Q8_0"
    assert r.total_stored_bytes == sum(t.nbytes for t in GGUFFile(path).tensors.values())
    assert not r.arch.tied_embeddings


# -- attention ----------------------------------------------------------------------------


def test_attention_rows_sum_to_one_and_are_causal(att):
    L, H, T, _ = att.patterns.shape
    assert (L, H, T) == (30, 9, 5)
    assert att.str_tokens == ["The", " capital", " of", " France", " is"]
    assert torch.allclose(att.patterns.sum(-1), torch.ones(L, H, T), atol=1e-5)
    assert torch.all(att.patterns.triu(1) == 0)


def test_attention_top_and_averages(att):
    avg = att.select()
    assert torch.allclose(avg, att.patterns.mean(dim=(0, 1)))
    assert torch.equal(att.select(16, 0), att.patterns[16, 0])
    top = att.top(16, 0, k=2)
    assert [t.token for t in top] == att.str_tokens
    last = top[-1]
    weights = [a.weight for a in last.top]
    assert weights == sorted(weights, reverse=True)
    assert weights[0] == pytest.approx(float(att.patterns[16, 0, -1].max()))
    assert len(top[0].top) == 1  # the first token can only attend to itself
    no_sink = att.top(k=3, skip_first=True)
    assert all(a.pos > 0 for t in no_sink[1:] for a in t.top)
    with pytest.raises(PellucidError, match="layer 30 is out of range"):
        att.select(layer=30)
    with pytest.raises(PellucidError, match="head"):
        att.top(head=9)


# -- logit lens ---------------------------------------------------------------------------


def test_lens_last_layer_is_the_model_output(lens, real_lm):
    ids = real_lm.tokenizer.encode(PROMPT)
    with torch.no_grad():
        probs = torch.softmax(real_lm.model(torch.tensor([ids]))[0], dim=-1)  # (T, V)
    p, i = probs.topk(5, dim=-1)
    assert torch.equal(lens.top_ids[-1], i)
    assert torch.equal(lens.top_probs[-1], p)
    assert lens.target_token == " Paris" and lens.target_from == "model"
    assert lens.target_id == int(probs[-1].argmax())
    assert float(lens.target_prob[-1]) == float(probs[-1, lens.target_id])
    assert int(lens.target_rank[-1]) == 0
    assert lens.labels[0] == "embed" and lens.labels[-1] == "29" and len(lens.labels) == 31
    assert lens.first_layer_top1() is not None


def test_lens_norms(lens, real_lm):
    c = real_lm.model.run_with_cache(
        real_lm.tokenizer.encode(PROMPT), lambda n: n.endswith("resid_post")
    )
    assert torch.allclose(lens.resid_norm[-1], c["resid_post", 29][0].norm(dim=-1))
    assert lens.attn_norm.shape == lens.mlp_norm.shape == (30, 5)
    assert torch.all(lens.attn_norm >= 0) and torch.all(lens.mlp_norm > 0)


def test_lens_given_target(real_lm):
    r = lens_report(real_lm, PROMPT, target=" London", k=1)
    assert r.target_token == " London" and r.target_from == "given"
    assert r.top_ids.shape == (31, 5, 1)
    with pytest.raises(PellucidError, match="single token"):
        lens_report(real_lm, PROMPT, target=" Parisian capital")


def test_run_with_cache_from_an_llm(real_llm):
    from pellucid.inspect import run_with_cache

    c = run_with_cache(real_llm, PROMPT, names=lambda n: n.endswith("hook_resid_post"))
    assert c.str_tokens == ["The", " capital", " of", " France", " is"]
    assert len(c) == 30 and c["resid_post", 29].shape == (1, 5, 576)
    assert real_llm.tokenizer.piece(int(c.logits[0, -1].argmax())) == " Paris"


def test_chat_wraps_the_prompt(real_lm):
    r = attention_patterns(real_lm, "Hi", chat=True)
    text = "".join(r.str_tokens)
    assert "<|im_start|>user\nHi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")


# -- ablation -----------------------------------------------------------------------------


def test_ablation_deltas_match_a_manual_knockout(ablation, real_lm):
    model = real_lm.model
    tokens = torch.tensor(
        [real_lm.tokenizer.encode("Water boils at one hundred degrees Celsius at sea level.")]
    )
    assert ablation.n_tokens == tokens.shape[1] and ablation.n_layers == 30
    assert ablation.base_loss == pytest.approx(next_token_loss(model, tokens), abs=1e-6)
    zero = [("blocks.0.hook_mlp_out", lambda x, hook: torch.zeros_like(x))]
    # knock-outs run as batch rows: the same numbers as one forward each, up to GEMM rounding
    assert ablation.loss["mlp"][0] == pytest.approx(next_token_loss(model, tokens, zero), rel=1e-4)
    top = ablation.ranking(3)
    assert top[0][2] >= top[1][2] >= top[2][2] > 0


def test_mean_ablation_replaces_with_the_mean_over_positions(real_lm):
    text = "One, two, three, four, five."
    r = ablate_layers(real_lm, text, mode="mean", components=("attn",))
    model = real_lm.model
    ids = real_lm.tokenizer.encode(text)
    c = model.run_with_cache(ids, ["blocks.3.hook_attn_out"])
    mean = c["attn_out", 3].mean(dim=(0, 1))
    hook = [("blocks.3.hook_attn_out", lambda x, h: mean.expand_as(x))]
    assert r.loss["attn"][3] == pytest.approx(
        next_token_loss(model, torch.tensor([ids]), hook), rel=1e-4
    )
    assert list(r.loss) == ["attn"]
    with pytest.raises(PellucidError, match="mode"):
        ablate_layers(real_lm, text, mode="shuffle")


# -- pictures -----------------------------------------------------------------------------


def _check_png(path, min_w=400, min_h=300):
    assert path.is_file() and path.stat().st_size > 10_000
    img = mpimg.imread(path)
    assert img.shape[1] >= min_w and img.shape[0] >= min_h
    assert float(np.std(img[..., :3])) > 0.05  # not a blank canvas
    return img


def test_pictures(tmp_path, att, lens, ablation):
    grid = _check_png(
        plots.attention_grid(att.patterns, att.str_tokens, tmp_path / "grid.png", "grid"),
        1000,
        3000,
    )
    assert grid.shape[0] > grid.shape[1]  # one row of heads per layer
    _check_png(
        plots.attention_heatmap(att.select(16, 0), att.str_tokens, tmp_path / "heat.png", "L16 H0")
    )
    _check_png(plots.lens_heatmap(lens, tmp_path / "lens.png"), 600, 800)
    _check_png(plots.lens_target_plot(lens, tmp_path / "target.png"))
    _check_png(plots.residual_norms_plot(lens, tmp_path / "norms.png"))
    _check_png(plots.ablation_plot(ablation, tmp_path / "ablation.png"))


def test_token_labels_for_axes():
    assert plots.token_label(" ") == "␣"
    assert plots.token_label("\n") == "↵"
    assert plots.token_label("a" * 20, 8) == "a" * 7 + "…"
    assert plots._label("$x") == r"\$x"


# -- CLI ----------------------------------------------------------------------------------


def test_cli_inspect_json(cli, real_path):
    res = cli("inspect", str(real_path), "--json")
    d = json.loads(res.stdout)
    assert d["total"]["params"] == SMOLLM2_PARAMS == sum(g["params"] for g in d["groups"])
    assert d["total"]["stored_bytes"] == sum(g["stored_bytes"] for g in d["groups"])
    assert d["architecture"]["n_layers"] == 30 and d["architecture"]["tied_embeddings"] is True
    layers = [g for g in d["groups"] if g["section"] == "layers"][0]
    assert layers["label"] == "blocks.0-29 (x30)" and layers["rows"][0]["storage"] == "Q4_1"
    per_layer = json.loads(cli("inspect", str(real_path), "--json", "--per-layer").stdout)
    assert len(per_layer["groups"]) == 33 and per_layer["total"] == d["total"]
    table = cli("inspect", str(real_path)).stdout
    assert "134,515,008" in table and "Q4_1" in table and "tied" in table


def test_cli_params(cli, tmp_path):
    d = json.loads(cli("params", "--preset", "llama-70b", "--json").stdout)
    assert d["total"] == 68_976_648_192 == sum(d["breakdown"].values())
    assert d["memory_bytes"] == {
        "fp32": 4 * d["total"],
        "fp16": 2 * d["total"],
        "int8": d["total"],
        "int4": d["total"] // 2,
    }
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "num_hidden_layers": 30,
                               "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536,
                               "tie_word_embeddings": True}))  # fmt: skip
    assert (
        json.loads(cli("params", "--config", str(cfg), "--json").stdout)["total"] == SMOLLM2_PARAMS
    )
    table = cli("params").stdout
    assert "gpt2-xl" in table and "1.558 B" in table and "+0.00%" in table
    with pytest.raises(PellucidError, match="unknown preset"):
        cli("params", "--preset", "gpt-5")


def test_cli_attention_lens_ablate(cli, tmp_path):
    res = cli("attention", PROMPT, "--layer", "16", "--head", "0", "--out", str(tmp_path))
    assert "' France' (0.78)" in res.stdout
    assert (tmp_path / "attention_grid.png").is_file() and (
        tmp_path / "attention_L16_H0.png"
    ).is_file()
    assert f"wrote {tmp_path / 'attention_grid.png'}" in res.stdout
    res = cli("lens", PROMPT, "--out", str(tmp_path), "--json")
    d = json.loads(res.stdout)
    assert d["target"]["token"] == " Paris" and d["target"]["rank"][-1] == 0
    assert {p.rsplit("/", 1)[-1] for p in d["pictures"]} == {
        "lens_heatmap.png",
        "lens_target.png",
        "residual_norms.png",
    }
    assert "Paris" in cli("lens", PROMPT, "--no-plot").stdout
    res = cli(
        "ablate",
        "--text",
        "Water boils at one hundred degrees.",
        "--component",
        "mlp",
        "--out",
        str(tmp_path),
    )
    assert "Largest: MLP " in res.stdout and "Δ loss, attention" not in res.stdout
    assert (tmp_path / "ablation_zero.png").is_file()
