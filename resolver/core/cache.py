"""The answer cache: upstream replies kept as wire bytes, served with TTLs counted down.

An entry holds the reply's records exactly as they came (OPT removed) plus the offset of
every TTL. Serving patches the TTLs once per second of age and reuses that copy until the
next second, so a hit costs a dictionary lookup and a few byte joins.

Stored entries are packed into one ``bytes`` each, in plain dicts: the garbage collector
does not track bytes, nor a dict that holds only bytes, so a full collection never walks
the cache. With :class:`Entry` objects in OrderedDicts it did, and a million entries
stalled the event loop for about half a second at every full collection.
"""

from __future__ import annotations

import struct
from typing import Final

from ..defaults import DEFAULT_CACHE_MAX_BYTES as DEFAULT_MAX_BYTES
from ..defaults import DEFAULT_CACHE_MAX_ENTRIES as DEFAULT_MAX_ENTRIES
from ..defaults import DEFAULT_CACHE_MAX_NEGATIVE_TTL as DEFAULT_MAX_NEGATIVE_TTL
from ..defaults import DEFAULT_CACHE_MAX_TTL as DEFAULT_MAX_TTL
from .wire import RCODE_NOERROR, RCODE_NXDOMAIN, Scan, label_offsets, pack_u32_into

#: Uses of an entry that make it popular enough to prefetch.
PREFETCH_HITS: Final = 3
#: RFC 8767 4: the TTL of a stale answer.
STALE_TTL: Final = 30
#: What an entry takes beyond the bytes of its key and packed entry: its dict slot and
#: the two bytes objects' headers (measured: about 110 bytes).
ENTRY_OVERHEAD: Final = 120
#: No entry may take more than this share of ``max_bytes`` (1/16): one answer must not
#: empty the cache of the others.
_LARGEST_SHARE: Final = 16


#: stored, expires, flags, rcode, an, ns, ar, TTL count, chain names, addresses, upstream
#: label length; then the TTL offsets and TTLs, the names and addresses (a length byte
#: each), the label, and the records.
_HEAD: Final = struct.Struct("<ddHHHHHHHHH")
_TTL_STRUCTS: dict[int, struct.Struct] = {}
_EXPIRES: Final = struct.Struct("<d")
#: The length byte of each name and address in a packed entry, made once.
_LENGTHS: Final = tuple(bytes((n,)) for n in range(256))
#: Upstream labels as packed (a label per configured upstream; bounded all the same).
_LABELS: dict[str, bytes] = {}
_LABELS_MAX: Final = 1024


def _ttl_struct(n: int) -> struct.Struct:
    found = _TTL_STRUCTS.get(n)
    if found is None:
        found = _TTL_STRUCTS[n] = struct.Struct(f"<{n}H{n}I")
    return found


_PACKERS: dict[int, struct.Struct] = {}


def _packer(n: int) -> struct.Struct:
    """The head and ``n`` TTL offsets and TTLs, as one struct."""
    found = _PACKERS.get(n)
    if found is None:
        found = _PACKERS[n] = struct.Struct(_HEAD.format + f"{n}H{n}I")
    return found


class Entry:
    """One cached (or just received) reply, ready to be served to any client."""

    __slots__ = (
        "_rendered",
        "_rendered_age",
        "addresses",
        "an",
        "ar",
        "body",
        "chain",
        "expires",
        "flags",
        "hits",
        "key",
        "ns",
        "prefetching",
        "rcode",
        "stored",
        "ttl_offsets",
        "ttls",
        "upstream",
    )

    def __init__(self, scan: Scan | None, stored: float, expires: float) -> None:
        if scan is None:
            return  # unpack() sets every field
        self.upstream = scan.source
        #: Uses of the stored entry so far, and whether a prefetch of it was asked for
        #: (set by Cache.get from what it keeps beside the packed entry).
        self.hits = 0
        self.prefetching = False
        self.key = b""
        #: Names the answer passes through (CNAME/DNAME), checked against policy on use.
        self.chain = tuple(dict.fromkeys(scan.chain)) if scan.chain else ()
        #: Addresses in the answer, checked against network rules and rebinding on use.
        self.addresses = tuple(scan.addresses)
        self.flags = scan.flags
        self.rcode = scan.rcode
        self.an = scan.ancount
        self.ns = scan.nscount
        self.ar = scan.arcount
        self.body = scan.body
        # Tuples of ints, not lists: the garbage collector stops tracking such tuples,
        # so that a full collection walks one object per entry, not three.
        self.ttl_offsets = tuple(scan.ttl_offsets)
        self.stored = stored
        self.expires = expires
        # No record may claim to live longer than the entry: that cap carries the policy's
        # next transition and the configured maximum to the client.
        life = max(0, int(expires - stored))
        ttls = scan.ttls
        unchanged = not ttls or max(ttls) <= life
        if unchanged:
            self.ttls = tuple(ttls)
        else:
            self.ttls = tuple([t if t < life else life for t in ttls])
        if unchanged and scan.ttls_as_sent:
            # Served at age 0, the records are the reply's own bytes: the first answer
            # (the one to the query that fetched it) needs no rewriting.
            self._rendered_age = 0
            self._rendered = self.body
        else:
            self._rendered_age = -1
            self._rendered = b""

    def pack(self) -> bytes:
        """The entry as one bytes object (see the module docstring); unpack() reverses it."""
        n = len(self.ttl_offsets)
        upstream = _LABELS.get(self.upstream)
        if upstream is None:
            if len(_LABELS) >= _LABELS_MAX:
                _LABELS.clear()
            upstream = _LABELS[self.upstream] = self.upstream.encode()
        # The head and the TTLs in one call of one struct (the layout unpack() reads).
        parts = [
            _packer(n).pack(
                self.stored,
                self.expires,
                self.flags,
                self.rcode,
                self.an,
                self.ns,
                self.ar,
                n,
                len(self.chain),
                len(self.addresses),
                len(upstream),
                *self.ttl_offsets,
                *self.ttls,
            )
        ]
        for item in self.chain:
            parts.append(_LENGTHS[len(item)])
            parts.append(item)
        for item in self.addresses:
            parts.append(_LENGTHS[len(item)])
            parts.append(item)
        parts.append(upstream)
        parts.append(self.body)
        return b"".join(parts)

    @classmethod
    def unpack(cls, blob: bytes, key: bytes) -> Entry:
        """The entry that pack() made ``blob`` of, stored under ``key``."""
        # (Not cls.__new__(cls): the compiled build cannot make a native object that way.)
        entry = cls(None, 0.0, 0.0)
        (
            entry.stored,
            entry.expires,
            entry.flags,
            entry.rcode,
            entry.an,
            entry.ns,
            entry.ar,
            n,
            chains,
            addresses,
            upstream,
        ) = _HEAD.unpack_from(blob)
        off = _HEAD.size
        ttl = _ttl_struct(n)
        values = ttl.unpack_from(blob, off)
        entry.ttl_offsets = values[:n]
        entry.ttls = values[n:]
        off += ttl.size
        items = []
        for _ in range(chains + addresses):
            size = blob[off]
            items.append(blob[off + 1 : off + 1 + size])
            off += 1 + size
        entry.chain = tuple(items[:chains])
        entry.addresses = tuple(items[chains:])
        entry.upstream = blob[off : off + upstream].decode()
        entry.body = blob[off + upstream :]
        entry.hits = 0
        entry.prefetching = False
        entry.key = key
        entry._rendered_age = -1
        entry._rendered = b""
        return entry

    def stale_records(self) -> bytes:
        """The records with every TTL at 30 s, as RFC 8767 serves a stale answer."""
        buf = bytearray(self.body)
        for off in self.ttl_offsets:
            pack_u32_into(buf, off, STALE_TTL)
        return bytes(buf)

    def records(self, now: float) -> bytes:
        """The records after the question, TTLs reduced by the entry's age in whole seconds
        rounded up: a TTL is the floor of the time its record has left, never more."""
        elapsed = now - self.stored
        age = int(elapsed)  # (age_of, inline: this is the cache hit's path)
        if age < elapsed:
            age += 1
        elif age < 0:
            age = 0
        if age != self._rendered_age:
            if self.ttl_offsets:
                buf = bytearray(self.body)
                for off, ttl in zip(self.ttl_offsets, self.ttls, strict=True):
                    pack_u32_into(buf, off, ttl - age if ttl > age else 0)
                self._rendered = bytes(buf)
            else:
                self._rendered = self.body
            self._rendered_age = age
        return self._rendered


def age_of(now: float, stored: float) -> int:
    """The age that served TTLs are reduced by: the seconds since ``stored`` rounded up,
    so that a TTL served at ``now`` never reaches past its record's end (flooring the age
    handed out TTLs up to a second too long, past a ban's start too)."""
    elapsed = now - stored
    if elapsed <= 0:
        return 0
    age = int(elapsed)
    return age + 1 if age < elapsed else age


#: Entries per shard that the cache aims at. A Python dict rebuilds its whole table when
#: it grows, and, once evictions churn it, every half table of inserts: one table of
#: 100,000 entries stalled the event loop for about 12 ms each time, of 1,400,000 for
#: 200 ms. Shards of a few thousand entries keep each rebuild well under a millisecond.
SHARD_TARGET: Final = 4096
MAX_SHARDS: Final = 256


def shard_count(max_entries: int) -> int:
    """A power of two, so that ``max_entries`` makes shards of about SHARD_TARGET entries
    (1 for small caches, which are then exactly LRU)."""
    count = 1
    while count < MAX_SHARDS and count * SHARD_TARGET < max_entries:
        count *= 2
    return count


class Cache:
    """A map from (name, type, class, DO, CD) to :class:`Entry`, bounded in entries and
    in bytes.

    Kept in shards by key hash, each an LRU bounded to its share of ``max_entries`` (see
    SHARD_TARGET): least recently used within a shard is evicted first, which is as good
    as a global LRU for a cache, without the long rebuilds of one big table. The bytes
    (keys, packed entries and ENTRY_OVERHEAD each) are counted for the whole cache:
    beyond ``max_bytes``, the shard that just grew gives up its least recently used
    entries (the next shards, when it holds only the new one). Keys spread evenly over
    the shards, so each holds about its share of the bytes too.
    """

    def __init__(
        self,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        min_ttl: int = 0,
        max_ttl: int = DEFAULT_MAX_TTL,
        max_negative_ttl: int = DEFAULT_MAX_NEGATIVE_TTL,
        serve_stale: float = 0.0,
        prefetch: bool = False,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        #: Bytes the stored entries take, as max_bytes counts them.
        self.bytes = 0
        self.min_ttl = min_ttl
        self.max_ttl = max_ttl
        self.max_negative_ttl = max_negative_ttl
        #: Seconds past expiry an entry may still be served when upstreams fail (0: off).
        self.serve_stale = serve_stale
        #: Refresh popular entries before they expire.
        self.prefetch = prefetch
        self.prefetches = 0
        count = shard_count(max_entries)
        #: Packed entries (Entry.pack), least recently used first in each shard.
        self._shards: list[dict[bytes, bytes]] = [{} for _ in range(count)]
        self._mask = count - 1
        #: Uses of stored entries, and the entries whose prefetch was asked for: kept only
        #: with prefetch on, and dropped with their entries.
        self._hits: dict[bytes, int] = {}
        self._prefetching: set[bytes] = set()
        self.misses = 0
        #: Entries evicted to bound the cache (for entries or for bytes), and those of
        #: them evicted for bytes; answers too large to keep at all.
        self.evictions = 0
        self.byte_evictions = 0
        self.rejections = 0

    def __len__(self) -> int:
        return sum(len(shard) for shard in self._shards)

    def get(self, key: bytes, now: float) -> Entry | None:
        """The live entry for ``key``, or None (an expired one is dropped on the way)."""
        data = self._shards[hash(key) & self._mask]
        blob = data.get(key)
        if blob is None:
            self.misses += 1
            return None
        expires: float = _EXPIRES.unpack_from(blob, 8)[0]  # (typed: native compares)
        if expires <= now:
            if now - expires >= self.serve_stale:
                self._drop(data, key)  # kept while it may still serve stale (RFC 8767)
            self.misses += 1
            return None
        del data[key]
        data[key] = blob  # the most recently used, last
        entry = Entry.unpack(blob, key)
        if self.prefetch:
            entry.hits = self._hits[key] = self._hits.get(key, 0) + 1
            entry.prefetching = key in self._prefetching
        return entry

    def wants_prefetch(self, entry: Entry, now: float) -> bool:
        """Popular (PREFETCH_HITS uses) and in the last tenth of its life: refresh it now,
        once, so that its users never see it expire."""
        if not self.prefetch or entry.prefetching or entry.hits < PREFETCH_HITS:
            return False
        if entry.expires - now > 0.1 * (entry.expires - entry.stored):
            return False
        entry.prefetching = True
        self._prefetching.add(entry.key)
        self.prefetches += 1
        return True

    def stale(self, key: bytes, now: float) -> Entry | None:
        """An expired entry still within ``serve_stale`` seconds of its expiry, for when
        the upstreams fail or are too slow (RFC 8767)."""
        blob = self._shards[hash(key) & self._mask].get(key)
        if blob is None:
            return None
        expires: float = _EXPIRES.unpack_from(blob, 8)[0]  # (typed: native compares)
        if expires > now or now - expires >= self.serve_stale:
            return None
        return Entry.unpack(blob, key)

    def flush(self, name: bytes | None = None) -> int:
        """Drop every entry (``name`` None) or those for ``name`` (lower-case wire) and the
        names below it; return how many were dropped."""
        count = 0
        if name is None:
            for data in self._shards:
                count += len(data)
                data.clear()
            self.bytes = 0
            self._hits.clear()
            self._prefetching.clear()
            return count
        for data in self._shards:
            doomed = []
            for key in data:
                owner = key[:-6]  # the name; then type, class, DO and CD
                cut = len(owner) - len(name)
                if cut >= 0 and owner.endswith(name) and (cut == 0 or cut in label_offsets(owner)):
                    doomed.append(key)
            for key in doomed:
                self._drop(data, key)
            count += len(doomed)
        return count

    def lifetime(self, scan: Scan) -> int | None:
        """How long a reply may be kept (RFC 2308 for negative ones), or None: not at all."""
        if scan.rcode == RCODE_NOERROR and scan.ancount:
            ttl = scan.min_answer_ttl or 0
            return max(self.min_ttl, min(ttl, self.max_ttl))
        if scan.rcode in (RCODE_NOERROR, RCODE_NXDOMAIN):
            if scan.negative_ttl is None:
                return None  # no SOA: RFC 2308 5 says do not cache
            return min(scan.negative_ttl, self.max_negative_ttl)
        return None  # SERVFAIL, REFUSED, FORMERR...: never cached

    def admit(self, key: bytes, scan: Scan, now: float, cap_until: float) -> Entry:
        """Make an entry of ``scan``; keep it when its lifetime (cut at ``cap_until``) is
        positive. The entry is returned either way so the reply can be served once."""
        life = self.lifetime(scan)
        expires = now + life if life is not None else now
        if cap_until < expires:
            expires = cap_until
        entry = Entry(scan, now, expires)
        entry.key = key
        if expires > now and self.max_entries > 0:
            blob = entry.pack()
            size = len(key) + len(blob) + ENTRY_OVERHEAD
            if size * _LARGEST_SHARE > self.max_bytes:
                self.rejections += 1
                return entry
            index = hash(key) & self._mask
            data = self._shards[index]
            if key in data:
                self._drop(data, key)  # a new entry: uses and prefetch start afresh
            data[key] = blob
            self.bytes += size
            # This shard's share (rounded up); while: the limit may have been lowered.
            limit = -(-self.max_entries // len(self._shards))
            while len(data) > limit:
                self._drop(data, next(iter(data)))
                self.evictions += 1
            if self.bytes > self.max_bytes:
                self._shed(index, key)
        return entry

    def _shed(self, index: int, key: bytes) -> None:
        """Evict least recently used entries until the cache is within max_bytes again:
        from shard ``index`` first, then from the next ones (``key`` is the entry just
        stored, which stays)."""
        shards = self._shards
        idle = 0  # shards passed over in a row: all of them, and there is nothing to evict
        while self.bytes > self.max_bytes and idle <= len(shards):
            data = shards[index]
            oldest = next(iter(data), None)
            if oldest is None or oldest == key:
                index = (index + 1) & self._mask
                idle += 1
                continue
            idle = 0
            self._drop(data, oldest)
            self.evictions += 1
            self.byte_evictions += 1

    def _drop(self, data: dict[bytes, bytes], key: bytes) -> None:
        self.bytes -= len(key) + len(data.pop(key)) + ENTRY_OVERHEAD
        if self._hits:
            self._hits.pop(key, None)
        if self._prefetching:
            self._prefetching.discard(key)
