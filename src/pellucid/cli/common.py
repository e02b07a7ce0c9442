"""Options shared by the commands that generate; flags are the API's names in kebab case."""

from __future__ import annotations

from typing import Annotated

import typer

from pellucid.registry import DEFAULT_MODEL

Model = Annotated[str, typer.Option("--model", "-m", help="Registry name, .gguf file or HF folder.")]
Dtype = Annotated[str, typer.Option("--dtype", help="float32, bfloat16 or float16.")]
MaxTokens = Annotated[int, typer.Option("--max-tokens", "-n", help="Most tokens to generate.")]
Temperature = Annotated[float, typer.Option("--temperature", "-t", help="0 = greedy.")]
Seed = Annotated[int | None, typer.Option("--seed", help="Seed for sampling; same seed, same output.")]
TopK = Annotated[int, typer.Option("--top-k", help="Keep the k most likely tokens (0 = off).")]
TopP = Annotated[float, typer.Option("--top-p", help="Keep the smallest set with this much probability.")]
MinP = Annotated[float, typer.Option("--min-p", help="Keep tokens with p >= min_p * p_max.")]
FrequencyPenalty = Annotated[float, typer.Option("--frequency-penalty")]
PresencePenalty = Annotated[float, typer.Option("--presence-penalty")]
RepetitionPenalty = Annotated[float, typer.Option("--repetition-penalty")]
Stop = Annotated[list[str] | None, typer.Option("--stop", help="Stop at this text (repeatable).")]

DEFAULT_DTYPE = "bfloat16"
__all__ = ["DEFAULT_MODEL", "DEFAULT_DTYPE"]
