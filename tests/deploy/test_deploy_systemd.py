"""The systemd unit and host config of deploy/systemd/.

- ``systemd-analyze verify`` accepts the unit with no warning about it (an unknown or
  misspelled directive is only a warning, so warnings fail the test). Verify needs the
  ExecStart program to exist: a copy of the unit whose ExecStart names this machine's
  ``resolver`` is verified. Skipped without systemd-analyze (Debian package ``systemd``).
- ``systemd-analyze security --offline=yes`` rates the sandbox "OK" (exposure below 2.0).
- The hardening directives are the ones promised (as Unbound's unit), and the unit agrees
  with the host config: the config path, the lists beside it, the state, logs and audit
  directories, port 53 with only CAP_NET_BIND_SERVICE.
- ``resolver check`` accepts the host config with the shipped lists.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ..helpers.realservers import ROOT

UNIT = ROOT / "deploy" / "systemd" / "resolver.service"
HOST_CONFIG = ROOT / "deploy" / "systemd" / "resolver.yaml"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze not found: apt-get install systemd"
)


def directives() -> dict[str, list[str]]:
    """``Key=value`` lines of the unit, by key (a key may repeat), across sections."""
    out: dict[str, list[str]] = {}
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def one(key: str) -> str:
    values = directives()[key]
    assert len(values) == 1, f"{key} given {len(values)} times"
    return values[0]


def runnable_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart naming the resolver command found here."""
    found = shutil.which("resolver")
    program = found or str(Path(sys.executable).parent / "resolver")
    if not os.access(program, os.X_OK):
        pytest.skip("the resolver command is not installed (pip install -e .)")
    text = UNIT.read_text()
    assert "ExecStart=/usr/local/bin/resolver " in text
    copy = tmp_path / "resolver.service"
    copy.write_text(text.replace("ExecStart=/usr/local/bin/resolver ", f"ExecStart={program} "))
    return copy


@needs_analyze
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    assert ANALYZE is not None
    unit = runnable_copy(tmp_path)
    result = subprocess.run(
        [ANALYZE, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    about_unit = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if "resolver.service" in line or str(tmp_path) in line
    ]
    assert result.returncode == 0, result.stdout + result.stderr
    assert about_unit == []


@needs_analyze
def test_systemd_analyze_verify_catches_a_misspelling(tmp_path: Path) -> None:
    """The check above is live: a misspelled directive shows as a warning."""
    assert ANALYZE is not None
    unit = runnable_copy(tmp_path)
    unit.write_text(unit.read_text().replace("ProtectClock=", "ProtectClok="))
    result = subprocess.run(
        [ANALYZE, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert "ProtectClok" in result.stdout + result.stderr


@needs_analyze
def test_systemd_analyze_security_rates_the_sandbox_ok(tmp_path: Path) -> None:
    assert ANALYZE is not None
    unit = runnable_copy(tmp_path)
    result = subprocess.run(
        [ANALYZE, "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if "--offline" in result.stderr and result.returncode != 0:
        pytest.skip(f"this systemd-analyze has no --offline: {result.stderr.strip()}")
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) < 2.0, match.group(0)


def test_hardening_directives() -> None:
    expected = {
        "Type": "simple",
        "DynamicUser": "yes",
        "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "ProtectClock": "yes",
        "ProtectHostname": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX AF_NETLINK",
        "RestrictNamespaces": "yes",
        "RestrictRealtime": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "SystemCallArchitectures": "native",
        "StateDirectory": "resolver",
        "LogsDirectory": "resolver",
        "ConfigurationDirectory": "resolver",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "Restart": "on-failure",
        "KillSignal": "SIGTERM",
    }
    for key, value in expected.items():
        assert one(key) == value, key
    assert directives()["SystemCallFilter"][0] == "@system-service"
    assert "RESOLVER_STATE_DIR=%S/resolver" in directives()["Environment"]
    assert one("WantedBy") == "multi-user.target"


def test_unit_and_host_config_agree() -> None:
    start = one("ExecStart").split()
    assert start[:2] == ["/usr/local/bin/resolver", "serve"]
    config_path = Path(start[start.index("--config") + 1])
    assert config_path == Path("/etc") / one("ConfigurationDirectory") / "resolver.yaml"
    config = yaml.safe_load(HOST_CONFIG.read_text())
    # The lists live beside the config, in the configuration directory.
    lists = Path(os.path.normpath(config_path.parent / config["blocklists"]))
    assert lists.parent == config_path.parent
    # State from the unit's environment (StateDirectory=), not from the file.
    assert "state_dir" not in config
    # The audit log goes to LogsDirectory= (writable under ProtectSystem=strict).
    assert config["audit"]["sink"] == "file"
    assert Path(config["audit"]["path"]).parent == Path("/var/log") / one("LogsDirectory")
    # Port 53, which CAP_NET_BIND_SERVICE allows; explicit addresses, no wildcard.
    for address in config["listen"]:
        host, port = address.rsplit(":", 1)
        assert port == "53"
        assert host.strip("[]") not in ("0.0.0.0", "::", "127.0.0.53", "127.0.0.54")
    # Admin and metrics on loopback: no token in the file.
    assert config["admin"]["listen"].startswith("127.0.0.1:") and "token" not in config["admin"]
    assert config["metrics"]["listen"].startswith("127.0.0.1:")


def check_installed(root: Path) -> subprocess.CompletedProcess[str]:
    """``resolver check`` of ``root``/etc/resolver/resolver.yaml (written by the caller),
    with the shipped lists copied beside it, as installed."""
    etc = root / "etc" / "resolver"
    shutil.copytree(ROOT / "blocklists", etc / "blocklists")
    return subprocess.run(
        [sys.executable, "-m", "resolver", "check", "--config", str(etc / "resolver.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=root,
    )


def test_host_config_passes_check(tmp_path: Path) -> None:
    """As installed: /etc/resolver/resolver.yaml with the shipped lists beside it."""
    etc = tmp_path / "etc" / "resolver"
    etc.mkdir(parents=True)
    shutil.copy(HOST_CONFIG, etc / "resolver.yaml")
    result = check_installed(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{etc / 'blocklists'}: ok: " in result.stdout


# --- Encrypted DNS: the drop-in that passes the TLS key as a credential ------------------

DROP_IN = ROOT / "deploy" / "systemd" / "encrypted-dns.conf"


def encrypted_config() -> dict[str, object]:
    """The host config with its commented encrypted-DNS block (tls: to the blank line)
    uncommented, as docs/encrypted-dns.md tells the operator to do."""
    lines = HOST_CONFIG.read_text().splitlines()
    start = lines.index("# tls:")
    end = lines.index("", start)
    block = [line.removeprefix("# ") for line in lines[start:end]]
    config: dict[str, object] = yaml.safe_load("\n".join(lines[:start] + block + lines[end:]))
    return config


def drop_in_copy(tmp_path: Path, text: str | None = None) -> Path:
    unit = runnable_copy(tmp_path)
    folder = tmp_path / "resolver.service.d"
    folder.mkdir()
    (folder / DROP_IN.name).write_text(DROP_IN.read_text() if text is None else text)
    return unit


@needs_analyze
def test_systemd_analyze_verify_with_the_credential_drop_in(tmp_path: Path) -> None:
    assert ANALYZE is not None
    unit = drop_in_copy(tmp_path)
    result = subprocess.run(
        [ANALYZE, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert [line for line in output.splitlines() if str(tmp_path) in line] == []
    # Live: the drop-in is read (a misspelling in it is reported).
    broken = tmp_path / "broken"
    broken.mkdir()
    unit = drop_in_copy(broken, DROP_IN.read_text().replace("LoadCredential=", "LoadCredentail="))
    result = subprocess.run(
        [ANALYZE, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert "LoadCredentail" in result.stdout + result.stderr


def test_the_config_reads_the_key_from_the_credentials_directory() -> None:
    (credential,) = [
        line.split("=", 1)[1]
        for line in DROP_IN.read_text().splitlines()
        if line.startswith("LoadCredential=")
    ]
    name, source = credential.split(":", 1)
    config = encrypted_config()
    tls = config["tls"]
    assert isinstance(tls, dict)
    # $CREDENTIALS_DIRECTORY of resolver.service, written out (the config takes no variables).
    assert tls["key"] == f"/run/credentials/{UNIT.name}/{name}"
    # On disk, key and certificate live in the configuration directory.
    etc = Path("/etc") / one("ConfigurationDirectory")
    assert Path(source).parent == Path(tls["cert"]).parent == etc / "tls"
    # Ports 853 and 443: CAP_NET_BIND_SERVICE allows them.
    ports = {
        key: [a.rsplit(":", 1)[1] for a in config[key]["listen"]] for key in ("dot", "doh", "doq")
    }  # type: ignore[index]
    assert ports == {"dot": ["853"], "doh": ["443"], "doq": ["853"]}


def test_host_config_with_encrypted_dns_passes_check(tmp_path: Path) -> None:
    etc = tmp_path / "etc" / "resolver"
    etc.mkdir(parents=True)
    (etc / "resolver.yaml").write_text(yaml.safe_dump(encrypted_config()))
    result = check_installed(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
