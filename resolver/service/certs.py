"""The certificate the encrypted listeners (DoT, DoH, DoQ) present, reloaded when its files
change on disk (cert-manager and ACME clients rewrite them) without a restart.

A :class:`CertStore` reads a PEM certificate (with its chain) and its key, checks them (the
key matches, the certificate is valid now) and keeps one server :class:`ssl.SSLContext` per
ALPN set. A reload reads the files once, checks the new pair in a throwaway context, and only
then loads the very bytes it checked into every live context: ``load_cert_chain`` on an
existing context changes what new handshakes present, while open connections keep the
session they have (tests/test_dot.py shows it). A bad pair never replaces a good one.

The TLS server name a client sent is recorded per connection by the contexts'
``sni_callback`` (see :meth:`CertStore.server_name`), for the client id of
:func:`client_id_from_sni`. The TLS counters of every listener live here too (handshakes,
failures, reloads), read by service/tlsmetrics.py.
"""

from __future__ import annotations

import logging
import os
import re
import ssl
import tempfile
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from ..config import TLSConfig

__all__ = ["CertError", "CertStore", "client_id_from_sni", "open_store"]

log = logging.getLogger("resolver")

#: Server names recorded at once (one per connection in handshake or open; entries go with
#: their connection). Past it, names are not recorded (counted): the client has no id.
MAX_NAMES: Final = 100_000
#: A client id is one DNS label of these characters (the convention of AdGuard Home).
_CLIENT_ID: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,62})")


class CertError(Exception):
    """A certificate or key that cannot be served; ``str()`` names the file and why."""


def client_id_from_sni(server_name: str | None, domain: str) -> str:
    """The client id in a TLS server name ``{id}.{domain}``; "" when there is none.

    The id is one label of letters, digits and hyphens (up to 63); anything else (no name,
    another domain, several labels before the domain) gives "", as for a client that sent
    the domain itself."""
    if not server_name or not domain:
        return ""
    name = server_name.rstrip(".").lower()
    suffix = "." + domain.strip(".").lower()
    if not name.endswith(suffix):
        return ""
    label = name[: -len(suffix)]
    return label if _CLIENT_ID.fullmatch(label) else ""


Fingerprint = tuple[tuple[int, int, int], ...]


def _stat(paths: Sequence[Path]) -> Fingerprint:
    """Inode, size and mtime of each file (following links: a Kubernetes Secret's
    ``..data`` swap shows as new targets); a missing file is all zeros."""
    out = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out.append((0, 0, 0))
        else:
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def _read(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CertError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise CertError(f"{path}: not a PEM file (no -----BEGIN line); the {what} must be PEM")
    return data


class Pair:
    """A certificate chain and its key, read and checked (see :func:`check_pair`)."""

    __slots__ = ("cert_pem", "key_pem", "names", "not_after", "not_before", "subject")

    def __init__(self, cert_pem: bytes, key_pem: bytes, leaf: x509.Certificate) -> None:
        self.cert_pem = cert_pem
        self.key_pem = key_pem
        self.not_after = leaf.not_valid_after_utc.timestamp()
        self.not_before = leaf.not_valid_before_utc.timestamp()
        self.subject = leaf.subject.rfc4514_string()
        names: list[str] = []
        try:
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            pass
        else:
            names += san.get_values_for_type(x509.DNSName)
            names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
        self.names = tuple(names)


def check_pair(cert: Path, key: Path, now: float) -> Pair:
    """Read ``cert`` and ``key`` once and check them; raise :class:`CertError`."""
    cert_pem = _read(cert, "certificate")
    key_pem = _read(key, "key")
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError as exc:
        raise CertError(f"{cert}: not a PEM certificate: {exc}") from None
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise CertError(f"{key}: the key is encrypted; give it without a passphrase") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CertError(f"{key}: not a PEM private key: {exc}") from None
    leaf = chain[0]
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if private.public_key().public_bytes(der, spki) != leaf.public_key().public_bytes(der, spki):
        raise CertError(
            f"{key}: the key does not match the certificate in {cert} "
            f"({leaf.subject.rfc4514_string()})"
        )
    pair = Pair(cert_pem, key_pem, leaf)
    if now >= pair.not_after:
        raise CertError(f"{cert}: the certificate expired on {_when(pair.not_after)}")
    if now < pair.not_before:
        raise CertError(f"{cert}: the certificate is not valid before {_when(pair.not_before)}")
    # The last word is OpenSSL's: what it refuses (a key too weak for its security level,
    # a broken chain file) is refused here, before any live context sees it.
    with _files(pair) as (cert_file, key_file):
        try:
            _server_context(()).load_cert_chain(cert_file, key_file)
        except ssl.SSLError as exc:
            raise CertError(f"{cert}: OpenSSL refuses the pair: {exc.reason or exc}") from None
    return pair


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


@contextmanager
def _files(pair: Pair) -> Iterator[tuple[str, str]]:
    """The checked bytes in private temporary files (ssl only loads from files), removed
    at once: what is loaded is what was checked, whatever the files on disk do meanwhile."""
    with tempfile.TemporaryDirectory(prefix="resolver-tls-") as tmp:
        cert_file, key_file = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        for path, data in ((cert_file, pair.cert_pem), (key_file, pair.key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
        yield cert_file, key_file


def _server_context(alpn: Sequence[str]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # TLS 1.2 at least (RFC 8310, RFC 9325); OpenSSL picks 1.3 whenever the client has it.
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


class CertStore:
    """The certificate and key in force, and the server contexts that present them."""

    def __init__(self, cert: Path, key: Path, clock: Callable[[], float] = time.time) -> None:
        self.cert = Path(cert)
        self.key = Path(key)
        self.clock = clock
        self._seen = _stat((self.cert, self.key))
        self._pair = check_pair(self.cert, self.key, clock())
        self._failed: Fingerprint | None = None
        self._contexts: dict[tuple[str, ...], ssl.SSLContext] = {}
        #: The TLS server name of each connection (by its SSLObject), while it lives.
        self._names: weakref.WeakKeyDictionary[object, str] = weakref.WeakKeyDictionary()
        self.last_error = ""
        #: Reloads of the pair by result (success, failure).
        self.reloads: Counter[str] = Counter({"success": 0, "failure": 0})
        #: Handshakes completed by transport (dot, doh, doq), and failed by transport and
        #: reason: every encrypted listener counts its own here.
        self.handshakes: Counter[str] = Counter()
        self.handshake_failures: Counter[tuple[str, str]] = Counter()
        #: Server names not recorded: MAX_NAMES were held.
        self.names_dropped = 0

    @property
    def not_after(self) -> float:
        """When the loaded certificate expires (epoch seconds)."""
        return self._pair.not_after

    @property
    def names(self) -> tuple[str, ...]:
        """The loaded certificate's subjectAltName entries (DNS names, then addresses)."""
        return self._pair.names

    @property
    def subject(self) -> str:
        """The loaded certificate's subject (RFC 4514)."""
        return self._pair.subject

    def context(self, alpn: Sequence[str]) -> ssl.SSLContext:
        """The server context for these ALPN protocols (one per set, kept and reloaded)."""
        key = tuple(alpn)
        ctx = self._contexts.get(key)
        if ctx is None:
            ctx = _server_context(key)
            ctx.sni_callback = self._sni
            with _files(self._pair) as (cert_file, key_file):
                ctx.load_cert_chain(cert_file, key_file)
            self._contexts[key] = ctx
        return ctx

    def _sni(self, conn: object, name: str | None, _ctx: ssl.SSLContext) -> None:
        if name is None:
            return
        if len(self._names) >= MAX_NAMES:
            self.names_dropped += 1
            return
        try:
            self._names[conn] = name
        except TypeError:  # not weakly referable: no name rather than a leak
            self.names_dropped += 1

    def server_name(self, ssl_object: object | None) -> str | None:
        """The TLS server name the client of this connection sent (its ``ssl_object``,
        as the transport's ``get_extra_info("ssl_object")`` gives it), or None."""
        if ssl_object is None:
            return None
        try:
            return self._names.get(ssl_object)
        except TypeError:
            return None

    def reload_if_changed(self, force: bool = False) -> bool:
        """Load the files again if they changed on disk (inode, size, mtime); True when a
        new pair is in force. A pair that fails its checks keeps the old one serving, is
        logged once with the file and the reason, counted, and kept in ``last_error``;
        the same files are not tried again until they change (or ``force``: SIGHUP)."""
        seen = _stat((self.cert, self.key))
        if seen == self._seen or (seen == self._failed and not force):
            return False
        try:
            pair = check_pair(self.cert, self.key, self.clock())
        except CertError as exc:
            self._failed = seen
            self.last_error = str(exc)
            self.reloads["failure"] += 1
            log.error("TLS certificate not reloaded, the old one keeps serving: %s", exc)
            return False
        with _files(pair) as (cert_file, key_file):
            for ctx in self._contexts.values():
                ctx.load_cert_chain(cert_file, key_file)
        self._pair = pair
        self._seen = seen
        self._failed = None
        self.last_error = ""
        self.reloads["success"] += 1
        log.info(
            "TLS certificate reloaded from %s: %s, valid until %s",
            self.cert,
            ", ".join(pair.names) or pair.subject,
            _when(pair.not_after),
        )
        return True

    def status(self, now: float) -> dict[str, object]:
        """The certificate in force, for /v1/status."""
        return {
            "cert": str(self.cert),
            "subject": self.subject,
            "names": list(self.names),
            "not_after": _when(self.not_after),
            "days_left": round((self.not_after - now) / 86400, 1),
            "last_error": self.last_error or None,
            "reloads": dict(self.reloads),
        }


def open_store(tls: TLSConfig) -> CertStore | None:
    """The store of ``tls.cert`` and ``tls.key``; None when they are not configured. Raises
    :class:`CertError`. (The server keeps one, shared by its DoT, DoH and DoQ listeners.)"""
    if tls.cert is None or tls.key is None:
        return None
    return CertStore(tls.cert, tls.key)
