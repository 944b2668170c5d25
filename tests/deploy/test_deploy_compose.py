"""deploy/compose/compose.yaml (resolver, Prometheus, Grafana), checked without Docker.

- The services, their builds and pinned images, ports, and hardening.
- Every host path mounted exists in the repository (paths are relative to
  deploy/compose/), and lands where the container expects it: the resolver's config and
  lists directories are the image's (parsed from the Dockerfile), Prometheus gets its
  config and the shared rules side by side, Grafana its provisioning and the dashboard in
  the provider's directory.
- Prometheus scrapes the resolver service on the port its config serves /metrics on, as
  job ``resolver`` (what the alerts and the dashboard expect); its config is the shared
  deploy/prometheus/prometheus.yml but for the one target; Grafana's data source is the
  prometheus service.
- With promtool (Debian package ``prometheus``), the Prometheus container's
  /etc/prometheus is laid out from the mounts and ``promtool check config`` passes.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from ..helpers.image import FINAL, copies, image_config, image_config_path
from ..helpers.realservers import ROOT

COMPOSE_DIR = ROOT / "deploy" / "compose"
COMPOSE = yaml.safe_load((COMPOSE_DIR / "compose.yaml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
PROMTOOL = shutil.which("promtool")
INTERPOLATION = re.compile(r"\$\{(\w+):-([^}]*)\}")


def interpolate(text: str) -> str:
    """Compose's ``${VAR:-default}``, with the defaults (the environment is not read)."""
    assert "$" not in INTERPOLATION.sub("", text), f"unsupported interpolation in {text!r}"
    return INTERPOLATION.sub(lambda m: m.group(2), text)


def mounts(service: str) -> list[tuple[str, str, str]]:
    """(source, target, options) of a service's short-syntax volumes."""
    out = []
    for entry in SERVICES[service].get("volumes", []):
        source, target, *options = entry.split(":")
        out.append((source, target, ",".join(options)))
    return out


def bind_source(source: str) -> Path | None:
    """The host path of a bind mount (relative to the compose file), None for a volume."""
    if source.startswith((".", "/")):
        return Path(os.path.normpath(COMPOSE_DIR / source))
    return None


def host_path_for(service: str, target: str) -> Path:
    """The host path behind ``target`` in a service: a mount of it or of a parent."""
    for source, mounted, _ in mounts(service):
        host = bind_source(source)
        if host is not None and (target == mounted or target.startswith(mounted + "/")):
            return host / os.path.relpath(target, mounted)
    raise AssertionError(f"{service}: nothing mounted at {target}")


def published(service: str) -> list[tuple[str, int, int, str]]:
    """(host address, host port, container port, protocol) of a service's ports."""
    out = []
    for entry in SERVICES[service].get("ports", []):
        text = interpolate(str(entry))
        text, _, proto = text.partition("/")
        parts = text.split(":")
        address = parts[0] if len(parts) == 3 else ""
        out.append((address, int(parts[-2]), int(parts[-1]), proto or "tcp"))
    return out


def test_services_builds_and_images() -> None:
    assert set(SERVICES) == {"resolver", "prometheus", "grafana"}
    build = SERVICES["resolver"]["build"]
    assert Path(os.path.normpath(COMPOSE_DIR / build["context"])) == ROOT
    assert (COMPOSE_DIR / build["context"] / build["dockerfile"]).resolve() == ROOT / "Dockerfile"
    for name, service in SERVICES.items():
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and tag and tag != "latest", f"{name}: pin the image tag"
    version = re.search(r"ARG VERSION=(\S+)", (ROOT / "Dockerfile").read_text())
    assert version and SERVICES["resolver"]["image"].endswith(":" + version.group(1))
    for name in ("prometheus", "grafana"):
        assert set(SERVICES[name]["depends_on"]) <= set(SERVICES)


def test_every_mounted_host_path_exists_and_volumes_are_declared() -> None:
    declared = set(COMPOSE.get("volumes") or {})
    for name in SERVICES:
        for source, target, _ in mounts(name):
            assert target.startswith("/"), f"{name}: {target}"
            host = bind_source(source)
            if host is None:
                assert source in declared, f"{name}: volume {source} is not declared"
            else:
                assert host.exists(), f"{name}: {source} -> {host} does not exist"
                assert ROOT in host.parents, f"{name}: {source} leaves the repository"


def test_resolver_ports_mounts_and_hardening() -> None:
    config = image_config()
    listen_port = {int(a.rsplit(":", 1)[1]) for a in config["listen"]}
    ports = published("resolver")
    assert {(p[1], p[2], p[3]) for p in ports} == {
        (53, port, proto) for port in listen_port for proto in ("udp", "tcp")
    }
    # The config and the lists are mounted as directories, where the image reads them.
    config_dir = str(Path(image_config_path()).parent)
    lists_dir = os.path.normpath(Path(config_dir) / config["blocklists"])
    targets = {target: (source, opts) for source, target, opts in mounts("resolver")}
    assert bind_source(targets[config_dir][0]) == COMPOSE_DIR / "config"
    assert bind_source(targets[lists_dir][0]) == ROOT / "blocklists"
    assert targets[config_dir][1] == targets[lists_dir][1] == "ro"
    assert (COMPOSE_DIR / "config" / "resolver.yaml").is_file()
    # The image's default config is the file compose mounts.
    image_copies = {dest: srcs for srcs, dest, f in copies(FINAL) if f is None}
    assert image_copies[image_config_path()] == ["deploy/compose/config/resolver.yaml"]
    state = [t for s, t, _ in mounts("resolver") if bind_source(s) is None]
    assert state == ["/var/lib/resolver"]
    service = SERVICES["resolver"]
    assert service["read_only"] is True
    assert service["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in service["security_opt"]
    assert "/tmp" in service["tmpfs"]
    # Web UIs only on the host's loopback.
    for name in ("prometheus", "grafana"):
        assert all(p[0] == "127.0.0.1" for p in published(name)), name


def prometheus_config() -> tuple[Path, dict[str, Any]]:
    command = SERVICES["prometheus"]["command"]
    (flag,) = [c for c in command if c.startswith("--config.file=")]
    path = host_path_for("prometheus", flag.split("=", 1)[1])
    return path, yaml.safe_load(path.read_text())


def test_prometheus_scrapes_the_resolver_metrics_port_with_the_shared_rules() -> None:
    path, config = prometheus_config()
    assert path == COMPOSE_DIR / "prometheus.yml"
    (job,) = config["scrape_configs"]
    (static,) = job["static_configs"]
    metrics_port = int(image_config()["metrics"]["listen"].rsplit(":", 1)[1])
    assert static["targets"] == [f"resolver:{metrics_port}"]
    assert "resolver" in SERVICES
    # The shared config, but for the targets.
    shared = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    assert f"resolver:{metrics_port}" in shared["scrape_configs"][0]["static_configs"][0]["targets"]
    for doc in (shared, config):
        doc["scrape_configs"][0].pop("static_configs")
    assert config == shared
    # rule_files, relative to the config in the container, are the shared rules.
    command = SERVICES["prometheus"]["command"]
    config_target = next(c for c in command if c.startswith("--config.file=")).split("=", 1)[1]
    for rule_file in config["rule_files"]:
        target = str(Path(config_target).parent / rule_file)
        assert host_path_for("prometheus", target) == ROOT / "deploy" / "prometheus" / "rules.yml"


def test_grafana_gets_provisioning_dashboard_and_prometheus() -> None:
    provisioning = host_path_for("grafana", "/etc/grafana/provisioning")
    assert provisioning == ROOT / "deploy" / "grafana" / "provisioning"
    provider = yaml.safe_load((provisioning / "dashboards" / "resolver.yaml").read_text())
    dashboards = provider["providers"][0]["options"]["path"]
    mounted = [
        (bind_source(s), t)
        for s, t, _ in mounts("grafana")
        if t.startswith(dashboards + "/") and t.endswith(".json")
    ]
    assert mounted == [(ROOT / "deploy" / "grafana" / "dashboard.json", mounted[0][1])]
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())
    url = datasource["datasources"][0]["url"]
    match = re.fullmatch(r"http://(\w+):(\d+)", url)
    assert match and match.group(1) in SERVICES
    assert match.group(2) == "9090"  # Prometheus' own port in its image


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not found: apt-get install prometheus")
def test_promtool_checks_the_prometheus_container_config(tmp_path: Path) -> None:
    """/etc/prometheus as the container sees it, then ``promtool check config``."""
    assert PROMTOOL is not None
    for source, target, _ in mounts("prometheus"):
        host = bind_source(source)
        if host is None:
            continue
        dest = tmp_path / target.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(host, dest)
    result = subprocess.run(
        [PROMTOOL, "check", "config", str(tmp_path / "etc" / "prometheus" / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr
