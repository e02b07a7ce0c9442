"""The default format keeps each real model's quality: KL from float32 and top-1 agreement no
worse than llama.cpp running the same file, on WikiText-2, through the path users get
(the fused CPU path with its KV cache).

llama.cpp's figures are recorded, not computed here: `pellucid quantize-report MODEL
--tokens 1024 --window 256 --formats float32,int4 --peer-python <llama-cpp-python>`
(llama-cpp-python 0.3.36, BENCHMARKS.md). This test scores the first 256-token window, for
the default format and for its 8-bit-activation variant (`-a8`).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from paths import SHARED

from pellucid.engine.kv_cache import KVCache
from pellucid.models.layers import ForwardContext
from pellucid.quantization.report import Accumulator, text_windows

pytestmark = pytest.mark.real

TEXT = Path(os.environ.get("PELLUCID_EVAL_TEXT", SHARED / "data" / "wikitext-2-raw-test.txt"))
LLAMA_CPP = {  # model -> (mean KL from float32, top-1 agreement) of llama.cpp on the file as stored
    "smollm2-135m-instruct": (0.00426, 0.956),
    "gemma3-270m": (0.0187, 0.926),
}


@torch.inference_mode()
def _logp(lm, ids: list[int], *, cached: bool) -> torch.Tensor:
    tokens = torch.tensor([ids])
    if cached:  # the engine's way: a cache, so blocks take the fused ops
        T = len(ids)
        ctx = ForwardContext(torch.arange(T)[None], KVCache(lm.config, 1, T, torch.float32), torch.tensor([0]), T)
        logits = lm.model(tokens, ctx)
    else:
        logits = lm.model(tokens)
    return torch.log_softmax(logits[0, :-1].float(), dim=-1)


@pytest.mark.skipif(not TEXT.exists(), reason=f"no evaluation text at {TEXT}")
@pytest.mark.parametrize("name", sorted(LLAMA_CPP))
def test_default_format_is_at_least_as_faithful_as_llama_cpp(name):
    from pellucid import registry, runtime
    from pellucid.loading import load_model

    path = registry.resolve(name)
    ref = load_model(path, dtype="float32")
    window = text_windows(ref.tokenizer, TEXT, 256, 256)[0]
    ref_logp = _logp(ref, window, cached=False)
    del ref
    kl, top1 = LLAMA_CPP[name]
    lm = load_model(path, quant=runtime.DEFAULT_QUANT)
    r = _score(lm, window, ref_logp)
    assert r["kl_mean"] <= kl, r
    assert r["top1_agreement"] >= top1, r
    # 8-bit activations (opt-in) trade the default's fidelity for speed: they land in
    # llama.cpp's band (its KL and top-1 come from its own 8-bit activations), not better
    a8 = _score(load_model(path, quant=runtime.DEFAULT_QUANT + "-a8"), window, ref_logp)
    assert r["kl_mean"] < a8["kl_mean"] <= 2 * kl, (a8, r)
    assert a8["top1_agreement"] >= top1 - 0.03, a8


def _score(lm, window: list[int], ref_logp: torch.Tensor) -> dict:
    acc = Accumulator()
    acc.add(_logp(lm, window, cached=True), torch.tensor(window[1:]), ref_logp)
    return acc.result()
