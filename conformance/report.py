"""The two reports of a conformance run: ``report.json`` for machines, ``report.md`` for people."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

FAILING = ("fail", "error", "timeout", "crashed")
ORDER = ("pass", "fail", "error", "timeout", "crashed", "unsupported", "waived-fail", "waived-pass")


def summarise(results: List[Mapping[str, Any]]) -> Dict[str, int]:
    counts = {status: 0 for status in ORDER}
    for r in results:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return counts


def summary_line(data: Mapping[str, Any]) -> str:
    s = data["summary"]
    verdict = "CONFORMS" if data["conforms"] else "DOES NOT CONFORM"
    emulated = " (EMULATED)" if data["meta"].get("emulated") else ""
    return (
        f"{verdict}{emulated}: {s['pass']} passed, {s['fail'] + s['error']} failed, {s['timeout']} timed out, "
        f"{s['crashed']} crashed, {s['unsupported']} unsupported, {s['waived-fail'] + s['waived-pass']} waived"
    )


def write(
    directory: Path, meta: Mapping[str, Any], results: List[Mapping[str, Any]], waivers: Mapping[str, str]
) -> Dict[str, Any]:
    results = sorted(results, key=lambda r: r["id"])
    summary = summarise(results)
    stale = [p for p in waivers if not any(r["id"].startswith(p) for r in results)]
    data = {
        "meta": dict(meta),
        "summary": summary,
        "conforms": not any(summary[s] for s in FAILING),
        "stale_waivers": stale,
        "cells": results,
    }
    (directory / "report.json").write_text(json.dumps(data, indent=2))
    (directory / "report.md").write_text(markdown(data))
    return data


def _fmt(x: float) -> str:
    return f"{x:.2g}" if x else "0"


def limits_text(limits: Iterable[Tuple[Optional[float], str]]) -> str:
    """The time limits cells ran under, from (seconds, "derived" | "given" | "none") pairs, e.g.
    "75-120 s, derived from the profile and the operator"."""
    limits = list(limits)
    parts = []
    for source, how in (("derived", "derived from the profile and the operator"), ("given", "given with --timeout")):
        seconds = sorted({s for s, f in limits if f == source})
        if seconds:
            parts.append(f"{seconds[0]:g}{f'-{seconds[-1]:g}' if len(seconds) > 1 else ''} s, {how}")
    if any(f == "none" for _, f in limits):
        parts.append("none (run in process)")
    return "; ".join(parts)


def coverage_markdown(cells: List[Mapping[str, Any]]) -> List[str]:
    """What each cell's draws covered: size ranges, special values and boundary classes (with counts)."""
    rows = [r for r in cells if (r.get("coverage") or {}).get("examples")]
    if not rows:
        return []
    lines = [
        "## Coverage",
        "",
        "What a pass covers: the sizes drawn (min-max), the special values and the boundary "
        "classes that occurred (examples with each), and each cell's own seed.",
        "",
        "| cell | seed | examples | sizes | special values | boundary classes |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        c = r["coverage"]
        sizes = ", ".join(f"{k} {lo}-{hi}" for k, (lo, hi) in c["ranges"].items())
        counts = [", ".join(f"{k} ({v})" for k, v in c[kind].items()) or "-" for kind in ("special", "boundary")]
        lines.append(f"| {r['id']} | {r.get('seed')} | {c['examples']} | {sizes or '-'} | {counts[0]} | {counts[1]} |")
    return lines + [""]


def markdown(data: Mapping[str, Any]) -> str:
    meta = data["meta"]
    title = f"# Conformance report: backend `{meta['backend']}`"
    lines = [title, ""]
    if meta.get("emulated"):
        lines += [
            "> **EMULATED** — this backend ran against a CPU stand-in for the vendor's kernels (a test",
            "> double written from the vendor's documentation). These results say nothing about hardware.",
            "",
        ]
    lines += [f"**{summary_line(data)}**", "", "| | |", "| --- | --- |"]
    for key in (
        "vendor",
        "device_type",
        "distribution",
        "profile",
        "max_examples",
        "seed",
        "hal_version",
        "torch",
        "python",
        "platform",
        "started",
        "finished",
    ):
        if meta.get(key) not in (None, ""):
            lines.append(f"| {key} | {meta[key]} |")
    limits = limits_text((r.get("time_limit_s"), r.get("time_limit_from", "")) for r in data["cells"])
    if limits:  # absent in reports of runs from before limits were recorded
        lines.append(f"| time limit per cell | {limits} |")
    for k, v in (meta.get("versions") or {}).items():
        if meta.get(k) != v:  # the backend's own versions, not repeating the table above
            lines.append(f"| {k} | {v} |")
    lines.append("")
    by_op: Dict[str, List[Mapping[str, Any]]] = {}
    for r in data["cells"]:
        by_op.setdefault(r["op"], []).append(r)
    for op, rows in by_op.items():
        counts = summarise(rows)
        lines += [f"## {op}", "", ", ".join(f"{k}: {v}" for k, v in counts.items() if v), ""]
        axes = list(rows[0]["features"])
        lines.append(
            "| " + " | ".join(axes) + " | result | examples | max abs err | max rel err | tolerance used | "
            "max ulps | seconds (limit) |"
        )
        lines.append("|" + " --- |" * (len(axes) + 7))
        for r in rows:
            st = r.get("stats") or {}
            mabs = max((v["max_abs"] for v in st.values()), default=0.0)
            mrel = max((v["max_rel"] for v in st.values()), default=0.0)
            mulp = max((v["max_ulps"] for v in st.values()), default=0)
            used = max((v["tolerance_used"] for v in st.values()), default=0.0)
            mark = {"pass": "pass", "unsupported": "unsupported"}.get(r["status"], f"**{r['status'].upper()}**")
            limit = f"{r['time_limit_s']:g}" if r.get("time_limit_s") else "none"
            lines.append(
                "| "
                + " | ".join(r["features"][a] for a in axes)
                + f" | {mark} | {r['examples']} | {_fmt(mabs)} | {_fmt(mrel)} | {used:.0%} | {mulp} | "
                f"{r['seconds']:.1f} ({limit}) |"
            )
        lines.append("")
    lines += coverage_markdown(data["cells"])
    problems = [r for r in data["cells"] if r["status"] in FAILING or r["status"] == "waived-fail"]
    if problems:
        lines += ["## Failures", ""]
        for r in problems:
            lines += [f"### {r['id']} — {r['status']}", "", "```", r["message"], "```", ""]
            if r.get("minimal_example"):
                lines += ["Minimal failing example:", "", "```", r["minimal_example"], "```", ""]
            if r.get("reproduce"):
                lines += [f"Reproduce: `{r['reproduce']}`", ""]
    if data["stale_waivers"]:
        lines += ["## Waivers that matched no cell", ""] + [f"- `{w}`" for w in data["stale_waivers"]] + [""]
    return "\n".join(lines)
