"""The YAML inference config of the concept note's "Configuration Summary".

    model:
      name: smollm2-135m-instruct   # a registry name, a .gguf file or an HF folder
      max_tokens: 256
    sampling:
      temperature: 0.7
      top_p: 0.9
      top_k: 50
      frequency_penalty: 0.5
      presence_penalty: 0.0
      # and every other control of SamplingParams: min_p, repetition_penalty, seed, ...
    control:
      stop_sequences: ["\\n\\n", "END"]
      logit_bias: {}                # token id or the text of one token -> [-100, 100]
      # pellucid's extras: stop_token_ids, min_tokens, and structured output (generate):
      # response_format: {type: json_object}   # or json_schema / regex / choice / grammar
    system_prompt: |
      You are a helpful assistant.
    deploy:                         # pellucid serve on Ray Serve (docs/scale-out.md)
      replicas: 2                   # engine processes, each with its own KV cache
      threads: 1                    # torch threads per replica
      # min_replicas / max_replicas: autoscaling bounds; max_ongoing_requests: per replica;
      # stream_interval_ms: a stream's tokens within this interval relayed as one message (100);
      # ingress: pellucid (this process answers HTTP, the default) or ray-proxy (Ray Serve's proxy)

`pellucid generate/chat --config FILE` reads it; command-line flags that the user gives
override it. An unknown key or a bad value is an error naming the key and the line (and,
for a near-miss, the key that was probably meant). A model name pellucid cannot serve
(such as gpt-4o) is an error, never a silent substitution.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pellucid import registry
from pellucid.errors import PellucidError, did_you_mean
from pellucid.sampling.bias import resolve_logit_bias
from pellucid.sampling.params import KNOBS, SamplingParams, build_params, check_bias_value

# section -> key -> the SamplingParams field it sets (None: not a sampling parameter)
SCHEMA: dict[str, dict[str, str | None]] = {
    "model": {"name": None, "max_tokens": "max_tokens"},
    "sampling": {**{name: name for name in KNOBS}, "seed": "seed"},  # every numeric control (sampling.params.KNOBS)
    "control": {
        "stop_sequences": "stop", "logit_bias": "logit_bias", "stop_token_ids": "stop_token_ids",
        "min_tokens": "min_tokens", "response_format": None,
    },
    "deploy": {"replicas": None, "threads": None, "min_replicas": None, "max_replicas": None, "max_ongoing_requests": None,
               "stream_interval_ms": None, "ingress": None},
}  # fmt: skip
TOP_LEVEL = ["model", "sampling", "control", "system_prompt", "deploy"]
# deploy.ingress, who answers HTTP for the Ray Serve replicas (pellucid/server/ray_serve/): the
# `pellucid serve` process itself (one hop), or Ray Serve's HTTP proxy and an ingress deployment
DEPLOY_INGRESS = ("pellucid", "ray-proxy")


@dataclass
class Config:
    """A parsed config. `values` maps "section.key" to the value given; `lines` to its line."""

    source: str = "<config>"
    values: dict[str, Any] = field(default_factory=dict)
    lines: dict[str, int] = field(default_factory=dict)
    bias_lines: dict[Any, int] = field(default_factory=dict)  # logit_bias key -> its line

    @property
    def model(self) -> str | None:
        return self.values.get("model.name")

    @property
    def deploy(self) -> dict[str, int]:
        """The `deploy:` section (pellucid serve on Ray Serve): key -> value, only those given."""
        return {k.split(".", 1)[1]: v for k, v in self.values.items() if k.startswith("deploy.") and v is not None}

    @property
    def response_format(self) -> dict | None:
        """control.response_format: OpenAI's (json_object, json_schema) or pellucid's
        (regex, choice, grammar); see pellucid.sampling.constraints.from_response_format."""
        return self.values.get("control.response_format")

    @property
    def system_prompt(self) -> str | None:
        v = self.values.get("system_prompt")
        if v is None:
            return None
        try:
            return resolve_system_prompt(v, base_dir=self.base_dir)
        except PellucidError as e:
            raise PellucidError(f"{self.where('system_prompt')}: system_prompt: {e.message}", param="system_prompt") from None

    @property
    def base_dir(self) -> Path | None:
        """The config file's folder (relative prompt files are found there), if from a file."""
        p = Path(self.source)
        return p.parent if p.is_file() else None

    def where(self, key: str) -> str:
        """'FILE:LINE' of a dotted key (or of the file when the key is not in it)."""
        line = self.lines.get(key)
        return f"{self.source}:{line}" if line else self.source

    def sampling_values(self) -> dict[str, Any]:
        """SamplingParams fields set by this config (logit_bias keys may still be texts)."""
        out: dict[str, Any] = {}
        for section, keys in SCHEMA.items():
            for key, param in keys.items():
                dotted = f"{section}.{key}"
                if param is not None and dotted in self.values:
                    out[param] = self.values[dotted]
        return out


# -- loading -------------------------------------------------------------------------------
def load_config(path: str | os.PathLike) -> Config:
    """Read and check a YAML config file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise PellucidError(f"config file {str(path)!r} does not exist", param="config")
    return parse_config(p.read_text(encoding="utf-8"), str(p), base_dir=p.parent)


def parse_config(text: str, source: str = "<config>", *, base_dir: Path | None = None) -> Config:
    """Check a YAML config text; errors name the source, the line and the key."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise PellucidError(f"{source}{line}: not valid YAML: {e.problem or e}", param="config") from None
    cfg = Config(source=source)
    if root is None:
        return cfg
    if not isinstance(root, yaml.MappingNode):
        raise _err(cfg, root, "", "the config must be a mapping with the sections " + ", ".join(TOP_LEVEL))
    for key_node, value_node in _pairs(cfg, root, ""):
        key = key_node.value
        if key == "system_prompt":
            cfg.lines[key] = key_node.start_mark.line + 1
            value = _value(value_node)
            if value is not None and not isinstance(value, str):
                raise _err(cfg, value_node, key, f"must be text, got {value!r}")
            cfg.values[key] = value
            continue
        if key not in SCHEMA:
            raise _unknown(cfg, key_node, key, TOP_LEVEL, "")
        if _value(value_node) is None:
            continue  # an empty section
        if not isinstance(value_node, yaml.MappingNode):
            raise _err(cfg, value_node, key, f"must be a mapping with the keys {', '.join(SCHEMA[key])}")
        for sub_key_node, sub_value_node in _pairs(cfg, value_node, key):
            sub = sub_key_node.value
            dotted = f"{key}.{sub}"
            if sub not in SCHEMA[key]:
                raise _unknown(cfg, sub_key_node, sub, list(SCHEMA[key]), key)
            cfg.lines[dotted] = sub_key_node.start_mark.line + 1
            cfg.values[dotted] = _check_value(cfg, dotted, sub_value_node, base_dir)
    _check_sampling(cfg)
    return cfg


def _pairs(cfg: Config, node: yaml.MappingNode, section: str):
    seen: set[str] = set()
    for k, v in node.value:
        if not isinstance(k, yaml.ScalarNode):
            raise _err(cfg, k, section, "keys must be plain names")
        if k.value in seen:
            raise _err(cfg, k, _join(section, k.value), "appears twice")
        seen.add(k.value)
        yield k, v


def _value(node: yaml.Node) -> Any:
    """The Python value of a node, as yaml.safe_load builds it."""
    return yaml.constructor.SafeConstructor().construct_object(node, deep=True)


def _check_value(cfg: Config, dotted: str, node: yaml.Node, base_dir: Path | None) -> Any:
    """Type checks that SamplingParams cannot do on raw YAML; ranges are left to it."""
    value = _value(node)
    if dotted == "model.name":
        if not isinstance(value, str) or not value.strip():
            raise _err(cfg, node, dotted, f"must be a model name or path, got {value!r}")
        return check_model_name(value.strip(), cfg.where(dotted), base_dir)
    if dotted == "deploy.ingress":
        if value is not None and value not in DEPLOY_INGRESS:
            raise _err(cfg, node, dotted, f"must be one of {', '.join(DEPLOY_INGRESS)}, got {value!r}")
        return value
    if dotted.startswith("deploy."):
        least = 0 if dotted == "deploy.stream_interval_ms" else 1
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise _err(cfg, node, dotted, f"must be a whole number, {least} or more, got {value!r}")
        return value
    if dotted == "control.stop_sequences":
        if value is None:
            return []
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
            raise _err(cfg, node, dotted, f"must be a list of non-empty strings, got {value!r}")
        return value
    if dotted == "control.response_format":
        try:
            # imported here: the grammar engine (llguidance, JSON-schema handling) costs every
            # `pellucid` start ~0.3 s, and only a config with a response_format needs it
            from pellucid.sampling.constraints import from_response_format

            from_response_format(None, value)  # checks the kind and compiles the grammar, no model needed
        except PellucidError as e:
            raise _err(cfg, node, dotted, e.message) from None
        return value
    if dotted == "control.stop_token_ids":
        if value is None:
            return []
        if not isinstance(value, list):
            raise _err(cfg, node, dotted, f"must be a list of token ids, got {value!r}")
        return value
    if dotted == "control.logit_bias":
        if value is None:
            return {}
        if not isinstance(node, yaml.MappingNode):
            raise _err(cfg, node, dotted, f"must be a mapping of token (id or text) -> bias in [-100, 100], got {value!r}")
        out: dict[Any, Any] = {}
        for k_node, v_node in _pairs(cfg, node, dotted):
            k = _value(k_node)
            if isinstance(k, bool) or not isinstance(k, int | str):
                raise _err(cfg, k_node, dotted, f"key {k!r} must be a token id or the text of one token")
            out[k] = _value(v_node)
            cfg.bias_lines[k] = k_node.start_mark.line + 1
        return out
    return value


def _check_sampling(cfg: Config) -> None:
    """Validate the sampling values by building SamplingParams; point errors at their line."""
    values = cfg.sampling_values()
    bias = values.pop("logit_bias", {})
    values["logit_bias"] = {k: v for k, v in bias.items() if isinstance(k, int)}
    for text, v in bias.items():  # text keys are resolved with the tokenizer later; check values now
        if isinstance(text, str):
            try:
                check_bias_value(text, v)
            except PellucidError as e:
                raise _located_error(cfg, "control.logit_bias", e, line=cfg.bias_lines.get(text), key=text) from None
    try:
        build_params({"max_tokens": None}, values)
    except PellucidError as e:
        raise _located_error(cfg, _dotted_of(e.param), e) from None


def _dotted_of(param: str | None) -> str | None:
    for section, keys in SCHEMA.items():
        for key, p in keys.items():
            if p is not None and p == param:
                return f"{section}.{key}"
    return None


def _located_error(cfg: Config, dotted: str | None, e: PellucidError, *, line: int | None = None,
                   key: Any = None) -> PellucidError:  # fmt: skip
    if dotted is None:
        return PellucidError(f"{cfg.source}: {e.message}", param=e.param)
    where = f"{cfg.source}:{line}" if line else cfg.where(dotted)
    if dotted == "control.logit_bias" and key is None:  # find the entry the message is about
        key = next((k for k in cfg.bias_lines if f"[{k}]" in e.message or repr(k) in e.message), None)
        if key is not None:
            where = f"{cfg.source}:{cfg.bias_lines[key]}"
    return PellucidError(f"{where}: {dotted}: {e.message}", param=dotted)


def _join(section: str, key: str) -> str:
    return f"{section}.{key}" if section else key


def _err(cfg: Config, node: yaml.Node, dotted: str, msg: str) -> PellucidError:
    name = f"{dotted}: " if dotted else ""
    return PellucidError(f"{cfg.source}:{node.start_mark.line + 1}: {name}{msg}", param=dotted or "config")


def _unknown(cfg: Config, node: yaml.Node, key: str, allowed: list[str], section: str) -> PellucidError:
    dotted = _join(section, key)
    hint = ""
    close = did_you_mean(key, allowed)
    if close:
        hint = f"; did you mean {_join(section, close)!r}?"
    else:  # the right key in the wrong section?
        for other, keys in SCHEMA.items():
            if other != section and key in keys:
                hint = f"; {key!r} belongs in the {other!r} section ({other}.{key})"
                break
    where = f"the {section!r} section" if section else "the top level"
    return PellucidError(
        f"{cfg.source}:{node.start_mark.line + 1}: unknown key {dotted!r}{hint} "
        f"(allowed in {where}: {', '.join(allowed)})",
        param=dotted,
    )


# -- model names and system prompts ---------------------------------------------------------
def check_model_name(name: str, where: str = "model.name", base_dir: Path | None = None) -> str:
    """A name pellucid can serve: a registry name, hf://..., or an existing path.

    A relative path is looked up from the current directory, then from the config's
    directory. Anything else (such as a hosted model's name, gpt-4o) is an error.
    """

    if name in registry.REGISTRY or name.startswith("hf://"):
        return name
    p = Path(name).expanduser()
    if p.exists():
        return str(p)
    if base_dir is not None and not p.is_absolute() and (base_dir / p).exists():
        return str(base_dir / p)
    close = did_you_mean(name, registry.REGISTRY)
    hint = f" Did you mean {close!r}?" if close else ""
    raise PellucidError(
        f"{where}: model.name {name!r} is not a model pellucid can serve: it is neither a registry "
        f"name ({', '.join(registry.REGISTRY)}) nor an existing .gguf file or Hugging Face folder. "
        f"pellucid runs open weights locally and never substitutes another model.{hint}",
        param="model.name",
    )


def resolve_system_prompt(value: str, base_dir: Path | None = None) -> str:
    """The text of a config's system_prompt.

    `NAME@VERSION` (or a prompt file, FILE[@VERSION]) is a versioned prompt file, looked up
    in the config's folder, $PELLUCID_HOME/prompts and the built-ins: its rendered system
    text, few-shot examples as text. Anything else is the text itself. (`pellucid chat`
    sends a prompt file's examples as real prior turns: pellucid.prompts.resolve_system_value.)
    """

    # (imported here: pellucid.prompts costs ~0.2 s, and only a config with a system_prompt needs it)
    from pellucid.prompts.compose import system_text

    return system_text(value, base_dir)


# -- merging: defaults < config < command-line flags ----------------------------------------
def merge_params(defaults: dict[str, Any], config: Config | None, flags: dict[str, Any], *,
                 tokenizer=None, flag_names: dict[str, str] | None = None,
                 without_bias: bool = False) -> SamplingParams:  # fmt: skip
    """SamplingParams from a command's defaults, the config, then the flags the user gave.

    `flags` holds only flags that were given (None = not given). Lists (stop sequences,
    stop token ids) given on the command line replace the config's; logit_bias entries are
    merged per token, the command line winning. Text keys of logit_bias are turned into
    token ids with `tokenizer`. Errors name the flag or the config line they come from.
    `without_bias` leaves logit_bias out: a check of everything else before the model (and
    its tokenizer) is loaded.
    """

    flag_names = flag_names or {}
    values = dict(defaults)
    from_config: set[str] = set()
    config_bias: dict[int, float] = {}
    if config is not None:
        cv = config.sampling_values()
        raw_bias = {} if without_bias else cv.pop("logit_bias", {})
        cv.pop("logit_bias", None)
        values.update(cv)
        from_config = set(cv)
        if raw_bias:
            if tokenizer is None:
                raise PellucidError("logit_bias given by text needs the model's tokenizer", param="logit_bias")

            def where(k):
                return f"{config.source}:{config.bias_lines.get(k, config.lines.get('control.logit_bias', 0))}: control.logit_bias"

            config_bias = resolve_logit_bias(raw_bias, tokenizer, where=where)
    given = {k: v for k, v in flags.items() if v is not None}
    flag_bias = given.pop("logit_bias", None) or {}
    if without_bias:
        flag_bias = {}
    if flag_bias:
        if tokenizer is None:
            raise PellucidError("logit_bias given by text needs the model's tokenizer", param="logit_bias")
        flag_bias = resolve_logit_bias(flag_bias, tokenizer, where=lambda k: flag_names.get("logit_bias", "--logit-bias"))
    values.update(given)
    bias = {**config_bias, **flag_bias}
    if bias:
        values["logit_bias"] = bias
    try:
        return build_params(values, vocab_size=tokenizer.vocab_size if tokenizer is not None else None)
    except PellucidError as e:
        if e.param in given or (e.param == "logit_bias" and flag_bias):
            name = flag_names.get(e.param, "--" + (e.param or "").replace("_", "-"))
            raise PellucidError(f"{name}: {e.message}", param=e.param) from None
        if config is not None and e.param in from_config | ({"logit_bias"} if config_bias else set()):
            raise _located_error(config, _dotted_of(e.param), e) from None
        raise
