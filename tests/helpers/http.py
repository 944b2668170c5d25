"""HTTP against a resolver's admin API and /metrics: requests, the admin token the tests
configure, the addresses a resolver process logs, and responses checked against the admin
API's OpenAPI description."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import jsonschema

from .realservers import ROOT, ResolverProcess

SPEC = json.loads((ROOT / "resolver" / "schema" / "admin.openapi.json").read_text())
TOKEN = "s3cret-token-for-tests"


def http(url: str, method: str = "GET", token: str | None = None) -> tuple[int, Any, str]:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read().decode()
            status = response.status
            ctype = response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        body = exc.read().decode()
        status = exc.code
        ctype = exc.headers.get("Content-Type", "")
    document = json.loads(body) if "json" in ctype else body
    return status, document, ctype


def scrape(metrics_port: int) -> tuple[str, dict[str, float]]:
    """The text of /metrics on ``metrics_port`` and its samples by series."""
    _, text, _ = http(f"http://127.0.0.1:{metrics_port}/metrics")
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return text, samples


def check_against_spec(path: str, method: str, status: int, document: Any) -> None:
    """The response must be one the OpenAPI description documents, with a body its schema
    accepts (OpenAPI 3.1 schemas are JSON Schema 2020-12)."""
    operation = SPEC["paths"][path][method.lower()]
    assert str(status) in operation["responses"], f"{method} {path} -> undocumented {status}"
    schema = operation["responses"][str(status)]["content"]["application/json"]["schema"]
    resolver_schema = {**schema, "components": SPEC["components"]}
    jsonschema.validate(document, resolver_schema, cls=jsonschema.Draft202012Validator)


def urls(proc: ResolverProcess) -> tuple[str, str]:
    log = "\n".join(proc.lines)
    admin = log.split("admin API on ")[1].split()[0].rstrip("/")
    metrics = log.split("metrics on ")[1].split()[0].rstrip("/")
    return admin, metrics
