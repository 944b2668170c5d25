"""An answer on its way from upstream, handed to its listener by a plain callback.

A forwarded query used to travel as an asyncio Future: each completion then cost a turn of
the event loop per done-callback (a Handle and a context copy each) before the answer went
out. A :class:`Pending` calls its one waiter at once, in the same turn as the upstream
reply. It is also awaitable (the TCP path awaits it), and :class:`service.listeners.Tasks` holds
the ones still waiting so that a shutdown can wait for them or give up on them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Generator
from typing import Any, Final

log = logging.getLogger("resolver")

_WAITING: Final = 0
_DONE: Final = 1
_CANCELLED: Final = 2

#: Called with the answer (None: no answer to send) and the argument given to then().
Waiter = Callable[[bytes | None, Any], None]


class Pending:
    """One answer to come: :meth:`deliver` it once; :meth:`then` names who gets it."""

    __slots__ = ("_answer", "_arg", "_held", "_state", "_waiter", "error")

    def __init__(self) -> None:
        self._state = _WAITING
        self._answer: bytes | None = None
        self._waiter: Waiter | None = None
        self._arg: Any = None
        self._held: set[Pending] | None = None
        #: What went wrong working out the answer (see fail()).
        self.error: BaseException | None = None

    @property
    def cancelled(self) -> bool:
        return self._state == _CANCELLED

    def done(self) -> bool:
        return self._state != _WAITING

    def then(self, waiter: Waiter, arg: Any = None, held: set[Pending] | None = None) -> None:
        """Call ``waiter(answer, arg)`` when the answer is there (at once if it is); while
        it is not, keep this in ``held``. One waiter per answer."""
        if self._waiter is not None:
            raise RuntimeError("a Pending answer has one waiter")
        if self._state == _DONE:
            waiter(self._answer, arg)
            return
        if self._state == _CANCELLED:
            return
        self._waiter = waiter
        self._arg = arg
        if held is not None:
            held.add(self)
            self._held = held

    def deliver(self, answer: bytes | None) -> None:
        """The answer is there (None: none to send). Ignored once cancelled."""
        if self._state != _WAITING:
            return
        self._state = _DONE
        self._answer = answer
        waiter = self._waiter
        if waiter is not None:
            self._release()
            waiter(answer, self._arg)

    def fail(self, exc: BaseException) -> None:
        """Working out the answer went wrong: logged, and nothing is sent."""
        log.error("internal error answering a query", exc_info=exc)
        self.error = exc
        self.deliver(None)

    def cancel(self) -> None:
        """Give up (shutdown ran out of time): the answer, if it comes, goes nowhere."""
        if self._state == _WAITING:
            self._state = _CANCELLED
            self._release()
            waiter, self._waiter = self._waiter, None
            if waiter is not None:
                waiter(None, self._arg)  # nothing to send; an await returns None

    def _release(self) -> None:
        held = self._held
        if held is not None:
            held.discard(self)
            self._held = None

    def __await__(self) -> Generator[Any, None, bytes | None]:
        if self._state == _WAITING:
            future: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
            self.then(_settle, future)
            return (yield from future)
        return self._answer


def _settle(answer: bytes | None, future: asyncio.Future[bytes | None]) -> None:
    if not future.done():
        future.set_result(answer)
