"""A bounded atheris run over the wire code and the synchronous query path (fuzz/)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(
    importlib.util.find_spec("atheris") is None,
    reason="atheris not installed (.ci/run installs it)",
)
def test_fuzz_the_parsers_for_a_bounded_time(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    shutil.copytree(ROOT / "fuzz" / "corpus", corpus)  # the fuzzer adds to its corpus
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "fuzz" / "fuzz_wire.py"),
            str(corpus),
            "-max_total_time=15",
            "-timeout=5",
            f"-artifact_prefix={tmp_path}/",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done" in result.stderr
