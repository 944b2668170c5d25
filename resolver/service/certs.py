"""The certificate of the encrypted listeners: a MINIMAL stand-in for helper T's module.

It implements the interface of HELPERS19.md (CertStore, CertError, client_id_from_sni) so
that the DoH listener can be built and tested on its own branch; T's module, which also
reloads changed files, replaces this one at merge.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509


class CertError(Exception):
    """A certificate or key that cannot serve; the message names the file and the reason."""


class CertStore:
    """A certificate and its key, loaded now, and one server context per ALPN set."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.cert = cert
        self.key = key
        self.last_error = ""
        self._contexts: dict[tuple[str, ...], ssl.SSLContext] = {}
        try:
            loaded = x509.load_pem_x509_certificate(cert.read_bytes())
        except (OSError, ValueError) as exc:
            raise CertError(f"{cert}: cannot read the certificate: {exc}") from None
        self.not_after = loaded.not_valid_after_utc.timestamp()
        try:
            san = loaded.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            self.names: tuple[str, ...] = tuple(san.value.get_values_for_type(x509.DNSName))
        except x509.ExtensionNotFound:
            self.names = ()
        self.context(())  # fails now, with the file named, if the key does not fit

    def context(self, alpn: Sequence[str]) -> ssl.SSLContext:
        """A server context (TLS 1.2+) offering these ALPN protocols; one per set, kept."""
        wanted = tuple(alpn)
        context = self._contexts.get(wanted)
        if context is None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            try:
                context.load_cert_chain(str(self.cert), str(self.key))
            except (OSError, ssl.SSLError) as exc:
                raise CertError(f"{self.key}: cannot load the key for {self.cert}: {exc}") from None
            if wanted:
                context.set_alpn_protocols(list(wanted))
            self._contexts[wanted] = context
        return context

    def reload_if_changed(self) -> bool:
        """Not in this stand-in (T's module reloads); nothing changes."""
        return False


def client_id_from_sni(server_name: str | None, domain: str) -> str:
    """``id`` of ``{id}.{domain}`` (one label); "" when there is none."""
    if not server_name or not domain:
        return ""
    name, domain = server_name.lower().rstrip("."), domain.lower().strip(".")
    head, dot, tail = name.partition(".")
    return head if dot and tail == domain and head else ""
