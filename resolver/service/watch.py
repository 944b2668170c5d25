"""What makes a running server reload by itself: files that change on disk
(:class:`FileWatcher`) and remote lists that are due for a fetch (:class:`RemoteRefresher`).

Both only decide *when*; the reload itself is the server's, passed in as a coroutine
function, so that every reload (SIGHUP, the admin API, these two) takes the same path.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..policy import remote
from ..policy.loader import fault, list_files
from ..policy.model import RemoteSpec
from ..yamlload import SourceError

log = logging.getLogger("resolver")

#: Reloads the config and the policy; True when it worked.
Reload = Callable[[], Awaitable[bool]]


@dataclass(slots=True)
class WatchState:
    """What the file watcher has seen: metadata and content digests, and when it last
    hashed the contents."""

    seen: str
    digest: str
    last_sum: float


class FileWatcher:
    """Reloads when the config file or anything the policy read changes on disk."""

    def __init__(
        self,
        config: Callable[[], Config],
        included: Callable[[], Sequence[str] | None],
        reload: Reload,
        stopping: asyncio.Event,
    ) -> None:
        #: The config in force, and the files the policy in force read (None before one).
        self._config = config
        self._included = included
        self._reload = reload
        self._stopping = stopping
        self._baseline = self._baseline_sum = ""

    async def lists(self) -> str:
        """The metadata of the config and the list files alone (no included files)."""
        return await self._run(False, ())

    async def set_baseline(self, before: str) -> None:
        """Once the first policy is loaded: the files as they are now (included files too)
        become what later rounds compare with, unless the config or the lists changed
        since ``before`` (:meth:`lists` taken before that load): then the first round
        reloads. The baseline is taken before that check, so that no edit slips in."""
        baseline = await self._run(False)
        baseline_sum = await self._run(True)
        if await self._run(False, ()) == before:
            self._baseline, self._baseline_sum = baseline, baseline_sum

    async def run(self) -> None:
        """Reload when the config file or anything the policy read changes on disk.

        Every ``reload.interval`` the watcher compares the files' metadata (the directory
        walk included, so new and deleted lists count, and a Kubernetes ConfigMap's
        ``..data`` symlink swap shows as new targets); every ``checksum_interval`` it also
        hashes their contents, a backstop for edits that keep size and mtime. A change
        waits ``debounce`` of quiet (an editor's burst of writes), then reloads once.
        """
        state = WatchState(self._baseline, self._baseline_sum, time.monotonic())
        failed: str | None = None
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._config().reload.interval)
            if self._stopping.is_set():
                return
            # Nothing may end the watcher: a fault in one round is logged (once while it
            # lasts) and the next round tries again, so a later good edit still loads.
            try:
                await self._once(state)
                failed = None
            except Exception as exc:
                why = fault(exc)
                if why != failed:
                    log.error("file watcher: %s; still watching", why)
                failed = why

    async def _once(self, state: WatchState) -> None:
        """One round of :meth:`run`: look, and reload if something changed."""
        settings = self._config().reload
        seen, digest, last_sum = state.seen, state.digest, state.last_sum
        now = await self._run(False)
        changed = now != seen
        if not changed and time.monotonic() - last_sum >= settings.checksum_interval:
            last_sum = time.monotonic()
            changed = await self._run(True) != digest
        if not changed:
            state.last_sum = last_sum
            return
        while True:  # debounce: wait until the files stop changing
            await asyncio.sleep(settings.debounce)
            again = await self._run(False)
            if again == now:
                break
            now = again
        # Remember what is about to be loaded, not what is there after: an edit made
        # during the reload must still count as a change.
        seen = now
        digest = await self._run(True)
        last_sum = time.monotonic()
        lists = await self.lists()
        state.seen, state.digest, state.last_sum = seen, digest, last_sum
        log.info("files changed on disk: reloading")
        await self._reload()
        # The reload may have added or dropped included files: they join the baseline,
        # unless the config or the lists changed meanwhile (then the next check
        # reloads). The new baseline is taken before that check, so an edit made
        # between the two is never absorbed into it.
        with_includes = await self._run(False)
        contents = await self._run(True)
        if await self.lists() == lists:
            seen, digest = with_includes, contents
        state.seen, state.digest, state.last_sum = seen, digest, last_sum

    async def _run(self, contents: bool, included: Sequence[str] | None = None) -> str:
        """:meth:`fingerprint` in a thread (it reads and hashes files)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.fingerprint, contents, included)

    def _watched(self, included: Sequence[str] | None) -> list[Path]:
        config = self._config()
        paths: list[Path] = []
        if config.source != "embedded default":
            paths.append(Path(config.source))
        with contextlib.suppress(SourceError):
            paths.extend(list_files(config.blocklists))
        if included is None:
            included = self._included()
        paths.extend(Path(f) for f in included or ())
        return paths

    def fingerprint(self, contents: bool, included: Sequence[str] | None = None) -> str:
        """Metadata (or, with ``contents``, a hash of the contents) of the watched files:
        the config, the list files, and ``included`` (default: what the policy read)."""
        digest = hashlib.sha256()
        for path in sorted(set(self._watched(included))):
            digest.update(str(path).encode() + b"\0")
            try:
                if contents and path.is_file():  # not a FIFO: reading one would block
                    digest.update(path.read_bytes())
                elif contents:
                    digest.update(b"not a regular file")
                else:
                    st = path.stat()  # follows symlinks: a swapped target is a change
                    digest.update(f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}".encode())
            except (OSError, ValueError):  # ValueError: a NUL byte in a path
                digest.update(b"missing")
        return str(digest.hexdigest())


class RemoteRefresher:
    """Keeps remote lists fresh: fetches each when due, and reloads when one changed."""

    def __init__(
        self,
        config: Callable[[], Config],
        remotes: Callable[[], Sequence[RemoteSpec]],
        own_endpoints: Callable[[], tuple[tuple[str, int], ...]],
        reload: Reload,
        stopping: asyncio.Event,
    ) -> None:
        self._config = config
        self._remotes = remotes
        self._own_endpoints = own_endpoints
        self._reload = reload
        self._stopping = stopping
        #: When each remote list was last fetched (or its copy was), and how that went.
        self.fetched: dict[str, float] = {}
        self.status: dict[str, remote.FetchResult] = {}

    async def run(self) -> None:
        """Fetch each remote list when due (its ``refresh``), in a thread, and reload when
        one changed. A failed fetch keeps the copy and is logged."""
        while not self._stopping.is_set():
            wake, changed = await self._round()
            if changed:
                await self._reload()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), max(1.0, wake - time.time()))

    async def _round(self) -> tuple[float, bool]:
        """Fetch what is due; when the next one is, and whether a list changed."""
        loop = asyncio.get_running_loop()
        config = self._config()
        state_dir = config.state_dir
        now = time.time()
        wake = now + 60
        changed = False
        for spec in self._remotes():
            last = self.fetched.get(spec.url)
            if last is None:
                copy = await loop.run_in_executor(None, remote.load_copy, spec.url, state_dir)
                last = copy.fetched_at or 0.0
                # The copy's last successful fetch, until a fetch of ours says more.
                self.status.setdefault(spec.url, copy)
            if now - last >= spec.refresh:
                result = await loop.run_in_executor(
                    None,
                    remote.fetch,
                    spec.url,
                    state_dir,
                    spec.timeout,
                    spec.max_size,
                    config.remote.allow_private,
                    self._own_endpoints(),
                )
                last = time.time()
                self.status[spec.url] = result
                if result.status == "updated":
                    changed = True
                    log.info("remote list %s (list %s) updated", spec.url, spec.list_id)
                elif result.status == "failed":
                    log.error(
                        "remote list %s (list %s): %s; keeping the last copy",
                        spec.url,
                        spec.list_id,
                        result.error,
                    )
            self.fetched[spec.url] = last
            wake = min(wake, last + spec.refresh)
        return wake, changed
