"""What the vendor backends (Ascend, Cambricon MLU, a third party's) share, written once.

* :class:`VendorBackend` — a backend whose kernels call a vendor op library (``torch_npu``,
  ``torch_mlu_ops``). It imports the library lazily, says in plain words why it cannot run here (not
  installed; installed but its native libraries fail to load, with the vendor's hint; no device
  visible), and serves a request its vendor kernel cannot (an unsupported argument combination, a
  version that lacks an operator) through :meth:`VendorBackend.reference_path`: the contract's
  reference semantics on the same device, never a silently different result. Every call records the
  path that served it (:attr:`VendorBackend.paths`), so tests and ``hal bisect`` can tell which vendor
  operator ran, and every reference-path call the condition that sent it there
  (:attr:`VendorBackend.fallbacks`).
* :class:`OpMapping` and :class:`Fallback` — what a vendor backend's operator maps to, as data: the
  vendor operators, the documentation followed, and the named conditions under which the reference
  path serves instead, each with its reason in plain words. A kernel marked :func:`mapped` never sees
  a call one of its conditions covers; the same records render the backend's docs table
  (:mod:`hal.docgen`) and ``hal info``.
* :class:`EmulatedLibrary` — the base of a **test double**: a CPU stand-in for exactly the vendor
  operators a backend calls, written from the vendor's documentation (signatures, output conventions
  and refusals). A backend built on one is registered with ``emulated=True``: never auto-selected, and
  every result and report it produces is labelled EMULATED. It is not evidence about hardware.
* :func:`emulated_twin` — the ``BackendSpec`` pair (real backend, emulated twin) a vendor plugin
  returns; ``hal conformance --backend NAME --emulate`` certifies the twin.
"""

from __future__ import annotations

import collections
import functools
import importlib
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Counter, Dict, List, Mapping, Optional, Tuple

import torch

from hal.backend import Availability, Backend, implements
from hal.contract import get_op
from hal.errors import PluginError

__all__ = [
    "VendorBackend",
    "EmulatedLibrary",
    "EmulatorRefusal",
    "emulated_twin",
    "EMULATED_SUFFIX",
    "OpMapping",
    "Fallback",
    "always",
    "given",
    "row_count",
    "by_operator",
    "mapped",
]

EMULATED_SUFFIX = "-emulated"


@dataclass(frozen=True)
class Fallback:
    """A named condition under which a vendor kernel does not serve a call: the reference path does.

    ``when(backend, call)`` is true for the calls it covers; ``call`` holds the call's arguments under the
    contract's parameter names, defaults filled in (``call.x``, ``call.out_dtype``). ``when=None`` covers
    every call. ``reason`` says why in plain words, citing the vendor's documentation or limit."""

    name: str
    reason: str
    when: Optional[Callable[[Any, SimpleNamespace], bool]] = None


def always(reason: str) -> Fallback:
    """The condition of an operator that the reference path always serves."""
    return Fallback("always", reason)


def given(name: str, reason: str, *params: str) -> Fallback:
    """The condition that the call gives one of the optional parameters ``params`` (not ``None``)."""
    listed = " or ".join(f"`{p}`" for p in params)
    return Fallback(name, f"{listed} given: {reason}", lambda b, c: any(getattr(c, p) is not None for p in params))


def row_count(t: torch.Tensor) -> int:
    """The rows of ``t`` flattened to 2-D over its last dimension (a predicate's "no rows")."""
    return t.shape[:-1].numel()


@dataclass(frozen=True)
class OpMapping:
    """How a vendor backend serves one operator.

    ``vendor_ops``: the vendor operators its kernel calls (none: the reference path serves every call);
    ``call`` (how it calls them) and ``translation`` (the conversions at the boundary): markdown for the
    docs table; ``source``: the documentation the mapping follows; ``fallbacks``: when the reference path
    serves instead (the first that holds is recorded); ``offered``: where the backend offers the operator,
    when not wherever it runs (its ``capabilities()`` applies it)."""

    op: str
    vendor_ops: Tuple[str, ...] = ()
    call: str = ""
    translation: str = ""
    source: str = ""
    fallbacks: Tuple[Fallback, ...] = ()
    offered: str = ""

    def __post_init__(self) -> None:
        if not self.vendor_ops and not any(f.when is None for f in self.fallbacks):
            raise ValueError(f"{self.op}: a mapping without vendor operators needs an unconditional fallback")

    def as_dict(self) -> Dict[str, Any]:
        """JSON-ready, for ``hal info --json``."""
        return {
            "maps_to": list(self.vendor_ops),
            "source": self.source,
            "offered": self.offered or "everywhere",
            "reference_when": [{"condition": f.name, "reason": f.reason} for f in self.fallbacks],
        }


def by_operator(*records: OpMapping) -> Dict[str, OpMapping]:
    """A backend's :attr:`VendorBackend.mappings` from its records, one per operator."""
    table = {r.op: r for r in records}
    if len(table) != len(records):
        raise ValueError("two OpMapping records for one operator")
    return table


def mapped(op: str, **axes: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """:func:`~hal.backend.implements` for a :class:`VendorBackend` kernel: a call that one of ``op``'s
    fallback conditions covers takes the reference path; the kernel serves the others."""

    def mark(kernel: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(kernel)  # the signature registration checks is the kernel's
        def serve(self: "VendorBackend", *args: Any, **kwargs: Any) -> Any:
            return self._serve(op, kernel, args, kwargs)

        return implements(op, **axes)(serve)

    return mark


class EmulatorRefusal(RuntimeError):
    """Raised by an emulated vendor operator where the vendor's kernel rejects its arguments (the
    documented constraints); a ``RuntimeError`` as the vendors' own errors are."""


class EmulatedLibrary:
    """Base of a CPU stand-in for a vendor op library (a test double, see the module docstring).

    Subclasses define the vendor's operators as methods with the vendor's names and signatures. Each
    call is recorded in :attr:`calls` (the vendor operator's name), and :meth:`refuse` raises what the
    vendor kernel raises for an argument it documents as unsupported.
    """

    #: what the stand-in emulates, e.g. "torch_npu 2.10.0.post4 operators, as documented"
    emulates: str = ""

    def __init__(self) -> None:
        self.calls: List[str] = []

    def record(self, op: str) -> None:
        self.calls.append(op)

    def refuse(self, op: str, why: str) -> None:
        raise EmulatorRefusal(f"[emulated {op}] {why}")

    @staticmethod
    def per_row_int8(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The per-row symmetric int8 quantiser both vendors document (``s = rowmax|x| / 127``, ``q =
        round(x / s)``), with this double's picks where they are silent: no amax floor (an all-zero row
        gets ``s = 0``, ``q = 0``) and ties rounded half away from zero. ``x`` ``[M, K]`` -> ``(q, s)``."""
        xf = x.float()
        s = xf.abs().amax(dim=-1) / 127.0
        v = xf / s[:, None]
        return (v.sign() * (v.abs() + 0.5).floor()).nan_to_num(0.0).clamp(-127, 127).to(torch.int8), s


class VendorBackend(Backend):
    """A backend calling a vendor op library; see the module docstring.

    Subclasses set ``library`` (import name), ``install_hint`` and ``native_hint`` (what a user does
    about a missing package or missing native libraries), and implement :meth:`visible_devices`.
    ``lib`` is the vendor library, or an :class:`EmulatedLibrary` for the emulated twin. ``mappings``
    (:func:`by_operator`) holds one :class:`OpMapping` per operator the backend implements: kernels marked
    :func:`mapped` serve the operators with vendor operators, the reference path the others.
    """

    library: str = ""
    install_hint: str = ""
    native_hint: str = ""
    device_name: str = "device"  # in messages: "no NPU is visible"
    mappings: Mapping[str, OpMapping] = {}

    def __init__(self, lib: Optional[Any] = None) -> None:
        self._lib = lib
        self.emulated = isinstance(lib, EmulatedLibrary)
        if self.emulated:
            self.device_type = "cpu"  # the test double computes on CPU tensors
        #: how many calls each (operator, path) served: path = the vendor operator, or "reference"
        self.paths: Counter[Tuple[str, str]] = collections.Counter()
        #: how many calls each (operator, fallback condition's name) sent to the reference path
        self.fallbacks: Counter[Tuple[str, str]] = collections.Counter()
        super().__init__()
        for op, record in self.mappings.items():
            if not record.vendor_ops:
                self.add_implementation(op, self._reference_server(op))
        unmapped = set(self._impls) ^ set(self.mappings)
        if unmapped:
            raise PluginError(
                f"backend '{self.name or type(self).__name__}': {', '.join(sorted(unmapped))}: "
                "implemented without an OpMapping record, or recorded without a kernel"
            )

    @property
    def lib(self) -> Any:
        if self._lib is None:
            self._lib = importlib.import_module(self.library)
        return self._lib

    # -- availability ----------------------------------------------------------------------------
    def visible_devices(self) -> int:
        """How many devices of this backend's type the vendor runtime sees (the library is imported)."""
        raise NotImplementedError

    def probe(self) -> Availability:
        if self.emulated:
            emulates = getattr(self._lib, "emulates", "") or "CPU stand-in"
            return Availability(True, f"EMULATED: {emulates} (a test double, not hardware)")
        try:
            _ = self.lib  # the import is the probe
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.split(".")[0] == self.library.split(".")[0]:
                return Availability(
                    False, f"{self.library} is not installed" + (f" ({self.install_hint})" if self.install_hint else "")
                )
            return Availability(False, f"{self.library} failed to import: {exc}")
        except (ImportError, OSError) as exc:  # the package is there, its native libraries are not
            hint = f"; {self.native_hint}" if self.native_hint else ""
            return Availability(False, f"{self.library} is installed but failed to load: {exc}{hint}")
        except Exception as exc:  # vendor import hooks fail in surprising ways: report, never crash
            return Availability(False, f"{self.library} failed to import: {type(exc).__name__}: {exc}")
        try:
            count = self.visible_devices()
        except Exception as exc:
            return Availability(False, f"{self.library} imported but the device query failed: {exc}")
        if count == 0:
            return Availability(False, f"{self.library} imported but no {self.device_name} is visible")
        return Availability(True)

    # -- serving ---------------------------------------------------------------------------------
    def served(self, op: str, path: str) -> None:
        """Record that ``path`` (a vendor operator's name, or "reference") served one call of ``op``."""
        self.paths[(op, path)] += 1

    def fallback(self, op: str, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional[Fallback]:
        """The first of ``op``'s fallback conditions that holds for a call, or ``None`` (its kernel serves it)."""
        call = None
        for condition in self.mappings[op].fallbacks:
            if condition.when is None:
                return condition
            if call is None:
                call = _arguments(op, args, kwargs)
            if condition.when(self, call):
                return condition
        return None

    def _serve(
        self, op: str, kernel: Optional[Callable[..., Any]], args: Tuple[Any, ...], kwargs: Dict[str, Any]
    ) -> Any:
        condition = self.fallback(op, args, kwargs)
        if condition is None:
            assert kernel is not None  # a record without vendor operators has an unconditional fallback
            return kernel(self, *args, **kwargs)
        self.fallbacks[(op, condition.name)] += 1
        return self.reference_path(op, *args, **kwargs)

    def _reference_server(self, op: str) -> Callable[..., Any]:
        def serve(*args: Any, **kwargs: Any) -> Any:
            return self._serve(op, None, args, kwargs)

        serve.__signature__ = get_op(op).signature  # type: ignore[attr-defined]  # registration checks it
        return serve

    def mapping_info(self) -> Dict[str, Dict[str, Any]]:
        """Per operator offered here, what it maps to and when the reference path serves it (``hal info``)."""
        offered = self.capabilities()
        return {op: self.mappings[op].as_dict() for op in sorted(offered) if op in self.mappings}

    def reference_path(self, op: str, *args: Any, **kwargs: Any) -> Any:
        """Serve ``op`` with the contract's reference semantics (fp32 compute, plain PyTorch, on the
        arguments' device): the correct path for a request the vendor kernel cannot serve."""
        self.served(op, "reference")
        return _reference(op)(*args, **kwargs)


@functools.lru_cache(maxsize=None)
def _reference(op: str) -> Callable[..., Any]:
    return get_op(op).fp32_reference()


@functools.lru_cache(maxsize=None)
def _parameters(op: str) -> Tuple[Tuple[str, ...], Dict[str, Any]]:
    """``op``'s positional parameter names and its defaults."""
    params = get_op(op).signature.parameters.values()
    positional = tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
    return positional, {p.name: p.default for p in params if p.default is not p.empty}


def _arguments(op: str, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> SimpleNamespace:
    """A call's arguments by parameter name, defaults filled in (cheaper than ``Signature.bind``)."""
    positional, defaults = _parameters(op)
    return SimpleNamespace(**{**defaults, **dict(zip(positional, args)), **kwargs})


def emulated_twin(spec: Any, *, emulator_factory: str, description: str = "") -> List[Any]:
    """``[spec, twin]``: a vendor plugin's real backend and its emulated twin (named ``NAME-emulated``,
    ``emulated=True``, built by ``emulator_factory`` = ``"module:Class"``)."""
    from dataclasses import replace

    twin = replace(
        spec,
        name=spec.name + EMULATED_SUFFIX,
        factory=emulator_factory,
        emulated=True,
        priority=-1,
        description=description
        or f"EMULATED test double of '{spec.name}': vendor operators "
        "emulated on the CPU from the vendor's documentation",
    )
    return [spec, twin]
