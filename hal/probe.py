"""Backend probes that cannot take the process down.

A vendor backend's :meth:`~hal.backend.Backend.probe` imports the vendor's library, whose native code may crash
the interpreter (a segfault in a driver library) or hang. Such a probe runs in a child process under a time
limit; only its verdict comes back, and a crash or a hang becomes "unavailable" with the reason. The verdict is
cached on disk (``$XDG_CACHE_HOME/xpu-hal/probes.json``), keyed by what it depends on: the backend and the
distribution that brought it, the Python interpreter, the distributions installed where this process imports
from (installing or upgrading torch_npu changes them), ``PYTHONPATH``, ``LD_LIBRARY_PATH`` and every
``*_VISIBLE_DEVICES`` variable. Later processes pay nothing.

A probe runs in this process instead when there is nothing to isolate or the child could not find the backend:
the base class's probe (nothing runs), an emulated test double, a plugin registered in-process with
:func:`hal.register_plugin`, or a backend class that sets ``isolate_probe = False``.

``HAL_PROBE_ISOLATION=0`` probes in this process (to debug a probe); ``HAL_PROBE_CACHE=0`` ignores cached
verdicts and probes afresh (after a driver install, or a device became visible); ``HAL_PROBE_TIMEOUT`` is the
time limit in seconds (default 60).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict

from hal.backend import Availability, Backend
from hal.errors import ConfigError

__all__ = ["Verdict", "verdict", "probe_here", "cache_dir", "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 60.0
_STARTUP_S = 120.0  # the child's start (Python, torch and hal imports) runs before the probe's own time limit
_CACHE_SIZE = 64  # verdicts kept: one per backend and environment (venv, visible devices ...)
_CACHE_ENV = ("PYTHONPATH", "LD_LIBRARY_PATH")  # and every *_VISIBLE_DEVICES
_ALARM = getattr(signal, "SIGALRM", None)  # POSIX: the child's own time limit; elsewhere the parent's only

# The child imports exactly what this process imports: same sys.path (``python -m`` would put the working
# directory first, where a source checkout's ``hal/`` folder shadows the installed package).
_CHILD = "import json, sys; sys.path[:] = json.loads(sys.argv[1]); from hal.probe import _child; _child()"


@dataclass(frozen=True)
class Verdict:
    """A probe's outcome. ``contained``: the probe crashed, hung or failed in its child process, so nothing of
    this backend's vendor code may run in this process (not even to list its versions)."""

    availability: Availability
    contained: bool = False


def probe_here(backend: Backend) -> Availability:
    """Probe in this process; a probe that raises is reported as the reason."""
    try:
        return backend.probe()
    except Exception as exc:
        return Availability(False, f"{type(exc).__name__}: {exc}")


def verdict(backend: Backend, factory: str, distribution: str, *, in_process: bool) -> Verdict:
    """Whether ``backend`` (built from ``factory``, brought by ``distribution``) can run here: probed in a child
    process, or served from the cache, unless its probe runs in this process (``in_process``: the registry says
    so, for an emulated backend or a plugin registered in-process; see the module docstring)."""
    if (
        in_process
        or os.environ.get("HAL_PROBE_ISOLATION", "").strip() == "0"
        or not backend.isolate_probe
        or type(backend).probe is Backend.probe
    ):
        return Verdict(probe_here(backend))
    key = _cache_key(backend.name, factory, distribution)
    cached = _read_cache().get(key) if os.environ.get("HAL_PROBE_CACHE", "").strip() != "0" else None
    if isinstance(cached, dict) and set(cached) == {"available", "reason", "contained"}:
        return Verdict(Availability(cached["available"], cached["reason"]), cached["contained"])
    found = _probe_in_child(backend.name, factory, _timeout())
    _write_cache(key, found)
    return found


def _timeout() -> float:
    text = os.environ.get("HAL_PROBE_TIMEOUT", "").strip()
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if value <= 0:
        raise ConfigError(f"HAL_PROBE_TIMEOUT: expected a positive number of seconds, got {text!r}")
    return value


def _probe_in_child(name: str, factory: str, timeout: float) -> Verdict:
    who = f"the probe of backend '{name}'"
    hung = Verdict(Availability(False, f"{who} hung for more than {timeout:g} s (HAL_PROBE_TIMEOUT)"), True)
    request = json.dumps({"name": name, "factory": factory, "timeout": timeout})
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, json.dumps(sys.path)],
            input=request,
            text=True,
            capture_output=True,
            timeout=timeout + _STARTUP_S,
        )
    except subprocess.TimeoutExpired:  # no SIGALRM here, or the child's start got stuck
        return hung
    if _ALARM is not None and proc.returncode == -_ALARM:
        return hung
    if proc.returncode < 0:
        try:
            died = signal.Signals(-proc.returncode).name
        except ValueError:
            died = f"signal {-proc.returncode}"
        return Verdict(
            Availability(
                False,
                f"{who} crashed with {died} (it ran in a child process; "
                "HAL_PROBE_ISOLATION=0 runs it in this one, e.g. under a debugger)",
            ),
            True,
        )
    try:
        found = json.loads(proc.stdout)
        return Verdict(Availability(bool(found["available"]), str(found["reason"])))
    except (ValueError, KeyError, TypeError):
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return Verdict(
            Availability(False, f"{who} failed in its child process (exit code {proc.returncode}): {last}"), True
        )


def _child() -> None:
    """The child process: probe one backend and write the verdict, as JSON, to stdout."""
    request = json.load(sys.stdin)
    verdict_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # what the vendor library prints (from C too) goes to stderr, not into the verdict
    if _ALARM is not None:  # SIGALRM's default action ends a hung probe, even one that holds the GIL
        signal.setitimer(signal.ITIMER_REAL, request["timeout"])
    from hal.registry import instantiate

    found = probe_here(instantiate(request["name"], request["factory"]))
    if _ALARM is not None:
        signal.setitimer(signal.ITIMER_REAL, 0)
    json.dump({"available": found.available, "reason": found.reason}, verdict_out)
    verdict_out.close()


# -- the on-disk cache -----------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/xpu-hal``, else ``~/.cache/xpu-hal`` (a relative XDG_CACHE_HOME counts as unset)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "xpu-hal"


def _cache_key(name: str, factory: str, distribution: str) -> str:
    installed = []
    for folder in sys.path:
        try:
            installed += sorted(n for n in os.listdir(folder or ".") if n.endswith((".dist-info", ".egg-info")))
        except OSError:
            continue
    env = {k: v for k, v in os.environ.items() if k in _CACHE_ENV or k.endswith("_VISIBLE_DEVICES")}
    key = {
        "backend": name,
        "factory": factory,
        "distribution": distribution,
        "python": [sys.executable, sys.version],
        "installed": installed,
        "env": sorted(env.items()),
    }
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()


_cache_lock = threading.Lock()


def _read_cache() -> Dict[str, Any]:
    try:
        data = json.loads((cache_dir() / "probes.json").read_text())
    except (OSError, ValueError):  # none yet, or unreadable: probe
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(key: str, found: Verdict) -> None:
    """Add a verdict (the oldest go past ``_CACHE_SIZE``); written whole and renamed, so that a reader never
    sees a partial file. A cache that cannot be written is no error: the next process probes again."""
    path = cache_dir() / "probes.json"
    with _cache_lock:
        data = _read_cache()
        data.pop(key, None)
        data[key] = {
            "available": found.availability.available,
            "reason": found.availability.reason,
            "contained": found.contained,
        }
        data = dict(list(data.items())[-_CACHE_SIZE:])
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                (Path(tmp) / path.name).write_text(json.dumps(data))
                os.replace(Path(tmp) / path.name, path)
        except OSError:
            pass
