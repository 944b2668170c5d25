"""Load the policy in another process, so that a large load never stalls the event loop.

Loading a million-name list is seconds of CPU: the bulk parse runs whole-file passes in C,
and the table is filled by compiled loops; both hold the GIL, so a load in a thread of the
server delays answers by up to a quarter of a second and loses queries (issue 17, item 25).

So the load runs in a child process. The name table hashes names with Python's own
``hash()`` (salted per process, and the fastest hash the lookup can call), so the child must
share the server's salt: it must be forked from the server, not spawned. Forking the server
itself at each reload would copy its page tables (100 ms at 1 GiB, with the GIL held), so a
small **builder** process is forked once, at the first load, before the server binds or
caches anything; it forks one short-lived child per load. The child runs
:func:`load_policy` and writes the compiled policy to a fresh pipe: a small pickle of
everything but the table, then the table's two arrays as raw bytes. The server reads them
in a thread in 1 MiB pieces (the GIL is free while it waits for the pipe; each piece is
one copy of about 0.1 ms) and puts the arrays into a :class:`NameTable` as they are.

Errors keep their form: a :class:`SourceError` in the child is raised again in the server
with its file, line and field; any other exception, or a child that dies (out of memory,
killed), is a :class:`SourceError` that says what happened. A child that takes longer than
``reload.timeout`` (a list on a stalled network mount, a FIFO nobody writes) is killed by
its own alarm, and that load fails the same way: a hung load never holds later reloads.
Where ``fork`` is missing, or the builder cannot be started, the load runs in a thread as
before (without the time limit).
"""

from __future__ import annotations

import contextlib
import copyreg
import ctypes
import dataclasses
import gc
import io
import logging
import os
import pickle
import signal
import socket
import struct
import threading
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from ..yamlload import SourceError, Where
from .builder import LoadOptions
from .loader import load_policy, release_memory
from .model import Action, BlockList, ClientGroups, Pattern, Phases, Policy, RemoteSpec, RuleSet
from .table import NameTable

log = logging.getLogger("resolver.policy")

_PIECE: Final = 1 << 20
_HEADER: Final = struct.Struct("!QQQ")  # pickle length, keys length, values length (bytes)
_STATUS: Final = struct.Struct("!i")
_PR_SET_PDEATHSIG: Final = 1
_NICE: Final = 5

Reducer = Callable[[Any], tuple[Any, ...]]


def _make(cls: Any, values: tuple[Any, ...]) -> Any:
    return cls(*values)


def _reduce_dataclass(obj: Any) -> tuple[Any, ...]:
    # The compiled (mypyc) dataclasses do not pickle by default: rebuild them from their
    # fields, which are all __init__ arguments.
    return _make, (type(obj), tuple(getattr(obj, f.name) for f in dataclasses.fields(obj)))


def _make_groups(
    bits: dict[str, int], networks: list[Any], ids: dict[str, int] | None = None
) -> ClientGroups:
    groups = ClientGroups()
    groups.bits = dict(bits)
    groups.networks = list(networks)
    groups.ids = dict(ids or {})
    return groups


def _reduce_groups(groups: ClientGroups) -> tuple[Any, ...]:
    return _make_groups, (groups.bits, groups.networks, groups.ids)


_REDUCERS: Final[dict[type, Reducer]] = {
    Action: _reduce_dataclass,
    BlockList: _reduce_dataclass,
    Pattern: _reduce_dataclass,
    Phases: _reduce_dataclass,
    RemoteSpec: _reduce_dataclass,
    RuleSet: _reduce_dataclass,
    ClientGroups: _reduce_groups,
}


def _dumps(obj: Any) -> bytes:
    out = io.BytesIO()
    pickler = pickle.Pickler(out, pickle.HIGHEST_PROTOCOL)
    # The global table too: it is how re.Pattern and others pickle.
    pickler.dispatch_table = {**copyreg.dispatch_table, **_REDUCERS}
    pickler.dump(obj)
    return out.getvalue()


class PolicyLoader:
    """Loads policies in a child process of a builder forked from this process.

    :meth:`start` forks the builder: call it while the process is still small and has no
    listening sockets (the server does, at its first load). :meth:`load` is blocking: call
    it in a thread. :meth:`close` ends the builder.
    """

    def __init__(self, timeout: float = 300.0) -> None:
        #: Seconds a load may take; then its child is killed and the load fails.
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._pid = 0
        self._lock = threading.Lock()
        #: Loads that ran in a child process (for tests and the log).
        self.isolated = 0

    @property
    def running(self) -> bool:
        return self._sock is not None

    def start(self) -> bool:
        """Fork the builder (once); False where that is not possible here."""
        if self._sock is not None:
            return True
        if not hasattr(os, "fork") or not hasattr(socket, "send_fds"):
            return False
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError as exc:
            log.warning("policy loads run in a thread: no socket for the builder (%s)", exc)
            return False
        parent = os.getpid()
        try:
            pid = os.fork()
        except OSError as exc:
            ours.close()
            theirs.close()
            log.warning("policy loads run in a thread: cannot fork the builder (%s)", exc)
            return False
        if pid == 0:  # the builder: never returns
            code = 1
            try:
                ours.close()
                _builder(theirs, parent)
                code = 0
            finally:
                os._exit(code)
        theirs.close()
        self._sock, self._pid = ours, pid
        return True

    def close(self) -> None:
        """End the builder: it exits when its socket closes."""
        sock, pid = self._sock, self._pid
        self._sock, self._pid = None, 0
        if sock is None:
            return
        sock.close()
        with contextlib.suppress(ChildProcessError):
            # It exits at once; reap it, without waiting for one stuck in a load.
            for _ in range(50):
                if os.waitpid(pid, os.WNOHANG)[0]:
                    return
                threading.Event().wait(0.01)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)

    def load(self, path: Path, options: LoadOptions, background: bool = True) -> Policy:
        """Load ``path`` in a child process; raise :class:`SourceError` as
        :func:`load_policy` would. Falls back to loading here when there is no builder.

        ``background``: the server answers meanwhile, so the child yields the CPU to it
        (a lower priority); False for the first load, which nothing waits beside."""
        with self._lock:
            sock = self._sock
            if sock is None:
                return load_policy(path, options)
            request = _dumps((path, options, background, self.timeout))
            read_end, write_end = os.pipe()
            try:
                try:
                    socket.send_fds(sock, [request], [write_end])
                finally:
                    os.close(write_end)
                result = _receive(read_end)
            except OSError as exc:
                self._lost(f"cannot talk to it ({exc})")
                raise SourceError(None, "", f"the policy builder process failed: {exc}") from None
            finally:
                os.close(read_end)
            status = self._status(sock)
            if result is None:
                if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGALRM:
                    raise SourceError(
                        None,
                        "",
                        f"loading the policy took longer than reload.timeout "
                        f"({self.timeout:g} s): a list file that cannot be read to its end "
                        "(a stalled mount, a FIFO)?",
                    )
                raise SourceError(
                    None, "", f"the process loading the policy died ({_describe(status)})"
                )
            self.isolated += 1
            policy = _policy(result, options)
        # The pieces read went through the heap: give it back (ctypes lets go of the GIL).
        release_memory()
        return policy

    def _status(self, sock: socket.socket) -> int:
        """The child's wait status, which the builder sends when it has ended."""
        try:
            data = sock.recv(_STATUS.size)
        except OSError:
            data = b""
        if len(data) != _STATUS.size:
            self._lost("it ended")
            return -1
        status: int = _STATUS.unpack(data)[0]
        return status

    def _lost(self, why: str) -> None:
        log.error("the policy builder process is gone (%s); the next load starts a new one", why)
        self.close()


def _describe(status: int) -> str:
    if status < 0:
        return "the builder process is gone"
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}, perhaps for lack of memory"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def _read_exact(fd: int, size: int) -> bytes | None:
    parts: list[bytes] = []
    left = size
    while left:
        piece = os.read(fd, min(left, _PIECE))
        if not piece:
            return None
        parts.append(piece)
        left -= len(piece)
    return b"".join(parts)


def _read_array(fd: int, typecode: str, size: int) -> array[int] | None:
    """An array read from the pipe in pieces: each piece is one short copy with the GIL,
    and the wait for the next is without it."""
    out = array(typecode)
    carry = b""
    left = size
    while left:
        piece = os.read(fd, min(left, _PIECE))
        if not piece:
            return None
        left -= len(piece)
        if carry:
            piece = carry + piece
        cut = len(piece) - len(piece) % out.itemsize
        out.frombytes(piece if cut == len(piece) else piece[:cut])
        carry = piece[cut:]
    return out if not carry else None


def _receive(fd: int) -> tuple[Any, array[int] | None, array[int] | None] | None:
    head = _read_exact(fd, _HEADER.size)
    if head is None:
        return None
    size, keys_size, values_size = _HEADER.unpack(head)
    body = _read_exact(fd, size)
    if body is None:
        return None
    payload = pickle.loads(body)
    if payload[0] != "ok":
        return payload, None, None
    keys = _read_array(fd, "Q", keys_size)
    values = _read_array(fd, "I", values_size)
    if keys is None or values is None:
        return None
    return payload, keys, values


def _policy(
    result: tuple[Any, array[int] | None, array[int] | None], options: LoadOptions
) -> Policy:
    payload, keys, values = result
    if payload[0] == "source":
        _, where, field, message = payload
        raise SourceError(Where(*where) if where else None, field, message)
    if payload[0] == "error":
        raise SourceError(None, "", payload[1])
    _, parts, count, depths = payload
    assert keys is not None and values is not None
    table = NameTable.from_arrays(keys, values, count, depths)
    lists, rulesets, multi, patterns, digest, warnings, sources, remotes, files, networks = parts
    return Policy(
        lists,
        rulesets,
        table,
        multi,
        patterns,
        options.groups,  # the server's own object, not a copy
        digest,
        warnings,
        sources,
        remotes,
        files,
        networks,
    )


def _detach(parent: int) -> None:
    """In a forked process: die with the parent, leave the server's signals alone."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(0)  # the parent died before the line above
    with contextlib.suppress(ValueError, OSError):
        # The server's signal wake-up fd is inherited: a signal here must not wake the
        # server's loop as if the server had received it.
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the server stops us
        signal.signal(signal.SIGHUP, signal.SIG_IGN)


def _builder(sock: socket.socket, parent: int) -> None:
    """The builder's loop: one request (path, options, a pipe) at a time, each loaded in
    a fresh child, whose wait status goes back when it has ended."""
    _detach(parent)
    # What the server held when it forked us is never collected here: the collector would
    # only copy pages that are shared with the server now.
    gc.freeze()
    with contextlib.suppress(OSError):
        os.closerange(3, sock.fileno())
        os.closerange(sock.fileno() + 1, 1 << 16)
    while True:
        try:
            request, fds, _, _ = socket.recv_fds(sock, 1 << 20, 1)
        except OSError:
            return
        if not request or not fds:
            return  # the server closed its end: it is stopping
        me = os.getpid()
        try:
            pid = os.fork()
        except OSError:
            os.close(fds[0])
            sock.send(_STATUS.pack(1 << 8))
            continue
        if pid == 0:
            code = 1
            try:
                sock.close()
                _child(request, fds[0], me)
                code = 0
            finally:
                os._exit(code)
        os.close(fds[0])
        _, status = os.waitpid(pid, 0)
        try:
            sock.send(_STATUS.pack(status))
        except OSError:
            return


def _child(request: bytes, fd: int, parent: int) -> None:
    """Load, and write the result to ``fd``: header, pickle, then the table's arrays."""
    _detach(parent)
    keys: Any = b""
    values: Any = b""
    payload: Any
    try:
        path, options, background, timeout = pickle.loads(request)
        # The default action of SIGALRM ends this process: the server reads the end of
        # the pipe and the builder's wait status says why (see PolicyLoader.load).
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.setitimer(signal.ITIMER_REAL, timeout)
        if background:
            with contextlib.suppress(OSError):
                # Where CPU is short, the server's answers go first (5, not more: on a
                # busy machine a load must still finish within seconds).
                os.nice(_NICE)
        policy = load_policy(path, options)
        keys, values = policy.table.arrays()
        parts = (
            policy.lists,
            policy.rulesets,
            policy.multi,
            policy.patterns,
            policy.digest,
            policy.warnings,
            policy.sources,
            policy.remotes,
            policy.files,
            policy.networks,
        )
        payload = ("ok", parts, policy.table.count, policy.table.depths)
    except SourceError as exc:
        where = (exc.where.file, exc.where.line, exc.where.column) if exc.where else None
        payload = ("source", where, exc.field, exc.message)
    except Exception as exc:  # any fault is a failed load, said in words
        payload = ("error", f"{type(exc).__name__}: {exc}")
    try:
        body = _dumps(payload)
    except Exception as exc:  # e.g. an object that cannot be pickled
        body = _dumps(("error", f"cannot send the loaded policy: {type(exc).__name__}: {exc}"))
        keys = values = b""
    key_bytes = memoryview(keys).cast("B")
    value_bytes = memoryview(values).cast("B")
    with open(fd, "wb", buffering=_PIECE) as out:
        out.write(_HEADER.pack(len(body), len(key_bytes), len(value_bytes)))
        out.write(body)
        out.write(key_bytes)
        out.write(value_bytes)
