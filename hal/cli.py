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
    opts = runner.Options(
        backend=backend,
        profile=args.profile,
        ops=args.ops,
        report_dir=Path(args.report),
        seed=args.seed,
        resume=args.resume,
        timeout=args.timeout,
        waivers=Path(args.waivers) if args.waivers else None,
        isolate=not args.in_process,
    )
    data = runner.run(opts)
    return 0 if data["conforms"] else 1


def _timeout(text: str) -> float:
    from hal.conformance.runner import TIMEOUT_EXPECTED, check_timeout

    try:
        return check_timeout(float(text))
    except ValueError:  # not a number, or not a usable one (InvalidArgumentError is a ValueError)
        raise argparse.ArgumentTypeError(f"expected {TIMEOUT_EXPECTED}, got {text!r}") from None


def _dtype(name: str):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def _generate(args: argparse.Namespace) -> int:
    import hal.model
    from hal.model.generate import timed_generate

    model = hal.model.load(
        args.model,
        backend=args.backend,
        dtype=_dtype(args.dtype),
        fp8=args.fp8,
        fp4=args.fp4,
        strict=not args.no_strict,
    )
    if args.backend:
        from hal.registry import registry

        print(f"backend: {args.backend}{registry().emulated_label(args.backend)}", file=sys.stderr)
    if model.fp8 is not None:
        print(f"FP8 checkpoint weights: {model.fp8} ({model.fp8_reason})", file=sys.stderr)
    fp4 = getattr(model, "fp4", None)  # V4 models with FP4 experts
    if fp4 is not None:
        print(f"FP4 expert weights: {fp4} ({getattr(model, 'fp4_reason', '')})", file=sys.stderr)
    new, rate = timed_generate(model, [args.prompt_ids], args.max_new_tokens)
    print(" ".join(map(str, new[0])))
    print(f"{args.max_new_tokens} tokens, {rate:.2f} tokens/s", file=sys.stderr)
    return 0


def _make_tiny(args: argparse.Namespace) -> int:
    from hal.model.tiny import make_tiny

    out = make_tiny(args.arch, args.dir, fp8=args.fp8, seed=args.seed, scale_fmt=args.scale_fmt, fp4=args.fp4)
    formats = " + ".join(f for f, on in (("FP8", args.fp8), ("FP4 experts", args.fp4)) if on)
    print(f"wrote a tiny random {args.arch} checkpoint{f' ({formats})' if formats else ''} to {out}")
    return 0


def _bisect(args: argparse.Namespace) -> int:
    import hal.model
    from hal.model.bisect import bisect, logits_rtol, render

    model = hal.model.load(args.model, backend="cpu", dtype=_dtype(args.dtype))
    findings = bisect(model, args.backend, prompt=[args.prompt_ids], steps=args.steps)
    sys.stdout.write(render(findings, args.backend, logits_rtol(model.args, model.dtype)))
    return 1 if any(f.status == "diverges" for f in findings) else 0


def _bench(args: argparse.Namespace) -> int:
    from hal import bench

    return bench.main(args.size, args.backend, args.json, model=not args.no_model)


def _add_model_args(p: argparse.ArgumentParser, dtype: str) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help="Hugging Face style checkpoint directory")
    p.add_argument("--prompt-ids", type=int, nargs="+", default=[1, 2, 3, 4, 5], metavar="ID", help="prompt token ids")
    p.add_argument(
        "--dtype", default=dtype, choices=["bfloat16", "float16", "float32"], help=f"compute dtype (default: {dtype})"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hal", description="xpu-hal: DeepSeek operators on many backends")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="list every backend found, whether it can run here, and what it supports")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--all", action="store_true", help="also list emulated backends (test doubles)")
    p.set_defaults(func=_info)

    p = sub.add_parser(
        "conformance",
        help="certify a backend against the operator contracts",
        description="Run the property-based conformance suite against one backend and write "
        "report.md and report.json. Exit status 0 when it conforms, 1 when not.",
    )
    p.add_argument("--backend", default="cpu", help="backend to certify (default: cpu)")
    p.add_argument(
        "--emulate",
        action="store_true",
        help="certify the backend's emulated twin (NAME-emulated: vendor operators emulated on the "
        "CPU, a test double; its report is labelled EMULATED)",
    )
    p.add_argument(
        "--profile",
        default="ci",
        choices=["quick", "ci", "thorough"],
        help="examples per cell: quick (smoke), ci (default), thorough (overnight)",
    )
    p.add_argument(
        "--ops",
        nargs="+",
        metavar="OP",
        help="only these operators, or cells by id prefix: 'grouped_gemm[layout=masked'",
    )
    p.add_argument("--report", default="hal-report", metavar="DIR", help="report folder (default: hal-report)")
    p.add_argument("--seed", type=int, help="hypothesis seed (printed; default: random)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --report")
    p.add_argument(
        "--timeout",
        type=_timeout,
        metavar="S",
        help="time limit per cell in seconds (default: derived from the profile and the operator)",
    )
    p.add_argument("--waivers", metavar="FILE", help="TOML file with a [waivers] table: cell-id prefix = reason")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run cells in this process (no crash isolation or time limit; for debugging)",
    )
    p.set_defaults(func=_conformance)

    p = sub.add_parser("generate", help="greedy generation from a DeepSeek checkpoint (progress on stderr)")
    _add_model_args(p, "bfloat16")
    p.add_argument("--max-new-tokens", type=int, default=16, metavar="N", help="tokens to generate")
    p.add_argument("--backend", help="backend to run on (default: the settings in force)")
    p.add_argument(
        "--fp8",
        default="auto",
        choices=["auto", "keep", "int8", "dequantize"],
        help="FP8 checkpoints: keep weights quantised, convert them to W8A8 int8, dequantise on load, "
        "or auto (the first of keep, int8, dequantize the backend serves; reported on stderr)",
    )
    p.add_argument(
        "--fp4",
        default="auto",
        choices=["auto", "keep", "dequantize"],
        help="V4 FP4 experts: keep them packed, dequantise on load, or auto (keep when the backend "
        "serves FP4-weight grouped GEMMs; reported on stderr)",
    )
    p.add_argument(
        "--no-strict",
        action="store_true",
        help="skip checkpoint tensors the model does not use and fill a missing routing bias with zeros, "
        "with a warning naming them (default: refuse such a checkpoint)",
    )
    p.set_defaults(func=_generate)

    p = sub.add_parser("model", help="model utilities")
    model_sub = p.add_subparsers(dest="model_command", required=True)
    p = model_sub.add_parser("make-tiny", help="write a tiny random checkpoint in the official format")
    p.add_argument("--arch", required=True, choices=["deepseek_v3", "deepseek_v4"])
    p.add_argument("dir", help="output directory")
    p.add_argument("--fp8", action="store_true", help="FP8 block-quantised weights (weight_scale_inv)")
    p.add_argument("--scale-fmt", choices=["ue8m0"], help="power-of-two (UE8M0) FP8 scales, as V3.1")
    p.add_argument("--fp4", action="store_true", help="deepseek_v4: routed experts packed FP4 (UE8M0 scale per 32)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(func=_make_tiny)

    p = sub.add_parser(
        "bisect",
        help="find the operator (and layer) whose backend makes the logits diverge",
        description="Run the model on the CPU reference, then each operator in turn on BACKEND, "
        "and report which operator (and first layer) moves the logits beyond "
        "tolerance. Exit status 1 when one does.",
    )
    _add_model_args(p, "float32")
    p.add_argument("--backend", required=True, help="backend to check operator by operator")
    p.add_argument("--steps", type=int, default=3, help="decode steps after the prefill (default: 3)")
    p.set_defaults(func=_bisect)

    p = sub.add_parser(
        "bench",
        help="measure each operator and the model against limits measured in the same run",
        description="Time each operator on DeepSeek-shaped problems and print it as a ratio to its "
        "limit on this machine (dense fp32 GEMM of equal FLOPs, memory copy of equal "
        "bytes, a direct call), median and spread over repetitions; and the tiny V3 "
        "and V4 models against transformers when it is installed. See "
        "docs/performance.md.",
    )
    p.add_argument("--backend", default="cpu", help="backend to measure (default: cpu)")
    p.add_argument(
        "--size",
        default="default",
        choices=["default", "tiny"],
        help="problem sizes: default (minutes on 2 cores) or tiny (seconds, for CI)",
    )
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    p.add_argument("--no-model", action="store_true", help="operators only, skip the end-to-end models")
    p.set_defaults(func=_bench)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)  # (an option's type may import an extra: --timeout)
        return args.func(args)
    except Exception as exc:  # the HAL's own errors read as messages, not tracebacks
        from hal.errors import HalError

        if isinstance(exc, HalError):
            print(f"hal: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
