"""The live server both inspector test files use: `pellucid serve` in-process, the default
model in its default (served) format."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def served(max_len: int = 1024) -> Iterator:
    from pellucid.server.app import ServerThread, create_app
    from pellucid.server.state import ServerConfig

    s = ServerThread(create_app(ServerConfig(max_batch=4, max_len=max_len))).start()
    try:
        assert s.wait_ready(180), s.state.error
        yield s
    finally:
        s.stop()
