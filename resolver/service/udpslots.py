"""The buffers of the batched UDP listener (service/udpbatch.py): the mmsghdr arrays that
recvmmsg and sendmmsg read and write, their datagram and answer slots, and the senders'
addresses, read without conversion until something needs them as Python values.

- the received datagrams land in fixed slots of one anonymous memory map (64 KiB each, as
  large as a UDP datagram can be; only the pages written to take memory), and their
  senders' addresses in an array of sockaddr slots;
- answers are copied into slots of a second map, each sent to the address its query came
  from, read from the same sockaddr slot without conversion.
"""

from __future__ import annotations

import ctypes
import mmap
import socket
import sys
from array import array
from typing import Any, Final, Literal

#: Datagrams read (and answers sent) per system call.
SLOTS: Final = 64
#: Bytes a received datagram may have: the largest UDP payload.
RECV_SIZE: Final = 65536
#: Bytes an answer may have to be sent from its slot; a larger one is sent on its own.
SEND_SIZE: Final = 4096
#: Entries of the IPv4 address cache (cleared when full).
MAX_ADDRESSES: Final = 65536
#: Bytes of a sockaddr slot: sizeof(struct sockaddr_in6), which holds a sockaddr_in too.
NAME_SIZE: Final = 28
_NAME_SIZE: Final = NAME_SIZE


class _IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_void_p),
        ("namelen", ctypes.c_uint32),
        ("iov", ctypes.c_void_p),
        ("iovlen", ctypes.c_size_t),
        ("control", ctypes.c_void_p),
        ("controllen", ctypes.c_size_t),
        ("flags", ctypes.c_int),
    ]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("hdr", _MsgHdr), ("len", ctypes.c_uint)]


def _words(array: Any, code: Literal["B", "H", "I", "Q"]) -> memoryview[int]:
    """A ctypes array as a memoryview of native bytes or words."""
    return memoryview(array).cast("B").cast(code)


def sockaddr_tuple(raw: bytes) -> Any:
    """A raw sockaddr_in or sockaddr_in6 as the socket module gives it."""
    port = int.from_bytes(raw[2:4], "big")
    if int.from_bytes(raw[0:2], sys.byteorder) == socket.AF_INET:
        return (socket.inet_ntop(socket.AF_INET, raw[4:8]), port)
    flowinfo = int.from_bytes(raw[4:8], "big")
    host = socket.inet_ntop(socket.AF_INET6, raw[8:24])
    scope = int.from_bytes(raw[24:28], sys.byteorder)
    if scope:
        try:
            host = f"{host}%{socket.if_indextoname(scope)}"
        except OSError:
            host = f"{host}%{scope}"
    return (host, port, flowinfo, scope)


class Buffers:
    """The slots of one listener: received datagrams and their senders, answers to send.

    Slot ``i`` of the receive side is datagram ``i`` of the last recvmmsg; the send side
    is filled from slot 0 on with the answers of that batch, each pointing at the sockaddr
    slot of its query."""

    def __init__(self, slots: int = SLOTS) -> None:
        self.slots = slots
        self._recv_map = mmap.mmap(-1, slots * RECV_SIZE)
        self._send_map = mmap.mmap(-1, slots * SEND_SIZE)
        self.received = memoryview(self._recv_map)
        self.outgoing = memoryview(self._send_map)
        self.names = (ctypes.c_char * (slots * _NAME_SIZE))()
        #: Addresses of answers sent after their batch (from upstream): their own slots.
        self.later_names = (ctypes.c_char * (slots * _NAME_SIZE))()
        self._recv_iov = (_IOVec * slots)()
        self._send_iov = (_IOVec * slots)()
        self.recv_msgs = (_MMsgHdr * slots)()
        self.send_msgs = (_MMsgHdr * slots)()
        recv_base = ctypes.addressof(ctypes.c_char.from_buffer(self._recv_map))
        send_base = ctypes.addressof(ctypes.c_char.from_buffer(self._send_map))
        self.names_base = ctypes.addressof(self.names)
        self.later_base = ctypes.addressof(self.later_names)
        for i in range(slots):
            self._recv_iov[i].base = recv_base + i * RECV_SIZE
            self._recv_iov[i].len = RECV_SIZE
            recv = self.recv_msgs[i].hdr
            recv.name = self.names_base + i * _NAME_SIZE
            recv.namelen = _NAME_SIZE
            recv.iov = ctypes.addressof(self._recv_iov[i])
            recv.iovlen = 1
            self._send_iov[i].base = send_base + i * SEND_SIZE
            send = self.send_msgs[i].hdr
            send.namelen = _NAME_SIZE  # the kernel reads as much as the family needs
            send.iov = ctypes.addressof(self._send_iov[i])
            send.iovlen = 1
        self.recv_ptr = ctypes.addressof(self.recv_msgs)
        self.send_ptr = ctypes.addressof(self.send_msgs)
        self.msg_size = ctypes.sizeof(_MMsgHdr)
        # Word views for the per-datagram reads and writes (a ctypes attribute costs ten
        # times as much): received lengths, send addresses, send lengths, sockaddr words.
        self.recv_words = _words(self.recv_msgs, "I")
        self.len_at = _MMsgHdr.len.offset // 4
        self.recv_stride = self.msg_size // 4
        self.send_words = _words(self.send_msgs, "Q")
        self.name_at = _MsgHdr.name.offset // 8
        self.send_stride = self.msg_size // 8
        self.iov_words = _words(self._send_iov, "Q")
        self.iov_len_at = _IOVec.len.offset // 8
        self.iov_stride = ctypes.sizeof(_IOVec) // 8
        self.name_bytes = _words(self.names, "B")
        self.later_bytes = _words(self.later_names, "B")
        self.name_halves = _words(self.names, "H")
        self.name_words = _words(self.names, "I")
        #: IPv4 senders by the 32-bit value of their address, as strings.
        self._hosts: dict[int, str] = {}
        #: What the C loop hands back: indices of datagrams it left, its pauses.
        self.misses = array("H", bytes(2 * slots))
        self.slow_slots = array("q", bytes(8 * slots))
        self.slow_times = array("d", bytes(8 * slots))
        #: Datagrams the C loop found in no memo entry: (datagram, host or None (not in
        #: the address cache), raw sockaddr, index).
        self.fresh: list[tuple[bytes, str | None, bytes, int]] = []

    def put(self, k: int, answer: bytes, name: int) -> bool:
        """Put ``answer`` in send slot ``k``, to the sockaddr at address ``name``; False
        when it is too large for a slot (it is then sent on its own)."""
        end = len(answer)
        if end > SEND_SIZE:
            return False
        out = k * SEND_SIZE
        self.outgoing[out : out + end] = answer
        self.iov_words[k * self.iov_stride + self.iov_len_at] = end
        self.send_words[k * self.send_stride + self.name_at] = name
        return True

    def length(self, i: int) -> int:
        return int(self.recv_words[i * self.recv_stride + self.len_at])

    def host(self, i: int) -> str:
        """The sender of datagram ``i``, as a string (IPv4 ones from a cache)."""
        if self.name_halves[i * (_NAME_SIZE // 2)] != socket.AF_INET:
            return str(self.address(i)[0])
        value = self.name_words[i * (_NAME_SIZE // 4) + 1]
        host = self._hosts.get(value)
        if host is None:
            if len(self._hosts) >= MAX_ADDRESSES:
                self._hosts.clear()
            host = self._hosts[value] = socket.inet_ntop(
                socket.AF_INET, value.to_bytes(4, sys.byteorder)
            )
        return host

    def address(self, i: int) -> Any:
        """The sender of datagram ``i`` as the socket module gives it: (host, port) for
        IPv4, (host, port, flowinfo, scope_id) for IPv6."""
        at = i * (_NAME_SIZE // 2)
        if self.name_halves[at] == socket.AF_INET:
            return (self.host(i), socket.ntohs(self.name_halves[at + 1]))
        start = i * _NAME_SIZE
        return sockaddr_tuple(bytes(self.name_bytes[start : start + _NAME_SIZE]))

    def sockaddr(self, i: int) -> bytes:
        """The sender of datagram ``i`` as it came: a raw sockaddr."""
        start = i * _NAME_SIZE
        return bytes(self.name_bytes[start : start + _NAME_SIZE])

    def close(self) -> None:
        for view in (
            *(self.received, self.outgoing, self.recv_words, self.send_words, self.iov_words),
            *(self.name_bytes, self.name_halves, self.name_words, self.later_bytes),
        ):
            view.release()
        self._recv_map.close()
        self._send_map.close()
