"""The ``resolver`` command: ``serve``, ``check``, ``explain`` and ``healthcheck``;
``audit`` is handed to :mod:`.audit`, which has its own arguments."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import dns.exception

from .. import __version__
from ..config import DEFAULT_LISTEN, Config, finish, load_config
from ..config.load import read_config
from ..config.model import EditsConfig
from ..policy import ClientGroups, LoadOptions, Policy, load_policy
from ..policy.explain import explain, parse_moment, render_text
from ..policy.loader import fault
from ..policy.model import DOMAIN, SUBDOMAINS
from ..yamlload import SourceError
from .rules import add_parser as rules_parser
from .rulesfile import edit_problems


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resolver", description="A DNS filtering resolver with date-activated blocklists."
    )
    parser.add_argument("--version", action="version", version=f"resolver {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "audit",
        add_help=False,
        help="report which clients hit which lists, from audit log files (see audit --help)",
    )

    serve = sub.add_parser("serve", help="answer DNS queries (UDP and TCP)")
    serve.add_argument("--config", type=Path, help="YAML config file (see deploy/resolver.yaml)")
    serve.add_argument(
        "--listen",
        action="append",
        metavar="HOST:PORT",
        help="listen address, repeatable (default "
        + " and ".join(str(listen) for listen in DEFAULT_LISTEN)
        + ")",
    )
    serve.add_argument(
        "--upstream",
        action="append",
        metavar="HOST[:PORT]",
        help="upstream resolver, repeatable, tried in order (default: /etc/resolv.conf)",
    )
    serve.add_argument("--blocklists", metavar="PATH", help="directory (or file) of list files")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument(
        "--admin", metavar="HOST:PORT", help="serve the admin API here (off unless asked for)"
    )
    serve.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus /metrics here (off unless asked for)",
    )

    serve.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="processes answering on the same addresses (SO_REUSEPORT; default 1)",
    )
    # Internal: how the first worker starts the others (see resolver/service/workers.py).
    serve.add_argument("--worker-child", type=int, metavar="FD", help=argparse.SUPPRESS)
    serve.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)

    check = sub.add_parser("check", help="validate a config file and the lists it names")
    check.add_argument("--config", type=Path, help="YAML config file")
    check.add_argument("paths", nargs="*", type=Path, help="list files or directories")

    _add_healthcheck(sub)
    rules_parser(sub)

    explain = sub.add_parser("explain", help="what the policy does with a name, and why")
    explain.add_argument("name", help="the domain name to explain")
    explain.add_argument("--client", default="127.0.0.1", help="client address (default 127.0.0.1)")
    explain.add_argument("--client-id", metavar="ID", help="an encrypted client's id (its groups)")
    explain.add_argument("--type", default="A", help="query type (default A)")
    explain.add_argument(
        "--at",
        metavar="TIME",
        help="when: a date or ISO date and time, then optionally a time zone or an offset "
        "('2025-02-26T00:30 Europe/Brussels', '2025-02-26T00:30+01:00'; UTC without); "
        "default now",
    )
    explain.add_argument("--config", type=Path, help="YAML config file (for groups and lists)")
    explain.add_argument("--blocklists", type=Path, help="directory (or file) of list files")
    explain.add_argument("--json", action="store_true", help="print the explanation as JSON")
    return parser


def _add_healthcheck(sub: Any) -> None:
    """The ``healthcheck`` command's arguments."""
    health = sub.add_parser(
        "healthcheck", help="ask the resolver a real DNS question; exit 0 when it answers"
    )
    health.add_argument(
        "--server",
        default=str(DEFAULT_LISTEN[0]),  # where serve listens by default
        metavar="HOST:PORT",
        help=f"the resolver to ask (default {DEFAULT_LISTEN[0]}, serve's default address)",
    )
    health.add_argument(
        "--name",
        default="healthcheck.resolver.invalid",
        help="the name to ask for (any answer, NXDOMAIN included, counts as alive)",
    )
    health.add_argument("--tcp", action="store_true", help="ask over TCP")
    health.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")


def _load(args: argparse.Namespace) -> Config:
    return load_config(args.config) if args.config else Config()


def _options(config: Config, keep_sources: bool, now: float | None = None) -> LoadOptions:
    return LoadOptions(
        ClientGroups(dict(config.groups), dict(config.group_ids)),
        config.state_dir,
        keep_sources,
        now,
        config.include_roots,
        config.remote.allow_private,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``resolver`` command; returns the exit code.

    Output into a pipe closed early (``resolver explain x | head -1``) ends the command
    quietly, as it ends other Unix tools: no traceback, exit status 141 (128 + SIGPIPE).
    ``serve`` writes no output of its own there, so an error of its sockets is not hidden."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        code = _command(argv)
        sys.stdout.flush()  # inside the try: the last output may be what meets the closed pipe
        return code
    except BrokenPipeError:
        if argv[:1] == ["serve"]:
            raise
        # Python flushes stdout once more at exit; pointed at /dev/null, that flush is silent.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + signal.SIGPIPE


def _command(argv: list[str]) -> int:
    if argv[:1] == ["audit"]:
        from .audit import main as audit_main  # its own argument parser

        return audit_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "explain":
        return _explain(args)
    if args.command == "healthcheck":
        return _healthcheck(args)
    if args.command == "rules":
        from .rules import main as rules_main

        return rules_main(args)
    return _check(args)


def _serve(args: argparse.Namespace) -> int:
    child = args.worker_child is not None

    def reread() -> Config:
        config = finish(
            _load(args),
            args.listen,
            args.upstream,
            args.blocklists,
            args.admin,
            args.metrics,
            args.workers,
        )
        if child:  # the first worker alone serves the admin API and /metrics
            config = replace(config, admin=None, metrics=None)
        return config

    try:
        config = reread()
    except (SourceError, ValueError) as exc:
        print(f"resolver: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a sentence, never a traceback
        print(f"resolver: cannot load the config: {fault(exc)}", file=sys.stderr)
        return 2
    level = (args.log_level or config.log_level).upper()
    who = f"worker {args.worker_index}: " if child else ""
    logging.basicConfig(
        level=level, stream=sys.stderr, format=f"%(asctime)s %(levelname)s {who}%(message)s"
    )
    from ..service.server import run
    from ..service.workers import WorkerLink, child_argv

    if child:
        return run(config, reread, link=WorkerLink(args.worker_child, args.worker_index))

    def child_command(listens: list[str]) -> list[str]:
        return child_argv(
            str(args.config) if args.config else None,
            args.upstream,
            args.blocklists,
            args.log_level,
            listens,
        )

    return run(config, reread, child_command=child_command)


def shadowed(policy: Policy) -> list[str]:
    """Warnings for names already covered by a parent domain with the same settings."""
    out = []
    sources = policy.sources or {}
    for name, entries in sources.items():
        for index, where in entries:
            rs = policy.rulesets[index]
            if not rs.flags & DOMAIN or rs.flags & ~DOMAIN & 0xFF:
                continue
            parent = name
            while b"." in parent:
                parent = parent.split(b".", 1)[1]
                for other_index, other_where in sources.get(parent, ()):
                    other = policy.rulesets[other_index]
                    if (
                        other.blocklist is rs.blocklist
                        and other.flags & SUBDOMAINS
                        and other.phases == rs.phases
                        and other.action == rs.action
                        and other.flags & 4 == rs.flags & 4
                    ):
                        out.append(
                            f"{where}: warning: {name.decode()} is already covered by "
                            f"{parent.decode()} ({other_where})"
                        )
                        break
                else:
                    continue
                break
    return out


def _check(args: argparse.Namespace) -> int:
    """Validate the config and the lists, reporting every error found (each config
    section and each list file is read on its own), and, with ``--config``, everything
    that would stop ``serve`` from starting on that config."""
    from ..service.assembly import problems as startup_problems  # what serve refuses

    errors: list[str] = []
    config = Config()
    lists: list[tuple[str, str]] | None = None  # (id, file) of each list, with --config
    if args.config:
        try:
            config, found = read_config(args.config)
            config, lists = finish(config), []
            errors += [str(error) for error in found]
            errors += [f"{args.config}: {p}" for p in startup_problems(config)]
        except SourceError as exc:
            errors += _each(exc)
        except ValueError as exc:
            errors.append(f"{args.config}: {exc}")
        except Exception as exc:  # a sentence, never a traceback
            errors.append(f"{args.config}: cannot load the config: {fault(exc)}")
    now = time.time()
    for path in args.paths or [config.blocklists]:
        try:
            policy = load_policy(path, replace(_options(config, True, now), all_errors=True))
        except SourceError as exc:
            errors += _each(exc)
            continue
        except Exception as exc:  # load_policy reports its own faults; belt and braces
            errors.append(f"{path}: {fault(exc)}")
            continue
        for warning in (*policy.warnings, *shadowed(policy)):
            print(warning, file=sys.stderr)
        print(f"{path}: ok: {policy.summary(now)}")
        if lists is not None:
            lists += [(b.id, b.where.file) for b in policy.lists]
    if lists is not None:  # rule edits: errors when edits: is set, else warnings
        found_edits = [f"{args.config}: {p}" for p in edit_problems(config, lists)]
        if config.edits != EditsConfig():
            errors += found_edits
        else:
            for problem in found_edits:
                print(f"warning: {problem}", file=sys.stderr)
    for error in errors:
        print(error, file=sys.stderr)
    if errors:
        print(f"resolver check: {len(errors)} error(s)", file=sys.stderr)
    return 1 if errors else 0


def _each(exc: SourceError) -> list[str]:
    """The errors ``exc`` stands for, one a line."""
    return [str(error) for error in getattr(exc, "errors", [exc])]


def _explain(args: argparse.Namespace) -> int:
    try:
        config = _load(args)
        path = args.blocklists or config.blocklists
        moment = parse_moment(args.at)
        now = moment.instant
        policy = load_policy(path, _options(config, True, now))
        doc = explain(
            policy, args.name, args.client, args.type, now, moment, client_id=args.client_id or ""
        )
    except SourceError as exc:
        print(f"{exc}", file=sys.stderr)
        return 1
    except (ValueError, dns.exception.DNSException) as exc:
        print(f"resolver explain: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(doc, indent=2) if args.json else render_text(doc))
    return 0


def _healthcheck(args: argparse.Namespace) -> int:
    """A real DNS query to the resolver (the container's HEALTHCHECK): exit 0 on any
    well-formed answer, 1 on silence, a malformed answer or SERVFAIL, 2 on bad arguments.

    Over UDP it asks in the CHAOS class, which the resolver answers itself (REFUSED: it
    serves the Internet class only), so the check says whether this resolver is up, not
    whether its upstreams are (that is /readyz)."""
    import dns.message
    import dns.query
    import dns.rcode

    from ..upstream.endpoints import split_host_port

    try:
        host, port = split_host_port(args.server, 53)
    except ValueError as exc:
        print(f"resolver healthcheck: {exc}", file=sys.stderr)
        return 2
    if args.tcp:
        query = dns.message.make_query(args.name, "A")
    else:
        query = dns.message.make_query(args.name, "TXT", "CH")
    ask = dns.query.tcp if args.tcp else dns.query.udp
    try:
        reply = ask(query, host, port=port, timeout=args.timeout)
    except (OSError, dns.exception.DNSException) as exc:
        print(f"unhealthy: no answer from {args.server}: {exc}", file=sys.stderr)
        return 1
    rcode = dns.rcode.to_text(reply.rcode())
    if reply.rcode() == dns.rcode.SERVFAIL:
        print(f"unhealthy: {args.server} answered SERVFAIL", file=sys.stderr)
        return 1
    print(f"healthy: {args.server} answered {rcode}")
    return 0
