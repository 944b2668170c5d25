"""The listeners' certificate: loaded from files, validated, reloaded when they change.

MINIMAL VERSION (helper Q, for DoQ): it follows the shared interface of issue 19 exactly so
that service/doq.py can be written against it; helper T's full module replaces it at merge.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509

log = logging.getLogger("resolver")


class CertError(Exception):
    """A certificate or key that cannot serve; the message names the file and the reason."""


def _stamp(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size


class CertStore:
    """A certificate and its key from files, with TLS server contexts that use them."""

    def __init__(self, cert: Path, key: Path) -> None:
        self._cert = cert
        self._key = key
        self._contexts: dict[tuple[str, ...], ssl.SSLContext] = {}
        self.not_after = 0.0
        self.names: tuple[str, ...] = ()
        self.last_error = ""
        self._stamps = self._validate()

    def _validate(self) -> tuple[tuple[int, int], tuple[int, int]]:
        try:
            stamps = _stamp(self._cert), _stamp(self._key)
            pem = self._cert.read_bytes()
        except OSError as exc:
            raise CertError(f"{exc.filename}: {exc.strerror}") from None
        try:
            cert = x509.load_pem_x509_certificate(pem)
        except ValueError:
            raise CertError(f"{self._cert}: not a PEM certificate") from None
        not_after = cert.not_valid_after_utc.timestamp()
        if not_after < time.time():
            raise CertError(f"{self._cert}: the certificate expired")
        probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            probe.load_cert_chain(self._cert, self._key)
        except (ssl.SSLError, OSError) as exc:
            raise CertError(f"{self._key}: does not match {self._cert} ({exc})") from None
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            names = tuple(san.value.get_values_for_type(x509.DNSName))
        except x509.ExtensionNotFound:
            names = ()
        self.not_after, self.names = not_after, names
        return stamps

    def context(self, alpn: Sequence[str]) -> ssl.SSLContext:
        """A server context for these ALPN protocols (TLS 1.2+), one per ALPN set."""
        key = tuple(alpn)
        ctx = self._contexts.get(key)
        if ctx is None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.set_alpn_protocols(list(alpn))
            ctx.load_cert_chain(self._cert, self._key)
            self._contexts[key] = ctx
        return ctx

    def reload_if_changed(self) -> bool:
        """New files on disk: validate, then load; on error keep the old pair."""
        try:
            if (_stamp(self._cert), _stamp(self._key)) == self._stamps:
                return False
            self._stamps = self._validate()
            for ctx in self._contexts.values():
                ctx.load_cert_chain(self._cert, self._key)
        except (CertError, OSError, ssl.SSLError) as exc:
            if str(exc) != self.last_error:
                log.error("keeping the loaded certificate: %s", exc)
            self.last_error = str(exc)
            return False
        self.last_error = ""
        return True


def client_id_from_sni(server_name: str | None, domain: str) -> str:
    """``{id}.{domain}`` as the TLS server name names the client ``id``; "" when none."""
    if not server_name or not domain:
        return ""
    name = server_name.lower().rstrip(".")
    suffix = "." + domain
    if not name.endswith(suffix):
        return ""
    ident = name[: -len(suffix)]
    return ident if ident and "." not in ident else ""
