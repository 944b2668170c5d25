"""The answer memo and the counters, as the server, the metrics and the tests read and
set them through the resolver (core/pipeline.Resolver inherits these views)."""

from __future__ import annotations

from .memo import AnswerMemo
from .stats import Stats


class MemoViews:
    """Views of the resolver's memo (``memo``) and counters (``_stats``)."""

    #: The answer memo, which the UDP listeners' fast path reads too.
    memo: AnswerMemo
    _stats: Stats

    @property
    def stats(self) -> Stats:
        """The counters, the fast path's answers included."""
        self.memo.fold()
        return self._stats

    @property
    def memo_hits(self) -> int:
        """Answers from the memo, the fast path's included."""
        memo = self.memo
        memo.fold()
        return memo.hits + memo.fast_hits - memo.fast_decided

    def fold(self) -> None:
        """Add the answers the UDP fast path sent since the last call to the counters."""
        self.memo.fold()

    @property
    def memo_entries(self) -> int:
        """Answers in the memo, both transports."""
        return self.memo.entries

    @property
    def memo_bytes(self) -> int:
        """Bytes the memo takes, as its bound counts them."""
        return self.memo.size

    @property
    def memo_max_entries(self) -> int:
        """The memo's bound in entries, per transport."""
        return self.memo.max_entries

    @memo_max_entries.setter
    def memo_max_entries(self, value: int) -> None:
        self.memo.max_entries = value

    @property
    def memo_max_bytes(self) -> int:
        """The memo's bound in bytes, both transports together (half each)."""
        return self.memo.max_bytes

    @memo_max_bytes.setter
    def memo_max_bytes(self, value: int) -> None:
        self.memo.max_bytes = value

    @property
    def memo_evictions(self) -> int:
        """Memo entries evicted to keep within the bounds."""
        return self.memo.evictions

    @property
    def memo_rejections(self) -> int:
        """Answers too large to memoise."""
        return self.memo.rejections

    def pin_memo(self) -> None:
        """Keep the memo out of the garbage collector's walks (see AnswerMemo.pin)."""
        self.memo.pin()
