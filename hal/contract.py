"""Operator contracts: the single source of truth for each HAL operator.

An operator is declared once, in its family module under ``hal/ops``, as a plain function:

* its signature and docstring are the public API and the spec (shapes, dtypes, layouts, semantics);
* its body checks the arguments' types, dtypes, shapes, devices and options (raising
  :class:`~hal.errors.InvalidArgumentError`), never their tensor values, and returns a
  :class:`Request`: the device the call runs on and the *features* of the call (dtype, layout, ...),
  which backends declare support for as data;
* ``@op.value_checks`` attaches the checks that read tensor values (sizes adding up, ids in range): they
  run in checked mode, and wherever an implementation reads those values anyway (``op.check_values``);
* ``@op.reference`` attaches the exact reference semantics, written in plain PyTorch and
  parameterised by ``compute_dtype`` (float64 = the oracle, which returns unrounded float64 results);
* ``axes`` lists every feature value the contract defines and ``tolerance`` the numerical tolerance
  per output dtype.

The :func:`contract` decorator turns that function into an :class:`Op`, which validates, picks the
backend (see :mod:`hal.dispatch`) and calls its implementation with the caller's arguments unchanged.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch

from hal.errors import DeviceMismatchError, InvalidArgumentError, InvalidDtypeError

if TYPE_CHECKING:
    from typing import TypeGuard  # Python >= 3.10; annotations are not evaluated at run time

__all__ = [
    "Op",
    "Request",
    "Tolerance",
    "contract",
    "all_ops",
    "get_op",
    "dtype_name",
    "result",
    "FLOAT_DTYPES",
    "INDEX_DTYPES",
    "check",
    "check_tensor",
    "check_same_device",
    "value_checks_enabled",
    "is_int",
    "is_number",
]


@dataclass(frozen=True)
class Tolerance:
    """How far a result may be from the exact (float64) reference.

    An element passes when ``|actual - exact| <= atol + rtol * |exact| + acc_eps * n * magnitude``,
    where ``n`` is the length of the reduction behind the element and ``magnitude`` the same
    reduction over absolute values (``sum |terms|``). ``acc_eps * n`` is the classical worst-case
    bound of an ``n``-term sum in a format with unit roundoff ``acc_eps``, valid in any order, so a
    correct implementation never trips it while a wrong one (wrong group, wrong scale) does.
    """

    rtol: float
    atol: float = 0.0
    acc_eps: float = 0.0
    ulps: int = 0  # for quantized outputs: allowed distance in representable steps of the format


@dataclass(frozen=True)
class Request:
    """What a validated call asks of a backend: the device and the value of each feature axis."""

    device: torch.device
    features: Tuple[Tuple[str, str], ...]


FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def result(y: torch.Tensor, dtype: torch.dtype, compute_dtype: torch.dtype) -> torch.Tensor:
    """Round a reference result to the contract's output dtype, except for the float64 oracle
    (``compute_dtype=torch.float64``), which returns unrounded results."""
    return y if compute_dtype == torch.float64 else y.to(dtype)


_DTYPE_NAMES: Dict[torch.dtype, str] = {}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``'bfloat16'`` (cached; used on the hot path)."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype).replace("torch.", "")
    return name


_OPS: Dict[str, "Op"] = {}


class Op:
    """A HAL operator: call it like the function it was declared as."""

    def __init__(
        self,
        spec: Callable[..., Request],
        family: str,
        axes: Mapping[str, Sequence[str]],
        tolerance: Mapping[str, Tolerance],
    ):
        functools.update_wrapper(self, spec)
        self.name: str = spec.__name__
        self.family = family
        self.axes: Dict[str, Tuple[str, ...]] = {k: tuple(v) for k, v in axes.items()}
        self.tolerance: Dict[str, Tolerance] = dict(tolerance)
        self.signature = inspect.signature(spec)
        self._validate = spec
        self._reference: Optional[Callable[..., Any]] = None
        self._value_checks: Optional[Callable[..., None]] = None

    def reference(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Decorator: attach the reference semantics (same parameters, plus ``compute_dtype``)."""
        self._reference = fn
        return fn

    def value_checks(self, fn: Callable[..., None]) -> Callable[..., None]:
        """Decorator: attach the checks that read tensor *values* (ids in range, sizes adding up; same
        parameters). They run in checked mode (:meth:`validate`) and wherever an implementation reads those
        values anyway (:meth:`check_values`)."""
        self._value_checks = fn
        return fn

    @property
    def has_value_checks(self) -> bool:
        return self._value_checks is not None

    def check_values(self, *args: Any, **kwargs: Any) -> None:
        """Run the contract's value checks on a call's arguments (a device-to-host sync on an accelerator)."""
        if self._value_checks is not None:
            self._value_checks(*args, **kwargs)

    @property
    def reference_impl(self) -> Callable[..., Any]:
        assert self._reference is not None, f"{self.name} has no reference"
        return self._reference

    def fp32_reference(self, *, check_values: bool = False) -> Callable[..., Any]:
        """The reference computing in float32 (``compute_dtype=torch.float32``), the operator's signature
        otherwise: what the CPU backend runs, and a vendor backend's reference path. With ``check_values``
        the contract's value checks, if any, run first (where the values index memory and reading them
        costs no device-to-host sync)."""
        reference = functools.partial(self.reference_impl, compute_dtype=torch.float32)
        if not (check_values and self.has_value_checks):
            return reference

        @functools.wraps(self.reference_impl)
        def value_checked(*args: Any, **kwargs: Any) -> Any:
            self.check_values(*args, **kwargs)
            return reference(*args, **kwargs)

        value_checked.__signature__ = inspect.signature(reference)  # type: ignore[attr-defined]
        return value_checked

    def validate(self, *args: Any, **kwargs: Any) -> Request:
        """Check the arguments against the contract (their values too in checked mode); return the
        :class:`Request` they make."""
        request = self._validate(*args, **kwargs)
        if self._value_checks is not None and value_checks_enabled():
            self._value_checks(*args, **kwargs)
        return request

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return (_DISPATCH or _dispatch())(self, args, kwargs)

    def __repr__(self) -> str:
        return f"<hal op {self.family}.{self.name}>"


_DISPATCH: Optional[Callable[..., Any]] = None


def _dispatch() -> Callable[..., Any]:
    """:func:`hal.dispatch.dispatch`, imported on first use (import cycle: dispatch needs the registry and
    config) and then held in ``_DISPATCH``, so that an operator call does not pay for an import statement."""
    global _DISPATCH
    from hal.dispatch import dispatch

    _DISPATCH = dispatch
    return dispatch


def contract(
    *, family: str, axes: Mapping[str, Sequence[str]], tolerance: Mapping[str, Tolerance]
) -> Callable[[Callable[..., Any]], Op]:
    """Declare an operator contract (see the module docstring). The spec is annotated as the operator is
    called (its return type the operator's); as a spec it returns the :class:`Request` the call makes."""

    def wrap(spec: Callable[..., Any]) -> Op:
        op = Op(spec, family, axes, tolerance)
        if op.name in _OPS:
            raise RuntimeError(f"operator {op.name!r} declared twice")
        _OPS[op.name] = op
        return op

    return wrap


def all_ops() -> Dict[str, Op]:
    """Every declared operator, by name (importing :mod:`hal.ops` declares them)."""
    import hal.ops  # noqa: F401  (declares the contracts)

    return dict(_OPS)


def get_op(name: str) -> Op:
    ops = all_ops()
    if name not in ops:
        raise KeyError(f"no operator named {name!r}; known: {', '.join(sorted(ops))}")
    return ops[name]


# --------------------------------------------------------------------------- validation helpers


def is_int(value: object) -> TypeGuard[int]:
    """Whether ``value`` is a Python int, and not a bool (``isinstance(True, int)`` holds)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> TypeGuard[float]:
    """Whether ``value`` is a Python int or float, and not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check(ok: bool, op: str, argument: str, expected: str, got: object) -> None:
    """Raise :class:`InvalidArgumentError` naming ``argument`` unless ``ok``."""
    if not ok:
        raise InvalidArgumentError(op, argument, expected, str(got))


def check_tensor(
    op: str, argument: str, value: object, *, ndim: Optional[int] = None, dtypes: Optional[Sequence[torch.dtype]] = None
) -> torch.Tensor:
    """Check that ``value`` is a tensor of rank ``ndim`` with one of ``dtypes``; return it."""
    if not isinstance(value, torch.Tensor):
        raise InvalidArgumentError(op, argument, "a torch.Tensor", type(value).__name__)
    if ndim is not None and value.dim() != ndim:
        raise InvalidArgumentError(op, argument, f"a {ndim}-D tensor", f"{value.dim()}-D of shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        raise InvalidDtypeError(
            op, argument, "dtype in {" + ", ".join(dtype_name(d) for d in dtypes) + "}", dtype_name(value.dtype)
        )
    return value


def check_same_device(op: str, **tensors: Optional[torch.Tensor]) -> torch.device:
    """All given (non-None) tensors must share one device; return it."""
    device = None
    first = ""
    for name, t in tensors.items():
        if t is None:
            continue
        if device is None:
            device, first = t.device, name
        elif t.device != device:
            raise DeviceMismatchError(
                op, name, f"a tensor on {device} (the device of '{first}')", f"a tensor on {t.device}"
            )
    assert device is not None
    return device


def value_checks_enabled(device: Optional[torch.device] = None) -> bool:
    """Whether checks that read tensor *values* run: only in checked mode (``HAL_CHECKED=1``, see
    :mod:`hal.config`), on every device. They cost a device-to-host sync on an accelerator and microseconds
    per call on the CPU, and unchecked calls with arguments seen before skip validation altogether
    (:mod:`hal.dispatch`), so what it returns must not depend on values. ``device`` is ignored (accepted
    for code written when the CPU always checked values)."""
    del device
    from hal.config import checked_mode

    return checked_mode()
