"""Per-call dispatch: pick the backend for an operator, check the request against its declared
support, apply the fallback policy, call the implementation.

The backend chosen for an operator under the settings in force is resolved once and cached (the
settings' layer tuple is the cache key). Outside checked mode, a route also remembers the *signatures*
of the calls it has validated and served (each tensor's dtype, shape, device and contiguity; the type
and value of every other argument): a contract's checks depend on nothing else there, so a call whose
signature was seen before goes straight to the implementation. That is the decode-loop hot path: a
settings lookup, a signature, a set lookup, and the call. Where torch has its C++ tensor guard (see
:func:`_tensor_guard_factory`), the last few signatures of a route are also held as guards, which
recognise a call's tensors ~5x faster than reading their metadata from Python. In checked mode every
call is validated, values included (a contract's ``@op.value_checks``, see :class:`hal.contract.Op`).
"""

from __future__ import annotations

import itertools
import operator
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Hashable, Iterator, List, Optional, Set, Tuple

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
    policy: str  # "error" | "warn"
    fallback: str  # backend name used under "warn"
    source: str  # which settings layer chose the backend ("auto-detected" if none)
    checked: bool  # checked mode: validate every call, values included
    # signatures (see call_key()) of valid calls this route serves: they skip validation next time
    known: Set[Hashable] = field(default_factory=set, compare=False)
    # the most recent of them whose arguments are all tensors, as (options, tensor guard) pairs
    guarded: List[Tuple[Hashable, Any]] = field(default_factory=list, compare=False)
    # calls recognised by their Python key only (more signatures in use than guards held)
    unguarded_hits: Iterator[int] = field(default_factory=itertools.count, compare=False)

    def refusal(self, request: Request) -> Optional[str]:
        """Why this route cannot serve ``request``, or ``None`` when it can."""
        if self.impl is None or self.support is None:
            return f"backend '{self.backend.name}' does not implement {self.op}"
        backend = self.backend
        if not backend.portable and request.device.type != backend.device_type:
            return (
                f"backend '{backend.name}' computes on '{backend.device_type}' tensors, "
                f"the arguments are on '{request.device}'"
            )
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
    return Route(
        op.name,
        backend,
        backend.implementation(op.name),
        backend.capabilities().get(op.name),
        policy,
        fallback,
        source,
        checked,
    )


_SCALAR_TYPES = frozenset((int, float, bool, str, type(None), torch.dtype))
_KNOWN_LIMIT = 4096  # signatures kept per route (prefill shapes vary with the prompt): a bound on memory
_GUARDED_LIMIT = 8  # guarded signatures per route: a decode step alternates a few shapes per operator
_REGUARD_EVERY = 16  # a signature recognised without a guard gets one back on every 16th such call
_tensor_meta = operator.attrgetter("dtype", "shape", "device")
_keyed_classes: Dict[int, type] = {}  # the classes of the tuples call keys name by identity
_is_contiguous = torch.Tensor.is_contiguous


def call_key(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional[Hashable]:
    """What a contract's checks can see of a call outside checked mode: each tensor's dtype, shape, device
    and contiguity, the type and value of every other argument (``None``, numbers, strings, dtypes), tuples
    of either item by item (a tuple of tensors with its class), and the keywords used; ``None`` (validate
    every time) when an argument is none of these."""
    try:  # tensors as positional arguments, scalars as keywords: the common call, read in C loops
        key = (*map(_tensor_meta, args), *map(_is_contiguous, args))
    except (AttributeError, TypeError):
        return _any_call_key(args, kwargs)
    if not kwargs:
        return key
    return (*key, _options(args, kwargs)) if _scalar_keywords(kwargs) else _any_call_key(args, kwargs)


def _options(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Hashable:
    """The positional argument count and the keywords: their types by identity first (1, 1.0 and True are
    equal values, not equal arguments; an identity cannot be fooled by a class's ``__eq__``, and a tensor is
    then never compared with a number), then their names and values."""
    return (len(args), *map(id, map(type, kwargs.values())), *kwargs.items()) if kwargs else len(args)


def _scalar_keywords(kwargs: Dict[str, Any]) -> bool:
    return all(type(v) in _SCALAR_TYPES for v in kwargs.values())


def _any_call_key(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional[Hashable]:
    """:func:`call_key` of any call, argument by argument (each tagged with its position or keyword): a tuple
    of tensors (e.g. a ``MoePermutation``) by its class's identity and its tensors', a plain tuple of scalars
    by their types and values."""
    key: list = []
    for where, a in (*enumerate(args), *kwargs.items()):
        if isinstance(a, torch.Tensor):
            key += (where, _tensor_meta(a), a.is_contiguous())
        elif type(a) in _SCALAR_TYPES:
            key += (where, type(a), a)
        elif isinstance(a, tuple) and a and all(isinstance(t, torch.Tensor) for t in a):
            _keyed_classes.setdefault(id(type(a)), type(a))  # kept alive: its id is never another class's
            key += (where, id(type(a)), *map(_tensor_meta, a), *map(_is_contiguous, a))
        elif type(a) is tuple and all(type(t) in _SCALAR_TYPES for t in a):  # e.g. block_shape=(128, 128)
            key += (where, tuple, *map(type, a), a)
        else:
            return None
    return tuple(key)


def _tensor_guard_factory() -> Optional[Callable[[Tuple[torch.Tensor, ...]], Any]]:
    """A maker of torch's C++ tensor guards (the check ``torch.compile`` runs before a compiled graph, from
    ``torch._C._dynamo.guards``): a guard made from some tensors accepts exactly the tensors of the same
    dtype, device, shape, strides and autograd state. The class is private and its constructor has changed
    between torch versions, so it is probed, and ``None`` (metadata read from Python only) where it is
    missing or behaves otherwise."""
    try:
        from torch._C._dynamo.guards import TensorGuards

        def guard(tensors: Tuple[torch.Tensor, ...]) -> Any:
            sizes: Any = [list(t.shape) for t in tensors]  # (its stubs want SymInts; plain ints are what it reads)
            strides: Any = [list(t.stride()) for t in tensors]
            return TensorGuards(*tensors, dynamic_dims_sizes=sizes, dynamic_dims_strides=strides)

        def zeros(*shape: int, **options: Any) -> torch.Tensor:  # whatever torch's defaults are set to
            return torch.zeros(*shape, **{"dtype": torch.float32, "device": "cpu", **options})

        g = guard((zeros(2, 3),))
        others = (
            zeros(3, 2),
            zeros(2, 3, dtype=torch.float64),
            zeros(3, 2).t(),
            zeros(2, 3, device="meta"),
            zeros(2, 3, requires_grad=True),
        )
        if g.check(zeros(2, 3)) and not any(g.check(t) for t in others):
            return guard
    except Exception:  # any failure of a private API means: not available here
        pass
    return None


_make_guard = _tensor_guard_factory()


def dispatch(op: Op, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    """Validate a call of ``op`` (or recognise its signature) and run it where the settings route it."""
    r = _cache.get((op.name, config.layers())) or route(op)
    if r.checked:
        return _validated(op, r, None, args, kwargs)
    if r.guarded:  # the hot path: tensors (checked in C++) and scalar options like a call served before
        options = _options(args, kwargs)
        for seen, guard in r.guarded:
            if seen == options and guard.check(*args):
                return r.impl(*args, **kwargs)  # type: ignore[misc]
    key = call_key(args, kwargs)
    if key not in r.known:  # None (validate every time) is never known
        return _validated(op, r, key, args, kwargs)
    if next(r.unguarded_hits) % _REGUARD_EVERY == 0:  # not on every call: more signatures than guards
        _remember_guarded(r, args, kwargs)  # would rebuild one per call
    return r.impl(*args, **kwargs)  # type: ignore[misc]


def _validated(op: Op, r: Route, key: Optional[Hashable], args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    request = op.validate(*args, **kwargs)
    refusal = r.refusal(request)
    if refusal is not None:
        return _fall_back(op, r, request, refusal, args, kwargs)
    if key is not None:
        if len(r.known) >= _KNOWN_LIMIT:
            r.known.clear()
            r.guarded.clear()
        r.known.add(key)
        _remember_guarded(r, args, kwargs)
    return r.impl(*args, **kwargs)  # type: ignore[misc]


def _remember_guarded(r: Route, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
    """Keep a served call's signature as a guard when every positional argument is a tensor and every
    keyword a scalar, and the guard accepts the call it was made from (it refuses a tensor given twice);
    the other calls are recognised by :func:`call_key` alone."""
    if _make_guard is None or not all(isinstance(a, torch.Tensor) for a in args) or not _scalar_keywords(kwargs):
        return
    guard = _make_guard(args)
    if guard.check(*args):
        r.guarded.insert(0, (_options(args, kwargs), guard))
        del r.guarded[_GUARDED_LIMIT:]


def _fall_back(op: Op, r: Route, request: Request, refusal: str, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    if r.policy == "error" or r.fallback == r.backend.name:
        raise UnsupportedError(op.name, r.backend.name, refusal)
    fb = registry().backend(r.fallback)
    fb_route = Route(
        op.name,
        fb,
        fb.implementation(op.name),
        fb.capabilities().get(op.name),
        "error",
        r.fallback,
        "fallback",
        r.checked,
    )
    fb_refusal = fb_route.refusal(request)
    if fb_refusal is not None:
        raise UnsupportedError(op.name, r.backend.name, f"{refusal}; fallback '{fb.name}' cannot either: {fb_refusal}")
    key = (op.name, r.backend.name, refusal)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(
            f"{op.name}: {refusal}; running it on '{fb.name}' instead (fallback policy 'warn')",
            HalFallbackWarning,
            stacklevel=3,
        )
    return fb_route.impl(*args, **kwargs)  # type: ignore[misc]
