"""Quantisation family: FP8 e4m3 / FP4 e2m1 quantisers, dequantisers and the block-scaled FP8 GEMM.

Every output is compared with the contract's float64 oracle under the contract's own tolerance table
(quantisers: ``ulps`` on ``q``, ``rtol`` on the scales, bit-exact for UE8M0 and FP4; dequantisers and
the GEMM: ``DEQUANT_TOLERANCE`` / ``GEMM_TOLERANCE``). Properties checked on top (as math):

* quantize_fp8, quantize_fp8_weight: ``s > 0``; UE8M0 ``s`` is a power of two; ``|q| <= 448``; the
  scale is tight, ``448 (1 - rtol) <= max(amax, 1e-4) / s <= 448 (1 + rtol)`` (UE8M0:
  ``224 < amax / s <= 448``); round trip ``|q s - x| <= (1/2 + ulps) step_e4m3(x / s) s``.
* dequantize_fp8, dequantize_fp4: for power-of-two scales, ``y == q s`` exactly wherever ``q s`` is
  representable in ``out_dtype``.
* fp8_gemm: ``y`` equals dequantise-then-matmul (via ``dequantize_fp8``); doubling ``a_scale``
  doubles ``y`` (within tolerance).
* quantize_fp4: ``s`` a positive power of two; decoded ``q`` on the e2m1 grid ``{0, .5, 1, 1.5, 2, 3,
  4, 6}``; ``max(amax, 1e-4) / s <= 6`` (never clips); round trip ``|e2m1(q) s - w| <= step_e2m1 / 2 s``.
* quantize_int8, quantize_int8_weight (one scale per row of K): ``q`` int8 in ``[-127, 127]``; ``s > 0``
  and tight, ``127 (1 - rtol) <= max(amax, 1e-4) / s <= 127 (1 + rtol)``; ``q`` is ``x / s`` rounded to
  nearest, ``|x - q s| <= (1/2 + 2**-14) s`` (the slack: the fp32 roundings of another division form,
  at most ``127 * 3 * 2**-23``), which a rounding toward zero or a wrong scale fails.
* int8_gemm: the integer sum is exact: with unit scales ``y == sum_k a b`` wherever that integer is
  representable in ``out_dtype`` (an accumulator narrower than int32 / fp32 fails); doubling
  ``a_scale`` doubles ``y`` (within tolerance).

Special values (:func:`draw_specials`): the FP8, FP4 and int8 quantisers get NaN, +-inf, -0.0, the input dtype's
subnormals and a group (row) holding the format's max (448, 6, 127: ``s = 1``) next to exact rounding midpoints.
Checked: a group (row) holding NaN or +-inf gets a non-finite scale, the other groups are unaffected (``q`` of
a non-finite group is unspecified); FP8 zeros keep their sign; and for both FP8 scale formats ``q`` is ``x / s``
rounded to nearest, ``|q - x / s| <= step_e4m3(x / s) / 2 + |x / s| 2**-22`` (at the backend's own ``s``;
the slack: the fp32 rounding of the division), which round-toward-zero fails; FP4 likewise, without slack.
dequantize_fp8 gets NaN codes (they decode to NaN, and nothing else does) and -0.0 (decodes to -0.0).

Inputs: DeepSeek-like shapes kept small (rows 0..6, K of 1..3 groups, weights ``[N, K]`` with partial
128-blocks), values from :func:`tensor_specs` (ties, outliers, wide range, tiny/subnormal, near the
format maximum), and an explicit all-zero group (the ``1e-4`` amax floor); int8_gemm also at DeepSeek's
K = 7168 with partial sums beyond 2**24 that cancel (an fp32 accumulator loses bits there).
(``torch.float4_e2m1fn_x2`` inputs are not drawn: torch cannot compare or copy them on the CPU.)
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence, Tuple

import torch
from hypothesis import strategies as st

from hal.conformance.core import Case, Recorder, Suite, note, suite
from hal.conformance.strategies import dim, large, tensor_specs, tiling
from hal.contract import Tolerance
from hal.formats import (
    AMAX_FLOOR,
    FP4_MAX,
    FP8_DTYPE,
    FP8_MAX,
    INT8_MAX,
    expand_scale,
    scale_as_float,
    scale_shape,
    unpack_fp4,
)
from hal.ops.grouped_gemm import dequantized_operands

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SIZES = (1, 64, 128, 130, 200, 256, 0)  # weight dims: partial edge blocks, zero last (simplest first)
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_E8M0 = getattr(torch, "float8_e8m0fnu", None)


# --------------------------------------------------------------------------- shared helpers


def e4m3_step(v: torch.Tensor) -> torch.Tensor:
    """Spacing of e4m3 values at magnitude ``|v|`` (float64): 3 mantissa bits, ``2**(e - 3)`` in the
    binade ``[2**e, 2**(e+1))``; subnormals (below ``2**-6``) are spaced ``2**-9``."""
    _, e = torch.frexp(v.double().abs())  # |v| = m 2**e, m in [0.5, 1): binade exponent e - 1
    return torch.exp2((e - 1).clamp_min(-6).double() - 3)


def e2m1_step(v: torch.Tensor) -> torch.Tensor:
    """Spacing of the e2m1 grid at magnitude ``|v|``: 0.5 below 2, 1 below 4, 2 up to 6."""
    a = v.double().abs()
    return torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0)).double()


def is_pow2(s: torch.Tensor) -> bool:
    m, _ = torch.frexp(s.double())
    return bool((m == 0.5).all())


def draw_values(
    data: st.DataObject, shape: Sequence[int], dtype: torch.dtype, max_value: float, label: str
) -> torch.Tensor:
    """Values of a tensor spec, clamped to ``dtype``'s finite range (no inf is drawn)."""
    spec = data.draw(tensor_specs(scales=(1.0, 0.01, 100.0, 0.0)), label=label)
    top = torch.finfo(dtype).max
    return spec.make(shape, torch.float32, max_value=max_value).clamp(-top, top).to(dtype)


BOOLS = st.booleans()
SPECIALS = ("nan", "inf", "-inf", "-0.0", "subnormal", "max and ties")
# e4m3 rounding midpoints (between neighbours 1 and 1.125, 2.25 and 2.5, ...): exact ties at s = 1
E4M3_MIDPOINTS = (1.0625, 1.1875, -2.375, 3.25, 0.0078125 * 1.5, -13.0, 208.0)
INT8_MIDPOINTS = (0.5, 1.5, 2.5, -3.5, 100.5, -126.5)  # exact in bfloat16 too
E2M1_MIDPOINTS = (0.25, 0.75, -1.25, 1.75, -2.5, 3.5, 5.0)
LONG_K = ("K>128", "K:tail")  # the boundary classes of the quantisers: several 128-wide tiles, a partial last one


def draw_specials(
    data: st.DataObject, t: torch.Tensor, top: float = FP8_MAX, ties: Sequence[float] = E4M3_MIDPOINTS
) -> None:
    """Write special values into ``t`` (in place): in about half the examples, each of SPECIALS with
    probability 1/2 at a few random places; ``max and ties`` clamps the first row to ``+-top`` (the format's
    max: 448, 6, 127) and starts it with ``top`` and exact rounding midpoints ``ties`` (the first group or row
    then has the scale 1 exactly)."""
    if not t.numel() or not data.draw(BOOLS, label="special values"):
        return
    chosen = [v for v in SPECIALS if data.draw(BOOLS, label=f"special {v}")]
    flat = t.view(-1)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="special positions seed"))
    tiny = torch.finfo(t.dtype).smallest_normal
    for v in chosen:
        if v == "max and ties":
            row = t.reshape(-1, t.shape[-1])[0]
            values = torch.tensor((top,) + tuple(ties))[: min(t.shape[-1], 64)]
            row.clamp_(-top, top)[: len(values)] = values.to(t.dtype)
            continue
        value = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "-0.0": -0.0, "subnormal": -tiny / 4}[
            v
        ]
        flat[torch.randint(0, flat.numel(), (2,), generator=g)] = value
    note(special=chosen)


def masked(t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``t[keep]`` for any dtype (boolean indexing of float8 goes through its bits)."""
    if t.dtype == FP8_DTYPE:
        return t.view(torch.uint8)[keep].view(FP8_DTYPE)
    return t[keep]


def draw_lead(data: st.DataObject) -> tuple:
    """Leading dims of an activation: rows 0..6, optionally a batch dim, or none (1-D)."""
    layout = data.draw(st.sampled_from(("rows", "batch x rows", "1-D")), label="leading dims")
    if layout == "1-D":
        return ()
    rows = data.draw(st.integers(0, 6), label="rows")
    return (rows,) if layout == "rows" else (data.draw(st.integers(1, 2), label="batch"), rows)


def draw_grouped(
    data: st.DataObject, group_sizes: Sequence[int], max_groups: int, dtype: torch.dtype, max_value: float, label: str
) -> Tuple[int, torch.Tensor]:
    """``(group_size, tensor [lead..., K])`` with 1..max_groups groups along K (up to 20 times as many in the
    large examples: K of DeepSeek's 7168 and beyond); the last one may be all zero (the amax floor)."""
    group = data.draw(st.sampled_from(tuple(group_sizes)), label="group_size")
    k = group * dim(data, "groups along K", 1, max_groups * (20 if large(data) else 1), tile=8)
    t = draw_values(data, draw_lead(data) + (k,), dtype, max_value, label)
    if data.draw(st.booleans(), label="last group all zero"):
        t[..., -group:] = 0
    return group, t


def draw_scales(data: st.DataObject, shape: Sequence[int]) -> torch.Tensor:
    """Block scales as given to a dequantiser: powers of two (float32 or e8m0 storage) or any fp32."""
    kind = data.draw(st.sampled_from(("pow2", "fp32")), label="scale kind")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="scale seed"))
    e = torch.randint(-24, 8, tuple(shape), generator=g).double()
    if kind == "fp32":
        return torch.exp2(e + torch.rand(tuple(shape), generator=g, dtype=torch.float64)).float()
    s = torch.exp2(e).float()
    if _E8M0 is not None and data.draw(st.booleans(), label="scale stored as float8_e8m0fnu"):
        s = s.to(_E8M0)
    return s


def exact_when_pow2(rec: Recorder, y: torch.Tensor, exact: torch.Tensor, scale: torch.Tensor) -> None:
    """Power-of-two scales: the product is exact wherever it is representable in y's dtype."""
    if not is_pow2(scale_as_float(scale)):
        return
    representable = exact.to(y.dtype).double() == exact
    rec.holds(
        bool((y.double()[representable] == exact[representable]).all()),
        "y == q * s exactly where q * s is representable in out_dtype (power-of-two scales)",
    )


def scale_key(fmt: str, dtype: str) -> str:
    return f"ue8m0:{dtype}" if fmt == "ue8m0" else dtype


class _Fp8QuantSuite(Suite):
    """What quantize_fp8 and quantize_fp8_weight share: checks against the oracle and properties."""

    def scale_fmt_kwarg(self, data: st.DataObject, fmt: str) -> Optional[str]:
        return "ue8m0" if fmt == "ue8m0" else data.draw(st.sampled_from((None, "fp32")), label="scale_fmt")

    def expand(self, case: Case, s: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        raise NotImplementedError

    def amax(self, case: Case, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def check(self, rec: Recorder, case: Case, output, oracle, run) -> None:
        x = case.args[0]
        fmt = "ue8m0" if case.kwargs.get("scale_fmt") == "ue8m0" else "fp32"
        q, s = output
        q_tol = self.contract.tolerance[scale_key(fmt, "float8_e4m3fn")]
        s_tol = self.contract.tolerance[scale_key(fmt, "float32")]
        amax = self.amax(case, x, s)
        finite = amax.isfinite()
        rec.holds(bool((~s[~finite].isfinite()).all()), "a group holding NaN or +-inf gets a non-finite scale")
        keep = self.expand(case, finite.double(), x.shape) > 0  # elements of finite groups (q elsewhere is free)
        q, s, x, amax = masked(q, keep), s[finite], x[keep], amax[finite]
        rec.ulps("q", q, masked(oracle[0], keep), q_tol.ulps)
        rec.close("s", s, oracle[1].double()[finite], s_tol)
        s64 = s.double()
        rec.holds(bool((s64 > 0).all()), "s > 0 (the amax floor 1e-4 keeps all-zero groups finite)")
        if fmt == "ue8m0":
            rec.holds(is_pow2(s64), "s == 2**k for an integer k (UE8M0)")
        qf = q.double()
        rec.holds(bool((qf.abs() <= FP8_MAX).all()), "|q| <= 448")
        ratio = amax.clamp_min(AMAX_FLOOR).double() / s64  # the floor in fp32
        rec.holds(bool((ratio <= FP8_MAX * (1 + s_tol.rtol)).all()), "max(amax, 1e-4) / s <= 448 (1 + rtol)")
        low = FP8_MAX / 2 if fmt == "ue8m0" else FP8_MAX * (1 - s_tol.rtol)
        rec.holds(
            bool((ratio > low).all() if fmt == "ue8m0" else (ratio >= low).all()),
            "the scale is tight: max(amax, 1e-4) / s > 224 (UE8M0), >= 448 (1 - rtol) (fp32)",
        )
        se = self.expand(case, output[1].double(), keep.shape)[keep]
        x64, v = x.double(), x.double() / se
        bound = (0.5 + q_tol.ulps) * e4m3_step(torch.maximum(v.abs(), qf.abs())) * se
        rec.holds(
            bool(((qf * se - x64).abs() <= bound).all()),
            "|q s - x| <= (1/2 + ulps) * step_e4m3(x / s) * s (round trip)",
        )
        rec.holds(
            bool(((qf - v).abs() <= 0.5 * e4m3_step(v) + v.abs() * 2**-22).all()),
            "|q - x / s| <= step_e4m3(x / s) / 2 + |x / s| 2**-22 (q is x / s rounded to nearest)",
        )
        zero = x64 == 0
        rec.holds(
            bool((qf[zero] == 0).all() and torch.equal(qf[zero].signbit(), x64[zero].signbit())),
            "zeros quantise to zeros of the same sign",
        )


# --------------------------------------------------------------------------- quantize_fp8


@suite
class QuantizeFp8Suite(_Fp8QuantSuite):
    op = "quantize_fp8"
    special = SPECIALS
    boundary = LONG_K

    def draw(self, data: st.DataObject, f: Mapping[str, str]) -> Case:
        group, x = draw_grouped(data, (128, 64), 3, DTYPES[f["dtype"]], FP8_MAX, "x values")
        draw_specials(data, x)
        note(rows=x.numel() // max(x.shape[-1], 1), K=x.shape[-1], boundary=tiling("K", x.shape[-1]))
        return Case((x,), {"group_size": group, "scale_fmt": self.scale_fmt_kwarg(data, f["scale_fmt"])})

    def expand(self, case, s, shape):
        return expand_scale(s, shape, (case.kwargs["group_size"],))

    def amax(self, case, x, s):
        g = case.kwargs["group_size"]
        return x.float().reshape(*x.shape[:-1], x.shape[-1] // g, g).abs().amax(dim=-1)


# --------------------------------------------------------------------------- quantize_fp8_weight


@suite
class QuantizeFp8WeightSuite(_Fp8QuantSuite):
    op = "quantize_fp8_weight"
    example_seconds = 2.0  # slowest example measured: 0.17 s
    special = SPECIALS

    def draw(self, data: st.DataObject, f: Mapping[str, str]) -> Case:
        n = data.draw(st.sampled_from(SIZES), label="N")
        k = data.draw(st.sampled_from(SIZES), label="K")
        block = data.draw(st.sampled_from((128, 64)), label="block_size")
        w = draw_values(data, (n, k), DTYPES[f["dtype"]], FP8_MAX, "w values")
        if data.draw(st.booleans(), label="first block all zero"):
            w[:block, :block] = 0
        draw_specials(data, w)
        note(N=n, K=k)
        return Case((w,), {"block_size": block, "scale_fmt": self.scale_fmt_kwarg(data, f["scale_fmt"])})

    def expand(self, case, s, shape):
        b = case.kwargs["block_size"]
        return expand_scale(s, shape, (b, b))

    def amax(self, case, w, s):
        b = case.kwargs["block_size"]
        out = torch.zeros(s.shape, dtype=torch.float32)
        for i in range(s.shape[0]):
            for j in range(s.shape[1]):
                out[i, j] = w[i * b : (i + 1) * b, j * b : (j + 1) * b].float().abs().max()
        return out


# --------------------------------------------------------------------------- dequantize_fp8


@suite
class DequantizeFp8Suite(Suite):
    op = "dequantize_fp8"
    example_seconds = 1.0  # slowest example measured: 0.07 s
    special = ("nan", "-0.0")

    def draw(self, data: st.DataObject, f: Mapping[str, str]) -> Case:
        block = data.draw(st.sampled_from(((128,), (128, 128), (32,), (1, 128))), label="block_shape")
        if len(block) == 1:
            shape = draw_lead(data) + (data.draw(st.sampled_from(SIZES), label="K"),)
        else:
            batch = data.draw(st.sampled_from(((), (2,))), label="batch dims")
            shape = batch + (data.draw(st.sampled_from(SIZES), label="M"), data.draw(st.sampled_from(SIZES), label="K"))
        q = draw_values(data, shape, torch.float32, FP8_MAX, "q values").clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        if q.numel() and data.draw(BOOLS, label="NaN codes and -0.0"):
            g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="special positions seed"))
            bits = q.view(torch.uint8).view(-1)
            for code in (0x7F, 0xFF, 0x80):  # +-NaN, -0.0
                bits[torch.randint(0, bits.numel(), (2,), generator=g)] = code
            note(special=("nan", "-0.0"))
        scale = draw_scales(data, scale_shape(shape, block))
        return Case((q, scale), {"block_shape": block, "out_dtype": DTYPES[f["out_dtype"]]})

    def check(self, rec: Recorder, case: Case, output, oracle, run) -> None:
        out_dtype = str(case.kwargs["out_dtype"]).replace("torch.", "")
        rec.holds(output.dtype == case.kwargs["out_dtype"], f"the result has dtype {out_dtype}")
        q = case.args[0].float()
        rec.holds(torch.equal(output.isnan(), q.isnan()), "NaN codes decode to NaN (and nothing else does)")
        zero = q == 0
        rec.holds(torch.equal(output[zero].signbit(), q[zero].signbit()), "-0.0 decodes to -0.0, +0.0 to +0.0")
        rec.close("y", output, oracle, self.contract.tolerance[out_dtype])
        exact_when_pow2(rec, output, oracle, case.args[1])


# --------------------------------------------------------------------------- fp8_gemm

FP8_GEMM_M1 = st.integers(0, 2**16 - 1).map(lambda i: i % 4 == 3)  # M = 1 in about a quarter of the large ones


@suite
class Fp8GemmSuite(Suite):
    op = "fp8_gemm"
    example_seconds = 1.0  # slowest example measured: 0.09 s
    boundary = ("M=1", "M>128", "M:tail", "N:tail", "K>128", "b_scale spans several blocks along N and K")

    def draw(self, data: st.DataObject, f: Mapping[str, str]) -> Case:
        from hal.ops import quantize_fp8, quantize_fp8_weight

        big = large(data)
        if big:  # several 128-blocks along M, N and K: a_scale [M, K/128] and b_scale [N/128, K/128] matter
            k = 128 * data.draw(st.integers(2, 3), label="K / 128")
            n = dim(data, "N", 129, 300)
            lead = (1,) if data.draw(FP8_GEMM_M1, label="M = 1") else (dim(data, "M", 129, 260),)
        else:
            k = 128 * data.draw(st.integers(1, 3), label="K / 128")
            n = data.draw(st.sampled_from(SIZES[:-1]), label="N")
            lead = draw_lead(data)
        m = math.prod(lead)
        classes = tiling("M", m) | tiling("N", n) | tiling("K", k)
        if n > 128 and k > 128:
            classes.add("b_scale spans several blocks along N and K")
        note(M=m, N=n, K=k, boundary=classes)
        fmt = data.draw(st.sampled_from((None, "ue8m0")), label="scale_fmt of the operands")
        x = draw_values(data, lead + (k,), torch.bfloat16, FP8_MAX, "a values")
        if big:  # tokens differ in magnitude (rows 128 apart too): a_scale varies along M
            x = (x.float() * torch.exp2(torch.arange(m, dtype=torch.float32) % 7 - 3)[:, None]).to(x.dtype)
        w = draw_values(data, (n, k), torch.bfloat16, FP8_MAX, "b values")
        # weights whose 128-row blocks differ in magnitude (as real checkpoints' do): b_scale varies along N
        step = data.draw(st.sampled_from((0, 3, -5)), label="log2 magnitude step per 128 rows of b")
        w = (w.float() * torch.exp2(torch.arange(n, dtype=torch.float32) // 128 * step)[:, None]).to(w.dtype)
        a, a_scale = quantize_fp8.reference_impl(x, 128, fmt)
        b, b_scale = quantize_fp8_weight.reference_impl(w, 128, fmt)
        if fmt == "ue8m0" and _E8M0 is not None and data.draw(st.booleans(), label="scales as float8_e8m0fnu"):
            a_scale, b_scale = a_scale.to(_E8M0), b_scale.to(_E8M0)
        return Case((a, a_scale, b, b_scale), {"out_dtype": DTYPES[f["out_dtype"]]})

    def check(self, rec: Recorder, case: Case, output, oracle, run) -> None:
        from hal.ops import dequantize_fp8

        a, a_scale, b, b_scale = case.args
        out_dtype = str(case.kwargs["out_dtype"]).replace("torch.", "")
        rec.holds(output.dtype == case.kwargs["out_dtype"], f"the result has dtype {out_dtype}")
        k = a.shape[-1]
        a2, as2 = a.reshape(-1, k), scale_as_float(a_scale).reshape(-1, k // 128)
        ad, bd = dequantized_operands(a2, b, as2, b_scale, torch.float64)
        magnitude = (ad.abs() @ bd.abs().t()).reshape(oracle.shape)
        tol, n = self.contract.tolerance[out_dtype], k + 3
        rec.close("y", output, oracle, tol, n=n, magnitude=magnitude)
        deq = dequantize_fp8.reference_impl
        y_deq = (
            deq(a, a_scale, block_shape=(128,), compute_dtype=torch.float64)
            @ deq(b, b_scale, block_shape=(128, 128), compute_dtype=torch.float64).t()
        )
        rec.close("y (dequantise-then-matmul)", output, y_deq, tol, n=n, magnitude=magnitude)
        if a.numel() and b.shape[0]:  # y is linear in a_scale: doubling it doubles y
            doubled = Case((a, scale_as_float(a_scale) * 2, b, b_scale), case.kwargs)
            rec.close("y (a_scale doubled)", run(doubled), 2 * oracle, tol, n=n, magnitude=2 * magnitude)


# --------------------------------------------------------------------------- quantize_fp4


@suite
class QuantizeFp4Suite(Suite):
    op = "quantize_fp4"
    special = SPECIALS
    boundary = LONG_K

    def draw(self, data: st.DataObject, f: Mapping[str, str]) -> Case:
        group, w = draw_grouped(data, (32, 16), 4, DTYPES[f["dtype"]], FP4_MAX, "w values")
        draw_specials(data, w, FP4_MAX, E2M1_MIDPOINTS)
        note(rows=w.numel() // w.shape[-1], K=w.shape[-1], boundary=tiling("K", w.shape[-1]))
        return Case((w,), {"group_size": group})

    def check(self, rec: Recorder, case: Case, output, oracle, run) -> None:
        w, g = case.args[0], case.kwargs["group_size"]
        q, s = output
        rec.holds(q.dtype == torch.uint8 and q.shape == oracle[0].shape, "q is uint8 [..., K // 2]")
        amax = w.float().reshape(*w.shape[:-1], w.shape[-1] // g, g).abs().amax(dim=-1)
        finite = amax.isfinite()
        rec.holds(bool((~s[~finite].isfinite()).all()), "a group holding NaN or +-inf gets a non-finite scale")
        keep = expand_scale(finite.double(), w.shape, (g,)) > 0  # elements of finite groups (q elsewhere is free)
        values, w, se = unpack_fp4(q)[keep], w[keep], expand_scale(s.double(), w.shape, (g,))[keep]
        rec.equal("q (decoded e2m1 values)", values, unpack_fp4(oracle[0])[keep])  # -0 == +0
        rec.close("s", s[finite], oracle[1].double()[finite], self.contract.tolerance["float32"])
        s64 = s[finite].double()
        rec.holds(bool((s64 > 0).all()) and is_pow2(s64), "s == 2**k > 0 (UE8M0)")
        grid = torch.tensor(E2M1_GRID, dtype=torch.float64)
        rec.holds(bool(torch.isin(values.double().abs(), grid).all()), "|e2m1(q)| in {0, .5, 1, 1.5, 2, 3, 4, 6}")
        rec.holds(
            bool((amax[finite].clamp_min(AMAX_FLOOR).double() / s64 <= FP4_MAX).all()),
            "max(amax, 1e-4) / s <= 6 (never clips)",
        )
        v, qf = w.double() / se, values.double()
        bound = 0.5 * e2m1_step(torch.maximum(v.abs(), qf.abs())) * se
        rec.holds(
            bool(((qf * se - w.double()).abs() <= bound).all()),
            "|e2m1(q) s - w| <= step_e2m1(w / s) / 2 * s (round trip)",
        )
        rec.holds(
            bool(((qf - v).abs() <= 0.5 * e2m1_step(v)).all()),
            "|e2m1(q) - w / s| <= step_e2m1(w / s) / 2 (q is w / s rounded to nearest)",
        )


# --------------------------------------------------------------------------- dequantize_fp4


@suite
class DequantizeFp4Suite(Suite):
    op = "dequantize_fp4"

    def draw(self, data: st.DataObject, f: Mapping[str, str]) -> Case:
        group = data.draw(st.sampled_from((32, 16, 2)), label="group_size")
        k = group * data.draw(st.integers(0, 4), label="groups along K")
        shape = draw_lead(data) + (k // 2,)
        seed = data.draw(st.integers(0, 2**31 - 1), label="packed bytes seed")
        q = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
        scale = draw_scales(data, shape[:-1] + (k // group,))
        return Case((q, scale), {"group_size": group, "out_dtype": DTYPES[f["out_dtype"]]})

    def check(self, rec: Recorder, case: Case, output, oracle, run) -> None:
        out_dtype = str(case.kwargs["out_dtype"]).replace("torch.", "")
        rec.holds(output.dtype == case.kwargs["out_dtype"], f"the result has dtype {out_dtype}")
        rec.close("y", output, oracle, self.contract.tolerance[out_dtype])
        exact_when_pow2(rec, output, oracle, case.args[1])


# --------------------------------------------------------------------------- quantize_int8, quantize_int8_weight


class _Int8QuantSuite(Suite):
    """What the per-row int8 quantisers share: checks against the oracle and properties."""

    special = SPECIALS
    boundary = LONG_K

    def draw_specials(self, data: st.DataObject, t: torch.Tensor) -> None:
        draw_specials(data, t, INT8_MAX, INT8_MIDPOINTS)

    def check(self, rec: Recorder, case: Case, output, oracle, run) -> None:
        x = case.args[0]
        q, s = output
        q_tol, s_tol = self.contract.tolerance["int8"], self.contract.tolerance["float32"]
        rec.holds(q.dtype == torch.int8 and q.shape == x.shape, "q is int8 of x's shape")
        finite = x.float().abs().amax(dim=-1).isfinite()
        rec.holds(bool((~s[~finite].isfinite()).all()), "a row holding NaN or +-inf gets a non-finite scale")
        # the other rows only (q of a non-finite row is unspecified); a 1-D x becomes one row
        x, q, s, oracle = x[finite], q[finite], s[finite], (oracle[0][finite], oracle[1][finite])
        rec.close("q", q, oracle[0].double(), Tolerance(rtol=0.0, atol=float(q_tol.ulps)))
        rec.close("s", s, oracle[1].double(), s_tol)
        qf, s64 = q.double(), s.double()
        rec.holds(bool((qf.abs() <= INT8_MAX).all()), "q in [-127, 127]")
        rec.holds(bool((s64 > 0).all()), "s > 0 (the amax floor 1e-4 keeps all-zero rows finite)")
        ratio = x.float().abs().amax(dim=-1).clamp_min(AMAX_FLOOR).double() / s64
        rec.holds(
            bool(((ratio <= INT8_MAX * (1 + s_tol.rtol)) & (ratio >= INT8_MAX * (1 - s_tol.rtol))).all()),
            "the scale is tight: 127 (1 - rtol) <= max(amax, 1e-4) / s <= 127 (1 + rtol)",
        )
        err = (x.double() - qf * s64.unsqueeze(-1)).abs()
        rec.holds(
            bool((err <= (0.5 + 2**-14) * s64.unsqueeze(-1)).all()),
            "|x - q s| <= (1/2 + 2**-14) s (q is x / s rounded to nearest)",
        )


@suite
class QuantizeInt8Suite(_Int8QuantSuite):
    op = "quantize_int8"

    def draw(self, data: st.DataObject, f: Mapping[str, str]) -> Case:
        k = dim(data, "K", 129, 7168) if large(data) else data.draw(st.sampled_from((1, 7, 64, 128, 300)), label="K")
        x = draw_values(data, draw_lead(data) + (k,), DTYPES[f["dtype"]], INT8_MAX, "x values")
        if x.dim() > 1 and x.shape[0] and data.draw(st.booleans(), label="first row all zero"):
            x[0] = 0
        self.draw_specials(data, x)
        note(rows=x.numel() // k, K=k, boundary=tiling("K", k))
        return Case((x,), {})


@suite
class QuantizeInt8WeightSuite(_Int8QuantSuite):
    op = "quantize_int8_weight"

    def draw(self, data: st.DataObject, f: Mapping[str, str]) -> Case:
        experts = data.draw(st.sampled_from(((), (1,), (3,))), label="expert dims")
        big = large(data)
        shape = experts + (
            dim(data, "N", 129, 300) if big else data.draw(st.sampled_from(SIZES), label="N"),
            dim(data, "K", 129, 2048) if big else data.draw(st.sampled_from(SIZES[:-1]), label="K"),
        )
        w = draw_values(data, shape, DTYPES[f["dtype"]], INT8_MAX, "w values")
        if shape[-2] and data.draw(st.booleans(), label="first channel all zero"):
            w[..., 0, :] = 0
        self.draw_specials(data, w)
        note(N=shape[-2], K=shape[-1], boundary=tiling("N", shape[-2]) | tiling("K", shape[-1]))
        return Case((w,), {})


# --------------------------------------------------------------------------- int8_gemm


@suite
class Int8GemmSuite(Suite):
    op = "int8_gemm"
    boundary = ("K=7168 with partial sums beyond 2**24",)

    def draw(self, data: st.DataObject, f: Mapping[str, str]) -> Case:
        from hal.ops import quantize_int8, quantize_int8_weight

        how = data.draw(
            st.sampled_from(("quantised", "any int8", "any int8", "cancelling at K = 7168")),
            label="operands (from the quantisers, any int8 with -128, or cancelling partial sums)",
        )
        k = 7168 if how.startswith("cancelling") else data.draw(st.sampled_from((1, 64, 128, 300, 2048)), label="K")
        n = data.draw(st.sampled_from(SIZES[:-1]), label="N")
        lead = draw_lead(data)
        note(K=k, N=n, rows=math.prod(lead))
        if how.startswith("cancelling"):
            # the first half's products are large and of one sign (partial sums pass 2**24, where an fp32
            # accumulator rounds), the second half's cancel them exactly: y is exactly 0 with unit scales
            g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="int8 seed"))
            a = torch.randint(90, 128, lead + (k // 2,), generator=g, dtype=torch.int8)
            b = torch.randint(90, 128, (n, k // 2), generator=g, dtype=torch.int8)
            a, b = torch.cat([a, a], -1), torch.cat([b, -b], -1)
            a_scale, b_scale = torch.ones(lead), torch.ones(n)
            note(boundary=("K=7168 with partial sums beyond 2**24",))
        elif how == "quantised":
            a, a_scale = quantize_int8.reference_impl(draw_values(data, lead + (k,), torch.bfloat16, INT8_MAX, "a"))
            b, b_scale = quantize_int8_weight.reference_impl(draw_values(data, (n, k), torch.bfloat16, INT8_MAX, "b"))
        else:
            g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="int8 seed"))
            a = torch.randint(-128, 128, lead + (k,), generator=g, dtype=torch.int8)
            b = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
            a_scale = torch.exp2(torch.randint(-20, 4, lead, generator=g).float() + torch.rand(lead, generator=g))
            b_scale = torch.exp2(torch.randint(-20, 4, (n,), generator=g).float() + torch.rand(n, generator=g))
        return Case((a, a_scale, b, b_scale), {"out_dtype": DTYPES[f["out_dtype"]]})

    def check(self, rec: Recorder, case: Case, output, oracle, run) -> None:
        a, a_scale, b, b_scale = case.args
        out_dtype = case.kwargs["out_dtype"]
        rec.holds(output.dtype == out_dtype, f"the result has dtype {out_dtype}")
        tol = self.contract.tolerance[str(out_dtype).replace("torch.", "")]
        rec.close("y", output, oracle, tol)
        if not (a.numel() and b.shape[0]):
            return
        units = Case((a, torch.ones_like(a_scale), b, torch.ones_like(b_scale)), case.kwargs)
        y1 = run(units).double()
        exact = a.reshape(-1, a.shape[-1]).double() @ b.double().t()
        representable = (exact.to(out_dtype).double() == exact).reshape(y1.shape)
        rec.holds(
            bool((y1[representable] == exact.reshape(y1.shape)[representable]).all()),
            "with unit scales y == sum_k a b exactly wherever representable in out_dtype (exact accumulation)",
        )
        doubled = Case((a, a_scale * 2, b, b_scale), case.kwargs)
        rec.close("y (a_scale doubled)", run(doubled), 2 * oracle, tol)
