"""Starting and stopping it: Ray's settings, the cluster (started or joined), the Serve
application, and `pellucid serve --replicas` serving HTTP until Ctrl-C or SIGTERM."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

from pellucid.errors import PellucidError
from pellucid.server.ray_serve.config import DeployConfig
from pellucid.server.ray_serve.relay import Ingress, Relay
from pellucid.server.ray_serve.replica import EngineReplica
from pellucid.server.state import ServerConfig

APP_NAME = "pellucid"
LOGGING = {"enable_access_log": False, "log_level": "WARNING"}
# Ray Serve settings for many small streamed messages: user code and the router on the
# caller's own event loop, request logs buffered.
RAY_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
           "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000"}  # fmt: skip


def set_ray_env() -> None:
    """RAY_ENV into this process's environment (a value already set wins)."""
    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)


def build_app(config: ServerConfig, deploy: DeployConfig, loader: Callable[[ServerConfig], Any] | None = None):
    """The Ray Serve application: the ingress bound to `deploy.replicas` engine replicas (after `start` imported Ray)."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from pellucid.server.ray_serve.routing import PrefixAffinityRouter

    deploy.check()
    config.num_threads = deploy.threads
    env = {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(deploy.threads)}  # before torch loads in the replica
    engine = serve.deployment(EngineReplica, name="engine", **deploy.deployment_options(config.max_batch),
                              ray_actor_options={"num_cpus": deploy.threads, "runtime_env": {"env_vars": env}},
                              request_router_config=RequestRouterConfig(request_router_class=PrefixAffinityRouter,
                                                                        request_router_kwargs={"imbalance": deploy.imbalance}),
                              health_check_period_s=2, health_check_timeout_s=30, graceful_shutdown_timeout_s=5,
                              logging_config=LOGGING)  # fmt: skip
    app = engine.bind(config, loader, deploy.stream_interval_ms)
    if deploy.ingress == "pellucid":
        return app
    ingress = serve.deployment(serve.ingress()(Ingress), name="ingress", num_replicas=1, max_ongoing_requests=100_000,
                               ray_actor_options={"num_cpus": 0}, logging_config=LOGGING)  # fmt: skip
    return ingress.bind(app)


def start(config: ServerConfig, deploy: DeployConfig, loader=None, *, log=print):
    """Start (or join) a Ray cluster and deploy; returns (the engine deployment's handle, the
    function that takes it down again)."""
    # Ray Serve reads RAY_ENV when it is imported, here and in every Ray process the local
    # cluster starts (they inherit this environment), so it is set before the first `import ray`.
    set_ray_env()
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise PellucidError(f"--replicas needs Ray Serve: pip install 'pellucid[ray]' ({e})", param="--replicas") from None
    deploy.check()
    local = deploy.ray_address is None
    try:
        ray.init(address=deploy.ray_address or "local", include_dashboard=False, logging_level="warning",
                 configure_logging=True, log_to_driver=True)  # fmt: skip
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise PellucidError(f"--ray-address {deploy.ray_address!r}: cannot join the Ray cluster: {e}", param="--ray-address") from None
    cpus = ray.cluster_resources().get("CPU", 0)
    first = deploy.min_replicas if deploy.autoscaling and deploy.min_replicas else deploy.replicas
    first = max(first, deploy.replicas)
    if first * deploy.threads > cpus:
        where = "this machine's local Ray cluster" if local else f"the Ray cluster at {deploy.ray_address}"
        ray.shutdown()
        raise PellucidError(f"--replicas {first} x --threads {deploy.threads} needs {first * deploy.threads} CPUs; "
                            f"{where} has {cpus:g}", param="--replicas")  # fmt: skip
    if deploy.ingress == "ray-proxy":
        serve.start(http_options={"host": config.host, "port": config.port})
    else:
        serve.start(proxy_location="Disabled")
    log(f"Ray cluster: {'local, started for this server' if local else deploy.ray_address} ({cpus:g} CPUs); "
        f"deploying {deploy.replicas} replica(s) x {deploy.threads} thread(s), each loading {config.model}")  # fmt: skip

    def stop() -> None:
        try:
            if local:
                serve.shutdown()
            else:
                serve.delete(APP_NAME)
        finally:
            ray.shutdown()

    try:
        handle = serve.run(build_app(config, deploy, loader), name=APP_NAME, blocking=False,
                           route_prefix="/" if deploy.ingress == "ray-proxy" else None)  # fmt: skip
    except Exception as e:
        stop()
        raise PellucidError(f"the deployment did not start: {type(e).__name__}: {e}") from None
    return handle, stop


def serve_forever(config: ServerConfig, deploy: DeployConfig, loader=None, *, log=print) -> None:
    """`pellucid serve --replicas N`: deploy, then serve HTTP here (or let Ray's proxy do it) until Ctrl-C or SIGTERM."""
    handle, stop = start(config, deploy, loader, log=log)
    where = "this process" if deploy.ingress == "pellucid" else "Ray Serve's proxy"
    log(f"pellucid: serving {config.model_name} on http://{config.host}:{config.port} ({where}) with "
        f"{deploy.replicas} replica(s) on Ray Serve (OpenAI: /v1/chat/completions, /v1/completions; "
        "Anthropic: /v1/messages; /health, /metrics)")  # fmt: skip
    try:
        if deploy.ingress == "pellucid":
            import uvicorn

            uvicorn.run(Relay(handle), host=config.host, port=config.port, log_level="warning", access_log=False,
                        timeout_graceful_shutdown=3, lifespan="off")  # fmt: skip
        else:
            signal.signal(signal.SIGTERM, _interrupt)  # `kill` takes Serve and the local cluster down as Ctrl-C does
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stop()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
