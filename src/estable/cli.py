"""The `estable` command. A thin shell over the library: parse, call, print; errors on one line."""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .errors import EstableError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="estable", description="Stable Diffusion, end to end.")
    parser.add_argument("--version", action="version", version=f"estable {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    del sub  # commands are added below as they land
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except EstableError as exc:
        print(f"estable: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("estable: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
