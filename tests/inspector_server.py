"""The live server both inspector test files use: `pellucid serve` in-process, the default
model in its default (served) format."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def served(max_len: int = 1024) -> Iterator:
    """`.steer_dir`: the server's steering folder, a fresh temporary one (vectors made through
    the inspector land there, not in the user's $PELLUCID_HOME)."""
    import tempfile

    from pellucid.server.app import ServerThread, create_app
    from pellucid.server.state import ServerConfig

    with tempfile.TemporaryDirectory(prefix="pellucid-steering-") as steer_dir:
        s = ServerThread(create_app(ServerConfig(max_batch=4, max_len=max_len, steer_dir=steer_dir))).start()
        s.steer_dir = steer_dir
        try:
            assert s.wait_ready(180), s.state.error
            yield s
        finally:
            s.stop()
