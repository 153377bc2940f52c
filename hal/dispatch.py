"""Per-call dispatch: pick the backend for an operator, check the request against its declared
support, apply the fallback policy, call the implementation.

The backend chosen for an operator under the settings in force is resolved once and cached (the
settings' layer tuple is the cache key), so the hot path is a dict lookup, a support check over a
handful of feature values, and the call.
"""
from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Set, Tuple

from hal import config
from hal.backend import Backend, Support
from hal.contract import Op, Request
from hal.errors import UnsupportedError
from hal.registry import registry

__all__ = ["Route", "dispatch", "route", "clear_cache", "HalFallbackWarning"]


class HalFallbackWarning(UserWarning):
    """An operator ran on the fallback backend because the selected one could not serve it."""


@dataclass(frozen=True)
class Route:
    """Where an operator goes under given settings."""

    op: str
    backend: Backend
    impl: Optional[Callable[..., Any]]
    support: Optional[Support]
    policy: str           # "error" | "warn"
    fallback: str         # backend name used under "warn"
    source: str           # which settings layer chose the backend ("auto-detected" if none)
    # (device type, features) of requests this route was found to serve: skips refusal() next time
    served: Set[Tuple[str, Tuple[Tuple[str, str], ...]]] = field(default_factory=set, compare=False)

    def refusal(self, request: Request) -> Optional[str]:
        """Why this route cannot serve ``request``, or ``None`` when it can."""
        if self.impl is None or self.support is None:
            return f"backend '{self.backend.name}' does not implement {self.op}"
        backend = self.backend
        if not backend.portable and request.device.type != backend.device_type:
            return (f"backend '{backend.name}' computes on '{backend.device_type}' tensors, "
                    f"the arguments are on '{request.device}'")
        return self.support.refusal(request.features)


_cache: Dict[Tuple[str, Tuple[config.Layer, ...]], Route] = {}
_lock = threading.Lock()
_warned: Set[Tuple[str, str, str]] = set()


def clear_cache() -> None:
    with _lock:
        _cache.clear()


def route(op: Op) -> Route:
    """The route of ``op`` under the settings in force (resolved once per settings)."""
    layers = config.layers()
    key = (op.name, layers)
    found = _cache.get(key)
    if found is None:
        found = _resolve(op, layers)
        with _lock:
            if len(_cache) > 4096:  # settings objects made in a loop: do not grow without bound
                _cache.clear()
            _cache[key] = found
    return found


def _resolve(op: Op, layers: Tuple[config.Layer, ...]) -> Route:
    def first(attr: str, default: Any) -> Tuple[Any, str]:
        for layer in layers:
            value = getattr(layer, attr)(op.name) if callable(getattr(layer, attr)) else getattr(layer, attr)
            if value is not None:
                return value, layer.source
        return default, "default"

    reg = registry()
    name, source = first("backend_for", None)
    if name is None:
        name, source = reg.auto_select(), "auto-detected"
    backend = reg.backend(name)
    policy, _ = first("fallback_for", "error")
    fallback, _ = first("fallback_backend", "cpu")
    return Route(op.name, backend, backend.implementation(op.name), backend.capabilities().get(op.name),
                 policy, fallback, source)


def dispatch(op: Op, request: Request, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    r = route(op)
    served = r.served
    if (request.device.type, request.features) in served:  # the hot path: a request seen before
        return r.impl(*args, **kwargs)  # type: ignore[misc]
    refusal = r.refusal(request)
    if refusal is None:
        if len(served) < 256:  # feature combinations are few; a bound anyway
            served.add((request.device.type, request.features))
        return r.impl(*args, **kwargs)  # type: ignore[misc]
    return _fall_back(op, r, request, refusal, args, kwargs)


def _fall_back(op: Op, r: Route, request: Request, refusal: str, args: Tuple[Any, ...],
               kwargs: Dict[str, Any]) -> Any:
    if r.policy == "error" or r.fallback == r.backend.name:
        raise UnsupportedError(op.name, r.backend.name, refusal)
    fb = registry().backend(r.fallback)
    fb_route = Route(op.name, fb, fb.implementation(op.name), fb.capabilities().get(op.name),
                     "error", r.fallback, "fallback")
    fb_refusal = fb_route.refusal(request)
    if fb_refusal is not None:
        raise UnsupportedError(op.name, r.backend.name, f"{refusal}; fallback '{fb.name}' cannot either: "
                                                        f"{fb_refusal}")
    key = (op.name, r.backend.name, refusal)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"{op.name}: {refusal}; running it on '{fb.name}' instead (fallback policy 'warn')",
                      HalFallbackWarning, stacklevel=3)
    return fb_route.impl(*args, **kwargs)  # type: ignore[misc]
