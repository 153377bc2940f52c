"""What the vendor backends (Ascend, Cambricon MLU, a third party's) share, written once.

* :class:`VendorBackend` — a backend whose kernels call a vendor op library (``torch_npu``,
  ``torch_mlu_ops``). It imports the library lazily, says in plain words why it cannot run here (not
  installed; installed but its native libraries fail to load, with the vendor's hint; no device
  visible), and serves a request its vendor kernel cannot (an unsupported argument combination, a
  version that lacks an operator) through :meth:`VendorBackend.reference_path`: the contract's
  reference semantics on the same device, never a silently different result. Every call records the
  path that served it (:attr:`VendorBackend.paths`), so tests and ``hal bisect`` can tell which vendor
  operator ran.
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
from typing import Any, Callable, Counter, Iterable, List, Optional, Tuple

import torch

from hal.backend import Availability, Backend
from hal.contract import get_op

__all__ = ["VendorBackend", "EmulatedLibrary", "EmulatorRefusal", "emulated_twin", "EMULATED_SUFFIX"]

EMULATED_SUFFIX = "-emulated"


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
    ``lib`` is the vendor library, or an :class:`EmulatedLibrary` for the emulated twin.
    """

    library: str = ""
    install_hint: str = ""
    native_hint: str = ""
    device_name: str = "device"  # in messages: "no NPU is visible"

    def __init__(self, lib: Optional[Any] = None) -> None:
        self._lib = lib
        self.emulated = isinstance(lib, EmulatedLibrary)
        if self.emulated:
            self.device_type = "cpu"  # the test double computes on CPU tensors
        #: how many calls each (operator, path) served: path = the vendor operator, or "reference"
        self.paths: Counter[Tuple[str, str]] = collections.Counter()
        super().__init__()

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
            return Availability(True, f"EMULATED: {self._lib.emulates or 'CPU stand-in'} (a test double, not hardware)")
        try:
            self.lib
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.split(".")[0] == self.library.split(".")[0]:
                return Availability(False, f"{self.library} is not installed" + (f" ({self.install_hint})"
                                                                                 if self.install_hint else ""))
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

    def add_reference_implementations(self, ops: Iterable[str]) -> None:
        """Serve each of ``ops`` by :meth:`reference_path` only (operators the vendor library has no kernel
        for), so that the backend serves the whole contract set and says which path ran."""
        for op in ops:
            self.add_implementation(op, self._reference_server(op))

    def _reference_server(self, op: str) -> Callable[..., Any]:
        def serve(*args: Any, **kwargs: Any) -> Any:
            return self.reference_path(op, *args, **kwargs)
        serve.__signature__ = get_op(op).signature  # type: ignore[attr-defined]  # registration checks it
        return serve

    def reference_path(self, op: str, *args: Any, **kwargs: Any) -> Any:
        """Serve ``op`` with the contract's reference semantics (fp32 compute, plain PyTorch, on the
        arguments' device): the correct path for a request the vendor kernel cannot serve."""
        self.served(op, "reference")
        return _reference(op)(*args, **kwargs)


@functools.lru_cache(maxsize=None)
def _reference(op: str) -> Callable[..., Any]:
    return functools.partial(get_op(op).reference_impl, compute_dtype=torch.float32)


def emulated_twin(spec: Any, *, emulator_factory: str, description: str = "") -> List[Any]:
    """``[spec, twin]``: a vendor plugin's real backend and its emulated twin (named ``NAME-emulated``,
    ``emulated=True``, built by ``emulator_factory`` = ``"module:Class"``)."""
    from dataclasses import replace
    twin = replace(spec, name=spec.name + EMULATED_SUFFIX, factory=emulator_factory, emulated=True, priority=-1,
                   description=description or f"EMULATED test double of '{spec.name}': vendor operators "
                                              "emulated on the CPU from the vendor's documentation")
    return [spec, twin]
