"""Every example in README.md and docs/*.md runs (issue 21): the runner is tests/docs_runner.py,
which also says how a block is marked. Blocks marked `run` are run on the real models; each
block must carry a marker, so that a new example cannot go unclassified."""

from __future__ import annotations

import os

import pytest
from docs_runner import Session, all_blocks, write_files

BLOCKS = all_blocks()
RUN = [b for b in BLOCKS if b.kind in ("run", "file")]


def test_every_block_is_marked():
    unmarked = [b.id for b in BLOCKS if b.kind is None]
    assert not unmarked, (
        f"fenced blocks without a <!-- run --> or <!-- no-run: why --> marker: {unmarked}"
    )


def test_no_run_blocks_say_why():
    assert all(b.opts.get("name") for b in BLOCKS if b.kind == "no-run")


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    from pellucid import api, registry

    home = tmp_path_factory.mktemp("pellucid_home")
    real_home = registry.home()
    for name in ("models", "kernels"):
        if (real_home / name).exists():
            (home / name).symlink_to(real_home / name)
    work = tmp_path_factory.mktemp("docs")
    cwd, env = os.getcwd(), os.environ.get("PELLUCID_HOME")
    os.environ["PELLUCID_HOME"] = str(home)
    real_llm, cache = api.LLM, {}

    def cached_llm(model=registry.DEFAULT_MODEL, *args, **kwargs):  # same arguments, same instance
        key = repr((model, args, sorted(kwargs.items())))
        if key not in cache:
            cache[key] = real_llm(model, *args, **kwargs)
        return cache[key]

    from pellucid.cli import common

    loaded_before = set(common.LOADED)
    api.LLM = cached_llm
    write_files(work)
    for b in RUN:  # every doc's file blocks up front: a later block may run on another xdist worker
        if b.kind == "file":
            (work / b.opts["name"]).write_text(b.text)
    s = Session(work)
    try:
        yield s
    finally:
        s.close()
        api.LLM = real_llm
        for key in set(common.LOADED) - loaded_before:  # free what the examples loaded
            common.LOADED.pop(key, None)
        os.chdir(cwd)
        if env is None:
            os.environ.pop("PELLUCID_HOME", None)
        else:
            os.environ["PELLUCID_HOME"] = env


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.parametrize("block", RUN, ids=[b.id for b in RUN])
def test_example(block, session):
    why = session.run(block)
    assert why is None, f"{block.id} ({block.lang or 'shell'}): {why}"
