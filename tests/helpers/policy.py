"""Inputs for the policy tests: list files written into a folder, and instants in UTC."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path


def utc(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
