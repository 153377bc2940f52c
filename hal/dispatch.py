"""Per-call dispatch: pick the backend for an operator, check the request against its declared
support, apply the fallback policy, call the implementation.

The backend chosen for an operator under the settings in force is resolved once and cached (the
settings' layer tuple is the cache key). Outside checked mode, a route also remembers the *signatures*
of the calls it has validated and served (each tensor's dtype, shape, device and contiguity; the type
and value of every other argument): a contract's checks depend on nothing else there, so a call whose
signature was seen before goes straight to the implementation. That is the decode-loop hot path: a
settings lookup, a signature, a set lookup, and the call. In checked mode every call is validated,
values included (a contract's ``@op.value_checks``, see :class:`hal.contract.Op`).
"""
from __future__ import annotations

import operator
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Hashable, Optional, Set, Tuple

import torch

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
    checked: bool         # checked mode: validate every call, values included
    # signatures (see call_key()) of valid calls this route serves: they skip validation next time
    known: Set[Hashable] = field(default_factory=set, compare=False)

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
    checked, _ = first("checked", False)
    return Route(op.name, backend, backend.implementation(op.name), backend.capabilities().get(op.name),
                 policy, fallback, source, checked)


_SCALAR_TYPES = frozenset((int, float, bool, str, type(None), torch.dtype))
_KNOWN_LIMIT = 4096  # signatures kept per route (prefill shapes vary with the prompt): a bound on memory
_tensor_meta = operator.attrgetter("dtype", "shape", "device")
_is_contiguous = torch.Tensor.is_contiguous


def call_key(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional[Hashable]:
    """What a contract's checks can see of a call outside checked mode: each tensor's dtype, shape, device
    and contiguity, the type and value of every other argument (``None``, numbers, strings, dtypes), and
    the keywords used; ``None`` (validate every time) when an argument is none of these."""
    try:  # tensors as positional arguments, scalars as keywords: the common call, read in C loops
        key = (*map(_tensor_meta, args), *map(_is_contiguous, args))
    except (AttributeError, TypeError):
        return _any_call_key(args, kwargs)
    if not kwargs:
        return key
    types = tuple(map(type, kwargs.values()))
    if _SCALAR_TYPES.issuperset(types):  # the types too: 1, 1.0 and True are equal keys, not equal arguments
        return (*key, *kwargs.items(), *types)
    return _any_call_key(args, kwargs)


def _any_call_key(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional[Hashable]:
    """:func:`call_key` of any call, argument by argument (each tagged with its position or keyword)."""
    key: list = []
    for where, a in (*enumerate(args), *kwargs.items()):
        if isinstance(a, torch.Tensor):
            key += (where, _tensor_meta(a), a.is_contiguous())
        elif type(a) in _SCALAR_TYPES:
            key += (where, type(a), a)
        else:
            return None
    return tuple(key)


def dispatch(op: Op, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    """Validate a call of ``op`` (or recognise its signature) and run it where the settings route it."""
    r = _cache.get((op.name, config.layers())) or route(op)
    key = None if r.checked else call_key(args, kwargs)
    if key in r.known:  # the hot path: a valid call like one served before (None is never known)
        return r.impl(*args, **kwargs)  # type: ignore[misc]
    request = op.validate(*args, **kwargs)
    refusal = r.refusal(request)
    if refusal is None:
        if key is not None:
            if len(r.known) >= _KNOWN_LIMIT:
                r.known.clear()
            r.known.add(key)
        return r.impl(*args, **kwargs)  # type: ignore[misc]
    return _fall_back(op, r, request, refusal, args, kwargs)


def _fall_back(op: Op, r: Route, request: Request, refusal: str, args: Tuple[Any, ...],
               kwargs: Dict[str, Any]) -> Any:
    if r.policy == "error" or r.fallback == r.backend.name:
        raise UnsupportedError(op.name, r.backend.name, refusal)
    fb = registry().backend(r.fallback)
    fb_route = Route(op.name, fb, fb.implementation(op.name), fb.capabilities().get(op.name),
                     "error", r.fallback, "fallback", r.checked)
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
