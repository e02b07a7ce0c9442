"""Options shared by the commands that generate; flags are the API's names in kebab case.

Sampling flags default to None, which means "not given": only flags the user typed
override the YAML config (`--config`), which overrides the command's defaults.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from pellucid.registry import DEFAULT_MODEL

Model = Annotated[str | None, typer.Option("--model", "-m", help="Registry name, .gguf file or HF folder. Default: the config's model.name, else smollm2-135m-instruct.")]
Dtype = Annotated[str, typer.Option("--dtype", help="Activations: auto (float32 for quantized weights on CPU; else bfloat16 where the CPU computes it natively, else float32), float32, bfloat16 or float16.")]
Quant = Annotated[str, typer.Option("--quant", help="Weights: auto (the default: int4 unless the model's measured quality says int8 or none), int4 (the file's own quantized blocks; int4-g64, ...), int8, or none.")]
ConfigFile = Annotated[Path | None, typer.Option("--config", "-c", help="YAML inference config (model, sampling, control, system_prompt); flags override it.")]
MaxTokens = Annotated[int | None, typer.Option("--max-tokens", "-n", help="Most tokens to generate.")]
MinTokens = Annotated[int | None, typer.Option("--min-tokens", help="No end-of-generation or stop token before this many tokens.")]
Temperature = Annotated[float | None, typer.Option("--temperature", "-t", help="0 = greedy.")]
Seed = Annotated[int | None, typer.Option("--seed", help="Seed for sampling; same seed, same output.")]
TopK = Annotated[int | None, typer.Option("--top-k", help="Keep the k most likely tokens (0 = off).")]
TopP = Annotated[float | None, typer.Option("--top-p", help="Keep the smallest set with this much probability (1 = off).")]
MinP = Annotated[float | None, typer.Option("--min-p", help="Keep tokens with p >= min_p * p_max (0 = off).")]
FrequencyPenalty = Annotated[float | None, typer.Option("--frequency-penalty", help="logit -= count * this, for generated tokens; -2..2.")]
PresencePenalty = Annotated[float | None, typer.Option("--presence-penalty", help="logit -= this, for tokens generated at least once; -2..2.")]
RepetitionPenalty = Annotated[float | None, typer.Option("--repetition-penalty", help="Divide (multiply if negative) logits of tokens in prompt + output; 1 = off.")]
LogitBias = Annotated[list[str] | None, typer.Option("--logit-bias", help='TOKEN=BIAS, TOKEN a token id or the text of one token: 9=5, " Paris=-100" (repeatable; -100 bans).')]
Stop = Annotated[list[str] | None, typer.Option("--stop", help="Stop at this text, which is not included (repeatable).")]
StopTokenId = Annotated[list[int] | None, typer.Option("--stop-token-id", help="Stop at this token id (repeatable).")]
IgnoreEos = Annotated[bool, typer.Option("--ignore-eos", help="Keep going past end-of-generation tokens.")]

from pellucid.runtime import DEFAULT_DTYPE, DEFAULT_QUANT  # noqa: E402  (one set of defaults: API, CLI, server)

__all__ = ["DEFAULT_MODEL", "DEFAULT_DTYPE", "DEFAULT_QUANT"]

# flag name of each SamplingParams field, for error messages
FLAG_NAMES = {
    "temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p", "min_p": "--min-p",
    "frequency_penalty": "--frequency-penalty", "presence_penalty": "--presence-penalty",
    "repetition_penalty": "--repetition-penalty", "logit_bias": "--logit-bias", "stop": "--stop",
    "stop_token_ids": "--stop-token-id", "max_tokens": "--max-tokens", "min_tokens": "--min-tokens",
    "seed": "--seed", "ignore_eos": "--ignore-eos",
}  # fmt: skip


SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "min_p", "frequency_penalty", "presence_penalty",
                  "repetition_penalty", "logit_bias", "stop", "stop_token_id", "max_tokens", "min_tokens",
                  "seed", "ignore_eos")  # fmt: skip


def sampling_flags(given: dict[str, Any]) -> dict[str, Any]:
    """The sampling flags among a command's arguments (pass `locals()`) as SamplingParams
    fields; None = not given on the command line."""
    from pellucid.sampling.bias import parse_bias_entry

    f = {name: given.get(name) for name in SAMPLING_FLAGS}
    f["logit_bias"] = dict(parse_bias_entry(e) for e in f["logit_bias"]) if f["logit_bias"] else None
    f["stop"] = list(f["stop"]) if f["stop"] else None
    f["stop_token_ids"] = list(f.pop("stop_token_id") or []) or None
    f["ignore_eos"] = True if f["ignore_eos"] else None
    return f


def read_config(path: Path | None):
    from pellucid.config import load_config

    return load_config(path) if path is not None else None


def model_name(model: str | None, config) -> str:
    """--model, else the config's model.name, else the default model."""
    if model is not None:
        return model
    if config is not None and config.model:
        return config.model
    return DEFAULT_MODEL


# Models loaded in this process, by (name, dtype): a command loads once; in-process callers
# (tests driving the CLI, a notebook) reuse what is already loaded.
LOADED: dict[tuple[str, str, str | None], Any] = {}


def load_llm(model: str, dtype: str, quant: str | None = None, *, max_batch: int = 1, quiet: bool = False):
    """Load a model with a spinner on stderr (one request at a time: a batch of 1)."""
    from rich.console import Console

    from pellucid.api import LLM

    quant = None if quant in (None, "", "none") else quant
    if (model, dtype, quant) in LOADED:
        return LOADED[model, dtype, quant]
    err = Console(stderr=True, quiet=quiet)
    t = time.perf_counter()
    with err.status(f"loading {model} ({dtype}{', ' + quant if quant else ''})"):
        llm = LLM(model, dtype=dtype, max_batch=max_batch, quant=quant)
    err.print(f"[dim]loaded {model} in {time.perf_counter() - t:.1f} s[/]")
    LOADED[model, dtype, quant] = llm
    return llm


def build_params(defaults: dict[str, Any], config, flags: dict[str, Any], tokenizer, *, without_bias: bool = False):
    """defaults < config < flags given, with errors naming the flag or the config line."""
    from pellucid.config import merge_params

    return merge_params(defaults, config, flags, tokenizer=tokenizer, flag_names=FLAG_NAMES, without_bias=without_bias)


def fit_context(llm, prompt_len: int, max_tokens: int | None) -> None:
    """Grow the engine's context to the model's own window when prompt + max_tokens needs it,
    instead of failing at the default 4,096 positions (one slot, so the cache stays small)."""
    need = prompt_len + (max_tokens or 0)
    eng = llm.engine
    limit = min(llm.config.context_length, getattr(llm.model, "max_len", llm.config.context_length))
    if need > eng.max_len and eng.max_len < limit:
        llm.engine = eng.resized(min(need, limit))
