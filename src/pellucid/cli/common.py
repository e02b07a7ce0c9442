"""Options shared by the commands that generate; flags are the API's names in kebab case.

Sampling flags default to None, which means "not given": only flags the user typed
override the YAML config (`--config`), which overrides the command's defaults.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from pellucid import runtime
from pellucid.config import load_config, merge_params
from pellucid.registry import DEFAULT_MODEL, resolve
from pellucid.sampling.bias import parse_bias_entry
from pellucid.sampling.params import KNOBS

Model = Annotated[str | None, typer.Option("--model", "-m", help="Registry name, .gguf file or HF folder. Default: the config's model.name, else smollm2-135m-instruct.")]
Dtype = Annotated[str, typer.Option("--dtype", help="Activations: auto (float32 for quantized weights on CPU; else bfloat16 where the CPU computes it natively, else float32), float32, bfloat16 or float16.")]
Quant = Annotated[str, typer.Option("--quant", help="Weights: auto (the default: int4 unless the model's measured quality says int8 or none), int4 (the file's own quantized blocks; int4-g64, ...), int8, or none; int4-a8 / int8-a8: 8-bit activations (faster prefill and batches, llama.cpp's fidelity).")]
ConfigFile = Annotated[Path | None, typer.Option("--config", "-c", help="YAML inference config (model, sampling, control, system_prompt); flags override it.")]
S = "Sampling"  # the help panel of the shared sampling flags
MaxTokens = Annotated[int | None, typer.Option("--max-tokens", "-n", help="Most tokens to generate.", rich_help_panel=S)]
MinTokens = Annotated[int | None, typer.Option("--min-tokens", help="No end-of-generation or stop token before this many tokens.", rich_help_panel=S)]
Seed = Annotated[int | None, typer.Option("--seed", help="Seed for sampling; same seed, same output.", rich_help_panel=S)]
LogitBias = Annotated[list[str] | None, typer.Option("--logit-bias", help='TOKEN=BIAS, TOKEN a token id or the text of one token: 9=5, " Paris=-100" (repeatable; -100 bans).', rich_help_panel=S)]
Stop = Annotated[list[str] | None, typer.Option("--stop", help="Stop at this text, which is not included (repeatable).", rich_help_panel=S)]
StopTokenIds = Annotated[list[int] | None, typer.Option("--stop-token-ids", help="Stop at this token id (repeatable).", rich_help_panel=S)]
IgnoreEos = Annotated[bool, typer.Option("--ignore-eos", help="Keep going past end-of-generation tokens.", rich_help_panel=S)]

from pellucid.runtime import DEFAULT_DTYPE, DEFAULT_QUANT  # noqa: E402  (one set of defaults: API, CLI, server)

__all__ = ["DEFAULT_MODEL", "DEFAULT_DTYPE", "DEFAULT_QUANT"]

# The shared sampling flags: parameter (= SamplingParams field) -> (annotation, default).
# Flags are the API's names in kebab case; each flag's default None means "not given".
# The numeric controls come from their declaration (sampling.params.KNOBS).
SAMPLING_OPTIONS: dict[str, tuple[Any, Any]] = {
    "max_tokens": (MaxTokens, None), "min_tokens": (MinTokens, None),
    **{name: (Annotated[k.kind | None, typer.Option("--" + name.replace("_", "-"), *([k.short] if k.short else []),
                                                    help=k.help, rich_help_panel=S)], None)
       for name, k in KNOBS.items()},
    "seed": (Seed, None), "logit_bias": (LogitBias, None), "stop": (Stop, None),
    "stop_token_ids": (StopTokenIds, None), "ignore_eos": (IgnoreEos, False),
}  # fmt: skip

# flag name of each SamplingParams field, for error messages
FLAG_NAMES = {name: "--" + name.replace("_", "-") for name in SAMPLING_OPTIONS}

Q = "Structured output"
STRUCTURED_OPTIONS: dict[str, tuple[Any, Any]] = {
    "json": (Annotated[bool, typer.Option("--json", help="Structured output: any JSON object.", rich_help_panel=Q)], False),
    "json_schema": (Annotated[str | None, typer.Option("--json-schema", help="Structured output: JSON that validates against the schema in FILE.", metavar="FILE", rich_help_panel=Q)], None),
    "regex": (Annotated[str | None, typer.Option("--regex", help="Structured output: text that matches the regular expression.", rich_help_panel=Q)], None),
    "choice": (Annotated[list[str] | None, typer.Option("--choice", help="Structured output: exactly one of these strings (repeatable).", rich_help_panel=Q)], None),
    "grammar": (Annotated[str | None, typer.Option("--grammar", help="Structured output: text of the Lark (or GBNF) grammar in FILE.", metavar="FILE", rich_help_panel=Q)], None),
    "strict": (Annotated[bool | None, typer.Option("--strict/--no-strict", rich_help_panel=Q, help=(
        "--strict: refuse a schema any of whose keywords (oneOf included) cannot be enforced exactly; --no-strict: "
        "ignore such keywords. Default: refuse, except oneOf, generated as anyOf and the output checked afterwards."))], None),
}  # fmt: skip


def options(group: dict[str, tuple[Any, Any]], into: str, convert: Callable[[dict[str, Any]], Any] = dict, *,
            without: tuple[str, ...] = ()) -> Callable:  # fmt: skip
    """Add a shared group of flags to a Typer command: the command declares one parameter,
    `into`, and receives the group's values there, through `convert`; the flags themselves
    are declared once, here, for every command that takes them (`without` leaves some out)."""

    def add(fn: Callable) -> Callable:
        sig = inspect.signature(fn)
        hints = typing.get_type_hints(fn, include_extras=True)  # (the module's annotations are strings)
        names = [n for n in group if n not in without]
        own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in sig.parameters.values() if p.name != into]
        added = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=group[n][1], annotation=group[n][0]) for n in names]

        @functools.wraps(fn)
        def command(*args: Any, **kwargs: Any) -> Any:
            picked = {n: kwargs.pop(n) for n in names}
            return fn(*args, **kwargs, **{into: convert(picked)})

        command.__signature__ = sig.replace(parameters=own + added)  # what Typer reads
        command.__annotations__ = {**{k: v for k, v in hints.items() if k != into}, **{n: group[n][0] for n in names}}
        return command

    return add


def sampling_flags(given: dict[str, Any]) -> dict[str, Any]:
    """The shared sampling flags' values as SamplingParams fields; None = not given."""
    f = {name: given.get(name) for name in SAMPLING_OPTIONS}
    f["logit_bias"] = dict(parse_bias_entry(e) for e in f["logit_bias"]) if f["logit_bias"] else None
    f["stop"] = list(f["stop"]) if f["stop"] else None
    f["stop_token_ids"] = list(f["stop_token_ids"]) if f["stop_token_ids"] else None
    f["ignore_eos"] = True if f["ignore_eos"] else None
    return f


def sampling_options(*, without: tuple[str, ...] = ()) -> Callable:
    """The command takes the shared sampling flags as `flags` (see sampling_flags)."""
    return options(SAMPLING_OPTIONS, "flags", sampling_flags, without=without)


structured_options = options(STRUCTURED_OPTIONS, "structured")  # the command takes them as `structured`


def read_config(path: Path | None):
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


def load_llm(model: str, dtype: str, quant: str | None = None, *, max_batch: int = 1, quiet: bool = False,
             threads: int | None = None):  # fmt: skip
    """Load a model, its progress on stderr (one request at a time: a batch of 1)."""

    from pellucid.api import LLM
    from pellucid.progress import Progress

    if threads is not None:
        set_threads(threads)
    quant = None if quant in (None, "", "none") else quant
    if (model, dtype, quant) in LOADED:
        return LOADED[model, dtype, quant]
    err = Console(stderr=True, quiet=quiet)
    progress = None if quiet else Progress(f"loading {model}")
    llm = LLM(model, dtype=dtype, max_batch=max_batch, quant=quant, progress=progress)
    seconds = progress.finish() if progress is not None else 0.0
    fmt = llm.loaded.quant or str(next(llm.model.parameters()).dtype).removeprefix("torch.")
    err.print(f"[dim]loaded {model} ({fmt}) in {seconds:.1f} s[/]")
    LOADED[model, dtype, quant] = llm
    runtime.started()
    return llm


Threads = Annotated[int | None, typer.Option("--threads", help="CPU threads for the model (default: the physical cores).", min=1)]


def set_threads(n: int) -> None:
    """Use `n` threads for the model's work in this process."""
    import torch

    if n < 1:
        from pellucid.errors import PellucidError

        raise PellucidError(f"--threads {n}: give 1 or more", param="--threads")
    torch.set_num_threads(n)


def command_params(defaults: dict[str, Any], config, flags: dict[str, Any], tokenizer, *, without_bias: bool = False):
    """defaults < config < flags given, with errors naming the flag or the config line."""
    return merge_params(defaults, config, flags, tokenizer=tokenizer, flag_names=FLAG_NAMES, without_bias=without_bias)


def check_params(defaults: dict[str, Any], config, flags: dict[str, Any], model: str) -> None:
    """Every sampling value checked before the model loads, so a bad flag costs no load;
    a logit_bias given by a token's text is looked up in the tokenizer read from the GGUF
    file's metadata (no weights are read)."""
    command_params(defaults, config, flags, None, without_bias=True)
    if not (flags.get("logit_bias") or (config is not None and config.sampling_values().get("logit_bias"))):
        return
    # (imported here: pellucid.prompts would cost every `pellucid` start ~0.2 s)
    from pellucid.prompts.counting import TokenCounter

    path = resolve(model)
    if path.is_file():
        command_params(defaults, config, flags, TokenCounter.for_model(path).tokenizer)
