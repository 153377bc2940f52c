"""The ``hal`` command."""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def _info(args: argparse.Namespace) -> int:
    from hal import info
    data = info.collect(include_emulated=args.all)
    sys.stdout.write(json.dumps(data, indent=2) + "\n" if args.json else info.render(data))
    return 0


def _conformance(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hal.conformance import runner
    from hal.vendor import EMULATED_SUFFIX
    backend = args.backend + EMULATED_SUFFIX if args.emulate else args.backend
    opts = runner.Options(backend=backend, profile=args.profile, ops=args.ops, report_dir=Path(args.report),
                          seed=args.seed, resume=args.resume, timeout=args.timeout,
                          waivers=Path(args.waivers) if args.waivers else None, isolate=not args.in_process)
    data = runner.run(opts)
    return 0 if data["conforms"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hal", description="xpu-hal: DeepSeek operators on many backends")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="list every backend found, whether it can run here, and what it supports")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--all", action="store_true", help="also list emulated backends (test doubles)")
    p.set_defaults(func=_info)

    p = sub.add_parser("conformance", help="certify a backend against the operator contracts",
                       description="Run the property-based conformance suite against one backend and write "
                                   "report.md and report.json. Exit status 0 when it conforms, 1 when not.")
    p.add_argument("--backend", default="cpu", help="backend to certify (default: cpu)")
    p.add_argument("--emulate", action="store_true",
                   help="certify the backend's emulated twin (NAME-emulated: vendor operators emulated on the "
                        "CPU, a test double; its report is labelled EMULATED)")
    p.add_argument("--profile", default="ci", choices=["quick", "ci", "thorough"],
                   help="examples per cell: quick (smoke), ci (default), thorough (overnight)")
    p.add_argument("--ops", nargs="+", metavar="OP",
                   help="only these operators, or cells by id prefix: 'grouped_gemm[layout=masked'")
    p.add_argument("--report", default="hal-report", metavar="DIR", help="report folder (default: hal-report)")
    p.add_argument("--seed", type=int, help="hypothesis seed (printed; default: random)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --report")
    p.add_argument("--timeout", type=float, default=600.0, metavar="S", help="time limit per cell in seconds")
    p.add_argument("--waivers", metavar="FILE", help="TOML file with a [waivers] table: cell-id prefix = reason")
    p.add_argument("--in-process", action="store_true",
                   help="run cells in this process (no crash isolation or time limit; for debugging)")
    p.set_defaults(func=_conformance)
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
