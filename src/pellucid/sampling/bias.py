"""logit_bias by token id or, in the CLI and the YAML config, by the text of one token."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pellucid.errors import PellucidError
from pellucid.sampling.params import check_bias_value


def parse_bias_entry(entry: str) -> tuple[int | str, float]:
    """One `--logit-bias` value: "TOKEN=BIAS" -> (key, bias).

    TOKEN is a token id when it is all digits ("9=5"), else the text of one token
    (" Paris=-100"); quote it to mean the text of a digit ('"9"=5'). The last '=' splits,
    so a token text may itself contain '='.
    """
    key, eq, value = entry.rpartition("=")
    if not eq or not key:
        raise PellucidError(
            f"--logit-bias {entry!r}: expected TOKEN=BIAS, TOKEN a token id or the text of one token "
            "(e.g. 9=5 or \" Paris=-100\")",
            param="logit_bias",
        )
    try:
        bias = float(value)
    except ValueError:
        raise PellucidError(f"--logit-bias {entry!r}: the bias {value!r} is not a number in [-100, 100]", param="logit_bias") from None
    k: int | str
    if key.isdigit():
        k = int(key)
    elif len(key) >= 2 and key[0] == key[-1] and key[0] in "\"'":
        k = key[1:-1]
    else:
        k = key
    check_bias_value(k, bias)
    return k, bias


def resolve_logit_bias(bias: dict[Any, float], tokenizer, *,
                       where: Callable[[Any], str] | None = None) -> dict[int, float]:  # fmt: skip
    """{token id or text of one token: bias} -> {token id: bias}; errors name the entry.

    An id must lie in the vocabulary; a text must be exactly one token of this model's
    tokenizer. Two keys naming the same token are an error.
    """
    out: dict[int, float] = {}
    names: dict[int, Any] = {}
    for k, v in bias.items():
        prefix = f"{where(k)}: " if where else ""
        if isinstance(k, bool) or not isinstance(k, int | str):
            raise PellucidError(f"{prefix}logit_bias key {k!r} must be a token id or the text of one token", param="logit_bias")
        if isinstance(k, int):
            if not 0 <= k < tokenizer.vocab_size:
                raise PellucidError(
                    f"{prefix}logit_bias token id {k} is not in the vocabulary (0..{tokenizer.vocab_size - 1})",
                    param="logit_bias",
                )
            tid = k
        else:
            if not k:
                raise PellucidError(f"{prefix}logit_bias key '' is empty: give a token id or the text of one token", param="logit_bias")
            try:
                tid = tokenizer.single_token_id(k)
            except PellucidError as e:
                raise PellucidError(f"{prefix}logit_bias key {e.message}", param="logit_bias") from None
        if tid in out:
            raise PellucidError(f"{prefix}logit_bias keys {names[tid]!r} and {k!r} are the same token ({tid})", param="logit_bias")
        try:
            check_bias_value(k, v)
        except PellucidError as e:
            raise PellucidError(f"{prefix}{e.message}", param="logit_bias") from None
        out[tid] = float(v)
        names[tid] = k
    return out
