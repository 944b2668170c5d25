"""The Kubernetes manifests of deploy/kubernetes/, checked without a cluster.

- kubernetes-validate (``pip install kubernetes-validate``; skipped without it) validates
  every built-in resource strictly (unknown fields are errors) against the newest schema
  it has and against 1.26, the oldest version the manifests claim (UDP and TCP on one
  LoadBalancer Service). It has no schema for the Prometheus Operator's ServiceMonitor and
  PrometheusRule, nor for Kustomization: those get structural checks instead.
- Structure: replicas and the autoscaler, spreading over nodes, the security context,
  probes, that the PodDisruptionBudget and Services select the Deployment's pods, that
  every port agrees with the config the pods read, ConfigMaps mounted as directories,
  emptyDirs for state and /tmp, no namespace anywhere, kustomization listing every file.
- The generated files (ConfigMaps, PrometheusRule) are up to date with their sources
  (blocklists/ verbatim, the container config, deploy/prometheus/rules.yml).
- The pod, emulated: the ConfigMaps are laid out the way the kubelet writes them (files
  behind a ``..data`` symlink), the container's args start the resolver, the probes' own
  commands run against it and pass, and a ConfigMap update (the ``..data`` swap) is
  picked up by the running resolver without a restart.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import dns.rcode
import pytest
import yaml

from ..helpers.fakeupstream import FakeUpstream
from ..helpers.image import ENTRYPOINT, FINAL, option, port_of
from ..helpers.image import ENV as IMAGE_ENV
from ..helpers.realservers import ROOT, ResolverProcess, free_port
from ..helpers.tls import make_certificate

K8S = ROOT / "deploy" / "kubernetes"
MONITORING = K8S / "monitoring"
VALIDATE = shutil.which("kubernetes-validate")
needs_validate = pytest.mark.skipif(
    VALIDATE is None, reason="kubernetes-validate not found: pip install kubernetes-validate"
)
NO_SCHEMA_KINDS = {"ServiceMonitor", "PrometheusRule", "Kustomization"}


def manifests() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml"))


def documents() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in manifests():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                yield path, doc


def kinds_in(path: Path) -> set[str]:
    return {doc["kind"] for doc in yaml.safe_load_all(path.read_text()) if doc}


def resource(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        doc
        for _, doc in documents()
        if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def load_generator() -> Any:
    spec = importlib.util.spec_from_file_location("k8s_generate", K8S / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DEPLOYMENT = resource("Deployment", "resolver")
POD = DEPLOYMENT["spec"]["template"]["spec"]
POD_LABELS = DEPLOYMENT["spec"]["template"]["metadata"]["labels"]
(CONTAINER,) = POD["containers"]
CONFIG_MAP = resource("ConfigMap", "resolver-config")
POD_CONFIG = yaml.safe_load(CONFIG_MAP["data"]["resolver.yaml"])


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def container_port(name: str) -> dict[str, Any]:
    (port,) = [p for p in CONTAINER["ports"] if p["name"] == name]
    return port


def mount(name: str) -> dict[str, Any]:
    (found,) = [m for m in CONTAINER["volumeMounts"] if m["name"] == name]
    return found


def volume(name: str) -> dict[str, Any]:
    (found,) = [v for v in POD["volumes"] if v["name"] == name]
    return found


# --- Schema validation -----------------------------------------------------------------


@needs_validate
@pytest.mark.parametrize("version", [None, "1.26"], ids=["newest", "1.26"])
def test_kubernetes_validate_strict(version: str | None) -> None:
    assert VALIDATE is not None
    files = [p for p in manifests() if not kinds_in(p) & NO_SCHEMA_KINDS]
    assert {p.name for p in files} >= {
        "deployment.yaml",
        "service.yaml",
        "pdb.yaml",
        "hpa.yaml",
        "configmap-config.yaml",
        "configmap-blocklists.yaml",
    }
    extra = ["-k", version] if version else []
    result = subprocess.run(
        [VALIDATE, "--strict", *extra, *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed for resource") == 8, result.stdout


@needs_validate
def test_kubernetes_validate_catches_a_mistake(tmp_path: Path) -> None:
    """The validator is live: a Deployment with a misspelled field is rejected."""
    assert VALIDATE is not None
    broken = (K8S / "deployment.yaml").read_text().replace("readOnlyRootFilesystem", "readOnlyRoot")
    (tmp_path / "deployment.yaml").write_text(broken)
    result = subprocess.run(
        [VALIDATE, "--strict", str(tmp_path / "deployment.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0


def test_custom_resources_have_the_operator_shape() -> None:
    """No schema for these: the fields the Prometheus Operator needs, checked by hand."""
    monitor = resource("ServiceMonitor")
    rule = resource("PrometheusRule")
    for doc in (monitor, rule):
        assert doc["apiVersion"] == "monitoring.coreos.com/v1"
        assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(monitor["spec"]) == {"jobLabel", "selector", "endpoints"}
    for endpoint in monitor["spec"]["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}
    assert set(rule["spec"]) == {"groups"}
    for group in rule["spec"]["groups"]:
        assert set(group) <= {"name", "interval", "rules"}
        for r in group["rules"]:
            assert set(r) <= {"alert", "record", "expr", "for", "labels", "annotations"}
            assert isinstance(r["expr"], str)


# --- Structure ---------------------------------------------------------------------------


def test_no_namespace_and_kustomizations_list_every_manifest() -> None:
    for path, doc in documents():
        assert "namespace" not in doc.get("metadata", {}), path
    listed = []
    for kustomization in (K8S / "kustomization.yaml", MONITORING / "kustomization.yaml"):
        doc = yaml.safe_load(kustomization.read_text())
        assert doc["kind"] == "Kustomization" and "namespace" not in doc
        listed += [kustomization.parent / r for r in doc["resources"]]
    expected = [p for p in manifests() if p.name != "kustomization.yaml"]
    assert sorted(listed) == expected
    # The CRD kinds live apart, so that the core applies on clusters without the operator.
    core = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    kinds = {yaml.safe_load((K8S / r).read_text().split("\n---")[0])["kind"] for r in core}
    assert not kinds & NO_SCHEMA_KINDS
    images = yaml.safe_load((K8S / "kustomization.yaml").read_text())["images"]
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert images == [{"name": "dns-filtering-resolver", "newTag": version}]
    assert CONTAINER["image"] == f"dns-filtering-resolver:{version}"


def test_replicas_spread_and_autoscaling() -> None:
    spec = DEPLOYMENT["spec"]
    assert spec["replicas"] >= 2
    assert selects(spec["selector"]["matchLabels"], POD_LABELS)
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    by_node = [
        c for c in POD["topologySpreadConstraints"] if c["topologyKey"] == "kubernetes.io/hostname"
    ]
    assert by_node and by_node[0]["whenUnsatisfiable"] == "DoNotSchedule"
    assert by_node[0]["maxSkew"] == 1
    assert selects(by_node[0]["labelSelector"]["matchLabels"], POD_LABELS)
    hpa = resource("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "resolver",
    }
    assert hpa["spec"]["minReplicas"] == spec["replicas"] < hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert "cpu" in CONTAINER["resources"]["requests"]  # utilization needs a request
    pdb = resource("PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"] == spec["selector"]


def test_security_context() -> None:
    pod = POD["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert isinstance(pod["runAsUser"], int) and pod["runAsUser"] > 0
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "sysctls" not in pod  # the pod listens on a high port instead
    ctx = CONTAINER["securityContext"]
    assert ctx["runAsNonRoot"] is True
    assert ctx["runAsUser"] == pod["runAsUser"]
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    assert POD["automountServiceAccountToken"] is False
    assert "hostNetwork" not in POD
    # The image's user.
    assert FINAL.one("USER").args == f"{pod['runAsUser']}:{pod['runAsGroup']}"


def test_config_volumes_are_directories_and_state_and_tmp_are_empty_dirs() -> None:
    for mount_ in CONTAINER["volumeMounts"]:
        assert "subPath" not in mount_ and "subPathExpr" not in mount_
    config_path = option(CONTAINER["args"], "--config")
    assert CONTAINER["args"][0] == "serve"
    assert mount("config")["mountPath"] == str(Path(config_path).parent)
    assert mount("config")["readOnly"] is True
    assert volume("config")["configMap"]["name"] == "resolver-config"
    assert Path(config_path).name in CONFIG_MAP["data"]
    blocklists = os.path.normpath(Path(config_path).parent / POD_CONFIG["blocklists"])
    assert mount("blocklists")["mountPath"] == blocklists
    assert volume("blocklists")["configMap"]["name"] == "resolver-blocklists"
    # State: the image's RESOLVER_STATE_DIR, writable; /tmp writable.
    assert mount("state")["mountPath"] == IMAGE_ENV["RESOLVER_STATE_DIR"]
    assert "emptyDir" in volume("state")
    assert mount("tmp")["mountPath"] == "/tmp" and "emptyDir" in volume("tmp")
    # Every mount path that the read-only root filesystem needs writable is an emptyDir.
    writable = {m["mountPath"] for m in CONTAINER["volumeMounts"] if not m.get("readOnly")}
    assert {m["name"] for m in CONTAINER["volumeMounts"] if m.get("readOnly")} == {
        "config",
        "blocklists",
        "tls",
    }
    assert writable == {IMAGE_ENV["RESOLVER_STATE_DIR"], "/tmp"}


def test_the_certificate_comes_from_a_tls_secret_mounted_read_only() -> None:
    tls = volume("tls")["secret"]
    assert tls["secretName"] == "resolver-tls"
    assert tls["defaultMode"] == 0o440  # the key: the pod's group (fsGroup) only
    assert POD["securityContext"]["fsGroup"] == POD["securityContext"]["runAsGroup"]
    assert mount("tls")["readOnly"] is True
    # The config names the keys of a kubernetes.io/tls Secret, inside that mount.
    config_dir = Path(option(CONTAINER["args"], "--config")).parent
    for key, name in (("cert", "tls.crt"), ("key", "tls.key")):
        path = Path(os.path.normpath(config_dir / POD_CONFIG["tls"][key]))
        assert path == Path(mount("tls")["mountPath"]) / name


def test_ports_agree_with_the_config() -> None:
    dns_port = {port_of(a) for a in POD_CONFIG["listen"]}
    assert dns_port == {container_port("dns-udp")["containerPort"]}
    assert container_port("dns-udp")["protocol"] == "UDP"
    assert container_port("dns-tcp")["protocol"] == "TCP"
    assert container_port("dns-tcp")["containerPort"] == container_port("dns-udp")["containerPort"]
    assert port_of(POD_CONFIG["metrics"]["listen"]) == container_port("metrics")["containerPort"]
    # DNS Service: 53 over UDP and TCP to the named container ports; client addresses kept.
    dns_service = resource("Service", "resolver")
    assert selects(dns_service["spec"]["selector"], POD_LABELS)
    ports = {(p["port"], p["protocol"], p["targetPort"]) for p in dns_service["spec"]["ports"]}
    assert ports == {
        (53, "UDP", "dns-udp"),
        (53, "TCP", "dns-tcp"),
        (853, "TCP", "dot"),
        (853, "UDP", "doq"),
        (443, "TCP", "doh"),
    }
    # Encrypted DNS: each listener of the config is a container port of its protocol.
    for key, name, protocol in (
        ("dot", "dot", "TCP"),
        ("doq", "doq", "UDP"),
        ("doh", "doh", "TCP"),
    ):
        assert {port_of(a) for a in POD_CONFIG[key]["listen"]} == {
            container_port(name)["containerPort"]
        }
        assert container_port(name)["protocol"] == protocol
    assert dns_service["spec"]["externalTrafficPolicy"] == "Local"
    # Metrics Service, and the ServiceMonitor that scrapes it as job "resolver".
    metrics_service = resource("Service", "resolver-metrics")
    assert selects(metrics_service["spec"]["selector"], POD_LABELS)
    (port,) = metrics_service["spec"]["ports"]
    assert port["targetPort"] == "metrics"
    monitor = resource("ServiceMonitor")["spec"]
    selector = monitor["selector"]["matchLabels"]
    assert selects(selector, metrics_service["metadata"]["labels"])
    assert not selects(selector, dns_service["metadata"]["labels"])
    assert [e["port"] for e in monitor["endpoints"]] == [port["name"]]
    assert monitor["endpoints"][0]["path"] == "/metrics"
    job = metrics_service["metadata"]["labels"][monitor["jobLabel"]]
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    assert job == scrape["scrape_configs"][0]["job_name"] == "resolver"
    assert 'up{job="resolver"}' in (ROOT / "deploy" / "prometheus" / "rules.yml").read_text()
    # Admin: loopback only, no token, not a container port.
    assert POD_CONFIG["admin"]["listen"].startswith("127.0.0.1:")
    assert "token" not in POD_CONFIG["admin"]
    assert all(
        p["containerPort"] != port_of(POD_CONFIG["admin"]["listen"]) for p in CONTAINER["ports"]
    )


def test_network_policy_opens_dns_to_all_and_metrics_to_the_cluster_only() -> None:
    policy = resource("NetworkPolicy", "resolver")["spec"]
    assert selects(policy["podSelector"]["matchLabels"], POD_LABELS)
    assert policy["policyTypes"] == ["Ingress"]
    rules = {
        tuple(sorted(p["port"] for p in rule["ports"])): rule.get("from")
        for rule in policy["ingress"]
    }
    # Every container port is covered by name; the admin port by none (it is loopback).
    dns_ports = ("dns-tcp", "dns-udp", "doh", "doq", "dot")
    assert rules == {dns_ports: None, ("metrics",): [{"namespaceSelector": {}}]}
    named = {p["name"] for p in CONTAINER["ports"]}
    assert named == {"dns-udp", "dns-tcp", "dot", "doq", "doh", "metrics"}


def probe_commands() -> dict[str, list[str]]:
    return {
        kind: CONTAINER[f"{kind}Probe"]["exec"]["command"]
        for kind in ("startup", "liveness", "readiness")
    }


def test_probes_ask_the_resolver_itself_and_readyz() -> None:
    probes = probe_commands()
    dns_port = container_port("dns-udp")["containerPort"]
    for kind in ("startup", "liveness"):
        command = probes[kind]
        assert command[:2] == [ENTRYPOINT[0], "healthcheck"]  # the image's resolver
        assert option(command, "--server") == f"127.0.0.1:{dns_port}"
        timeout = float(option(command, "--timeout"))
        assert CONTAINER[f"{kind}Probe"]["timeoutSeconds"] > timeout
    readiness = probes["readiness"]
    assert readiness[0] == str(Path(ENTRYPOINT[0]).parent / "python")
    admin = POD_CONFIG["admin"]["listen"]
    assert f"http://{admin}/readyz" in readiness[-1]
    assert CONTAINER["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"


def test_generated_files_are_up_to_date() -> None:
    generator = load_generator()
    for path, text in generator.generated().items():
        assert path.read_text() == text, (
            f"{path.relative_to(ROOT)} is out of date: run python3 deploy/kubernetes/generate.py"
        )


def test_blocklists_configmap_holds_the_shipped_lists_verbatim() -> None:
    data = resource("ConfigMap", "resolver-blocklists")["data"]
    shipped = {
        p.name: p.read_text()
        for p in (ROOT / "blocklists").iterdir()
        if p.suffix in (".yaml", ".yml") and not p.name.startswith(".")
    }
    assert data == shipped
    compose = (ROOT / "deploy" / "compose" / "config" / "resolver.yaml").read_text()
    assert CONFIG_MAP["data"] == {"resolver.yaml": compose + load_generator().ENCRYPTED}


def test_prometheus_rule_embeds_the_alert_rules() -> None:
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "rules.yml").read_text())
    assert resource("PrometheusRule")["spec"] == rules


# --- The pod, emulated ------------------------------------------------------------------


def write_configmap(mountpoint: Path, data: dict[str, str], stamp: str) -> None:
    """Lay out (or update) a ConfigMap volume as the kubelet does: the files in a hidden
    timestamped directory, ``..data`` pointing at it (swapped atomically by rename), and
    one symlink per key through ``..data``."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    payload = mountpoint / f"..{stamp}"
    payload.mkdir()
    for key, text in data.items():
        (payload / key).write_text(text)
    tmp_link = mountpoint / "..data_tmp"
    tmp_link.symlink_to(payload.name)
    old = (mountpoint / "..data").resolve() if (mountpoint / "..data").exists() else None
    os.replace(tmp_link, mountpoint / "..data")
    for key in data:
        link = mountpoint / key
        if not link.is_symlink():
            link.symlink_to(f"..data/{key}")
    for entry in mountpoint.iterdir():
        if entry.is_symlink() and not entry.name.startswith("..") and entry.name not in data:
            entry.unlink()
    if old is not None:
        shutil.rmtree(old)


def local_command(command: list[str]) -> list[str]:
    """An image command with the image's programs replaced by this environment's."""
    venv_bin = str(Path(ENTRYPOINT[0]).parent)
    if command[0] == ENTRYPOINT[0]:
        return [sys.executable, "-m", "resolver", *command[1:]]
    if command[0] == f"{venv_bin}/python":
        return [sys.executable, *command[1:]]
    return command


def test_pod_probes_pass_and_configmap_updates_are_reloaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "pod"
    config_mount = Path(mount("config")["mountPath"])
    lists_mount = Path(mount("blocklists")["mountPath"])
    lists = dict(resource("ConfigMap", "resolver-blocklists")["data"])
    # The encrypted listeners on free loopback ports (the pod's 8853 and 8443 may be taken
    # here); DoQ only where aioquic is installed (the image has it: the quic extra).
    pod_config = yaml.safe_load(CONFIG_MAP["data"]["resolver.yaml"])
    dot_port, doq_port, doh_port = free_port(), free_port(), free_port()
    pod_config["dot"]["listen"] = [f"127.0.0.1:{dot_port}"]
    pod_config["doh"]["listen"] = [f"127.0.0.1:{doh_port}"]
    quic = importlib.util.find_spec("aioquic") is not None
    if quic:
        pod_config["doq"]["listen"] = [f"127.0.0.1:{doq_port}"]
    else:
        del pod_config["doq"]
    write_configmap(
        root / config_mount.relative_to("/"),
        {"resolver.yaml": yaml.safe_dump(pod_config)},
        "2026_01_01_00_00_00.1",
    )
    write_configmap(root / lists_mount.relative_to("/"), lists, "2026_01_01_00_00_00.2")
    # The Secret resolver-tls, laid out by the kubelet as a ConfigMap is.
    made = tmp_path / "made"
    made.mkdir()
    make_certificate(made / "tls.crt", made / "tls.key", "resolver.example.test")
    write_configmap(
        root / Path(mount("tls")["mountPath"]).relative_to("/"),
        {name: (made / name).read_text() for name in ("tls.crt", "tls.key")},
        "2026_01_01_00_00_00.4",
    )
    state = root / Path(mount("state")["mountPath"]).relative_to("/")
    state.mkdir(parents=True)
    config_path = option(CONTAINER["args"], "--config")
    upstream = FakeUpstream(records={("example.org", "A"): ["192.0.2.1"]})
    port, admin_port, metrics_port = free_port(), free_port(), free_port()
    monkeypatch.setenv("RESOLVER_STATE_DIR", str(state))  # the image's ENV, moved
    proc = ResolverProcess(
        "--config",
        str(root / config_path.lstrip("/")),
        "--listen",
        f"127.0.0.1:{port}",
        "--admin",
        f"127.0.0.1:{admin_port}",
        "--metrics",
        f"127.0.0.1:{metrics_port}",
        "--upstream",
        upstream.address,
        ready=False,
    )
    try:
        proc.wait_for("listening on tcp", 30)
        dns_port = container_port("dns-udp")["containerPort"]
        admin = POD_CONFIG["admin"]["listen"]
        for kind, command in probe_commands().items():
            argv = [
                a.replace(f"127.0.0.1:{dns_port}", f"127.0.0.1:{port}").replace(
                    admin, f"127.0.0.1:{admin_port}"
                )
                for a in local_command(command)
            ]
            result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            assert result.returncode == 0, f"{kind} probe: {result.stdout}{result.stderr}"
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            assert b"resolver_build_info" in r.read()

        def rcode(name: str) -> int:
            query = dns.message.make_query(name, "A")
            return dns.query.udp(query, "127.0.0.1", port=port, timeout=3).rcode()

        assert rcode("example.org") == dns.rcode.NOERROR
        if quic:  # DNS over QUIC with the Secret's certificate
            query = dns.message.make_query("example.org", "A")
            reply = dns.query.quic(
                query,
                "127.0.0.1",
                port=doq_port,
                timeout=5,
                verify=str(made / "tls.crt"),
                server_hostname="resolver.example.test",
            )
            assert reply.rcode() == dns.rcode.NOERROR
        # A ConfigMap update: a new list arrives through the ..data swap.
        lists["k8s-test.yaml"] = "list: k8s-test\ndomains:\n  - example.org\n"
        write_configmap(root / lists_mount.relative_to("/"), lists, "2026_01_01_00_01_00.3")
        deadline = time.monotonic() + 20
        while rcode("example.org") != dns.rcode.NXDOMAIN:
            assert time.monotonic() < deadline, "\n".join(proc.lines)
            time.sleep(0.2)
        assert proc.proc.poll() is None  # reloaded, not restarted
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.finish(20) == 0
    finally:
        proc.stop()
        upstream.close()
