"""What a backend is: a named set of operator implementations plus the data saying what they support.

A vendor subclasses :class:`Backend`, marks each implementation with :func:`implements` (naming the
operator and, per feature axis, the values it supports), and publishes a :class:`~hal.registry.BackendSpec`
through the ``hal.backends`` entry-point group (see :mod:`hal.hookspecs`). Nothing here imports a
vendor library: a backend imports its vendor package lazily, in :meth:`Backend.probe` and its kernels.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Dict, FrozenSet, Mapping, Optional, Sequence, Tuple

from hal.contract import Op, get_op
from hal.errors import PluginError

__all__ = ["Availability", "Support", "Backend", "implements"]


@dataclass(frozen=True)
class Availability:
    """Whether a backend can run here and, when not, why in plain words."""

    available: bool
    reason: str = ""


@dataclass(frozen=True)
class Support:
    """For one operator on one backend: the supported values of each feature axis.

    An axis missing from ``axes`` means every value the contract defines is supported.
    """

    axes: Mapping[str, FrozenSet[str]]

    def refusal(self, features: Tuple[Tuple[str, str], ...]) -> Optional[str]:
        """``None`` when the request's features are all supported, else the reason in words."""
        for axis, value in features:
            allowed = self.axes.get(axis)
            if allowed is not None and value not in allowed:
                return f"{axis}={value} is not supported (supported: {', '.join(sorted(allowed))})"
        return None

    def as_dict(self, op: Op) -> Dict[str, list]:
        return {axis: sorted(self.axes.get(axis, values)) for axis, values in op.axes.items()}


def implements(op: str, **axes: Sequence[str]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Mark a :class:`Backend` method as the implementation of ``op``, supporting ``axes``."""

    def mark(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn.__hal_implements__ = (op, axes)  # type: ignore[attr-defined]
        return fn

    return mark


class Backend:
    """Base class of every backend.

    Class attributes a subclass sets: ``vendor``, ``device_type`` (the ``torch.device`` type its
    kernels take), ``portable`` (True when its kernels are plain PyTorch and accept tensors on any
    device), ``emulated`` (True for test doubles that stand in for hardware: every result they
    produce is labelled EMULATED) and ``isolate_probe`` (False only when :meth:`probe` loads no native
    library: it then runs in the calling process, see :mod:`hal.probe`).
    """

    name: str = ""
    vendor: str = ""
    device_type: str = "cpu"
    portable: bool = False
    emulated: bool = False
    isolate_probe: bool = True

    def __init__(self) -> None:
        self._impls: Dict[str, Callable[..., Any]] = {}
        self._support: Dict[str, Support] = {}
        for attr in dir(type(self)):
            marker = getattr(getattr(type(self), attr), "__hal_implements__", None)
            if marker is not None:
                op, axes = marker
                self.add_implementation(op, getattr(self, attr), **axes)

    # -- what a subclass may override -----------------------------------------------------------
    def probe(self) -> Availability:
        """Can this backend run here? Import the vendor library and look for a device here.

        For a backend installed through an entry point this runs in a child process (:mod:`hal.probe`): only
        the verdict comes back, so state set here is not seen by the instance that serves calls."""
        return Availability(True)

    def versions(self) -> Dict[str, str]:
        """Versions worth reporting (vendor library, driver, SoC ...)."""
        return {}

    def capabilities(self) -> Dict[str, Support]:
        """Per operator, what is supported. Override to narrow by detected hardware."""
        return dict(self._support)

    # -- registration ----------------------------------------------------------------------------
    def add_implementation(self, op_name: str, fn: Callable[..., Any], **axes: Sequence[str]) -> None:
        """Register ``fn`` as this backend's ``op_name``; checks the declaration against the contract."""
        who = self.name or type(self).__name__  # the registry names the instance after construction
        try:
            op = get_op(op_name)
        except KeyError as exc:
            raise PluginError(f"backend '{who}' implements unknown operator: {exc.args[0]}") from None
        declared: Dict[str, FrozenSet[str]] = {}
        for axis, values in axes.items():
            if axis not in op.axes:
                raise PluginError(
                    f"backend '{who}': {op_name} has no feature axis {axis!r} (axes: {', '.join(op.axes)})"
                )
            unknown = set(values) - set(op.axes[axis])
            if unknown:
                raise PluginError(
                    f"backend '{who}': {op_name}.{axis} values {sorted(unknown)} are "
                    f"not defined by the contract (defined: {', '.join(op.axes[axis])})"
                )
            declared[axis] = frozenset(values)
        _check_signature(who, op, fn)
        self._impls[op_name] = fn
        self._support[op_name] = Support(declared)

    def implementation(self, op_name: str) -> Optional[Callable[..., Any]]:
        return self._impls.get(op_name)


def _check_signature(backend: str, op: Op, fn: Callable[..., Any]) -> None:
    """An implementation takes the contract's parameters, same names, kinds and defaults; it may add
    keyword parameters of its own, with defaults."""
    impl = inspect.signature(fn).parameters
    for name, p in op.signature.parameters.items():
        q = impl.get(name)
        if q is None or q.kind != p.kind or q.default != p.default:
            raise PluginError(
                f"backend '{backend}': {op.name} implementation's parameter {name!r} does not "
                f"match the contract signature {op.name}{op.signature}"
            )
    for name, q in impl.items():
        if name not in op.signature.parameters and q.default is inspect.Parameter.empty:
            raise PluginError(f"backend '{backend}': {op.name} implementation has extra required parameter {name!r}")
