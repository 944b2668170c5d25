"""Which build runs: the Python source, or the per-query modules compiled by mypyc.

CI runs the suite twice: on the checkout, and on a copy built with ``RESOLVER_COMPILE=1``
(setup.py), where it sets RESOLVER_EXPECT_COMPILED=1. These tests make sure each pass
tested the build it names, and that the ready line tells an operator which one runs.
"""

from __future__ import annotations

import ast
import importlib
import os

from resolver.service.server import build

from .helpers.realservers import ROOT, ResolverProcess

EXPECT_COMPILED = os.environ.get("RESOLVER_EXPECT_COMPILED") == "1"
#: Set by CI, where a compiler exists: the C loop of UDP memo hits must have been built
#: (tests/test_fastudp.py skips its C cases without it, which must not pass unnoticed).
EXPECT_FASTUDP = os.environ.get("RESOLVER_EXPECT_FASTUDP") == "1"


def compiled_modules() -> list[str]:
    """The modules setup.py compiles (its COMPILED list), as module names."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "COMPILED":
            paths = ast.literal_eval(node.value)
            return [p.removesuffix(".py").replace("/", ".") for p in paths]
    raise AssertionError("setup.py has no COMPILED list")


def test_every_listed_module_is_of_the_build_this_run_expects() -> None:
    modules = compiled_modules()
    assert "resolver.core.wire" in modules
    for name in modules:
        path = importlib.import_module(name).__file__ or ""
        if EXPECT_COMPILED:
            assert path.endswith(".so"), f"{name} is not compiled: {path}"
        else:
            assert path.endswith(".py"), f"{name} is not the source: {path}"
    assert build() == ("compiled modules" if EXPECT_COMPILED else "interpreted")


def test_the_udp_fast_loop_is_built_where_ci_expects_it() -> None:
    from resolver.service import udpbatch

    if not EXPECT_FASTUDP:
        return
    assert importlib.import_module("resolver._fastudp").__file__
    assert udpbatch.ENGINE == "c"


def test_the_ready_line_names_the_build() -> None:
    proc = ResolverProcess("--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9")
    try:
        line = proc.wait_for("ready (")
        assert f", {build()}, config: " in line
    finally:
        proc.stop()
