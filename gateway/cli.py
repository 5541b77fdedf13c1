"""Command line: `python -m gateway [serve] --config F` and `python -m gateway check
--config F`. Owns argument parsing and exit codes; never prints a traceback for a bad
config (each error is one line naming its dotted key)."""

from __future__ import annotations

import argparse
import sys

from gateway.config import ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gateway", description="EventLive Edge gateway")
    p.add_argument("command", nargs="?", default="serve", choices=["serve", "check"])
    p.add_argument("--config", "-c", default="config.yaml", help="path to config.yaml")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"{args.config}: {len(exc.issues)} error(s)", file=sys.stderr)
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        return 2
    if args.command == "check":
        print(
            f"{args.config}: ok ({len(cfg.routes)} routes, {len(cfg.upstreams)} upstreams, "
            f"store {cfg.store.url.split('://')[0]})"
        )
        return 0
    from gateway.server import run

    return run(cfg, args.config)
