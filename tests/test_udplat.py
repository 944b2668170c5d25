"""bench/udplat.c, the load of core_bench's latency runs, against a real server: what it
reports must be what happened (every query sent at the rate, answered, its rcode)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from .helpers.server import RunningServer

SOURCE = Path(__file__).resolve().parent.parent / "bench" / "udplat.c"


@pytest.fixture(scope="module")
def udplat(tmp_path_factory: pytest.TempPathFactory) -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler")
    binary = tmp_path_factory.mktemp("udplat") / "udplat"
    subprocess.run([compiler, "-O2", "-o", str(binary), str(SOURCE)], check=True, timeout=60)
    return binary


def run(udplat: Path, port: int, datafile: Path, rate: int, loop: bool) -> dict[str, object]:
    argv = [str(udplat), "127.0.0.1", str(port), str(datafile), str(rate), "1", "4"]
    done = subprocess.run(
        [*argv, "1" if loop else "0"], capture_output=True, text=True, timeout=30, check=True
    )
    report: dict[str, object] = json.loads(done.stdout)
    return report


def test_it_sends_at_the_rate_and_times_every_answer(
    udplat: Path, server: RunningServer, tmp_path: Path
) -> None:
    datafile = tmp_path / "queries.txt"
    datafile.write_text("chat.deepseek.com A\napi.deepseek.com AAAA\n")
    report = run(udplat, server.port, datafile, 2000, loop=True)
    assert report["sent"] == 2000  # one second at 2,000 a second
    assert report["answered"] == 2000 and report["lost"] == 0
    assert report["rcodes"] == {"NXDOMAIN": 2000}
    p50, p99, top = report["p50_ms"], report["p99_ms"], report["max_ms"]
    assert isinstance(p50, float) and isinstance(p99, float) and isinstance(top, float)
    assert 0 < p50 <= p99 <= top + 0.001  # (buckets of 1 us, read at their upper edge)


def test_once_through_the_file_and_silence_is_counted_as_lost(
    udplat: Path, server: RunningServer, tmp_path: Path
) -> None:
    datafile = tmp_path / "queries.txt"
    datafile.write_text("".join(f"n{i}.deepseek.com A\n" for i in range(300)))
    report = run(udplat, server.port, datafile, 1000, loop=False)
    assert report["sent"] == 300 and report["answered"] == 300
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # bound, never answers
    silent.bind(("127.0.0.1", 0))
    try:
        report = run(udplat, silent.getsockname()[1], datafile, 1000, loop=False)
    finally:
        silent.close()
    assert report["sent"] == 300 and report["answered"] == 0 and report["lost"] == 300
    assert report["p50_ms"] == -1 and report["p99_ms"] == -1  # lost: later than any answer
