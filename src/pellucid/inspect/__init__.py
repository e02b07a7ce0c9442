"""The model's internals as data: weights, parameter counts, attention, residual stream,
logit lens, ablations. Every function returns tensors or dataclasses; the CLI
(`pellucid inspect / params / attention / lens / ablate`) only formats them and
pictures come from `pellucid.inspect.plots`.

    from pellucid.inspect import run_with_cache, lens_report
    cache = run_with_cache(llm, "The capital of France is")   # ActivationCache
    cache["pattern", 3]                                        # (B, H, T, L)
    lens = lens_report(llm, "The capital of France is")        # LensResult

(The functions are not named after their modules, `weights_table` and `logit_lens`, so
that importing a module never hides the function of the same name.)

`source` arguments take an LLM, a LoadedModel, or a model name / path (loaded in float32).
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "weights_report": "pellucid.inspect.weights_table",
    "WeightsReport": "pellucid.inspect.weights_table",
    "count_params": "pellucid.inspect.param_count",
    "ParamSpec": "pellucid.inspect.param_count",
    "PRESETS": "pellucid.inspect.param_count",
    "run_with_cache": "pellucid.inspect.subject",
    "load_subject": "pellucid.inspect.subject",
    "attention_patterns": "pellucid.inspect.attention",
    "AttentionPatterns": "pellucid.inspect.attention",
    "lens_report": "pellucid.inspect.logit_lens",
    "LensResult": "pellucid.inspect.logit_lens",
    "ablate_layers": "pellucid.inspect.ablate",
    "AblationResult": "pellucid.inspect.ablate",
    "ActivationCache": "pellucid.models.hooks",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    # Lazy: `pellucid.inspect.param_count` stays importable without torch.
    if name not in _EXPORTS:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
