"""pellucid serve: the OpenAI- and Anthropic-compatible HTTP server.

Every `pellucid` run imports this module to register the command, so the server
(FastAPI, uvicorn: ~0.7 s) and Ray Serve (optional, seconds) are imported inside it.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Annotated

import typer
from rich.console import Console

from pellucid import runtime
from pellucid.cli import app
from pellucid.cli.common import DEFAULT_DTYPE, DEFAULT_MODEL, DEFAULT_QUANT, Dtype, Quant
from pellucid.config import load_config
from pellucid.errors import PellucidError
from pellucid.runtime import ENGINE
from pellucid.sampling.bias import resolve_logit_bias

err = Console(stderr=True, soft_wrap=True)  # a URL or a path in a message stays whole
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@app.command()
def serve(
    model: Annotated[str | None, typer.Option("--model", "-m", help="Registry name, .gguf file or HF folder (default: the config's model.name, else the default model).")] = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on; loopback unless you say otherwise.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", help="TCP port.")] = 8000,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="PELLUCID_API_KEY", help="Require this key (Authorization: Bearer KEY or x-api-key: KEY).")] = None,
    config: Annotated[str | None, typer.Option("--config", "-c", help="YAML inference config: model, default sampling and control values, system prompt.")] = None,
    dtype: Dtype = DEFAULT_DTYPE,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Requests decoded together (continuous batching slots).")] = ENGINE.serve_max_batch,
    max_len: Annotated[int | None, typer.Option("--max-len", help="Context window served, tokens (default: the model's).")] = None,
    kv_cache_mib: Annotated[int | None, typer.Option("--kv-cache-mib", help=f"Memory all requests' keys and values share, MiB: one long request may use it all, or many short ones share it (default: {ENGINE.kv_memory_fraction:.0%} of the memory available at start).", show_default=False)] = None,
    max_waiting: Annotated[int, typer.Option("--max-waiting", help="Queued requests beyond which new ones get 429.")] = ENGINE.max_waiting,
    prefill_chunk: Annotated[int, typer.Option("--prefill-chunk", help="Prompt tokens prefilled per engine step while no request is generating.")] = ENGINE.prefill_chunk,
    step_tokens: Annotated[int, typer.Option("--step-tokens", help="Tokens per engine step while requests are generating (one each, then prompt chunks): lower keeps streams smoother under a burst of prompts, higher starts them sooner.")] = ENGINE.step_tokens,
    prefix_cache: Annotated[bool | None, typer.Option("--prefix-cache/--no-prefix-cache", help="Reuse the cached keys and values of earlier prompts that start the same way (default: on where outputs stay identical, the fused CPU path).", show_default=False)] = None,
    prefix_cache_mib: Annotated[int, typer.Option("--prefix-cache-mib", help="Of the KV-cache memory, at most this for finished requests' caches kept for reuse, MiB (least recently used go first).")] = ENGINE.prefix_cache_mib,
    quant: Quant = DEFAULT_QUANT,
    threads: Annotated[int | None, typer.Option("--threads", help="torch threads for the engine (default: torch's choice).")] = None,
    served_model_name: Annotated[str | None, typer.Option("--served-model-name", help="The model names clients may send, comma-separated; the first is reported (default: the registry name, or a file's stem).")] = None,
    log_level: Annotated[str, typer.Option("--log-level", help="uvicorn log level.")] = "info",
    replicas: Annotated[int | None, typer.Option("--replicas", help="Serve with N engine replicas on Ray Serve, each its own process with --threads threads and its own KV cache (needs pellucid[ray]; docs/scale-out.md).")] = None,
    ray_address: Annotated[str | None, typer.Option("--ray-address", help="With --replicas: join this Ray cluster ('auto', 'ray://HOST:10001') instead of starting a local one.")] = None,
    ingress: Annotated[str | None, typer.Option("--ingress", help="With --replicas: who answers HTTP: 'pellucid' (this process relays to the replicas: one hop, the default) or 'ray-proxy' (Ray Serve's HTTP proxy and an ingress deployment).")] = None,
    steer_dir: Annotated[str | None, typer.Option("--steer-dir", help="The folder of named steering vectors requests may name in `steer` (default: $PELLUCID_HOME/steering; GET /v1/steering lists them).")] = None,
    stream_interval_ms: Annotated[int | None, typer.Option("--stream-interval-ms", help="With --replicas: a stream's tokens that come within this many ms of the last one sent are relayed together, the first at once (default 100; 0: each token on its own, at more CPU per token).")] = None,
) -> None:
    """Serve a model over HTTP: OpenAI's /v1/chat/completions, /v1/completions and Anthropic's /v1/messages."""
    # OpenMP's own wait policy (spin briefly, then sleep) is kept: OMP_WAIT_POLICY=PASSIVE made
    # workers sleep between the parallel regions of every step, and a 1-client stream of
    # SmolLM2 fell from 189 to 80 tok/s (16 clients 511 -> 439; docs/speed.md).
    import uvicorn

    from pellucid.server.app import create_app
    from pellucid.server.state import ServerConfig, ServerState

    for name, value, lo in (("--max-batch", max_batch, 1), ("--max-waiting", max_waiting, 0), ("--prefill-chunk", prefill_chunk, 1),
                            ("--step-tokens", step_tokens, 1), ("--prefix-cache-mib", prefix_cache_mib, 0), ("--port", port, 0),
                            ("--kv-cache-mib", 1 if kv_cache_mib is None else kv_cache_mib, 1)):  # fmt: skip
        if value < lo:
            raise PellucidError(f"{name} = {value} is out of range; allowed: {lo} or more", param=name)
    defaults: dict = {}
    system_prompt = None
    cfg = None
    if config is not None:

        cfg = load_config(config)
        defaults = cfg.sampling_values()
        system_prompt = cfg.system_prompt
        model = model or cfg.model
    model = model or DEFAULT_MODEL
    sc = ServerConfig(model=model, host=host, port=port, api_key=api_key or None, dtype=dtype, max_batch=max_batch,
                      max_len=max_len, max_waiting=max_waiting, prefill_chunk=prefill_chunk, step_tokens=step_tokens,
                      prefix_cache=prefix_cache, prefix_cache_mib=prefix_cache_mib, kv_cache_mib=kv_cache_mib, num_threads=threads,
                      served_model_name=served_model_name, defaults=defaults, system_prompt=system_prompt, steer_dir=steer_dir,
                      quant=None if quant in ("", "none") else quant)  # fmt: skip
    deploy = dict(cfg.deploy) if cfg is not None else {}
    for flag, value in (("--stream-interval-ms", stream_interval_ms), ("--ingress", ingress)):
        if value is not None and replicas is None and ray_address is None and not deploy:
            raise PellucidError(f"{flag} {value}: it applies to Ray Serve replicas only; give --replicas N too",
                                param=flag)  # fmt: skip
    if replicas is not None or ray_address is not None or deploy:  # Ray Serve: imported only here
        if replicas is not None:
            deploy["replicas"] = replicas
        if threads is not None:
            deploy["threads"] = threads
        if stream_interval_ms is not None:
            deploy["stream_interval_ms"] = stream_interval_ms
        if ingress is not None:
            deploy["ingress"] = ingress
        deploy.setdefault("replicas", deploy.get("min_replicas", 1))
        deploy.setdefault("threads", max(1, (os.cpu_count() or 1) // max(1, deploy["replicas"])))
        if host not in LOOPBACK and not api_key:
            err.print(f"[yellow]warning:[/] listening on {host} without --api-key: anyone who can reach it can use it")
        # (imports no ray: a missing Ray Serve is said when it starts)
        from pellucid.server import ray_serve

        ray_serve.serve_forever(sc, ray_serve.DeployConfig(**deploy, ray_address=ray_address), ray_serve.ServeLoader(_loader, cfg),
                                log=lambda m: err.print(m, highlight=False))  # fmt: skip
        return
    _check_port(host, port)  # before any "serving" line: a busy port is the first thing said
    state = ServerState(sc, loader=_loader(cfg))
    server = _Server(state, uvicorn.Config(create_app(state=state), host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=3, loop=runtime.EVENT_LOOP))  # fmt: skip

    def failed(message: str) -> None:
        server.should_exit = True

    state.on_failure = failed
    if host not in LOOPBACK and not api_key:
        err.print(f"[yellow]warning:[/] listening on {host} without --api-key: anyone who can reach it can use it")
    err.print(f"pellucid: serving [bold]{sc.model_name}[/] on http://{host}:{port}  (OpenAI: /v1/chat/completions, "
              f"/v1/completions; Anthropic: /v1/messages; /health, /metrics)", highlight=False)  # fmt: skip
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown: a normal exit
        pass
    if state.status == "failed":
        raise PellucidError(f"the model did not load: {state.error}")


def _check_port(host: str, port: int) -> None:
    """A clear error when the address cannot be bound (in use, or not this machine's)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise PellucidError(f"--host {host!r} cannot be resolved: {e.strerror or e}", param="--host") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            why = "is already in use (another server?)" if e.errno == 98 else f"cannot be used: {e.strerror or e}"
            raise PellucidError(f"port {port} on {host} {why}; choose another with --port", param="--port") from None


def _Server(state, config):
    """uvicorn's server that, on SIGTERM or Ctrl-C, first ends the running requests: every open
    stream gets a last error event ("the server is shutting down", 503) and its end, instead of a
    connection cut when the graceful-shutdown time runs out."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if state.engine is not None and not self.should_exit:
                state.engine.end_all("the server is shutting down; send the request again to another server or later")
            super().handle_exit(sig, frame)

    return Server(config)


def _loader(cfg):
    def load(sc):
        from pellucid.server.state import default_loader

        t = time.perf_counter()
        dtype = runtime.resolve_dtype(sc.dtype, sc.quant)
        err.print(f"loading {sc.model} ({sc.quant or 'no quantization'}, {dtype} activations) in the background; "
                  "requests get 503 until it is ready", highlight=False)  # fmt: skip
        from pellucid.progress import Progress

        progress = Progress(f"loading {sc.model}")
        # (a copy: Ray Serve pickles the config it was given, and a Progress holds a stream)
        llm = default_loader(dataclasses.replace(sc, llm_options={**sc.llm_options, "progress": progress}))
        progress.finish()
        if cfg is not None and "logit_bias" in sc.defaults:
            # the config may name tokens by text: resolve them with the model's tokenizer

            sc.defaults["logit_bias"] = resolve_logit_bias(sc.defaults["logit_bias"], llm.tokenizer,
                                                           where=lambda k: cfg.where("control.logit_bias"))  # fmt: skip
        err.print(f"[green]ready[/]: {sc.model} loaded in {time.perf_counter() - t:.1f} s "
                  f"(max batch {sc.max_batch}, context {llm.engine.max_len:,}, prefix cache "
                  f"{'on' if llm.engine.prefix_cache else 'off'}; {llm.engine.memory_line()}; kernels: {runtime.kernels(quant=llm.loaded.quant)})",
                  highlight=False)  # fmt: skip
        runtime.started()
        return llm

    return load
