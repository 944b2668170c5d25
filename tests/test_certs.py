"""The certificate store (service/certs.py), client ids from TLS server names, and EDNS
padding of answers (core/padding.py)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import dns.edns
import dns.message
import pytest

from resolver.core.padding import RESPONSE_BLOCK, pad_response, wants_padding
from resolver.service.certs import CertError, CertStore, client_id_from_sni

from .helpers.testca import TestCA


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path)


def pair(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "cert.pem", tmp_path / "key.pem"


def test_a_good_pair_loads_with_its_names_and_expiry(tmp_path: Path, ca: TestCA) -> None:
    cert, key = pair(tmp_path)
    leaf = ca.issue(cert, key, days=20)
    store = CertStore(cert, key)
    assert store.names == ("dot.test", "*.dot.test", "127.0.0.1")
    assert store.not_after == leaf.not_valid_after_utc.timestamp()
    assert 19.9 < store.status(time.time())["days_left"] <= 20  # type: ignore[operator]
    ctx = store.context(["dot"])
    assert store.context(("dot",)) is ctx  # one per ALPN set, kept
    assert store.context(["h2", "http/1.1"]) is not ctx


@pytest.mark.parametrize(
    ("issue", "file", "words"),
    [
        ({"other_key": True}, "key", "does not match the certificate"),
        ({"days": -1, "starts": -3}, "cert", "expired on"),
        ({"starts": 2, "days": 5}, "cert", "not valid before"),
    ],
    ids=["key-mismatch", "expired", "not-yet-valid"],
)
def test_a_bad_pair_is_an_error_naming_the_file(
    tmp_path: Path, ca: TestCA, issue: dict[str, object], file: str, words: str
) -> None:
    cert, key = pair(tmp_path)
    ca.issue(cert, key, **issue)  # type: ignore[arg-type]
    with pytest.raises(CertError) as caught:
        CertStore(cert, key)
    assert str(cert if file == "cert" else key) in str(caught.value)
    assert words in str(caught.value)


def test_unreadable_and_non_pem_files_are_errors_naming_the_file(
    tmp_path: Path, ca: TestCA
) -> None:
    cert, key = pair(tmp_path)
    ca.issue(cert, key)
    with pytest.raises(CertError, match=f"{tmp_path / 'missing.pem'}: cannot read"):
        CertStore(tmp_path / "missing.pem", key)
    der = tmp_path / "key.der"
    der.write_bytes(b"\x30\x82\x01\x0a" + os.urandom(100))
    with pytest.raises(CertError, match=f"{der}: not a PEM file"):
        CertStore(cert, der)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text(
        "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n"
    )
    with pytest.raises(CertError, match=f"{garbage}: not a PEM certificate"):
        CertStore(garbage, key)


def test_reload_takes_a_renewal_and_keeps_the_old_pair_on_a_bad_one(
    tmp_path: Path, ca: TestCA
) -> None:
    cert, key = pair(tmp_path)
    ca.issue(cert, key, days=10)
    store = CertStore(cert, key)
    store.context(["dot"])
    assert store.reload_if_changed() is False  # nothing changed
    first = store.not_after
    ca.issue(cert, key, names=("renewed.test",), days=40)
    assert store.reload_if_changed() is True
    assert store.names == ("renewed.test",) and store.not_after > first
    assert store.reloads["success"] == 1
    ca.issue(cert, key, names=("bad.test",), other_key=True)
    assert store.reload_if_changed() is False
    assert store.names == ("renewed.test",)  # the old pair keeps serving
    assert str(key) in store.last_error and "does not match" in store.last_error
    assert store.reloads["failure"] == 1
    assert store.reload_if_changed() is False  # the same bad files: not tried again
    assert store.reloads["failure"] == 1
    assert store.reload_if_changed(force=True) is False  # SIGHUP tries again
    assert store.reloads["failure"] == 2
    ca.issue(cert, key, names=("fixed.test",))
    assert store.reload_if_changed() is True
    assert store.names == ("fixed.test",) and store.last_error == ""


@pytest.mark.parametrize(
    ("name", "domain", "expected"),
    [
        ("laptop-7.dot.test", "dot.test", "laptop-7"),
        ("LAPTOP.Dot.Test.", "dot.test.", "laptop"),
        ("dot.test", "dot.test", ""),
        ("a.b.dot.test", "dot.test", ""),
        ("laptop.other.test", "dot.test", ""),
        ("x_y.dot.test", "dot.test", ""),
        ("-x.dot.test", "dot.test", ""),
        (None, "dot.test", ""),
        ("laptop.dot.test", "", ""),
        ("a" * 64 + ".dot.test", "dot.test", ""),
    ],
)
def test_client_id_from_sni(name: str | None, domain: str, expected: str) -> None:
    assert client_id_from_sni(name, domain) == expected


def _answer_for(query: dns.message.Message, extra: int = 0) -> bytes:
    response = dns.message.make_response(query)
    response.use_edns(0, options=[])
    response.answer.append(
        dns.rrset.from_text(
            "www.example.test.",
            60,
            "IN",
            "TXT",
            " ".join(['"' + "x" * 200 + '"'] * (extra // 200) + ['"' + "x" * (extra % 200) + '"']),
        )
    )
    return response.to_wire()


@pytest.mark.parametrize("extra", [0, 100, 460, 1000])
def test_answers_are_padded_to_blocks_of_468_when_the_query_asks(extra: int) -> None:
    padded_query = dns.message.make_query(
        "www.example.test", "TXT", use_edns=0, options=[dns.edns.GenericOption(12, b"\0" * 8)]
    )
    plain_query = dns.message.make_query("www.example.test", "TXT", use_edns=0)
    assert wants_padding(padded_query.to_wire())
    assert not wants_padding(plain_query.to_wire())
    assert not wants_padding(dns.message.make_query("x.test", "A").to_wire())
    answer = _answer_for(padded_query, extra)
    out = pad_response(answer)
    assert len(out) % RESPONSE_BLOCK == 0
    parsed = dns.message.from_wire(out)
    assert parsed.answer == dns.message.from_wire(answer).answer
    assert [o.otype for o in parsed.options] == [12]
    assert pad_response(out) == out  # padding again replaces the old padding


def test_answers_without_opt_or_unreadable_are_left_alone() -> None:
    query = dns.message.make_query("www.example.test", "A", use_edns=False)
    answer = dns.message.make_response(query).to_wire()
    assert pad_response(answer) == answer
    assert pad_response(b"\x00\x01") == b"\x00\x01"
    broken = answer[:10] + b"\x00\x01" + answer[12:]  # one additional record, not there
    assert pad_response(broken) == broken
