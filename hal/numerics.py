"""Comparing a result with the exact reference under a contract's :class:`~hal.contract.Tolerance`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from hal.contract import Tolerance

__all__ = ["Comparison", "compare", "assert_within", "ulp_distance"]


@dataclass(frozen=True)
class Comparison:
    """Statistics of ``actual`` against ``exact``; ``ok`` when every element is within tolerance."""

    ok: bool
    max_abs: float
    max_rel: float  # over elements whose exact value exceeds their allowed error
    tolerance_used: float  # max of error / allowed error: <= 1 passes
    mismatched: int
    total: int
    worst_index: Optional[tuple]
    worst_actual: float
    worst_exact: float
    worst_allowed: float

    def __str__(self) -> str:
        head = "within tolerance" if self.ok else f"mismatched elements: {self.mismatched} / {self.total}"
        worst = (
            (
                f"; worst at index {self.worst_index}: got {self.worst_actual!r}, exact {self.worst_exact!r}, "
                f"allowed error {self.worst_allowed:.3g}"
            )
            if self.worst_index is not None
            else ""
        )
        return f"{head} (max abs error {self.max_abs:.3g}, max rel error {self.max_rel:.3g}){worst}"


def compare(
    actual: torch.Tensor, exact: torch.Tensor, tol: Tolerance, *, n: int = 0, magnitude: Optional[torch.Tensor] = None
) -> Comparison:
    """Compare elementwise: ``|actual - exact| <= atol + rtol*|exact| + acc_eps*n*magnitude``.

    ``exact`` is the float64 oracle; ``magnitude`` the same reduction over absolute values (for a
    GEMM, ``|x| @ |w|``). Non-finite values must match exactly (same infinity, NaN where NaN).
    """
    if actual.shape != exact.shape:
        raise AssertionError(f"shape mismatch: got {tuple(actual.shape)}, exact {tuple(exact.shape)}")
    a = actual.detach().to("cpu", torch.float64)
    e = exact.detach().to("cpu", torch.float64)
    allowed = tol.atol + tol.rtol * e.abs()
    if magnitude is not None and tol.acc_eps:
        allowed = allowed + tol.acc_eps * n * magnitude.detach().to("cpu", torch.float64).abs()
    finite = torch.isfinite(e)
    err = torch.where(finite & torch.isfinite(a), (a - e).abs(), torch.zeros_like(e))
    special_ok = torch.where(finite, torch.isfinite(a), (a == e) | (torch.isnan(a) & torch.isnan(e)))
    if actual.is_floating_point() and actual.dtype != torch.float64:
        # Rounding an exact value beyond the format's range (within tolerance of it) gives +-inf.
        top = torch.finfo(actual.dtype).max
        overflowed = finite & torch.isinf(a) & (a.sign() == e.sign()) & (e.abs() + allowed >= top)
        special_ok = special_ok | overflowed
    bad = ~special_ok | (err > allowed)
    # relative error only where it means something: exact values larger than their allowed error
    meaningful = finite & (e.abs() > allowed)
    rel = err / e.abs().clamp_min(torch.finfo(torch.float64).tiny)
    ratio = err / allowed.clamp_min(torch.finfo(torch.float64).tiny)
    worst = None
    if a.numel():
        score = torch.where(bad, torch.full_like(err, float("inf")), err - allowed)
        flat = int(score.flatten().argmax())
        worst = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape)) if a.dim() else ()
    wa = float(a.flatten()[flat]) if worst is not None else 0.0
    we = float(e.flatten()[flat]) if worst is not None else 0.0
    wl = float(allowed.flatten()[flat]) if worst is not None else 0.0
    return Comparison(
        ok=not bool(bad.any()),
        max_abs=float(err.max()) if a.numel() else 0.0,
        max_rel=float(rel[meaningful].max()) if bool(meaningful.any()) else 0.0,
        tolerance_used=float(ratio[finite].max()) if bool(finite.any()) else 0.0,
        mismatched=int(bad.sum()),
        total=a.numel(),
        worst_index=worst,
        worst_actual=wa,
        worst_exact=we,
        worst_allowed=wl,
    )


def assert_within(
    actual: torch.Tensor,
    exact: torch.Tensor,
    tol: Tolerance,
    *,
    n: int = 0,
    magnitude: Optional[torch.Tensor] = None,
    what: str = "result",
) -> Comparison:
    """:func:`compare`, raising ``AssertionError`` with the statistics when out of tolerance."""
    c = compare(actual, exact, tol, n=n, magnitude=magnitude)
    if not c.ok:
        raise AssertionError(f"{what}: {c}")
    return c


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in representable steps between two tensors of one floating dtype (FP8, bf16, ...),
    by ordering their bit patterns; NaNs must be excluded by the caller."""
    if a.dtype != b.dtype:
        raise TypeError(f"ulp_distance needs one dtype, got {a.dtype} and {b.dtype}")
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]

    def ordered(t: torch.Tensor) -> torch.Tensor:
        i = t.contiguous().view(bits).to(torch.int64)
        width = 8 * t.element_size()
        sign = (i >> (width - 1)) & 1
        mag = i & ((1 << (width - 1)) - 1)
        return torch.where(sign == 1, -mag, mag)

    return (ordered(a) - ordered(b)).abs()
