"""Optional: the hot modules compiled ahead of time with mypyc.

The package is plain Python and runs as such. Built with ``RESOLVER_COMPILE=1`` (mypy and a
C compiler at hand), the modules every query goes through are also compiled, from the same
source, to C extensions that Python imports in their place:

    python3 -m pip install mypy wheel
    RESOLVER_COMPILE=1 python3 -m pip install --no-build-isolation '.[fast]'

A forwarded miss then costs a third fewer instructions (bench/instructions.py) and about
16% less CPU: 0.94x Unbound's in one run, 0.79x interpreted (bench/README.md).
Everything else is configured in pyproject.toml; without the variable this file adds
nothing.
"""

from __future__ import annotations

import os

from setuptools import setup

#: The per-query path: wire format, policy lookup, cache, the query chain, pending answers,
#: metrics and UDP forwarding. Left interpreted: the batched UDP listener (mostly ctypes
#: calls, which compiling does not speed up), and DNS over TLS and HTTPS (dot.py, doh.py),
#: whose cost is the handshake, not per-query CPU.
COMPILED = [
    "resolver/wire.py",
    "resolver/policy/table.py",
    "resolver/policy/model.py",
    "resolver/cache.py",
    "resolver/chain.py",
    "resolver/pending.py",
    "resolver/metrics.py",
    "resolver/upstream.py",
]

ext_modules = []
if os.environ.get("RESOLVER_COMPILE") == "1":
    from mypyc.build import mypycify

    ext_modules = mypycify(COMPILED, opt_level="3")

setup(ext_modules=ext_modules)
