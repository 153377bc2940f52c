"""What ``hal info`` reports: every backend found, whether it can run here and why not, its versions,
and per operator the feature values (dtypes, layouts, formats) it supports and, for a vendor backend,
the vendor operators it maps to and when the reference path serves it instead."""

from __future__ import annotations

import platform
from typing import Any, Dict, List

import torch

import hal
from hal import config
from hal.contract import all_ops
from hal.errors import HalError
from hal.registry import BackendEntry, registry
from hal.vendor import VendorBackend


def _backend_info(entry: BackendEntry) -> Dict[str, Any]:
    spec = entry.spec
    info: Dict[str, Any] = {
        "name": spec.name,
        "vendor": spec.vendor,
        "device_type": spec.device_type,
        "emulated": spec.emulated,
        "plugin": entry.plugin,
        "distribution": entry.distribution,
        "description": spec.description,
    }
    try:
        backend = entry.load()
    except HalError as exc:
        info.update(
            available=False, reason=str(exc), error=str(exc), versions={}, operators={}, missing=[], mappings={}
        )
        return info
    availability = entry.availability()
    info["available"] = availability.available
    info["reason"] = availability.reason
    if entry.contained:  # its probe crashed or hung in a child process: run none of its vendor code here
        info.update(versions={}, operators={}, missing=[], mappings={})
        return info
    try:
        info["versions"] = backend.versions()
    except Exception as exc:  # a vendor probe may fail in surprising ways; report, do not crash
        info["versions"] = {"error": f"{type(exc).__name__}: {exc}"}
    caps = backend.capabilities()
    ops = all_ops()
    info["operators"] = {name: support.as_dict(ops[name]) for name, support in sorted(caps.items())}
    info["missing"] = sorted(set(ops) - set(caps))
    info["mappings"] = backend.mapping_info() if isinstance(backend, VendorBackend) else {}
    return info


def collect(include_emulated: bool = False) -> Dict[str, Any]:
    """Everything ``hal info`` shows, as JSON-ready data; emulated backends (test doubles) only when
    ``include_emulated``."""
    reg = registry()
    entries = sorted(reg.entries.values(), key=lambda e: (e.name != "cpu", e.name))
    shown = [e for e in entries if include_emulated or not e.spec.emulated]
    data: Dict[str, Any] = {
        "hal_version": hal.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "backends": [_backend_info(e) for e in shown],
        "emulated_hidden": [e.name for e in entries if e not in shown],
        "broken_plugins": [vars(b) for b in reg.broken],
        "plugins_not_allowed": list(reg.skipped),
    }
    try:
        data["settings"] = config.describe()
        data["selected"] = _selected()
    except HalError as exc:
        data["settings"] = {"error": str(exc)}
        data["selected"] = {}
    return data


def _selected() -> Dict[str, Any]:
    """Which backend each operator would run on under the settings in force."""
    from hal.dispatch import route

    out: Dict[str, Any] = {}
    for name, op in sorted(all_ops().items()):
        try:
            r = route(op)
            out[name] = {"backend": r.backend.name, "chosen_by": r.source, "fallback": r.policy}
        except HalError as exc:
            out[name] = {"error": str(exc)}
    return out


def render(data: Dict[str, Any]) -> str:
    """The human-readable report."""
    lines: List[str] = [f"xpu-hal {data['hal_version']}  (torch {data['torch']}, Python {data['python']})", ""]
    for b in data["backends"]:
        state = "available" if b["available"] else f"unavailable: {b['reason']}"
        tag = "  [EMULATED test double]" if b["emulated"] else ""
        lines.append(f"backend {b['name']}{tag}")
        lines.append(f"  vendor:   {b['vendor'] or '-'}")
        lines.append(f"  device:   {b['device_type'] or '-'}")
        lines.append(f"  status:   {state}")
        lines.append(f"  plugin:   {b['plugin']} ({b['distribution']})")
        if b["versions"]:
            lines.append("  versions: " + ", ".join(f"{k} {v}" for k, v in b["versions"].items()))
        for op, axes in b["operators"].items():
            lines.append(f"  {op}")
            for axis, values in axes.items():
                lines.append(f"      {axis:<14} {', '.join(values)}")
            mapping = b["mappings"].get(op)
            if mapping:
                lines.append(
                    f"      {'maps to':<14} "
                    f"{', '.join(mapping['maps_to']) or 'no vendor operator: the reference path, always'}"
                )
                lines.extend(f"      {'reference':<14} {f['reason']}" for f in mapping["reference_when"])
        if b["missing"]:
            lines.append("  not implemented: " + ", ".join(b["missing"]))
        lines.append("")
    if data["emulated_hidden"]:
        lines.append(f"emulated test doubles (hal info --all): {', '.join(data['emulated_hidden'])}")
    for p in data["broken_plugins"]:
        lines.append(f"broken plugin {p['plugin']} ({p['distribution']}): {p['error']}")
    if data["plugins_not_allowed"]:
        lines.append("installed but not in HAL_PLUGINS: " + ", ".join(data["plugins_not_allowed"]))
    selected = data.get("selected") or {}
    if selected:
        lines.append("")
        lines.append("operator routing under the current settings:")
        for op, r in selected.items():
            where = r.get("error") or f"{r['backend']} (chosen by {r['chosen_by']}, fallback: {r['fallback']})"
            lines.append(f"  {op:<22} {where}")
    elif "error" in data.get("settings", {}):
        lines.append(f"settings error: {data['settings']['error']}")
    return "\n".join(lines).rstrip() + "\n"
