"""Which engine replica takes a request.

A chat's key is a hash of its messages up to the first user message (with the system
prompt), a completion's of its first characters, or the `x-session-id` header when a client
sends one. Requests with the same key go to the same replica (rendezvous hashing over the
live replicas), so a conversation's later turns find their prefix in that replica's cache,
unless that replica has `imbalance` more requests than the lightest one; then the lightest
takes it. Requests without a key (GET /health, /tokenize, ...) get power-of-two-choices.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from typing import Any

SESSION_HEADER = b"x-session-id"
KEY_BODY_LIMIT = 1 << 20  # bodies larger than this are not parsed for a routing key
KEY_PROMPT_CHARS = 512  # a completion's routing key: its prompt's first characters


def routing_key(path: str, body: bytes, session: str | None = None) -> str | None:
    """The key that keeps a conversation on one replica, or None (no preference).

    Chat (OpenAI and Anthropic): the model, the system prompt and the messages up to the
    first user message, which stay the same as the conversation grows. Completions: the
    prompt's first KEY_PROMPT_CHARS characters (or 128 token ids). `session` (a client's
    x-session-id header) wins over both.
    """
    if session:
        return _digest(["session", session])
    if path not in ("/v1/chat/completions", "/v1/messages", "/v1/completions") or not body or len(body) > KEY_BODY_LIMIT:
        return None
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None  # the app answers the error
    if not isinstance(data, dict):
        return None
    if path == "/v1/completions":
        prompt = data.get("prompt")
        head = prompt[:KEY_PROMPT_CHARS] if isinstance(prompt, str) else prompt[:128] if isinstance(prompt, list) else None
    else:
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages:
            return None
        head = [data.get("system")]
        for m in messages:
            head.append(m)
            if isinstance(m, dict) and m.get("role") == "user":
                break
    return None if head is None else _digest([path == "/v1/completions", data.get("model"), head])


def _digest(value: Any) -> str:
    return hashlib.blake2b(json.dumps(value, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()


def rendezvous(key: str, names: list[str]) -> list[str]:
    """`names` ordered by preference for `key` (highest random weight first): when a replica
    goes or comes, only the keys it held (or takes) move."""
    return sorted(names, key=lambda n: hashlib.blake2b(f"{key}|{n}".encode(), digest_size=8).digest(), reverse=True)


def __getattr__(name: str) -> Any:
    # PrefixAffinityRouter subclasses Ray's RequestRouter, so it is defined on first use (by
    # lifecycle.build_app, after Ray is imported), not when this module is; Ray then finds it
    # by its path, pellucid.server.ray_serve.routing.PrefixAffinityRouter.
    if name == "PrefixAffinityRouter":
        return _prefix_affinity_router()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _prefix_affinity_router() -> type:
    from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

    class PrefixAffinityRouter(RequestRouter):
        """Ray Serve request router: a request's key picks its replica (see the module docstring)."""

        def initialize_state(self, imbalance: int = 2, **kwargs: Any) -> None:
            self.imbalance = imbalance

        async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                                  pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:  # fmt: skip
            if not candidate_replicas:
                return []
            kw = pending_request.kwargs if pending_request is not None else {}
            by_name = {r.replica_id.unique_id: r for r in candidate_replicas}
            index = kw.get("replica_index")
            if index is not None:  # one replica in turn (the relay's /metrics)
                names = sorted(by_name)
                return [[by_name[names[index % len(names)]]]]
            key = kw.get("key")
            if key is None:  # power of two choices
                return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
            ranked = [by_name[n] for n in rendezvous(key, list(by_name))]
            loads = [self.replica_queue_len_cache.get(r.replica_id) for r in ranked]
            known = [q for q in loads if q is not None]
            if loads[0] is not None and known and loads[0] > min(known) + getattr(self, "imbalance", 2):
                lightest = min((q, i) for i, q in enumerate(loads) if q is not None)[1]
                return [[ranked[lightest]], ranked]
            return [ranked[:1], ranked[1:]] if len(ranked) > 1 else [ranked]

    return PrefixAffinityRouter
