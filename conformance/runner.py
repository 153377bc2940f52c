"""``hal conformance``: run every cell of the chosen operators against one backend, each operator's
cells in a worker process with a per-cell time limit, and write the reports as results come in.

A cell that crashes its worker (segfault, abort, poisoned device) is recorded as ``crashed`` and one
that overruns its time limit (:func:`time_limit`, unless ``--timeout`` gives one) as ``timeout``; a fresh
worker then takes the remaining cells. Results are appended to ``results.jsonl`` as they finish, so
``--resume`` continues an interrupted run.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import selectors
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, TextIO

import torch

import hal
from hal.config import _read_toml
from hal.conformance import report
from hal.conformance.core import PROFILES, CellResult, cell_id, cells, database_at, run_cell, suites
from hal.errors import ConfigError, InvalidArgumentError
from hal.registry import registry

__all__ = ["Options", "run", "time_limit", "check_timeout"]

# Part of every cell's derived limit, whatever its size: first-use costs (native kernels compiled, lazy
# imports) and shrinking a failing example (up to 14 s measured for a wrong backend on the ci profile).
CELL_ALLOWANCE_S = 60.0
WORKER_START_S = 120.0  # a fresh worker's imports, before its first cell starts
TIMEOUT_EXPECTED = "a finite number of seconds > 0"


@dataclass
class Options:
    backend: str
    profile: str = "ci"
    ops: Optional[List[str]] = None
    report_dir: Path = Path("hal-report")
    seed: Optional[int] = None
    resume: bool = False
    timeout: Optional[float] = None  # per cell; None: derived from the profile and the operator (time_limit)
    waivers: Optional[Path] = None
    isolate: bool = True


def time_limit(op: str, profile: str) -> float:
    """The default time limit of one cell of ``op``, in seconds: ``CELL_ALLOWANCE_S`` plus the profile's
    examples times the suite's ``example_seconds`` (about ten times the slowest example measured)."""
    return CELL_ALLOWANCE_S + PROFILES[profile] * suites()[op].example_seconds


def check_timeout(value: float) -> float:
    """``value`` if it can be a time limit, else :class:`~hal.errors.InvalidArgumentError`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InvalidArgumentError("hal conformance", "timeout", TIMEOUT_EXPECTED, repr(value))
    return float(value)


def _waivers(opts: Options, backend: hal.Backend) -> Dict[str, str]:
    """Expected failures, by cell-id prefix: the backend's own, then the file's (which win)."""
    found = dict(getattr(backend, "conformance_waivers", {}) or {})
    if opts.waivers is not None:
        if not opts.waivers.is_file():
            raise ConfigError(f"--waivers: no file at {opts.waivers}")
        table = _read_toml(opts.waivers).get("waivers", {})
        if not isinstance(table, dict) or not all(isinstance(v, str) and v for v in table.values()):
            raise ConfigError(f'{opts.waivers}: expected a [waivers] table of "cell-id prefix" = "reason"')
        found.update(table)
    return found


def run(opts: Options, out: Optional[TextIO] = None) -> Dict[str, object]:
    """Run the suite, printing progress to ``out`` (default: the current ``sys.stdout``); return the report
    data (also written to ``opts.report_dir``)."""
    out = out if out is not None else sys.stdout
    if opts.profile not in PROFILES:
        raise ConfigError(f"--profile: expected one of {', '.join(PROFILES)}, got {opts.profile!r}")
    if opts.timeout is not None:
        check_timeout(opts.timeout)
    known = suites()
    selectors_ = opts.ops or sorted(known)  # operator names or cell-id prefixes ("grouped_gemm[layout=masked")
    unknown = [sel for sel in selectors_ if sel.split("[")[0] not in known]
    if unknown:
        raise ConfigError(f"--ops: no suite for {', '.join(unknown)} (operators: {', '.join(sorted(known))})")
    ops = sorted({sel.split("[")[0] for sel in selectors_})
    entry = registry().entry(opts.backend)
    backend = registry().backend(opts.backend)  # raises with the reason when it cannot run here
    waivers = _waivers(opts, backend)
    opts.report_dir.mkdir(parents=True, exist_ok=True)
    results_path = opts.report_dir / "results.jsonl"
    meta_path = opts.report_dir / "run.json"

    done: Dict[str, dict] = {}
    if opts.resume and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if (meta["backend"], meta["profile"]) != (opts.backend, opts.profile):
            raise ConfigError(
                f"--resume: {opts.report_dir} holds a run of backend {meta['backend']!r}, profile {meta['profile']!r}"
            )
        opts.seed = meta["seed"]
        for line in results_path.read_text().splitlines() if results_path.is_file() else []:
            r = json.loads(line)
            done[r["id"]] = r
    else:
        seed = opts.seed if opts.seed is not None else random.randrange(2**31)
        opts.seed = seed
        meta = {
            "backend": opts.backend,
            "emulated": entry.spec.emulated,
            "vendor": entry.spec.vendor,
            "device_type": entry.spec.device_type,
            "plugin": entry.plugin,
            "distribution": entry.distribution,
            "versions": backend.versions(),
            "profile": opts.profile,
            "max_examples": PROFILES[opts.profile],
            "seed": seed,
            "hal_version": hal.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "waivers": waivers,
        }
        meta_path.write_text(json.dumps(meta, indent=2))
        results_path.write_text("")

    limit_from = "none" if not opts.isolate else "derived" if opts.timeout is None else "given"
    limits = {
        op: time_limit(op, opts.profile) if limit_from == "derived" else opts.timeout if limit_from == "given" else None
        for op in ops
    }
    out.write(
        f"hal conformance: backend {opts.backend}{registry().emulated_label(opts.backend)}, "
        f"profile {opts.profile} ({PROFILES[opts.profile]} examples a cell), seed {opts.seed}, "
        f"time limit per cell {report.limits_text((limits[op], limit_from) for op in ops)}\n"
    )
    if done:
        out.write(f"resuming: {len(done)} cells already done in {opts.report_dir}\n")

    results: Dict[str, dict] = dict(done)
    for op in ops:
        plan = []
        for features in cells(op):
            cid = cell_id(op, features)
            if cid in done or not any(
                cid == sel or cid.startswith(sel if "[" in sel else sel + "[") for sel in selectors_
            ):
                continue
            waiver = next((reason for prefix, reason in waivers.items() if cid.startswith(prefix)), None)
            plan.append({"op": op, "features": features, "id": cid, "waiver": waiver, "time_limit": limits[op]})
        if not plan:
            continue
        stream = _isolated(opts, plan) if opts.isolate else _in_process(opts, plan)
        with results_path.open("a") as sink:
            for result in stream:
                result.time_limit_s, result.time_limit_from = limits[op], limit_from
                data = result.to_json()
                results[result.id] = data
                sink.write(json.dumps(data) + "\n")
                sink.flush()
                out.write(_line(result) + "\n")
                out.flush()
        report.write(opts.report_dir, meta, list(results.values()), waivers)

    meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    meta_path.write_text(json.dumps(meta, indent=2))
    data = report.write(opts.report_dir, meta, list(results.values()), waivers)
    out.write(report.summary_line(data) + "\n")
    out.write(f"reports: {opts.report_dir / 'report.md'} and {opts.report_dir / 'report.json'}\n")
    return data


def _line(r: CellResult) -> str:
    used = max((s.get("tolerance_used", 0.0) for s in r.stats.values()), default=0.0)
    detail = (
        f"{r.examples} examples, {used:.0%} of tolerance used"
        if r.status in ("pass", "waived-pass")
        else r.message.splitlines()[0][:160]
        if r.message
        else ""
    )
    return f"  {r.status.upper():<12} {r.id}  {detail}"


def _in_process(opts: Options, plan: List[dict]) -> Iterator[CellResult]:
    db = database_at(str(_db_path(opts)))
    for cell in plan:
        yield run_cell(
            opts.backend,
            cell["op"],
            cell["features"],
            profile=opts.profile,
            seed=opts.seed or 0,
            database=db,
            waiver=cell["waiver"],
        )


def _db_path(opts: Options) -> Path:
    return Path(os.environ.get("HAL_CONFORMANCE_DB", Path.cwd() / ".hypothesis" / "hal-conformance")) / opts.backend


# The worker imports exactly what this process imports: same sys.path (``python -m`` would put the working
# directory first, where a source checkout's ``hal/`` folder shadows the installed package).
_WORKER = (
    "import json, sys; sys.path[:] = json.loads(sys.argv[1]); from hal.conformance.worker import main; sys.exit(main())"
)


def _isolated(opts: Options, plan: List[dict]) -> Iterator[CellResult]:
    remaining = list(plan)
    while remaining:
        job = {
            "backend": opts.backend,
            "profile": opts.profile,
            "seed": opts.seed,
            "cells": remaining,
            "database": str(_db_path(opts)),
        }
        with tempfile.TemporaryFile("w+") as stderr:
            proc = subprocess.Popen(
                [sys.executable, "-c", _WORKER, json.dumps(sys.path)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
            proc.stdin.write(json.dumps(job))
            proc.stdin.close()
            sel = selectors.DefaultSelector()
            sel.register(proc.stdout, selectors.EVENT_READ)
            current: Optional[dict] = None
            deadline = time.monotonic() + remaining[0]["time_limit"] + WORKER_START_S
            failure: Optional[CellResult] = None
            while True:
                if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                    proc.kill()
                    proc.wait()
                    cell = current or remaining[0]
                    how = "given with --timeout" if opts.timeout is not None else "derived; --timeout sets another"
                    failure = CellResult(
                        cell["op"],
                        cell["features"],
                        cell["id"],
                        "timeout",
                        message=f"no result within {cell['time_limit']:g} s ({how}); the worker was killed",
                    )
                    break
                line = proc.stdout.readline()
                if not line:  # the worker exited
                    rc = proc.wait()
                    if current is not None or rc != 0:
                        cell = current or remaining[0]
                        stderr.seek(0)
                        tail = stderr.read()[-2000:]
                        failure = CellResult(
                            cell["op"],
                            cell["features"],
                            cell["id"],
                            "crashed",
                            message=f"worker process died (exit code {rc}) during this cell\n{tail}",
                        )
                    break
                event = json.loads(line)
                if event["event"] == "start":
                    current = next(c for c in remaining if c["id"] == event["id"])
                    deadline = time.monotonic() + current["time_limit"]
                else:
                    r = event["result"]
                    remaining = [c for c in remaining if c["id"] != r["id"]]
                    current = None
                    yield CellResult(**r)
            sel.close()
        if failure is not None:
            remaining = [c for c in remaining if c["id"] != failure.id]
            yield failure
        elif remaining:  # exited cleanly without finishing: should not happen; do not loop forever
            for cell in remaining:
                yield CellResult(
                    cell["op"],
                    cell["features"],
                    cell["id"],
                    "crashed",
                    message="worker exited before reaching this cell",
                )
            remaining = []
