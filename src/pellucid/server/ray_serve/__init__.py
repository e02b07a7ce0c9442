"""pellucid on Ray Serve: many engine replicas behind one OpenAI/Anthropic endpoint.

    HTTP -> `pellucid serve` itself (Relay, uvicorn) ------------------------> engine replicas
    HTTP -> Ray's proxy -> ingress deployment (Relay) ------------------------> engine replicas
            (--ingress ray-proxy)

Each engine replica is one process with its own model, threads, KV cache and prefix cache,
running the same FastAPI app as `pellucid serve` (server/app.py). The Relay reads the
request body, picks a routing key and hands the request to an engine replica through a
deployment handle; the replica runs it through its app and streams the ASGI messages back.
By default the Relay is an ASGI app that the `pellucid serve` process serves itself: one
Ray hop per streamed message. With `--ingress ray-proxy` it runs as an ingress deployment
behind Ray Serve's own HTTP proxy, as Serve applications usually do: a second hop and a
second process per message, about 3x the relay's CPU per token (BENCHMARKS.md), which on
a small machine the replicas pay for.

    config.py     DeployConfig: replicas, threads, autoscaling bounds, stream interval, ingress
    routing.py    the routing key, rendezvous order, and Ray Serve's request router
    replica.py    EngineReplica: one engine process, its app's messages streamed out
    relay.py      Relay: the HTTP front; resends a request whose replica died before it answered
    metrics.py    every replica's /metrics as one page
    lifecycle.py  Ray's settings, then start / stop / serve_forever

Only `pellucid serve --replicas` (or a `deploy:` section) uses this package, and none of
its modules imports Ray when imported: lifecycle.start does, after setting Ray's
environment.
"""

from pellucid.server.ray_serve.config import STREAM_INTERVAL_MS, DeployConfig
from pellucid.server.ray_serve.lifecycle import APP_NAME, RAY_ENV, build_app, serve_forever, start
from pellucid.server.ray_serve.metrics import merge_metrics
from pellucid.server.ray_serve.relay import Ingress, Relay, carries_output, stream_error
from pellucid.server.ray_serve.replica import EngineReplica, Outbox, ServeLoader
from pellucid.server.ray_serve.routing import rendezvous, routing_key

__all__ = ["APP_NAME", "RAY_ENV", "STREAM_INTERVAL_MS", "DeployConfig", "EngineReplica", "Ingress", "Outbox", "Relay",
           "ServeLoader", "build_app", "carries_output", "merge_metrics", "rendezvous", "routing_key", "serve_forever",
           "start", "stream_error"]  # fmt: skip
