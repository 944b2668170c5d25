"""The ``resolver`` command: ``serve`` and ``check``."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from . import __version__
from .config import Config, finish, load_config
from .policy import load_policy
from .yamlload import SourceError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resolver", description="A DNS filtering resolver with date-activated blocklists."
    )
    parser.add_argument("--version", action="version", version=f"resolver {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="answer DNS queries (UDP and TCP)")
    serve.add_argument("--config", type=Path, help="YAML config file (see deploy/resolver.yaml)")
    serve.add_argument(
        "--listen",
        action="append",
        metavar="HOST:PORT",
        help="listen address, repeatable (default 127.0.0.1:5353 and [::1]:5353)",
    )
    serve.add_argument(
        "--upstream",
        action="append",
        metavar="HOST[:PORT]",
        help="upstream resolver, repeatable, tried in order (default: /etc/resolv.conf)",
    )
    serve.add_argument("--blocklists", metavar="PATH", help="directory (or file) of list files")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])

    check = sub.add_parser("check", help="validate a config file and the lists it names")
    check.add_argument("--config", type=Path, help="YAML config file")
    check.add_argument("paths", nargs="*", type=Path, help="list files or directories")
    return parser


def _load(args: argparse.Namespace) -> Config:
    config = load_config(args.config) if args.config else Config()
    return config


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``resolver`` command; returns the exit code."""
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    return _check(args)


def _serve(args: argparse.Namespace) -> int:
    try:
        config = finish(_load(args), args.listen, args.upstream, args.blocklists)
    except (SourceError, ValueError) as exc:
        print(f"resolver: {exc}", file=sys.stderr)
        return 2
    level = (args.log_level or config.log_level).upper()
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s"
    )
    from .server import run

    return run(config)


def _check(args: argparse.Namespace) -> int:
    try:
        config = _load(args)
        paths = args.paths or [config.blocklists]
        now = time.time()
        for path in paths:
            policy = load_policy(path)
            print(f"{path}: ok: {policy.summary(now)}")
    except SourceError as exc:
        print(f"{exc}", file=sys.stderr)
        return 1
    return 0
