"""Backend discovery: plugins found through the ``hal.backends`` entry-point group, via pluggy.

Loading follows the practice of mature plugin systems: entry points are loaded one by one inside
their own error boundary (a broken plugin is recorded, never fatal), the ``HAL_PLUGINS`` allow-list
limits which load, two backends with one name are an error for that name, and a backend's class is
imported only when it is listed or used, so discovery imports no vendor library. A backend's probe runs where
it cannot take this process down (:mod:`hal.probe`).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import pluggy

from hal import hookspecs, probe
from hal.backend import Availability, Backend
from hal.errors import BackendNotFoundError, BackendUnavailableError, PluginError

__all__ = [
    "BackendSpec",
    "BackendEntry",
    "BrokenPlugin",
    "Registry",
    "registry",
    "register_plugin",
    "unregister_plugin",
    "instantiate",
    "ENTRY_POINT_GROUP",
]

ENTRY_POINT_GROUP = "hal.backends"
IN_PROCESS = "(in-process)"  # the distribution of a plugin registered with register_plugin()


@dataclass(frozen=True)
class BackendSpec:
    """A cheap descriptor of one backend, returned by a plugin's ``hal_backends`` hook.

    ``factory`` is ``"module:Class"``; the class (a :class:`~hal.backend.Backend`) is imported on
    first use. ``priority`` orders auto-detection among available accelerators (higher first).
    ``emulated`` marks a test double: never auto-selected, and its results are labelled EMULATED.
    """

    name: str
    factory: str
    vendor: str = ""
    device_type: str = ""
    priority: int = 0
    emulated: bool = False
    description: str = ""


@dataclass
class BrokenPlugin:
    """A plugin that could not be loaded, and why."""

    plugin: str
    distribution: str
    error: str


@dataclass
class BackendEntry:
    """One registered backend: its spec, where it came from, and (once loaded) the instance."""

    spec: BackendSpec
    plugin: str
    distribution: str
    error: Optional[str] = None  # set when the backend is unusable as registered (e.g. duplicate name)
    clashing_plugins: List[str] = field(default_factory=list)  # plugins that brought a backend of this name
    _backend: Optional[Backend] = field(default=None, repr=False)
    _verdict: Optional[probe.Verdict] = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _probe_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    def load(self) -> Backend:
        """Import and instantiate the backend class (once). Raises :class:`PluginError`."""
        if self.error is not None:
            raise PluginError(self.error)
        with self._lock:
            if self._backend is None:
                try:
                    backend = instantiate(self.spec.name, self.spec.factory)
                except PluginError as exc:
                    self.error = str(exc)
                    raise
                except Exception as exc:  # the plugin's error boundary
                    self.error = (
                        f"backend '{self.name}' from plugin '{self.plugin}' failed to load "
                        f"{self.spec.factory}: {type(exc).__name__}: {exc}"
                    )
                    raise PluginError(self.error) from exc
                self._backend = backend
        return self._backend

    def availability(self) -> Availability:
        """Probe once (isolated and cached as :mod:`hal.probe` says); a probe that raises, crashes or hangs is
        reported as the reason."""
        return self._probed().availability

    @property
    def contained(self) -> bool:
        """Whether the probe crashed, hung or failed in its child process: no vendor code of this backend may run
        here."""
        return self._probed().contained

    def _probed(self) -> probe.Verdict:
        if self._verdict is None:
            with self._probe_lock:
                if self._verdict is None:
                    try:
                        backend = self.load()
                    except Exception as exc:
                        self._verdict = probe.Verdict(Availability(False, f"{type(exc).__name__}: {exc}"))
                    else:
                        in_process = self.spec.emulated or self.distribution == IN_PROCESS
                        self._verdict = probe.verdict(
                            backend, self.spec.factory, self.distribution, in_process=in_process
                        )
        return self._verdict


class Registry:
    """Every backend found, by name, plus the plugins that failed to load."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.entries: Dict[str, BackendEntry] = {}
        self.broken: List[BrokenPlugin] = []
        self.skipped: List[str] = []  # plugins left out by the HAL_PLUGINS allow-list

    # -- discovery -------------------------------------------------------------------------------
    def discover(self) -> None:
        allow_env = os.environ.get("HAL_PLUGINS", "").strip()
        allow = {n.strip() for n in allow_env.split(",") if n.strip()} if allow_env else None
        for ep, dist in _entry_points():
            if allow is not None and ep.name not in allow:
                self.skipped.append(ep.name)
                continue
            if self.pm.has_plugin(ep.name):
                self.broken.append(
                    BrokenPlugin(
                        ep.name, dist, f"a plugin named '{ep.name}' is already registered; this one was not loaded"
                    )
                )
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # the plugin's error boundary
                self.broken.append(
                    BrokenPlugin(ep.name, dist, f"import of {ep.value} failed: {type(exc).__name__}: {exc}")
                )
                continue
            self.register_plugin(plugin, ep.name, dist)

    def register_plugin(self, plugin: Any, name: str, distribution: str = IN_PROCESS) -> bool:
        """Register a plugin object and collect its backends (what discovery does per entry point); whether
        pluggy took it (a refusal is recorded in ``broken``)."""
        try:
            self.pm.register(plugin, name=name)
        except Exception as exc:
            self.broken.append(BrokenPlugin(name, distribution, f"{type(exc).__name__}: {exc}"))
            return False
        for impl in self.pm.hook.hal_backends.get_hookimpls():
            if impl.plugin_name != name:
                continue
            try:
                returned: Any = impl.function()
                specs = list(returned)
                for spec in specs:
                    if not isinstance(spec, BackendSpec):
                        raise TypeError(f"hal_backends returned {type(spec).__name__}, not BackendSpec")
            except Exception as exc:
                self.broken.append(
                    BrokenPlugin(name, distribution, f"hal_backends() failed: {type(exc).__name__}: {exc}")
                )
                continue
            for spec in specs:
                self._add(BackendEntry(spec, name, distribution))
        return True

    def unregister_plugin(self, name: str) -> None:
        """Forget a plugin registered in-process, the backends it brought, and the name clashes they made."""
        self.pm.unregister(name=name)
        for backend in [b for b, entry in self.entries.items() if entry.plugin == name]:
            del self.entries[backend]
        for entry in self.entries.values():
            if name in entry.clashing_plugins:
                entry.clashing_plugins.remove(name)
                if not entry.clashing_plugins:
                    entry.error = None

    def _add(self, entry: BackendEntry) -> None:
        other = self.entries.get(entry.name)
        if other is None:
            self.entries[entry.name] = entry
            return
        other.clashing_plugins.append(entry.plugin)
        other.error = (
            f"two backends are named '{entry.name}': one from plugin '{other.plugin}' "
            f"({other.distribution}), one from plugin '{entry.plugin}' ({entry.distribution}); "
            "uninstall one or limit plugins with HAL_PLUGINS"
        )

    # -- lookup ----------------------------------------------------------------------------------
    def entry(self, name: str) -> BackendEntry:
        entry = self.entries.get(name)
        if entry is None:
            known = ", ".join(sorted(self.entries)) or "none"
            hint = ""
            if any(b.plugin == name for b in self.broken):
                hint = f"; plugin '{name}' failed to load (see `hal info`)"
            elif name in self.skipped:
                hint = f"; plugin '{name}' is installed but not in HAL_PLUGINS"
            raise BackendNotFoundError(f"no backend named '{name}' (registered: {known}){hint}")
        return entry

    def emulated_label(self, name: str) -> str:
        """What every output naming backend ``name`` appends to it: an EMULATED warning for a test
        double, nothing otherwise."""
        return (
            " [EMULATED: a CPU stand-in for the vendor's kernels, not hardware]"
            if self.entry(name).spec.emulated
            else ""
        )

    def backend(self, name: str) -> Backend:
        """The loaded, available backend ``name``; raises with the reason when it cannot be used."""
        entry = self.entry(name)
        backend = entry.load()
        availability = entry.availability()
        if not availability.available:
            raise BackendUnavailableError(name, availability.reason)
        return backend

    def auto_select(self) -> str:
        """The first available non-emulated accelerator backend by priority, else ``cpu``."""
        for entry in sorted(self.entries.values(), key=lambda e: -e.spec.priority):
            if entry.spec.emulated or entry.error is not None or entry.spec.device_type == "cpu":
                continue
            try:
                if entry.availability().available:
                    return entry.name
            except PluginError:
                continue
        return "cpu"


def instantiate(name: str, factory: str) -> Backend:
    """Import and construct the backend class (or factory function) ``factory``, ``"module:attr"``, as ``name``."""
    module_name, _, attr = factory.partition(":")
    backend = getattr(importlib.import_module(module_name), attr)()
    if not isinstance(backend, Backend):
        raise TypeError(f"{factory} is not a hal.backend.Backend")
    backend.name = name
    return backend


def _entry_points() -> List[Tuple[Any, str]]:
    """``(entry point, "dist version")`` for the group, by name; via the distributions so that the
    distribution is known on every supported Python (``EntryPoint.dist`` is 3.10+)."""
    found = []
    seen = set()
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name in seen:  # the same distribution on sys.path twice: the first one wins, as for imports
            continue
        seen.add(name)
        for ep in dist.entry_points:
            if ep.group == ENTRY_POINT_GROUP:
                found.append((ep, f"{name} {dist.version}"))
    return sorted(found, key=lambda pair: pair[0].name)


_registry: Optional[Registry] = None
_registry_lock = threading.Lock()


def registry() -> Registry:
    """The process-wide registry, discovered on first use."""
    global _registry
    if _registry is None:
        with _registry_lock:
            if _registry is None:
                reg = Registry()
                reg.discover()
                _registry = reg
    return _registry


def register_plugin(plugin: Any, name: str) -> bool:
    """Register a plugin in-process (tests, notebooks, vendor bring-up) as an entry point would; whether it
    was taken (a refusal, e.g. a name already registered, is listed by ``hal info``)."""
    from hal import dispatch

    registered = registry().register_plugin(plugin, name)
    dispatch.clear_cache()
    return registered


def unregister_plugin(name: str) -> None:
    """Undo a :func:`register_plugin` that returned True."""
    from hal import dispatch

    registry().unregister_plugin(name)
    dispatch.clear_cache()


def reset() -> None:
    """Forget every plugin and rediscover on next use (tests; after installing a plugin)."""
    global _registry
    from hal import dispatch

    _registry = None
    dispatch.clear_cache()
