"""How many engine replicas, and how they scale: `--replicas`, `--threads` and the `deploy:` section."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pellucid.config import DEPLOY_INGRESS
from pellucid.errors import PellucidError

# Each streamed message costs CPU at every hop to the client (replica -> serve process; with
# --ingress ray-proxy replica -> ingress -> proxy, about 1.5-2 ms a message on this project's
# machines), in processes that may share the replicas' cores. A
# stream's chunks that come within this interval of the last one sent travel together; a
# chunk after a quiet spell (the first token) goes at once. (Ray Serve LLM batches its
# streams the same way, stream_batching_interval_ms; vLLM has stream_interval.)
STREAM_INTERVAL_MS = 100


@dataclass
class DeployConfig:
    """How many engine replicas, and how they scale; from --replicas / --threads and `deploy:`."""

    replicas: int = 1
    threads: int = 1  # torch threads (and Ray CPUs) per replica
    min_replicas: int | None = None  # autoscaling bounds; both None = a fixed number of replicas
    max_replicas: int | None = None
    max_ongoing_requests: int | None = None  # per replica (default: 2 x --max-batch)
    ray_address: str | None = None  # an existing cluster ("auto", "ray://host:10001"); None starts a local one
    imbalance: int = 2  # the prefix's replica keeps it while it has at most this many more requests than the lightest
    stream_interval_ms: int = STREAM_INTERVAL_MS  # a stream's chunks within this interval travel as one message
    ingress: str = "pellucid"  # who answers HTTP: see pellucid.config.DEPLOY_INGRESS

    def check(self) -> None:
        for name, value in (("replicas", self.replicas), ("threads", self.threads), ("min_replicas", self.min_replicas),
                            ("max_replicas", self.max_replicas), ("max_ongoing_requests", self.max_ongoing_requests)):  # fmt: skip
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise PellucidError(f"{name} = {value!r} is out of range; allowed: an integer, 1 or more", param=name)
        if self.ingress not in DEPLOY_INGRESS:
            raise PellucidError(f"ingress = {self.ingress!r} is not one of: {', '.join(DEPLOY_INGRESS)}", param="ingress")
        v = self.stream_interval_ms
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 1000:
            raise PellucidError(f"stream_interval_ms = {v!r} is out of range; allowed: an integer 0..1000 (0 = every "
                                "chunk at once)", param="stream_interval_ms")  # fmt: skip
        if self.autoscaling:
            lo, hi = self.min_replicas or 1, self.max_replicas or max(self.replicas, self.min_replicas or 1)
            if not lo <= self.replicas <= hi:
                raise PellucidError(f"replicas = {self.replicas} must lie between min_replicas = {lo} and "
                                    f"max_replicas = {hi}", param="replicas")  # fmt: skip

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    def deployment_options(self, max_batch: int) -> dict[str, Any]:
        ongoing = self.max_ongoing_requests or 2 * max_batch
        opts: dict[str, Any] = {"max_ongoing_requests": ongoing}
        if self.autoscaling:
            lo = self.min_replicas or 1
            opts["autoscaling_config"] = {"min_replicas": lo, "initial_replicas": self.replicas,
                                          "max_replicas": self.max_replicas or max(self.replicas, lo),
                                          "target_ongoing_requests": max(1, max_batch // 2)}  # fmt: skip
        else:
            opts["num_replicas"] = self.replicas
        return opts
