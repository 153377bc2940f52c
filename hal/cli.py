"""The ``hal`` command."""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def _info(args: argparse.Namespace) -> int:
    from hal import info
    data = info.collect()
    sys.stdout.write(json.dumps(data, indent=2) + "\n" if args.json else info.render(data))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hal", description="xpu-hal: DeepSeek operators on many backends")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="list every backend found, whether it can run here, and what it supports")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_info)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as exc:  # the HAL's own errors read as messages, not tracebacks
        from hal.errors import HalError
        if isinstance(exc, HalError):
            print(f"hal: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
