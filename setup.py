"""Optional: the hot modules compiled ahead of time with mypyc.

The package is plain Python and runs as such. Built with ``RESOLVER_COMPILE=1`` (mypy and a
C compiler at hand), the modules every query goes through are also compiled, from the same
source, to C extensions that Python imports in their place:

    python3 -m pip install '.[fast,compile]'
    RESOLVER_COMPILE=1 python3 -m pip install --no-build-isolation --no-deps --force-reinstall .

(mypyc type-checks the package, so its dependencies and their stubs come first: the
``compile`` extra.) A forwarded miss then takes 46% fewer instructions
(bench/instructions.py) and about a fifth less CPU: 1.04x Unbound's in one run, where the
interpreted build is 0.84x (bench/README.md). The container image is built this way.

One C extension is built in every build, plain or compiled, where a C compiler and the
Python headers are there: ``resolver._fastudp`` (resolver/_fastudp.c), the batched UDP
listener's memo-hit loop, which answers repeated questions without entering the
interpreter per datagram (Linux only: it calls recvmmsg and sendmmsg). It is optional:
when it does not build, the install goes on without it and the listener runs its Python
loop (service/udpbatch.py says which one runs, in the log). Everything else is configured
in pyproject.toml.
"""

from __future__ import annotations

import os
import sys

from setuptools import Extension, setup

#: The per-query path: wire format, policy lookup, cache, the query pipeline and its parts
#: (context, memo, answer inspection, answers, accounting, stages, outcome, stats), pending
#: answers, metrics, forwarding (endpoints, the transport protocol and its errors, health,
#: strategies, the UDP and TCP transports), blocked answers, and the access list and rate
#: limit every query passes. Left interpreted: the batched UDP listener (ctypes calls and,
#: for memo hits, the C loop of resolver/_fastudp.c below: compiling would not speed it
#: up), and DNS over TLS and HTTPS (upstream/tls.py, upstream/https.py): the DoH
#: connection and transport subclass the TLS ones, which an interpreted class cannot do to
#: a compiled one (and https.py stands on h2, pure Python). They implement the transport
#: protocol of upstream/base.py structurally, subclassing nothing compiled.
COMPILED = [
    "resolver/core/octets.py",
    "resolver/core/wire.py",
    "resolver/core/records.py",
    "resolver/policy/table.py",
    "resolver/policy/model.py",
    "resolver/core/cache.py",
    "resolver/core/pipeline.py",
    "resolver/core/outcome.py",
    "resolver/core/stats.py",
    "resolver/core/context.py",
    "resolver/core/memo.py",
    "resolver/core/inspect.py",
    "resolver/core/answers.py",
    "resolver/core/account.py",
    "resolver/core/stages.py",
    "resolver/core/pending.py",
    "resolver/observe/counts.py",
    "resolver/observe/metrics.py",
    "resolver/upstream/endpoints.py",
    "resolver/upstream/base.py",
    "resolver/upstream/health.py",
    "resolver/upstream/strategies.py",
    "resolver/upstream/udp.py",
    "resolver/upstream/tcp.py",
    "resolver/upstream/forwarder.py",
    "resolver/core/sinkhole.py",
    "resolver/core/guard.py",
    "resolver/core/ddr.py",
    "resolver/core/memoview.py",
]

ext_modules: list[Extension] = []
if sys.platform.startswith("linux"):
    ext_modules.append(
        Extension(
            "resolver._fastudp",
            ["resolver/_fastudp.c", "resolver/_fastblock.c"],
            depends=["resolver/_fastblock.h"],
            extra_compile_args=["-O2", "-std=gnu11"],
            optional=True,  # no compiler, no headers: the Python loop serves
        )
    )
if os.environ.get("RESOLVER_COMPILE") == "1":
    from mypyc.build import mypycify

    ext_modules += mypycify(COMPILED, opt_level="3")

setup(ext_modules=ext_modules)
