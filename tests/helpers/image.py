"""The container image as its Dockerfile describes it, read without a Docker engine: a small
Dockerfile reader, the stages, the final stage's ENTRYPOINT, CMD, HEALTHCHECK and ENV, and the
config the image copies (for the container, Compose and Kubernetes tests)."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .realservers import ROOT

DOCKERFILE = ROOT / "Dockerfile"


# --- A small Dockerfile reader --------------------------------------------------------


@dataclass
class Instruction:
    keyword: str  # upper case
    args: str  # the rest, continuation lines joined
    flags: dict[str, str] = field(default_factory=dict)  # --from=..., --interval=...

    def exec_form(self) -> list[str]:
        """The JSON array of an exec-form instruction (CMD, ENTRYPOINT, HEALTHCHECK CMD)."""
        text = self.args
        if self.keyword == "HEALTHCHECK":
            assert text.startswith("CMD "), text
            text = text[4:].strip()
        value = json.loads(text)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), text
        return value


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def one(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert len(found) == 1, f"expected one {keyword}, found {len(found)}"
        return found[0]


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages and their instructions. Comment lines (also inside continuations) are dropped,
    as Docker does; flags (--name=value) before the arguments are split off."""
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1].strip() + " "
            continue
        logical.append(current + line)
        current = ""
    assert not current, "the Dockerfile ends inside a continuation"
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        flags: dict[str, str] = {}
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            name, _, value = flag[2:].partition("=")
            flags[name] = value
            rest = rest.strip()
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
            continue
        if keyword == "ARG" and not stages:
            continue  # global ARG before the first FROM
        assert stages, f"{keyword} before FROM"
        stages[-1].instructions.append(Instruction(keyword, rest, flags))
    return stages


def key_values(args: str) -> dict[str, str]:
    """``KEY=value KEY2="quoted value"`` (ENV, LABEL, ARG) as a dict."""
    out = {}
    for word in shlex.split(args):
        key, sep, value = word.partition("=")
        assert sep, f"not KEY=value: {word!r}"
        out[key] = value
    return out


def copies(stage: Stage) -> list[tuple[list[str], str, str | None]]:
    """(sources, destination, --from stage) of each COPY."""
    out = []
    for ins in stage.all("COPY"):
        words = shlex.split(ins.args)
        out.append((words[:-1], words[-1], ins.flags.get("from")))
    return out


STAGES = parse_dockerfile(DOCKERFILE.read_text())
BUILDER = STAGES[0]
FINAL = STAGES[-1]
ENTRYPOINT = FINAL.one("ENTRYPOINT").exec_form()
CMD = FINAL.one("CMD").exec_form()
HEALTHCHECK = FINAL.one("HEALTHCHECK").exec_form()
ENV = key_values(FINAL.one("ENV").args)


def option(argv: list[str], name: str) -> str:
    """The value after ``name`` in an argv."""
    assert name in argv, f"{name} not in {argv}"
    return argv[argv.index(name) + 1]


def image_config_path() -> str:
    return option(ENTRYPOINT + CMD, "--config")


def context_source(destination: str) -> Path:
    """The repository file that the final stage copies to ``destination``."""
    for sources, dest, from_stage in copies(FINAL):
        if from_stage is None and len(sources) == 1 and dest.rstrip("/") == destination:
            return ROOT / sources[0]
    raise AssertionError(f"no COPY to {destination}")


def image_config() -> dict[str, object]:
    doc = yaml.safe_load(context_source(image_config_path()).read_text())
    assert isinstance(doc, dict)
    return doc


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])
