"""The quantisation suites have teeth: deliberately wrong backends, registered through the public plugin
API, fail them; the CPU reference passes."""

from __future__ import annotations

import math

import torch
from helpers import register_backend

from hal.backends.cpu.backend import CpuBackend
from hal.conformance.core import PROFILES, run_cell
from hal.formats import FP8_DTYPE, FP8_MAX, ceil_pow2, expand_scale, scale_as_float
from hal.ops.quant import fp8_gemm as GEMM
from hal.ops.quant import int8_gemm as I8GEMM
from hal.ops.quant import quantize_fp4 as Q4
from hal.ops.quant import quantize_fp8 as Q8
from hal.ops.quant import quantize_int8 as QI8

CELLS = {
    "quantize_fp8": {"dtype": "bfloat16", "scale_fmt": "ue8m0"},
    "quantize_fp8_weight": {"dtype": "float32", "scale_fmt": "fp32"},
    "dequantize_fp8": {"out_dtype": "bfloat16"},
    "fp8_gemm": {"out_dtype": "bfloat16"},
    "quantize_fp4": {"dtype": "bfloat16"},
    "dequantize_fp4": {"out_dtype": "float16"},
    "quantize_int8": {"dtype": "bfloat16"},
    "quantize_int8_weight": {"dtype": "float32"},
    "int8_gemm": {"out_dtype": "bfloat16"},
}
FP32_SCALES = {"dtype": "bfloat16", "scale_fmt": "fp32"}


def _groups(x, group_size):
    return x.float().reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)


class NoAmaxFloor(CpuBackend):
    """quantize_fp8 without the 1e-4 amax floor: an all-zero group gets s = 0 and q = 0/0 = NaN."""

    def __init__(self):
        super().__init__()
        self.add_implementation("quantize_fp8", self.wrong)

    def wrong(self, x, group_size=128, scale_fmt=None):
        g = _groups(x, group_size)
        s = g.abs().amax(dim=-1) / FP8_MAX
        s = ceil_pow2(s) if scale_fmt == "ue8m0" else s
        return (g / s.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).reshape(x.shape), s


class Ue8m0RoundedToNearest(CpuBackend):
    """UE8M0 scales rounded to the *nearest* power of two instead of up: |x / s| can exceed 448."""

    def __init__(self):
        super().__init__()
        self.add_implementation("quantize_fp8", self.wrong)

    def wrong(self, x, group_size=128, scale_fmt=None):
        if scale_fmt != "ue8m0":
            return Q8.reference_impl(x, group_size, scale_fmt)
        g = _groups(x, group_size)
        s = torch.exp2(torch.round(torch.log2(g.abs().amax(dim=-1).clamp_min(1e-4) / FP8_MAX)))
        return (g / s.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).reshape(x.shape), s


class WeightScaleOver512(CpuBackend):
    """quantize_fp8_weight with s = amax / 512 and no clamp: |w / s| reaches 512 > 448 and saturates."""

    def __init__(self):
        super().__init__()
        self.add_implementation("quantize_fp8_weight", self.wrong)

    def wrong(self, w, block_size=128, scale_fmt=None):
        b = block_size
        n, k = w.shape
        nb, kb = math.ceil(n / b), math.ceil(k / b)
        mag = torch.nn.functional.pad(w.float().abs(), (0, kb * b - k, 0, nb * b - n))
        s = mag.reshape(nb, b, kb, b).amax(dim=(1, 3)).clamp_min(1e-4) / 512.0
        s = ceil_pow2(s) if scale_fmt == "ue8m0" else s
        return (w.float() / expand_scale(s, (n, k), (b, b))).to(FP8_DTYPE), s


class Fp4HighNibbleFirst(CpuBackend):
    """quantize_fp4 packing the lower-index element into the *high* nibble."""

    def __init__(self):
        super().__init__()
        self.add_implementation("quantize_fp4", self.wrong)

    def wrong(self, w, group_size=32):
        q, s = Q4.reference_impl(w, group_size)
        return ((q & 0xF) << 4) | (q >> 4), s


class Fp8GemmFirstWeightBlockScale(CpuBackend):
    """fp8_gemm applying b_scale's first block row to every output column (ignores the N blocks)."""

    def __init__(self):
        super().__init__()
        self.add_implementation("fp8_gemm", self.wrong)

    def wrong(self, a, a_scale, b, b_scale, *, out_dtype=torch.bfloat16):
        bs = scale_as_float(b_scale)
        return GEMM.reference_impl(a, a_scale, b, bs[:1].expand_as(bs), out_dtype=out_dtype)


class Fp8GemmDropsAScale(CpuBackend):
    """fp8_gemm forgetting the activation scales."""

    def __init__(self):
        super().__init__()
        self.add_implementation("fp8_gemm", self.wrong)

    def wrong(self, a, a_scale, b, b_scale, *, out_dtype=torch.bfloat16):
        return GEMM.reference_impl(a, torch.ones_like(scale_as_float(a_scale)), b, b_scale, out_dtype=out_dtype)


def _fails(name, cls, op, cell):
    register_backend(name, cls)
    result = run_cell(name, op, cell, profile="ci", seed=1)
    assert result.status == "fail", result
    return result


def test_reference_backend_passes():
    for op, cell in list(CELLS.items()) + [("quantize_fp8", FP32_SCALES)]:
        result = run_cell("cpu", op, cell, profile="ci", seed=1)
        assert result.status == "pass", (op, result.message, result.minimal_example)
        assert result.examples == PROFILES["ci"]


def test_missing_amax_floor_fails_on_an_all_zero_group():
    result = _fails("no-floor", NoAmaxFloor, "quantize_fp8", FP32_SCALES)
    assert "NaN" in result.message or "s > 0" in result.message, result.message
    # the shrunk example is an all-zero group: values of scale 0, or the explicit zero group
    assert "scale=0.0" in result.minimal_example or "all zero): True" in result.minimal_example


def test_ue8m0_rounded_to_nearest_fails_with_a_minimal_example():
    result = _fails("ue8m0-nearest", Ue8m0RoundedToNearest, "quantize_fp8", CELLS["quantize_fp8"])
    assert result.message.startswith("s:") or result.message.startswith("q:"), result.message
    assert result.minimal_example and "x values" in result.minimal_example
    assert result.reproduce.startswith("hal conformance --backend ue8m0-nearest --ops 'quantize_fp8[")
    assert " --seed 1 " in result.reproduce


def test_unclamped_weight_scale_fails():
    result = _fails("scale-512", WeightScaleOver512, "quantize_fp8_weight", CELLS["quantize_fp8_weight"])
    assert result.message.startswith("s:"), result.message


def test_fp4_nibble_order_swapped_fails():
    result = _fails("fp4-swapped", Fp4HighNibbleFirst, "quantize_fp4", CELLS["quantize_fp4"])
    assert result.message.startswith("q (decoded e2m1 values)"), result.message


def test_fp8_gemm_wrong_weight_block_scale_fails():
    result = _fails("gemm-b-scale", Fp8GemmFirstWeightBlockScale, "fp8_gemm", CELLS["fp8_gemm"])
    assert result.message.startswith("y:") and "mismatched elements" in result.message, result.message


def test_fp8_gemm_dropped_a_scale_fails():
    _fails("gemm-no-a-scale", Fp8GemmDropsAScale, "fp8_gemm", CELLS["fp8_gemm"])


class Int8ScaleOver128(CpuBackend):
    """quantize_int8 with s = amax / 128 (the int8 range's magnitude, not 127): q never reaches 127."""

    def __init__(self):
        super().__init__()
        self.add_implementation("quantize_int8", self.wrong)

    def wrong(self, x):
        xf = x.float()
        s = xf.abs().amax(dim=-1).clamp_min(1e-4) / 128.0
        return torch.round(xf / s.unsqueeze(-1)).clamp(-127, 127).to(torch.int8), s


class Int8RoundsTowardZero(CpuBackend):
    """quantize_int8_weight truncating x / s (a float-to-int cast) instead of rounding to nearest: q is
    at most one step off, which the q tolerance admits, but |w - q s| reaches a whole step."""

    def __init__(self):
        super().__init__()
        self.add_implementation("quantize_int8_weight", self.wrong)

    def wrong(self, w):
        wf = w.float()
        s = wf.abs().amax(dim=-1).clamp_min(1e-4) / torch.tensor(127.0)
        return (wf / s.unsqueeze(-1)).clamp(-127, 127).to(torch.int8), s


class Int8GemmFirstChannelScale(CpuBackend):
    """int8_gemm applying b_scale[0] to every output channel (a per-tensor weight scale)."""

    def __init__(self):
        super().__init__()
        self.add_implementation("int8_gemm", self.wrong)

    def wrong(self, a, a_scale, b, b_scale, *, out_dtype=torch.bfloat16):
        return I8GEMM.reference_impl(a, a_scale, b, b_scale[:1].expand_as(b_scale), out_dtype=out_dtype)


class Int8GemmBf16Accumulator(CpuBackend):
    """int8_gemm summing the products in bfloat16 (no exact integer accumulation)."""

    def __init__(self):
        super().__init__()
        self.add_implementation("int8_gemm", self.wrong)

    def wrong(self, a, a_scale, b, b_scale, *, out_dtype=torch.bfloat16):
        k = a.shape[-1]
        acc = torch.zeros(a.reshape(-1, k).shape[0], b.shape[0], dtype=torch.bfloat16)
        for i in range(k):
            acc += a.reshape(-1, k)[:, i : i + 1].to(torch.bfloat16) * b[:, i].to(torch.bfloat16)
        y = acc.float() * a_scale.reshape(-1, 1) * b_scale
        return y.reshape(*a.shape[:-1], b.shape[0]).to(out_dtype)


def test_int8_scale_over_128_fails():
    result = _fails("int8-128", Int8ScaleOver128, "quantize_int8", CELLS["quantize_int8"])
    assert result.message.startswith("s:"), result.message


def test_int8_rounding_toward_zero_fails_the_round_to_nearest_property():
    result = _fails("int8-trunc", Int8RoundsTowardZero, "quantize_int8_weight", CELLS["quantize_int8_weight"])
    assert "rounded to nearest" in result.message, result.message


def test_int8_gemm_per_tensor_weight_scale_fails():
    result = _fails("int8-b-scale", Int8GemmFirstChannelScale, "int8_gemm", CELLS["int8_gemm"])
    assert result.message.startswith("y:") and "mismatched elements" in result.message, result.message


def test_int8_gemm_narrow_accumulator_fails():
    _fails("int8-bf16-acc", Int8GemmBf16Accumulator, "int8_gemm", CELLS["int8_gemm"])


class Fp8RoundsTowardZero(CpuBackend):
    """quantize_fp8 with fp32 scales rounding x / s toward zero: within the 1-ulp tolerance of the oracle."""

    def __init__(self):
        super().__init__()
        self.add_implementation("quantize_fp8", self.wrong)

    def wrong(self, x, group_size=128, scale_fmt=None):
        _, s = Q8.reference_impl(x, group_size, scale_fmt)
        v = (_groups(x, group_size) / s.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX)
        q = v.to(FP8_DTYPE)
        return torch.where(q.float().abs() > v.abs(), _e4m3_below(q), q).reshape(x.shape), s


def _e4m3_below(q):
    """The e4m3 value one step toward zero from q (bit pattern minus one, magnitude-wise)."""
    bits = q.view(torch.uint8)
    mag, sign = bits & 0x7F, bits & 0x80
    return (sign | (mag - (mag > 0).to(torch.uint8))).view(FP8_DTYPE)


class NanGroupFiniteScale(CpuBackend):
    """quantize_fp8 that ignores NaN when taking a group's amax (a max reduction that drops NaN)."""

    def __init__(self):
        super().__init__()
        self.add_implementation("quantize_fp8", self.wrong)

    def wrong(self, x, group_size=128, scale_fmt=None):
        return Q8.reference_impl(x.nan_to_num(nan=0.0), group_size, scale_fmt)


class Int8NanIgnoringAmax(CpuBackend):
    """quantize_int8 that ignores NaN and clips inf when taking a row's amax: such a row gets a finite scale."""

    def __init__(self):
        super().__init__()
        self.add_implementation("quantize_int8", self.wrong)

    def wrong(self, x):
        return QI8.reference_impl(x.nan_to_num(nan=0.0))


class Fp4NanIgnoringAmax(CpuBackend):
    """quantize_fp4 that ignores NaN and clips inf when taking a group's amax: such a group gets a finite scale."""

    def __init__(self):
        super().__init__()
        self.add_implementation("quantize_fp4", self.wrong)

    def wrong(self, w, group_size=32):
        return Q4.reference_impl(w.nan_to_num(nan=0.0), group_size)


class Int8GemmFp32TileAccumulator(CpuBackend):
    """int8_gemm summing exact 128-wide K tiles into an fp32 accumulator (exact only below 2**24)."""

    def __init__(self):
        super().__init__()
        self.add_implementation("int8_gemm", self.wrong)

    def wrong(self, a, a_scale, b, b_scale, *, out_dtype=torch.bfloat16):
        a2 = a.reshape(-1, a.shape[-1]).double()
        acc = torch.zeros(a2.shape[0], b.shape[0], dtype=torch.float32)
        for k in range(0, a.shape[-1], 128):
            acc += (a2[:, k : k + 128] @ b[:, k : k + 128].double().t()).float()
        y = acc.double() * a_scale.reshape(-1, 1).double() * b_scale.double()
        return y.to(out_dtype).reshape(*a.shape[:-1], b.shape[0])


def test_fp8_round_toward_zero_fails_the_nearest_rounding_property():
    register_backend("fp8-rtz", Fp8RoundsTowardZero)
    result = run_cell("fp8-rtz", "quantize_fp8", {"dtype": "float32", "scale_fmt": "fp32"}, profile="ci", seed=0)
    assert result.status == "fail" and "rounded to nearest" in result.message, result


def test_nan_group_with_a_finite_scale_fails():
    register_backend("nan-finite-scale", NanGroupFiniteScale)
    result = run_cell("nan-finite-scale", "quantize_fp8", FP32_SCALES, profile="ci", seed=0)
    assert result.status == "fail" and "non-finite scale" in result.message, result


def test_int8_gemm_fp32_tile_accumulator_fails_at_deepseek_k():
    register_backend("i8-fp32-acc", Int8GemmFp32TileAccumulator)
    result = run_cell("i8-fp32-acc", "int8_gemm", {"out_dtype": "bfloat16"}, profile="ci", seed=0)
    assert result.status == "fail", result
    assert "7168" in result.minimal_example or "Tensor[" in result.minimal_example


def test_int8_row_with_nan_and_a_finite_scale_fails():
    result = _fails("int8-nan-finite-scale", Int8NanIgnoringAmax, "quantize_int8", CELLS["quantize_int8"])
    assert "non-finite scale" in result.message, result.message


def test_fp4_group_with_nan_and_a_finite_scale_fails():
    result = _fails("fp4-nan-finite-scale", Fp4NanIgnoringAmax, "quantize_fp4", CELLS["quantize_fp4"])
    assert "non-finite scale" in result.message, result.message
