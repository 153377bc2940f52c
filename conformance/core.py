"""The conformance machinery: suites, cells, the oracle comparison, and running one cell.

* A **suite** (one per operator, in ``hal/conformance/suites``) says which *cells* to certify — the
  combinations of the contract's feature values — how to draw valid inputs for a cell (hypothesis),
  and which properties the result must satisfy beyond agreeing with the oracle.
* A **cell** is one row of the report: ``grouped_gemm[layout=contiguous,x_dtype=bfloat16,...]``.
* The **oracle** is the contract's reference in float64 on the CPU; tolerances come from the contract.

:func:`run_cell` runs one cell against one backend, in this process, and returns a :class:`CellResult`.
Process isolation, timeouts, resuming and reports are :mod:`hal.conformance.runner`'s job.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

import torch
from hypothesis import HealthCheck, Phase, given, reporting, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase, ExampleDatabase

import hal
from hal.contract import Op, Tolerance, all_ops
from hal.errors import UnsupportedError
from hal.numerics import compare, ulp_distance
from hal.registry import registry

__all__ = [
    "PROFILES",
    "ConformanceFailure",
    "Suite",
    "Case",
    "Recorder",
    "CellResult",
    "Coverage",
    "suite",
    "suites",
    "cells",
    "run_cell",
    "draw_only",
    "cell_id",
    "cell_seed",
    "note",
]

# max_examples per cell. "quick" smoke-tests a bring-up, "ci" certifies the CPU backend in minutes on
# 2 cores, "thorough" is the overnight run a vendor sends back.
PROFILES: Dict[str, int] = {"quick": 4, "ci": 30, "thorough": 400}


class ConformanceFailure(AssertionError):
    """A verdict: the backend's result breaks the contract. Raised explicitly, never by ``assert``, which
    ``python -O`` / ``PYTHONOPTIMIZE`` strips (and would let any backend pass); an ``AssertionError`` so that
    hypothesis and pytest treat it as the failure it is."""


def cell_id(op: str, features: Mapping[str, str]) -> str:
    return f"{op}[" + ",".join(f"{k}={v}" for k, v in features.items()) + "]"


def cell_seed(seed: int, cid: str) -> int:
    """The hypothesis seed of one cell: a stable hash (not Python's salted ``hash``) of the run seed and the
    cell id, so that every cell draws its own inputs and a run seed reproduces all of them."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{cid}".encode()).digest()[:4], "big") >> 1


class Coverage:
    """What a cell's draws covered: the range of each noted size, and how often each special value and
    boundary class occurred. Suites add to the current cell's through :func:`note`."""

    def __init__(self) -> None:
        self.ranges: Dict[str, List[int]] = {}
        self.special: Dict[str, int] = {}
        self.boundary: Dict[str, int] = {}
        self.examples = 0

    def note(self, special: Iterable[str] = (), boundary: Iterable[str] = (), **sizes: int) -> None:
        for name, v in sizes.items():
            lo, hi = self.ranges.get(name, (int(v), int(v)))
            self.ranges[name] = [min(lo, int(v)), max(hi, int(v))]
        for counts, classes in ((self.special, special), (self.boundary, boundary)):
            for c in set(classes):
                counts[c] = counts.get(c, 0) + 1

    def missing(self, declared: Mapping[str, Iterable[str]]) -> List[str]:
        """The declared classes (``{"special": ..., "boundary": ...}``) never drawn, as ``kind:class``."""
        seen = {"special": self.special, "boundary": self.boundary}
        return sorted(f"{kind}:{c}" for kind, classes in declared.items() for c in classes if c not in seen[kind])

    def to_json(self) -> Dict[str, Any]:
        return {
            "examples": self.examples,
            "ranges": dict(sorted(self.ranges.items())),
            "special": dict(sorted(self.special.items())),
            "boundary": dict(sorted(self.boundary.items())),
        }


_COVERAGE: List[Coverage] = []  # the cell being drawn (a stack: empty outside a run)


def note(special: Iterable[str] = (), boundary: Iterable[str] = (), **sizes: int) -> None:
    """Record what the current draw covers (sizes such as ``tokens=``, ``K=``; special values; boundary
    classes) in the current cell's :class:`Coverage`; does nothing outside a run."""
    if _COVERAGE:
        _COVERAGE[-1].note(special, boundary, **sizes)


@dataclass
class Case:
    """One drawn input: positional and keyword arguments, made on the CPU."""

    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]
    # The input tensors as they were before the backend ran (set by the runner): what the check of an
    # operator that writes into an argument (``Suite.mutates``) compares the written tensor with.
    before: Dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def to(self, device: torch.device) -> "Case":
        return Case(tuple(_move(a, device) for a in self.args), {k: _move(v, device) for k, v in self.kwargs.items()})

    def tensors(self) -> Iterator[Tuple[str, torch.Tensor]]:
        """Every input tensor with its name: ``arg0``.. for positional arguments, the keyword otherwise,
        ``name.field`` inside a named tuple (e.g. a :class:`hal.ops.MoePermutation`)."""
        named = [(f"arg{i}", a) for i, a in enumerate(self.args)] + list(self.kwargs.items())
        for name, v in named:
            if isinstance(v, torch.Tensor):
                yield name, v
            elif _is_named_tuple(v):
                for field_name, t in zip(v._fields, v):
                    if isinstance(t, torch.Tensor):
                        yield f"{name}.{field_name}", t

    def describe(self) -> str:
        def show(v: Any) -> str:
            if isinstance(v, torch.Tensor):
                dtype = str(v.dtype).replace("torch.", "")
                if v.numel() <= 16:  # small enough to print: the minimal example, whole
                    values = v.float().tolist() if v.dtype.itemsize == 1 and v.is_floating_point() else v.tolist()
                    return f"tensor({values}, dtype={dtype})"
                return f"Tensor{list(v.shape)}:{dtype}"
            if _is_named_tuple(v):
                return f"{type(v).__name__}(" + ", ".join(f"{k}={show(t)}" for k, t in zip(v._fields, v)) + ")"
            return repr(v)

        parts = [show(a) for a in self.args] + [f"{k}={show(v)}" for k, v in self.kwargs.items()]
        return "(" + ", ".join(parts) + ")"


@dataclass
class Stat:
    max_abs: float = 0.0
    max_rel: float = 0.0
    tolerance_used: float = 0.0
    max_ulps: int = 0
    checked: int = 0

    def merge(
        self, max_abs: float = 0.0, max_rel: float = 0.0, max_ulps: int = 0, n: int = 0, tolerance_used: float = 0.0
    ) -> None:
        self.max_abs = max(self.max_abs, max_abs)
        self.max_rel = max(self.max_rel, max_rel)
        self.tolerance_used = max(self.tolerance_used, tolerance_used)
        self.max_ulps = max(self.max_ulps, max_ulps)
        self.checked += n


class Recorder:
    """What a suite's ``check`` uses to compare and check (raising :class:`ConformanceFailure`); keeps error
    statistics per output."""

    def __init__(self) -> None:
        self.stats: Dict[str, Stat] = {}

    def _stat(self, name: str) -> Stat:
        return self.stats.setdefault(name, Stat())

    def close(
        self,
        name: str,
        actual: torch.Tensor,
        exact: torch.Tensor,
        tol: Tolerance,
        *,
        n: int = 0,
        magnitude: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
    ) -> None:
        """``actual`` within ``tol`` of the float64 ``exact`` (only where ``mask``, if given)."""
        if actual.shape != exact.shape:
            raise ConformanceFailure(f"{name}: shape {tuple(actual.shape)}, expected {tuple(exact.shape)}")
        if actual.dtype != exact.dtype and exact.dtype != torch.float64:
            raise ConformanceFailure(f"{name}: dtype {actual.dtype}, expected {exact.dtype}")
        a, e = actual.detach().cpu(), exact.detach().cpu()
        m = magnitude.detach().cpu() if magnitude is not None else None
        if mask is not None:
            mask = mask.cpu()
            a, e = a[mask], e[mask]
            m = m[mask] if m is not None else None
        c = compare(a, e, tol, n=n, magnitude=m)
        self._stat(name).merge(c.max_abs, c.max_rel, 0, c.total, c.tolerance_used)
        if not c.ok:
            raise ConformanceFailure(f"{name}: {c}")

    def ulps(self, name: str, actual: torch.Tensor, expected: torch.Tensor, allowed: int) -> None:
        """Quantised outputs: at most ``allowed`` representable steps from the reference's bits."""
        if actual.dtype != expected.dtype:
            raise ConformanceFailure(f"{name}: dtype {actual.dtype}, expected {expected.dtype}")
        if actual.shape != expected.shape:
            raise ConformanceFailure(f"{name}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
        a, e = actual.detach().cpu(), expected.detach().cpu()
        nan = a.float().isnan() | e.float().isnan()
        if not torch.equal(a.float().isnan(), e.float().isnan()):
            raise ConformanceFailure(f"{name}: NaN positions differ")
        d = ulp_distance(a[~nan], e[~nan])
        worst = int(d.max()) if d.numel() else 0
        self._stat(name).merge(max_ulps=worst, n=int(d.numel()))
        if worst > allowed:
            idx = int(d.argmax())
            raise ConformanceFailure(
                f"{name}: {int((d > allowed).sum())} / {d.numel()} elements more than "
                f"{allowed} ulp(s) away (worst {worst} ulps: got {float(a[~nan][idx])!r}, "
                f"reference {float(e[~nan][idx])!r})"
            )

    def equal(self, name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
        """Exact equality (integer outputs, bit-exact contracts)."""
        self.ulps(name, actual, expected, 0) if actual.is_floating_point() else self._equal_int(name, actual, expected)

    def _equal_int(self, name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
        if actual.dtype != expected.dtype:
            raise ConformanceFailure(f"{name}: dtype {actual.dtype}, expected {expected.dtype}")
        a, e = actual.detach().cpu(), expected.detach().cpu()
        if a.shape != e.shape:
            raise ConformanceFailure(f"{name}: shape {tuple(a.shape)}, expected {tuple(e.shape)}")
        bad = a != e
        self._stat(name).merge(n=a.numel())
        if bool(bad.any()):
            raise ConformanceFailure(
                f"{name}: {int(bad.sum())} / {a.numel()} elements differ "
                f"(first at {tuple(int(i) for i in bad.nonzero()[0])})"
            )

    def holds(self, condition: bool, statement: str) -> None:
        """A property stated as math; ``statement`` is what the report prints when it fails."""
        if not condition:
            raise ConformanceFailure(f"property violated: {statement}")


class Suite:
    """The conformance suite of one operator. Subclass, set ``op``, and implement :meth:`draw` and
    :meth:`check`; override :meth:`meaningful` to drop feature combinations that cannot occur."""

    op: str = ""
    mutates: Tuple[str, ...] = ()  # arguments the contract says the operator writes to
    # Time budget per drawn example, for the derived per-cell time limit (runner.time_limit): about ten times
    # the slowest example measured on 2 CPU cores (0.5 s where that was under 0.05 s).
    example_seconds: float = 0.5
    # The special values and boundary classes a pass promises to have drawn (see :meth:`declared`).
    special: Tuple[str, ...] = ()
    boundary: Tuple[str, ...] = ()

    @property
    def contract(self) -> Op:
        return all_ops()[self.op]

    def meaningful(self, features: Mapping[str, str]) -> bool:
        return True

    def declared(self, features: Mapping[str, str]) -> Dict[str, Set[str]]:
        """The classes the cell's draws must reach on the ``ci`` profile (a test checks it)."""
        return {"special": set(self.special), "boundary": set(self.boundary)}

    def draw(self, data: st.DataObject, features: Mapping[str, str]) -> Case:
        """Draw one valid input of the cell, calling :func:`note` with what it covers."""
        raise NotImplementedError

    def check(self, rec: Recorder, case: Case, output: Any, oracle: Any, run: Callable[[Case], Any]) -> None:
        """Compare ``output`` (the backend's, moved to the CPU) with ``oracle`` (the float64 reference
        on the same inputs) and check the operator's properties through ``rec`` (never with ``assert``, which
        ``python -O`` strips); ``run(case)`` calls the backend again (for metamorphic properties: permuted
        groups, shuffled page tables ...)."""
        raise NotImplementedError


_SUITES: Dict[str, Suite] = {}


def suite(cls: type) -> type:
    """Class decorator: register a suite."""
    _SUITES[cls.op] = cls()
    return cls


def suites() -> Dict[str, Suite]:
    from hal.conformance import suites as _  # noqa: F401  (registers every suite)

    return dict(_SUITES)


def cells(op: str) -> List[Dict[str, str]]:
    """Every meaningful combination of the contract's feature values, in a stable order."""
    s = suites()[op]
    axes = s.contract.axes
    combos = (dict(zip(axes, values)) for values in itertools.product(*axes.values()))
    return [c for c in combos if s.meaningful(c)]


@dataclass
class CellResult:
    """One row of the report."""

    op: str
    features: Dict[str, str]
    id: str
    status: str  # pass | fail | unsupported | error | timeout | crashed | waived-fail | waived-pass
    examples: int = 0
    seconds: float = 0.0
    stats: Dict[str, Dict[str, float]] = field(default_factory=dict)
    message: str = ""
    minimal_example: str = ""
    reproduce: str = ""
    time_limit_s: Optional[float] = None  # the limit the runner applied (None: none, run in process)
    time_limit_from: str = ""  # "derived" (from the profile and the operator), "given" (--timeout) or "none"
    seed: Optional[int] = None  # the cell's own hypothesis seed (cell_seed of the run seed and the id)
    coverage: Dict[str, Any] = field(default_factory=dict)  # Coverage.to_json(): what the draws covered

    def to_json(self) -> Dict[str, Any]:
        return asdict(self)


def _device_for(backend: hal.Backend) -> torch.device:
    return torch.device("cpu") if backend.portable or backend.emulated else torch.device(backend.device_type)


def run_cell(
    backend_name: str,
    op: str,
    features: Mapping[str, str],
    *,
    profile: str = "ci",
    seed: int = 0,
    database: Optional[ExampleDatabase] = None,
    waiver: Optional[str] = None,
) -> CellResult:
    """Certify one cell: draw inputs, run the backend, compare with the oracle, check properties."""
    s = suites()[op]
    contract = s.contract
    features = dict(features)
    cid = cell_id(op, features)
    backend = registry().backend(backend_name)
    support = backend.capabilities().get(op)
    refusal = "not implemented" if support is None else support.refusal(tuple(features.items()))
    if refusal is not None:
        return CellResult(op, features, cid, "unsupported", message=refusal)
    device = _device_for(backend)
    rec = Recorder()
    examples = [0]
    last: List[Case] = []

    coverage = Coverage()

    @_settings(profile, database, cell_seed(seed, cid))
    def certify(data: st.DataObject) -> None:
        case = s.draw(data, features)
        coverage.examples += 1
        last[:] = [case]
        drawn = dict(contract.validate(*case.args, **case.kwargs).features)
        if drawn != features:
            raise ConformanceFailure(f"suite bug: drew {drawn} for cell {features}")
        before = case.before = {name: t.clone() for name, t in case.tensors()}
        on_device = case.to(device)
        output = _call(on_device)
        _write_back(on_device, case, s.mutates)
        for name, t in on_device.tensors():
            if name not in s.mutates:
                rec.holds(
                    torch.equal(t.cpu(), before[name]) or _same_with_nans(t.cpu(), before[name]),
                    f"the operator leaves its input '{name}' unchanged",
                )
        output = _to_cpu(output)
        case_for_oracle = Case(
            tuple(before.get(f"arg{i}", a) for i, a in enumerate(case.args)),
            {k: before.get(k, v) for k, v in case.kwargs.items()},
        )
        oracle = contract.reference_impl(*case_for_oracle.args, **case_for_oracle.kwargs, compute_dtype=torch.float64)
        s.check(rec, case, output, oracle, rerun)
        examples[0] += 1

    def rerun(c: Case) -> Any:
        moved = c.to(device)
        output = _call(moved)
        _write_back(moved, c, s.mutates)
        return _to_cpu(output)

    def _call(c: Case) -> Any:
        with hal.use_backend(backend_name, fallback="error"):
            return contract(*c.args, **c.kwargs)

    # One example-database key per backend and cell (hypothesis keys by test function otherwise, and
    # every cell shares this one): a failing example is replayed first in its own cell next run.
    certify._hypothesis_internal_add_digest = f"{backend_name}/{cid}".encode()
    started = time.perf_counter()
    lines: List[str] = []
    _COVERAGE.append(coverage)
    try:
        with reporting.with_reporter(lines.append):
            certify()
        status, message = "pass", ""
    except UnsupportedError as exc:  # declared supported for the cell, refused for a drawn input
        status, message = "fail", f"UnsupportedError for a declared-supported cell: {exc}"
        lines += getattr(exc, "__notes__", [])
    except AssertionError as exc:
        status, message = "fail", str(exc)
        lines += getattr(exc, "__notes__", [])  # hypothesis attaches the falsifying example here
    except Exception as exc:  # the backend raised: record it, with where
        status, message = (
            "error",
            f"{type(exc).__name__}: {exc}\n" + "".join(traceback.format_tb(exc.__traceback__)[-3:]),
        )
        lines += getattr(exc, "__notes__", [])
    finally:
        _COVERAGE.pop()
    result = CellResult(
        op,
        features,
        cid,
        status,
        examples=examples[0],
        seconds=time.perf_counter() - started,
        stats={k: asdict(v) for k, v in rec.stats.items()},
        message=message.strip(),
        seed=cell_seed(seed, cid),
        coverage=coverage.to_json(),
    )
    if status in ("fail", "error"):
        result.minimal_example = (f"{op}{last[0].describe()}\n" if last else "") + "\n".join(
            ln for ln in lines if not ln.startswith("You can reproduce")
        )
        result.reproduce = (
            f"hal conformance --backend {backend_name} --ops '{cid}' --seed {seed} "
            f"--profile {profile}  # cell seed {cell_seed(seed, cid)}"
        )
    if waiver is not None:
        result.status = "waived-fail" if status in ("fail", "error") else "waived-pass"
        result.message = f"waived: {waiver}" + (f"\n{result.message}" if result.message else "")
    return result


def _settings(profile: str, database: Optional[ExampleDatabase], seed: int) -> Callable:
    """A hypothesis test over ``st.data()`` with the suite's settings: the profile's examples, the cell's seed."""

    def wrap(body: Callable) -> Callable:
        return settings(
            max_examples=PROFILES[profile],
            deadline=None,
            database=database,
            print_blob=True,
            derandomize=False,
            phases=tuple(Phase),
            report_multiple_bugs=False,
            suppress_health_check=list(HealthCheck),
        )(hypothesis_seed(seed)(given(st.data())(body)))

    return wrap


def draw_only(op: str, features: Mapping[str, str], *, profile: str = "ci", seed: int = 0) -> Coverage:
    """What the cell's draws cover at ``profile`` and ``seed``, drawing inputs without running a backend (the
    same examples as a passing run: the same cell seed, no example database)."""
    s, coverage = suites()[op], Coverage()

    @_settings(profile, None, cell_seed(seed, cell_id(op, features)))
    def draw(data: st.DataObject) -> None:
        s.draw(data, dict(features))
        coverage.examples += 1

    _COVERAGE.append(coverage)
    try:
        draw()
    finally:
        _COVERAGE.pop()
    return coverage


def _write_back(on_device: Case, case: Case, mutated: Sequence[str]) -> None:
    """Copy the arguments an operator wrote on the device back into the case's CPU tensors."""
    written, originals = dict(on_device.tensors()), dict(case.tensors())
    for name in mutated:
        if written[name] is not originals[name]:
            originals[name].copy_(written[name].cpu())


def _is_named_tuple(v: Any) -> bool:
    return isinstance(v, tuple) and hasattr(v, "_fields")


def _move(v: Any, device: torch.device) -> Any:
    if isinstance(v, torch.Tensor):
        return v.to(device)
    if _is_named_tuple(v):
        return type(v)(*(_move(t, device) for t in v))
    return v


def _same_with_nans(a: torch.Tensor, b: torch.Tensor) -> bool:
    if not a.is_floating_point():
        return False
    return bool(torch.equal(a.float().nan_to_num(nan=math.pi), b.float().nan_to_num(nan=math.pi)))


def _to_cpu(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output.cpu()
    if isinstance(output, tuple):
        return (
            type(output)(*(_to_cpu(o) for o in output))
            if _is_named_tuple(output)
            else tuple(_to_cpu(o) for o in output)
        )
    return output


def database_at(path: str) -> ExampleDatabase:
    """The example database kept between runs (failing examples are replayed first next time)."""
    return DirectoryBasedExampleDatabase(path)
