"""The resolver's command line run to completion (``python -m resolver check|explain|audit
...``), from the repository root, its output captured."""

from __future__ import annotations

import subprocess
import sys

from .realservers import ROOT


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "resolver", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
