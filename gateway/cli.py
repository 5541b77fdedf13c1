"""Command line: `python -m gateway [serve|check|explain|routes] --config F`.

Owns argument parsing, what each command prints and its exit code: 0 ok (warnings
included), 2 for a bad config or bad arguments, never a traceback for a bad config (each
error or warning is one line naming its dotted key). `explain` and `routes` read the
config only; they contact nothing (gateway/explain.py).
"""

from __future__ import annotations

import argparse
import sys

from gateway.config import ConfigError, GatewayConfig, load_config

COMMANDS = ("serve", "check", "explain", "routes")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gateway",
        description="EventLive Edge gateway",
        epilog="explain: python -m gateway explain --config F METHOD PATH [-H 'Name: value']...",
    )
    p.add_argument("command", nargs="?", default="serve", choices=COMMANDS)
    p.add_argument("request", nargs="*", help="explain: METHOD PATH (PATH may carry ?query)")
    p.add_argument("--config", "-c", default="config.yaml", help="path to config.yaml")
    p.add_argument(
        "-H",
        "--header",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="explain: a request header (repeatable)",
    )
    p.add_argument(
        "--peer", default="127.0.0.1", help="explain: the connecting address (default 127.0.0.1)"
    )
    return p


def _load(path: str) -> GatewayConfig | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"{path}: {len(exc.issues)} error(s)", file=sys.stderr)
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        return None


def _check(cfg: GatewayConfig, path: str) -> int:
    from gateway.routecheck import route_warnings

    warnings = route_warnings(cfg)
    for w in warnings:
        print(f"{path}: warning: {w}", file=sys.stderr)
    note = f", {len(warnings)} warning(s)" if warnings else ""
    print(
        f"{path}: ok ({len(cfg.routes)} routes, {len(cfg.upstreams)} upstreams, "
        f"store {cfg.store.url.split('://')[0]}{note})"
    )
    return 0


def _explain(cfg: GatewayConfig, args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from gateway.explain import explain, parse_header

    if len(args.request) != 2:
        parser.error("explain needs METHOD and PATH, e.g. explain GET /api/webinars/42/chat")
    try:
        headers = [parse_header(h) for h in args.header]
    except ValueError as exc:
        parser.error(f"-H: {exc}")
    method, target = args.request
    print(explain(cfg, method, target, headers, peer=args.peer).render(), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Intermixed: `explain --config F GET /path` puts options between the positionals.
    args = parser.parse_intermixed_args(argv)
    if args.command != "explain" and args.request:
        parser.error(f"unexpected arguments for {args.command}: {' '.join(args.request)}")
    cfg = _load(args.config)
    if cfg is None:
        return 2
    if args.command == "check":
        return _check(cfg, args.config)
    if args.command == "explain":
        return _explain(cfg, args, parser)
    if args.command == "routes":
        from gateway.explain import route_table

        print(route_table(cfg), end="")
        return 0
    from gateway.server import run

    return run(cfg, args.config)
