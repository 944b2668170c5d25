"""Selection strategies (the config's ``upstream_strategy``): in which order a query's
upstreams are tried, and how many at once. Each is a small object with one method,
:meth:`Strategy.order`, applied to the upstreams not marked down (those come last, in
their configured order, whatever the strategy)."""

from __future__ import annotations

import random

from ..defaults import STRATEGIES
from .endpoints import Upstream
from .health import Health


class Strategy:
    """``failover``: in the configured order, one at a time (the base of the others)."""

    def __init__(self, name: str = "failover", keeps_order: bool = True, fanout: int = 1) -> None:
        self.name = name
        #: The configured order is the order of trial while every upstream answers (the
        #: forwarder then skips asking health for one).
        self.keeps_order = keeps_order
        #: How many upstreams are asked at once at first.
        self.fanout = fanout

    def order(self, usable: list[Upstream], health: Health) -> list[Upstream]:
        """``usable`` (none of them marked down) in the order to try them."""
        return usable


class Parallel(Strategy):
    """``parallel``: the first two at once, the first good answer wins; then failover."""

    def __init__(self) -> None:
        super().__init__("parallel", True, 2)


class Random(Strategy):
    """``random``: a random order for each query (spreads the load)."""

    def __init__(self) -> None:
        super().__init__("random", False, 1)

    def order(self, usable: list[Upstream], health: Health) -> list[Upstream]:
        return random.sample(usable, len(usable))


class Fastest(Strategy):
    """``fastest``: by measured latency (those not yet measured first, to measure them)."""

    def __init__(self) -> None:
        super().__init__("fastest", False, 1)

    def order(self, usable: list[Upstream], health: Health) -> list[Upstream]:
        return sorted(usable, key=health.latency)


#: The strategies by name, as the config names them.


def strategy_named(name: str) -> Strategy:
    """The strategy called ``name`` (one of :data:`STRATEGIES`)."""
    if name == "failover":
        return Strategy()
    if name == "random":
        return Random()
    if name == "fastest":
        return Fastest()
    if name == "parallel":
        return Parallel()
    raise ValueError(f"unknown upstream strategy {name!r} (known: {', '.join(STRATEGIES)})")
