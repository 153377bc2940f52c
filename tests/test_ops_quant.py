"""Quantisation contracts (family 4): FP8 act/weight quantisation, FP8 dequantisation, block-scaled FP8
GEMM, FP4 quantisation and dequantisation; their composition with the grouped GEMM; validation errors.

The DeepSeek / DeepGEMM quantisers are transcribed here from their published math (one block per loop
iteration, as one Triton program per block), independently of the HAL's vectorised reference."""

from __future__ import annotations

import math

import pytest
import torch

import hal
from hal.formats import unpack_fp4
from hal.numerics import assert_within, compare, ulp_distance
from hal.ops.grouped_gemm import GEMM_TOLERANCE

Q8 = hal.ops.quantize_fp8
Q8W = hal.ops.quantize_fp8_weight
DQ8 = hal.ops.dequantize_fp8
GEMM8 = hal.ops.fp8_gemm
Q4 = hal.ops.quantize_fp4
DQ4 = hal.ops.dequantize_fp4
E4M3 = torch.float8_e4m3fn
FLOATS = [torch.bfloat16, torch.float16, torch.float32]
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def spread(shape, dtype=torch.float32, seed=0, group=128):
    """Random values whose magnitude varies a lot from group to group (and inside groups)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    lead = x.reshape(-1, group)
    lead *= torch.exp2(torch.randint(-12, 12, (lead.shape[0], 1), generator=g).float())
    return x.to(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


# --------------------------------------------------------------------------- transcriptions


def deepseek_v3_act_quant(x, block_size=128, scale_fmt=None):
    """DeepSeek-V3 ``act_quant`` (Triton kernel at HEAD), one program (block) per loop iteration."""
    assert x.size(-1) % block_size == 0
    flat = x.contiguous().reshape(-1)
    y = torch.empty(flat.shape, dtype=E4M3)
    s = torch.empty(flat.numel() // block_size, dtype=torch.float32)
    for pid in range(s.numel()):
        xb = flat[pid * block_size : (pid + 1) * block_size].to(torch.float32)
        amax = torch.max(torch.abs(xb))
        amax = torch.maximum(amax, torch.tensor(1e-4))
        sb = amax / 448.0
        if scale_fmt == "ue8m0":
            exp = math.ceil(math.log2(sb.item()))  # log2 in float64: exact for the fp32 value
            sb = torch.tensor(2.0**exp, dtype=torch.float32)
        y[pid * block_size : (pid + 1) * block_size] = (xb / sb).to(E4M3)
        s[pid] = sb
    return y.view(x.shape), s.view(*x.shape[:-1], -1)


FP8_MAX_INV = torch.tensor(1 / 448, dtype=torch.float32)


def fast_round_scale(amax, inv):
    """V3.2's bitwise ceil-to-power-of-two of ``amax * inv``."""
    b = (amax * inv).view(torch.int32)
    e = ((b >> 23) & 0xFF) - 127 + ((b & 0x7FFFFF) != 0).to(torch.int32)
    return ((e + 127) << 23).view(torch.float32)


def deepseek_v32_act_quant(x, block_size=128, scale_fmt=None):
    """DeepSeek-V3.2-Exp TileLang ``act_quant``: s = amax * (1/448), clamp(x / s, +-448)."""
    xg = x.float().reshape(-1, block_size)
    amax = torch.clamp_min(xg.abs().amax(-1), 1e-4)
    s = fast_round_scale(amax, FP8_MAX_INV) if scale_fmt is not None else amax * FP8_MAX_INV
    y = torch.clamp(xg / s[:, None], -448.0, 448.0).to(E4M3)
    return y.view(x.shape), s.view(*x.shape[:-1], -1)


def deepgemm_cast(x, block_size=128, use_ue8m0=False):
    """DeepGEMM ``per_token_cast_to_fp8``: sf = amax / 448, q = x * (1 / sf)."""
    xg = x.float().reshape(-1, block_size)
    sf = xg.abs().amax(-1).clamp(1e-4) / 448.0
    if use_ue8m0:
        b = sf.view(torch.int32)
        e = ((b >> 23) & 0xFF) + (b & 0x7FFFFF).bool().int()
        sf = (e.clamp(1, 254) << 23).view(torch.float32)
    y = (xg * (1.0 / sf[:, None])).to(E4M3)
    return y.view(x.shape), sf.view(*x.shape[:-1], -1)


def e4m3_round(v: float) -> float:
    """Nearest e4m3fn value of ``v`` (|v| <= 448), ties to even, without torch's cast."""
    a = abs(v)
    if a == 0:
        return math.copysign(0.0, v)
    e = max(math.frexp(a)[1] - 1, -6)  # floor(log2 a), subnormals share the exponent -6
    step = 2.0 ** (e - 3)
    return math.copysign(round(a / step) * step, v)  # round(): half to even


def e4m3_step(v: torch.Tensor) -> torch.Tensor:
    """Spacing of e4m3 values at |v|: 2**(floor(log2|v|) - 3), 2**-9 in the subnormal range."""
    a = v.abs().double()
    e = torch.floor(torch.log2(a.clamp_min(2.0**-6)))
    return torch.exp2(e - 3)


def e2m1_code(v: float) -> int:
    """Nearest e2m1 code of ``v`` (|v| <= 6), ties to the even code; the sign only on non-zero codes."""
    a = abs(v)
    dists = [abs(a - g) for g in E2M1]
    best = min(dists)
    codes = [c for c, d in enumerate(dists) if d == best]
    code = next((c for c in codes if c % 2 == 0), codes[0])
    return code | (8 if v < 0 and code else 0)


def v4_fp4_quant(w, group_size=32):
    """V4-style FP4 quantisation, one group per loop iteration, packing nibbles by hand."""
    flat = w.float().reshape(-1, group_size)
    s = torch.empty(flat.shape[0])
    codes = []
    for i, row in enumerate(flat):
        amax = max(row.abs().max().item(), float(torch.tensor(1e-4)))
        sg = 2.0 ** math.ceil(math.log2(float(torch.tensor(amax) / torch.tensor(6.0))))
        s[i] = sg
        codes += [e2m1_code(v / sg) for v in row.tolist()]
    packed = torch.tensor([lo | (hi << 4) for lo, hi in zip(codes[0::2], codes[1::2])], dtype=torch.uint8)
    return packed.view(*w.shape[:-1], -1), s.view(*w.shape[:-1], -1)


# --------------------------------------------------------------------------- quantize_fp8 semantics


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape, group", [((4, 512), 128), ((2, 3, 256), 128), ((3, 96), 32)])
def test_quantize_fp8_is_deepseek_v3_act_quant_bit_exact(scale_fmt, dtype, shape, group):
    x = spread(shape, dtype, group=group)
    q, s = Q8(x, group, scale_fmt)
    q_ds, s_ds = deepseek_v3_act_quant(x, group, scale_fmt)
    assert q.dtype == E4M3 and q.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == (*shape[:-1], shape[-1] // group)
    assert torch.equal(bits(q), bits(q_ds))
    assert torch.equal(s, s_ds)


@pytest.mark.parametrize("form", ["v3.2", "deepgemm"])
@pytest.mark.parametrize("dtype", FLOATS)
def test_reciprocal_forms_within_tolerance_for_fp32_and_bit_exact_for_ue8m0(form, dtype):
    x = spread((64, 1024), dtype, seed=1)
    for fmt in (None, "ue8m0"):
        q, s = Q8(x, 128, fmt)
        if form == "v3.2":
            q_o, s_o = deepseek_v32_act_quant(x, 128, fmt)
        else:
            q_o, s_o = deepgemm_cast(x, 128, use_ue8m0=fmt is not None)
        if fmt is None:
            tol_q, tol_s = Q8.tolerance["float8_e4m3fn"], Q8.tolerance["float32"]
            assert ulp_distance(q_o, q).max() <= tol_q.ulps == 1
            assert_within(s_o, s, tol_s, what="scales")
        else:
            tol_q, tol_s = Q8.tolerance["ue8m0:float8_e4m3fn"], Q8.tolerance["ue8m0:float32"]
            assert tol_q.ulps == 0 and tol_s.rtol == 0
            assert torch.equal(bits(q_o), bits(q)) and torch.equal(s_o, s)
    if form == "v3.2":  # the tolerance is needed: the scale formulas really do differ by an ulp
        assert (deepseek_v32_act_quant(x)[1] != Q8(x)[1]).any()


def test_fp32_scale_quotient_is_a_division_at_e4m3_midpoints():
    # values within 3 fp32 ulps of (midpoint between two e4m3 values) * s: there x / s and x * (1/s)
    # round to different e4m3 values; the contract is the division, one e4m3 step the tolerance
    amax = torch.tensor(3.7)
    s = amax / 448.0
    mids = torch.tensor(
        [(k + 0.5) * 2.0 ** (e - 3) for e in range(-6, 9) for k in range(8, 16) if (k + 0.5) * 2.0 ** (e - 3) < 448],
        dtype=torch.float64,
    )
    near = (mids * s.double()).float().view(torch.int32)[:, None] + torch.arange(-3, 4, dtype=torch.int32)
    vals = near.view(torch.float32).flatten()
    vals = torch.cat([vals, vals.new_zeros(-vals.numel() % 127)]).reshape(-1, 127)
    x = torch.cat([amax.expand(vals.shape[0], 1), vals], 1)  # every group: amax first, s = 3.7 / 448
    q, s_hal = Q8(x)
    assert torch.all(s_hal == s)
    expected = torch.tensor([[e4m3_round(v) for v in row] for row in (x / s).tolist()])
    assert torch.equal(q.float(), expected)
    q_recip = (x * (1 / s)).to(E4M3)
    assert (q_recip.float() != q.float()).sum() > 10, "the two forms do differ here"
    assert ulp_distance(q_recip, q).max() <= Q8.tolerance["float8_e4m3fn"].ulps


def test_ue8m0_scale_equals_the_v32_reciprocal_form_around_every_binade():
    # amax within +-300 fp32 ulps of 448 * 2**k: the only place where the two formulas could round
    # to different powers of two (see the quantize_fp8 docstring)
    centre = torch.tensor(448.0).view(torch.int32)
    amax = (centre + torch.arange(-300, 301, dtype=torch.int32)).view(torch.float32)
    amax = (amax[None, :] * torch.exp2(torch.arange(-13, 14, dtype=torch.float32))[:, None]).flatten()
    x = torch.zeros(amax.numel(), 128)
    x[:, 0], x[:, 1] = amax, -0.3 * amax
    _, s = Q8(x, scale_fmt="ue8m0")
    _, s_v32 = deepseek_v32_act_quant(x, scale_fmt="ue8m0")
    assert torch.equal(s, s_v32)


@pytest.mark.parametrize("k", [-10, 0, 5])
def test_exact_power_of_two_scale_is_not_rounded_up(k):
    # amax = 448 * 2**k: amax / 448 is exactly 2**k, so s = 2**k and the max element is q = 448
    x = torch.zeros(1, 128)
    x[0, 3], x[0, 7] = 448.0 * 2.0**k, -1.0 * 2.0**k
    for fmt in (None, "ue8m0"):
        q, s = Q8(x, scale_fmt=fmt)
        assert s.item() == 2.0**k
        assert q.float()[0, 3].item() == 448.0 and q.float()[0, 7].item() == -1.0
    # a reciprocal that rounds up by one ulp jumps a whole binade there: such a formula fails
    inv_up = torch.nextafter(FP8_MAX_INV, torch.tensor(1.0))
    s_bad = fast_round_scale(x.abs().amax(-1), inv_up)
    assert s_bad.item() == 2.0 ** (k + 1) != Q8(x, scale_fmt="ue8m0")[1].item()


@pytest.mark.parametrize("fmt, expected_s", [(None, float(torch.tensor(1e-4) / 448)), ("ue8m0", 2.0**-22)])
def test_all_zero_group(fmt, expected_s):
    x = spread((2, 384))
    x[1, 128:256] = 0
    q, s = Q8(x, scale_fmt=fmt)
    assert s[1, 1].item() == expected_s  # 1e-4 / 448 = 2.23e-7, rounded up: 2**-22 = 2.38e-7
    assert torch.all(q[1, 128:256].float() == 0)
    assert torch.equal(bits(q[0]), bits(Q8(x[:1], scale_fmt=fmt)[0][0]))


def test_saturation_at_plus_minus_448_times_scale():
    x = torch.zeros(3, 128)
    x[0, :4] = torch.tensor([5.0, -5.0, 2.5, 1.0])  # fp32 s = 5/448: +-5 -> +-448
    x[1, :2] = torch.tensor([3.0, -3.0])  # ue8m0: s = 2**-7, 3 / s = 384 (not saturated)
    x[2, :2] = torch.tensor([448.0 * 2**-3, -448.0 * 2**-3])  # s = 2**-3 either way: exactly +-448
    q, s = Q8(x)
    assert q.float()[0, :2].tolist() == [448.0, -448.0]
    assert q.float()[2, :2].tolist() == [448.0, -448.0] and s[2].item() == 2**-3
    q, s = Q8(x, scale_fmt="ue8m0")
    assert s[1].item() == 2**-7 and q.float()[1, :2].tolist() == [384.0, -384.0]
    assert q.float()[2, :2].tolist() == [448.0, -448.0]
    # no |q| above 448, for any amax whose fp32 quotient amax / fl(amax / 448) rounds above 448
    amax = torch.rand(4096, generator=torch.Generator().manual_seed(3)) * 1000 + 1e-3
    y = torch.stack([amax, -amax], 1).repeat(1, 64)
    q, s = Q8(y)
    assert torch.all(q.float().abs() == 448.0)
    assert (y[:, 0] / s[:, 0] > 448).any(), "some quotients do round above 448: the clamp is exercised"


def test_subnormal_range_values():
    # amax 448 -> s = 1 (both formats): q is x rounded to e4m3, subnormal step 2**-9 below 2**-6
    vals = [
        448.0,
        0.01,
        -0.01,
        2.0**-10,
        1.5 * 2.0**-10,
        3 * 2.0**-9,
        2.0**-6 - 2.0**-11,
        2.0**-7 + 2.0**-10,
        -(2.0**-11),
        1e-40,
        0.0,
    ]
    x = torch.zeros(1, 128)
    x[0, : len(vals)] = torch.tensor(vals)
    for fmt in (None, "ue8m0"):
        q, s = Q8(x, scale_fmt=fmt)
        assert s.item() == 1.0
        got = q.float()[0, : len(vals)].tolist()
        expected = [e4m3_round(float(torch.tensor(v))) for v in vals]
        assert got == expected
    assert expected[3] == 0.0 and expected[4] == 2.0**-9  # the tie at 2**-10 goes to the even 0
    # a group made only of fp32 subnormals: amax is floored at 1e-4, q underflows to 0
    tiny = torch.full((1, 128), 1e-40)
    q, s = Q8(tiny)
    assert s.item() == float(torch.tensor(1e-4) / 448) and torch.all(q.float() == 0)


def test_large_dynamic_range_within_a_group():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 128, generator=g) * torch.exp2(torch.randint(-20, 10, (2, 128), generator=g).float())
    x[0, 0], x[1, 5] = 1000.0, -3e4
    for fmt in (None, "ue8m0"):
        q, s = Q8(x, scale_fmt=fmt)
        v = x / s  # fp32 division, as the contract states
        expected = torch.tensor([[e4m3_round(e) for e in row] for row in v.tolist()])
        assert torch.equal(q.float(), expected)
        assert (q.float() == 0).sum() > 20, "small values flush to zero next to a large one"


def test_nan_or_inf_poisons_only_its_group():
    x = spread((2, 256))
    x[0, 5] = float("nan")
    x[1, 200] = float("inf")
    q, s = Q8(x)
    assert torch.isnan(s[0, 0]) and not torch.isfinite(s[1, 1])
    assert torch.equal(s[0, 1], Q8(x[0:1, 128:])[1][0, 0]) and torch.equal(s[1, 0], Q8(x[1:2, :128])[1][0, 0])
    assert torch.equal(bits(q[1, :128]), bits(Q8(x[1:2, :128])[0][0]))


def test_quantize_fp8_accepts_any_layout_and_empty_inputs():
    x = spread((256, 6)).t()  # non-contiguous [6, 256]
    q, s = Q8(x)
    q2, s2 = Q8(x.contiguous())
    assert torch.equal(bits(q), bits(q2)) and torch.equal(s, s2)
    q, s = Q8(torch.empty(0, 256))
    assert q.shape == (0, 256) and s.shape == (0, 2)
    q, s = Q8(torch.empty(3, 0))
    assert q.shape == (3, 0) and s.shape == (3, 0)


def test_quantisers_ignore_compute_dtype():
    x = spread((4, 256), torch.bfloat16)
    for fmt in (None, "ue8m0"):
        q, s = Q8(x, scale_fmt=fmt)
        q64, s64 = Q8.reference_impl(x, scale_fmt=fmt, compute_dtype=torch.float64)
        assert q64.dtype == E4M3 and torch.equal(bits(q), bits(q64)) and torch.equal(s, s64)
    w = spread((4, 64))
    assert all(torch.equal(a, b) for a, b in zip(Q4(w), Q4.reference_impl(w, compute_dtype=torch.float64)))


def test_requests_name_the_declared_features():
    x = torch.randn(2, 128, dtype=torch.float16)
    assert Q8.validate(x).features == (("dtype", "float16"), ("scale_fmt", "fp32"))
    assert Q8.validate(x, scale_fmt="ue8m0").features == (("dtype", "float16"), ("scale_fmt", "ue8m0"))
    q, s = Q8(x)
    assert DQ8.validate(q, s, out_dtype=torch.float32).features == (("out_dtype", "float32"),)
    for op in (Q8, Q8W, DQ8, GEMM8, Q4, DQ4):
        assert op.family == "quant" and op.reference_impl is not None
    assert Q8.axes == {"dtype": ("bfloat16", "float16", "float32"), "scale_fmt": ("fp32", "ue8m0")}


# --------------------------------------------------------------------------- quantize_fp8_weight


def weight_quant_loop(w, b=128, scale_fmt=None):
    """Per-block loop: one 128x128 block (partial at the edges) at a time."""
    n, k = w.shape
    nb, kb = -(-n // b), -(-k // b)
    q = torch.empty(n, k, dtype=E4M3)
    s = torch.empty(nb, kb)
    for i in range(nb):
        for j in range(kb):
            blk = w[i * b : (i + 1) * b, j * b : (j + 1) * b].float()
            amax = torch.maximum(blk.abs().max(), torch.tensor(1e-4))
            sb = amax / 448.0
            if scale_fmt == "ue8m0":
                sb = torch.tensor(2.0 ** math.ceil(math.log2(sb.item())))
            q[i * b : (i + 1) * b, j * b : (j + 1) * b] = (blk / sb).to(E4M3)
            s[i, j] = sb
    return q, s


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
@pytest.mark.parametrize(
    "shape, block, dtype",
    [
        ((200, 300), 128, torch.bfloat16),
        ((130, 129), 128, torch.float32),
        ((5, 7), 128, torch.float16),
        ((96, 80), 32, torch.float32),
    ],
)
def test_weight_quant_with_partial_edge_blocks_matches_block_loop(scale_fmt, shape, block, dtype):
    w = spread(shape, dtype, seed=5, group=shape[1]) * 0.1
    w[-1, -1] = 7.5  # the largest value lives in the partial corner block
    q, s = Q8W(w, block, scale_fmt)
    q_l, s_l = weight_quant_loop(w, block, scale_fmt)
    assert q.shape == shape and s.shape == (-(-shape[0] // block), -(-shape[1] // block))
    assert torch.equal(bits(q), bits(q_l)) and torch.equal(s, s_l)


def test_weight_quant_empty_and_zero_blocks():
    q, s = Q8W(torch.empty(0, 300))
    assert q.shape == (0, 300) and s.shape == (0, 3)
    w = torch.zeros(130, 10)
    q, s = Q8W(w, scale_fmt="ue8m0")
    assert torch.all(s == 2.0**-22) and torch.all(q.float() == 0)


# --------------------------------------------------------------------------- quant -> dequant error


@pytest.mark.parametrize("fmt", [None, "ue8m0"])
def test_fp8_round_trip_error_is_at_most_half_a_step(fmt):
    x = spread((16, 512), seed=6)
    q, s = Q8(x, scale_fmt=fmt)
    y = DQ8(q, s, out_dtype=torch.float32)
    v = x.double() / s.double().repeat_interleave(128, -1)  # x in units of its scale
    bound = e4m3_step(v) / 2 * s.double().repeat_interleave(128, -1)
    # slack: the fp32 quotient x / s and the fp32 product q * s each round once (2**-24 relative)
    err = (y.double() - x.double()).abs()
    assert torch.all(err <= bound + 2**-22 * x.double().abs())
    assert torch.any(err > 0.4 * bound), "the bound is tight: some values do lose almost half a step"

    w = spread((200, 300), seed=7, group=300)
    qw, sw = Q8W(w, scale_fmt=fmt)
    yw = DQ8(qw, sw, block_shape=(128, 128), out_dtype=torch.float32)
    se = sw.double().repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :300]
    err = (yw.double() - w.double()).abs()
    assert torch.all(err <= e4m3_step(w.double() / se) / 2 * se + 2**-22 * w.double().abs())


def test_fp4_round_trip_error_is_at_most_half_a_grid_step():
    w = spread((8, 256), seed=8, group=32)
    q, s = Q4(w)
    y = DQ4(q, s, out_dtype=torch.float32)
    se = s.double().repeat_interleave(32, -1)
    v = (w.double() / se).abs()
    step = torch.where(v < 2, 0.5, torch.where(v < 4, 1.0, 2.0))
    err = (y.double() - w.double()).abs()
    assert torch.all(err <= step / 2 * se)  # x / s and q * s are exact: no slack
    assert torch.any(err == step / 2 * se) or torch.any(err > 0.45 * step * se)


# --------------------------------------------------------------------------- dequantize_fp8


@pytest.mark.parametrize("out_dtype", FLOATS)
def test_dequantize_fp8_groups_within_tolerance_of_oracle(out_dtype):
    g = torch.Generator().manual_seed(9)
    q = (torch.randn(3, 4, 300, generator=g) * 50).to(E4M3)
    scale = torch.rand(3, 4, 3, generator=g) * 4  # arbitrary fp32 scales, partial last group (300 = 2*128 + 44)
    y = DQ8(q, scale, block_shape=(128,), out_dtype=out_dtype)
    assert y.dtype == out_dtype and y.shape == q.shape
    exact = DQ8.reference_impl(q, scale, block_shape=(128,), out_dtype=out_dtype, compute_dtype=torch.float64)
    loop = torch.empty(q.shape, dtype=torch.float64)
    for k in range(300):
        loop[..., k] = q[..., k].double() * scale[..., k // 128].double()
    torch.testing.assert_close(exact, loop, rtol=0, atol=0)
    assert_within(y, exact, DQ8.tolerance[name(out_dtype)])


@pytest.mark.parametrize("out_dtype", FLOATS)
def test_dequantize_fp8_blocks_is_weight_dequant(out_dtype):
    g = torch.Generator().manual_seed(10)
    q = (torch.randn(2, 200, 300, generator=g) * 30).to(E4M3)
    scale = torch.rand(2, 2, 3, generator=g) + 0.5
    y = DQ8(q, scale, block_shape=(128, 128), out_dtype=out_dtype)
    loop = torch.empty(q.shape, dtype=torch.float64)
    for i in range(2):
        for j in range(3):
            loop[:, i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128] = (
                q[:, i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128].double() * scale[:, i, j, None, None].double()
            )
    assert_within(y, loop, DQ8.tolerance[name(out_dtype)])


def test_dequantize_with_power_of_two_scales_is_exact_and_accepts_e8m0():
    x = spread((4, 256), seed=11)
    q, s = Q8(x, scale_fmt="ue8m0")
    exact = DQ8.reference_impl(q, s, compute_dtype=torch.float64)
    for out_dtype in (torch.bfloat16, torch.float32):  # e4m3 (4 bits) times 2**e fits both exactly
        assert torch.equal(DQ8(q, s, out_dtype=out_dtype).double(), exact)
    e8 = getattr(torch, "float8_e8m0fnu", None)
    if e8 is not None:
        assert torch.equal(DQ8(q, s.to(e8), out_dtype=torch.float32), DQ8(q, s, out_dtype=torch.float32))


# --------------------------------------------------------------------------- fp8_gemm


def fp8_operands(m_shape=(3, 5), n=200, k=384, seed=12, fmt=None):
    a = spread((*m_shape, k), seed=seed)
    b = torch.randn(n, k, generator=torch.Generator().manual_seed(seed + 1)) * 0.05
    qa, sa = Q8(a, 128, fmt)
    qb, sb = Q8W(b, 128, fmt)
    return qa, sa, qb, sb


def block_loop_gemm(qa, sa, qb, sb, dtype=torch.float64):
    """DeepSeek's fp8_gemm loop: per 128-wide K block, the fp8 dot products scaled by a_s * b_s."""
    a2, s2 = qa.reshape(-1, qa.shape[-1]), sa.reshape(-1, sa.shape[-1])
    n = qb.shape[0]
    acc = torch.zeros(a2.shape[0], n, dtype=dtype)
    rows = torch.arange(n) // 128
    for kb in range(qa.shape[-1] // 128):
        part = a2[:, kb * 128 : (kb + 1) * 128].to(dtype) @ qb[:, kb * 128 : (kb + 1) * 128].to(dtype).T
        acc += part * s2[:, kb, None].to(dtype) * sb[rows, kb][None, :].to(dtype)
    return acc.reshape(*qa.shape[:-1], n)


def dequant_pair(qa, sa, qb, sb):
    ad = DQ8.reference_impl(qa, sa, compute_dtype=torch.float64)
    bd = DQ8.reference_impl(qb, sb, block_shape=(128, 128), compute_dtype=torch.float64)
    return ad, bd


@pytest.mark.parametrize("fmt", [None, "ue8m0"])
@pytest.mark.parametrize("out_dtype", FLOATS)
def test_fp8_gemm_within_tolerance_of_oracle_and_block_loop(out_dtype, fmt):
    qa, sa, qb, sb = fp8_operands(fmt=fmt)
    y = GEMM8(qa, sa, qb, sb, out_dtype=out_dtype)
    assert y.dtype == out_dtype and y.shape == (3, 5, 200)
    exact = GEMM8.reference_impl(qa, sa, qb, sb, out_dtype=out_dtype, compute_dtype=torch.float64)
    torch.testing.assert_close(exact, block_loop_gemm(qa, sa, qb, sb), rtol=1e-12, atol=1e-12)
    ad, bd = dequant_pair(qa, sa, qb, sb)
    magnitude = ad.abs() @ bd.abs().T
    tol, n = GEMM8.tolerance[name(out_dtype)], qa.shape[-1] + 3
    assert_within(y, exact, tol, n=n, magnitude=magnitude)
    # DeepSeek's kernel form (fp32 partial sums scaled per block) is admitted by the same tolerance
    assert_within(block_loop_gemm(qa, sa, qb, sb, torch.float32).to(out_dtype), exact, tol, n=n, magnitude=magnitude)


def test_fp8_gemm_tolerance_catches_a_wrong_block_scale():
    qa, sa, qb, sb = fp8_operands(m_shape=(8,), seed=13)
    wrong = GEMM8(qa, sa.flip(-1).contiguous(), qb, sb, out_dtype=torch.float32)
    exact = GEMM8.reference_impl(qa, sa, qb, sb, compute_dtype=torch.float64)
    ad, bd = dequant_pair(qa, sa, qb, sb)
    c = compare(wrong, exact, GEMM8.tolerance["float32"], n=qa.shape[-1] + 3, magnitude=ad.abs() @ bd.abs().T)
    assert not c.ok


def test_fp8_gemm_vector_input_and_empty_k():
    qa, sa, qb, sb = fp8_operands(m_shape=(1,), seed=14)
    y = GEMM8(qa[0], sa[0], qb, sb, out_dtype=torch.float32)
    assert y.shape == (200,)
    torch.testing.assert_close(y, GEMM8(qa, sa, qb, sb, out_dtype=torch.float32)[0])
    empty = GEMM8(torch.empty(4, 0, dtype=E4M3), torch.empty(4, 0), torch.empty(3, 0, dtype=E4M3), torch.empty(1, 0))
    assert empty.shape == (4, 3) and torch.all(empty == 0)


# --------------------------------------------------------------------------- grouped_gemm composition


def group_oracle(xd, wd, sizes):
    out, start = [], 0
    for g, size in enumerate(sizes.tolist()):
        out.append(xd[start : start + size] @ wd[g].T)
        start += size
    return torch.cat(out)


@pytest.mark.parametrize("case", ["fp8_x_fp8_w", "fp8_x_fp8_w_ue8m0", "bf16_x_fp4_w", "fp8_x_fp4_w"])
def test_grouped_gemm_with_quantised_operands_matches_dequantise_then_gemm(case):
    g = torch.Generator().manual_seed(15)
    sizes = torch.tensor([4, 0, 6], dtype=torch.int32)
    K, N = 256, 200
    x = (torch.randn(10, K, generator=g)).to(torch.bfloat16)
    w = torch.randn(3, N, K, generator=g) * 0.05
    fmt = "ue8m0" if case.endswith("ue8m0") else None
    if case.startswith("fp8_x"):
        xq, x_scale = Q8(x, 128, fmt)
        xd = DQ8.reference_impl(xq, x_scale, compute_dtype=torch.float64)
    else:
        xq, x_scale, xd = x, None, x.double()
    if "fp4_w" in case:
        wq, w_scale = Q4(w)
        assert wq.shape == (3, N, K // 2) and w_scale.shape == (3, N, K // 32)
        wd = DQ4.reference_impl(wq, w_scale, compute_dtype=torch.float64)
    else:
        per_expert = [Q8W(w[e], 128, fmt) for e in range(3)]
        wq, w_scale = torch.stack([p[0] for p in per_expert]), torch.stack([p[1] for p in per_expert])
        wd = torch.stack(
            [
                DQ8.reference_impl(wq[e], w_scale[e], block_shape=(128, 128), compute_dtype=torch.float64)
                for e in range(3)
            ]
        )
    y = hal.ops.grouped_gemm(xq, wq, sizes, x_scale=x_scale, w_scale=w_scale)
    assert y.dtype == torch.bfloat16
    exact = group_oracle(xd, wd, sizes)
    oracle = hal.ops.grouped_gemm.reference_impl(
        xq, wq, sizes, x_scale=x_scale, w_scale=w_scale, compute_dtype=torch.float64
    )
    torch.testing.assert_close(oracle, exact, rtol=1e-12, atol=1e-12)
    assert_within(y, exact, GEMM_TOLERANCE["bfloat16"], n=K + 3, magnitude=group_oracle(xd.abs(), wd.abs(), sizes))


# --------------------------------------------------------------------------- FP4


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("group", [32, 16])
def test_quantize_fp4_matches_v4_transcription_bit_exact(dtype, group):
    w = spread((3, 4, 64), dtype, seed=16, group=group)
    q, s = Q4(w, group)
    q_l, s_l = v4_fp4_quant(w, group)
    assert q.dtype == torch.uint8 and q.shape == (3, 4, 32) and s.shape == (3, 4, 64 // group)
    assert torch.equal(q, q_l) and torch.equal(s, s_l)


def test_fp4_ties_go_to_the_even_code_and_zero_is_positive():
    vals = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, -6.0, -0.1, 0.1]
    w = torch.zeros(32)
    w[: len(vals)] = torch.tensor(vals)
    q, s = Q4(w)
    assert s.item() == 1.0
    got = unpack_fp4(q)[: len(vals)].tolist()
    assert got == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 0.0, -1.0, -1.0, -2.0, -2.0, -4.0, -4.0, -6.0, 0.0, 0.0]
    assert q[4].item() & 0xF == 0 and q[8].item() >> 4 == 0, "values rounding to zero are +0 nibbles"


def test_fp4_pack_unpack_round_trip():
    g = torch.Generator().manual_seed(17)
    packed = torch.randint(0, 256, (6, 64), generator=g, dtype=torch.int32)
    lo, hi = packed & 0xF, packed >> 4
    lo, hi = torch.where(lo == 8, 0, lo), torch.where(hi == 8, 0, hi)  # canonical +0
    lo[:, ::16] = 7  # value 6.0 at the start of every 32-value group: scales are exact powers of two
    packed = (lo | hi << 4).to(torch.uint8)
    scale = torch.exp2(torch.randint(-8, 8, (6, 4), generator=g).float())
    w = unpack_fp4(packed) * scale.repeat_interleave(32, -1)
    assert torch.equal(unpack_fp4(packed)[:, 0], torch.full((6,), 6.0))  # low nibble = lower index
    q, s = Q4(w)
    assert torch.equal(q, packed) and torch.equal(s, scale)
    assert torch.equal(DQ4(q, s, out_dtype=torch.float32), w)
    assert torch.equal(DQ4(q, s, out_dtype=torch.bfloat16), w.bfloat16())


def test_ue8m0_scales_are_powers_of_two_and_tight():
    x = spread((8, 512), seed=18)
    _, s8 = Q8(x, scale_fmt="ue8m0")
    _, s4 = Q4(x)
    for s, fmax, group in ((s8, 448.0, 128), (s4, 6.0, 32)):
        mantissa, _ = torch.frexp(s)
        assert torch.all(mantissa == 0.5)
        ratio = x.reshape(8, -1, group).abs().amax(-1) / s  # the smallest power of two that fits
        assert torch.all(ratio <= fmax) and torch.all(ratio > fmax / 2)


def test_fp4_all_zero_group_and_non_finite():
    w = spread((2, 64), seed=19)
    w[0, :32] = 0
    w[1, 40] = float("nan")
    q, s = Q4(w)
    assert s[0, 0].item() == 2.0**-15 and torch.all(unpack_fp4(q)[0, :32] == 0)  # ceil_pow2(1e-4 / 6)
    assert torch.isnan(s[1, 1]) and torch.isfinite(s[1, 0])
    assert torch.equal(q[1, :16], Q4(w[1:2, :32])[0][0])


@pytest.mark.parametrize("out_dtype", FLOATS)
def test_dequantize_fp4_within_tolerance_and_storage_dtypes(out_dtype):
    w = spread((4, 3, 128), seed=20, group=32)
    q, s = Q4(w)
    y = DQ4(q, s, out_dtype=out_dtype)
    assert y.dtype == out_dtype and y.shape == w.shape
    exact = DQ4.reference_impl(q, s, compute_dtype=torch.float64)
    loop = unpack_fp4(q).double() * s.double().repeat_interleave(32, -1)
    assert torch.equal(exact, loop)
    assert_within(y, exact, DQ4.tolerance[name(out_dtype)])
    x2 = getattr(torch, "float4_e2m1fn_x2", None)
    if x2 is not None:
        assert torch.equal(DQ4(q.view(x2), s, out_dtype=out_dtype), y)
    e8 = getattr(torch, "float8_e8m0fnu", None)
    if e8 is not None:
        assert torch.equal(DQ4(q, s.to(e8), out_dtype=out_dtype), y)
    # a group size other than 32: scales per 16 values
    s16 = torch.exp2(torch.randint(-3, 3, (4, 3, 8), generator=torch.Generator().manual_seed(0)).float())
    y16 = DQ4(q, s16, group_size=16, out_dtype=torch.float32)
    assert torch.equal(y16.double(), unpack_fp4(q).double() * s16.double().repeat_interleave(16, -1))


def test_inputs_are_not_mutated():
    x = spread((2, 256), torch.bfloat16)
    copy = x.clone()
    q, s = Q8(x)
    Q8W(x)
    Q4(x)
    DQ8(q, s)
    assert torch.equal(x, copy)


# --------------------------------------------------------------------------- validation errors


def _fp8(*shape):
    return torch.zeros(*shape).to(E4M3)


ERRORS = [
    # quantize_fp8
    (Q8, lambda: dict(x=[1.0, 2.0]), "x", hal.InvalidArgumentError),
    (Q8, lambda: dict(x=torch.zeros(2, 128, dtype=torch.float64)), "x", hal.InvalidDtypeError),
    (Q8, lambda: dict(x=torch.zeros(2, 128, dtype=torch.int32)), "x", hal.InvalidDtypeError),
    (Q8, lambda: dict(x=torch.tensor(1.0)), "x", hal.InvalidArgumentError),
    (Q8, lambda: dict(x=torch.zeros(2, 100)), "x", hal.InvalidArgumentError),
    (Q8, lambda: dict(x=torch.zeros(2, 128), group_size=0), "group_size", hal.InvalidArgumentError),
    (Q8, lambda: dict(x=torch.zeros(2, 128), group_size=-128), "group_size", hal.InvalidArgumentError),
    (Q8, lambda: dict(x=torch.zeros(2, 128), group_size=128.0), "group_size", hal.InvalidArgumentError),
    (Q8, lambda: dict(x=torch.zeros(2, 128), scale_fmt="e8m0"), "scale_fmt", hal.InvalidArgumentError),
    # quantize_fp8_weight
    (Q8W, lambda: dict(w=torch.zeros(2, 3, 128)), "w", hal.InvalidArgumentError),
    (Q8W, lambda: dict(w=torch.zeros(128)), "w", hal.InvalidArgumentError),
    (Q8W, lambda: dict(w=_fp8(128, 128)), "w", hal.InvalidDtypeError),
    (Q8W, lambda: dict(w=torch.zeros(4, 4), block_size=0), "block_size", hal.InvalidArgumentError),
    (Q8W, lambda: dict(w=torch.zeros(4, 4), scale_fmt="UE8M0"), "scale_fmt", hal.InvalidArgumentError),
    # dequantize_fp8
    (DQ8, lambda: dict(q=torch.zeros(2, 128), scale=torch.ones(2, 1)), "q", hal.InvalidDtypeError),
    (DQ8, lambda: dict(q=_fp8(2, 128), scale=torch.ones(2, 1, dtype=torch.float16)), "scale", hal.InvalidDtypeError),
    (DQ8, lambda: dict(q=_fp8(2, 256), scale=torch.ones(2, 1)), "scale", hal.InvalidArgumentError),
    (
        DQ8,
        lambda: dict(q=_fp8(200, 300), scale=torch.ones(1, 3), block_shape=(128, 128)),
        "scale",
        hal.InvalidArgumentError,
    ),
    (DQ8, lambda: dict(q=_fp8(128), scale=torch.ones(1, 1), block_shape=(128, 128)), "q", hal.InvalidArgumentError),
    (
        DQ8,
        lambda: dict(q=_fp8(2, 128), scale=torch.ones(2, 1), block_shape=(1, 1, 128)),
        "block_shape",
        hal.InvalidArgumentError,
    ),
    (
        DQ8,
        lambda: dict(q=_fp8(2, 128), scale=torch.ones(2, 1), block_shape=(0,)),
        "block_shape",
        hal.InvalidArgumentError,
    ),
    (
        DQ8,
        lambda: dict(q=_fp8(2, 128), scale=torch.ones(2, 1), block_shape=128),
        "block_shape",
        hal.InvalidArgumentError,
    ),
    (
        DQ8,
        lambda: dict(q=_fp8(2, 128), scale=torch.ones(2, 1), out_dtype=torch.float64),
        "out_dtype",
        hal.InvalidArgumentError,
    ),
    # fp8_gemm
    (
        GEMM8,
        lambda: dict(a=torch.zeros(2, 128), a_scale=torch.ones(2, 1), b=_fp8(4, 128), b_scale=torch.ones(1, 1)),
        "a",
        hal.InvalidDtypeError,
    ),
    (
        GEMM8,
        lambda: dict(a=_fp8(2, 128), a_scale=torch.ones(2, 1), b=torch.zeros(4, 128), b_scale=torch.ones(1, 1)),
        "b",
        hal.InvalidDtypeError,
    ),
    (
        GEMM8,
        lambda: dict(a=_fp8(2, 128), a_scale=torch.ones(2, 1), b=_fp8(1, 4, 128), b_scale=torch.ones(1, 1)),
        "b",
        hal.InvalidArgumentError,
    ),
    (
        GEMM8,
        lambda: dict(a=_fp8(2, 100), a_scale=torch.ones(2, 1), b=_fp8(4, 100), b_scale=torch.ones(1, 1)),
        "a",
        hal.InvalidArgumentError,
    ),
    (
        GEMM8,
        lambda: dict(a=_fp8(2, 128), a_scale=torch.ones(2, 1), b=_fp8(4, 256), b_scale=torch.ones(1, 2)),
        "b",
        hal.InvalidArgumentError,
    ),
    (
        GEMM8,
        lambda: dict(a=_fp8(2, 256), a_scale=torch.ones(2, 1), b=_fp8(4, 256), b_scale=torch.ones(1, 2)),
        "a_scale",
        hal.InvalidArgumentError,
    ),
    (
        GEMM8,
        lambda: dict(a=_fp8(2, 256), a_scale=torch.ones(2, 2), b=_fp8(130, 256), b_scale=torch.ones(1, 2)),
        "b_scale",
        hal.InvalidArgumentError,
    ),
    (
        GEMM8,
        lambda: dict(
            a=_fp8(2, 128), a_scale=torch.ones(2, 1, dtype=torch.bfloat16), b=_fp8(4, 128), b_scale=torch.ones(1, 1)
        ),
        "a_scale",
        hal.InvalidDtypeError,
    ),
    (
        GEMM8,
        lambda: dict(
            a=_fp8(2, 128), a_scale=torch.ones(2, 1), b=_fp8(4, 128), b_scale=torch.ones(1, 1), out_dtype=torch.int8
        ),
        "out_dtype",
        hal.InvalidArgumentError,
    ),
    # quantize_fp4
    (Q4, lambda: dict(w=torch.zeros(2, 64, dtype=torch.int8)), "w", hal.InvalidDtypeError),
    (Q4, lambda: dict(w=torch.tensor(0.5)), "w", hal.InvalidArgumentError),
    (Q4, lambda: dict(w=torch.zeros(2, 48)), "w", hal.InvalidArgumentError),
    (Q4, lambda: dict(w=torch.zeros(2, 3), group_size=3), "w", hal.InvalidArgumentError),
    (Q4, lambda: dict(w=torch.zeros(2, 64), group_size=0), "group_size", hal.InvalidArgumentError),
    (Q4, lambda: dict(w=torch.zeros(2, 64), group_size=True), "group_size", hal.InvalidArgumentError),
    # dequantize_fp4
    (DQ4, lambda: dict(q=torch.zeros(2, 16), scale=torch.ones(2, 1)), "q", hal.InvalidDtypeError),
    (
        DQ4,
        lambda: dict(q=torch.zeros(2, 16, dtype=torch.uint8), scale=torch.ones(2, 2)),
        "scale",
        hal.InvalidArgumentError,
    ),
    (
        DQ4,
        lambda: dict(q=torch.zeros(2, 16, dtype=torch.uint8), scale=torch.ones(2, 1, dtype=torch.float16)),
        "scale",
        hal.InvalidDtypeError,
    ),
    (
        DQ4,
        lambda: dict(q=torch.zeros(2, 8, dtype=torch.uint8), scale=torch.ones(2, 1)),
        "group_size",
        hal.InvalidArgumentError,
    ),
    (
        DQ4,
        lambda: dict(q=torch.zeros(2, 16, dtype=torch.uint8), scale=torch.ones(2, 1), group_size=-32),
        "group_size",
        hal.InvalidArgumentError,
    ),
    (DQ4, lambda: dict(q=torch.zeros((), dtype=torch.uint8), scale=torch.ones(1)), "q", hal.InvalidArgumentError),
    (
        DQ4,
        lambda: dict(q=torch.zeros(2, 16, dtype=torch.uint8), scale=torch.ones(2, 1), out_dtype=torch.uint8),
        "out_dtype",
        hal.InvalidArgumentError,
    ),
]


@pytest.mark.parametrize(
    "op, make, argument, exc", ERRORS, ids=[f"{e[0].name}-{e[2]}-{i}" for i, e in enumerate(ERRORS)]
)
def test_bad_input_names_the_argument(op, make, argument, exc):
    with pytest.raises(exc, match=f"argument '{argument}'"):
        op(**make())


@pytest.mark.parametrize(
    "op, args, argument",
    [
        (DQ8, lambda: (_fp8(2, 128), torch.ones(2, 1, device="meta")), "scale"),
        (DQ4, lambda: (torch.zeros(2, 16, dtype=torch.uint8), torch.ones(2, 1, device="meta")), "scale"),
        (GEMM8, lambda: (_fp8(2, 128), torch.ones(2, 1), _fp8(4, 128), torch.ones(1, 1, device="meta")), "b_scale"),
    ],
)
def test_tensors_on_different_devices_are_rejected(op, args, argument):
    # the 'meta' device stands in for a second device on a CPU-only machine: validation runs before
    # any computation, so nothing is computed on it
    with pytest.raises(hal.DeviceMismatchError, match=f"argument '{argument}'"):
        op(*args())


def test_error_message_says_expected_and_got():
    with pytest.raises(hal.InvalidArgumentError) as info:
        Q8(torch.zeros(2, 100))
    err = info.value
    assert (err.op, err.argument) == ("quantize_fp8", "x")
    assert "divisible by group_size = 128" in err.expected and "K = 100" in err.got


def test_quantize_fp4_of_no_rows():
    q, s = hal.ops.quantize_fp4(torch.zeros(0, 64))
    assert q.shape == (0, 32) and q.dtype == torch.uint8 and s.shape == (0, 2)


# ------------------------------------------------------------------ W8A8 int8


def test_quantize_int8_is_per_token_symmetric_with_ties_to_even_and_the_amax_floor():
    x = torch.tensor([[127.0, 0.5, -0.5, 1.5, -63.5], [0.0, 0.0, 0.0, 0.0, 0.0], [2e-5, 0, 0, 0, 0]])
    q, s = hal.ops.quantize_int8(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (3,)
    assert q[0].tolist() == [127, 0, 0, 2, -64]  # s = 1: ties to even, never -128
    assert s[1] == s[2] == torch.tensor(1e-4) / 127  # all-zero and tiny rows: amax floored at 1e-4
    assert q[1].tolist() == [0] * 5 and q[2, 0] == 25  # 2e-5 / (1e-4 / 127) = 25.4


def test_quantize_int8_weight_scales_each_output_channel():
    w = torch.randn(3, 5, 16)
    q, s = hal.ops.quantize_int8_weight(w)
    assert q.shape == w.shape and s.shape == (3, 5)
    assert torch.equal(q.abs().amax(-1), torch.full((3, 5), 127, dtype=torch.int8))
    assert (q.float() * s[..., None] - w).abs().le(s[..., None] / 2 + 1e-7).all()


@pytest.mark.parametrize(
    "op, args",
    [
        (hal.ops.quantize_fp8, (128,)),
        (hal.ops.quantize_fp8, (128, "ue8m0")),
        (hal.ops.quantize_int8, ()),
        (hal.ops.quantize_int8_weight, ()),
    ],
)
def test_quantisers_of_many_rows_are_the_reference_bit_for_bit(op, args):
    # enough rows that the CPU backend quantises them a chunk of rows at a time
    x = spread((1200, 256), torch.bfloat16, group=128)
    x[7] = 0  # an all-zero row: the amax floor
    q, s = op(x, *args)
    q_ref, s_ref = op.reference_impl(x, *args)
    assert torch.equal(bits(q), bits(q_ref)) and torch.equal(s, s_ref)


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
@pytest.mark.parametrize("amax", [3.7, 448.0, 1.0, 0.01, 1e-5, 7e4])
def test_bf16_quantisation_is_the_reference_bit_for_bit_over_every_bf16_value(scale_fmt, amax):
    # every finite bf16 value up to amax, in groups led by amax (one scale): the CPU backend (where it runs, the
    # best variant of its native kernel: quotients by the reciprocal, the division where one lies near an e4m3
    # midpoint; every variant: the test above) against the reference's division
    x = every_bf16_value_below(amax)
    q, s = Q8(x, 128, scale_fmt)
    q_ref, s_ref = Q8.reference_impl(x, 128, scale_fmt)
    assert torch.equal(bits(q), bits(q_ref)) and torch.equal(s, s_ref)


def every_bf16_value_below(amax: float) -> torch.Tensor:
    """Every finite bf16 value up to ``amax``, in rows of 128 led by amax (each row one group of one scale)."""
    every = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    top = torch.tensor(amax).bfloat16()
    values = every[torch.isfinite(every) & (every.abs() <= top)]
    values = values[: values.numel() // 127 * 127].view(-1, 127)
    return torch.cat([top.expand(values.shape[0], 1), values], dim=1)


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_each_native_fp8_variant_is_the_reference_bit_for_bit(native_variant, scale_fmt):
    # each variant of the native quantiser (AVX-512 k-masks, or vector extensions on AVX2 / NEON) called directly:
    # every finite bf16 value below six group maxima, groups with inf / NaN / only zeros / values below 2^-6 of
    # the scale, and group sizes from 16 to 256
    from hal.backends.cpu import native

    odd = spread((6, 768), torch.bfloat16, seed=3, group=16)
    odd[0, 5], odd[1, 17], odd[2, 40], odd[3] = float("nan"), float("inf"), -float("inf"), 0
    odd[4, :16] = torch.tensor([1e-30, -3e-8, 2.0] * 5 + [0.0])  # quotients below e4m3's normal range
    cases = [(every_bf16_value_below(amax), 128) for amax in (3.7, 448.0, 1.0, 0.01, 1e-5, 7e4)]
    cases += [(odd, group) for group in (16, 48, 128, 256)]
    for x, group in cases:
        assert native.serves_quantize_fp8(x, group)
        q, s = native.quantize_fp8_bf16(x, group, scale_fmt == "ue8m0")
        q_ref, s_ref = Q8.reference_impl(x, group, scale_fmt)
        assert torch.equal(bits(q), bits(q_ref)) and torch.equal(s.nan_to_num(), s_ref.nan_to_num()), group
        assert torch.equal(s.isnan(), s_ref.isnan())


def test_int8_gemm_accumulates_exactly_and_scales_per_token_and_channel():
    a = torch.full((2, 3000), 127, dtype=torch.int8)  # 3000 * 127 * 127 = 48387000 > 2**24: beyond fp32 exact
    b = torch.full((4, 3000), -127, dtype=torch.int8)
    y = hal.ops.int8_gemm(a, torch.tensor([1.0, 0.5]), b, torch.tensor([1.0, 2.0, 1.0, 1.0]), out_dtype=torch.float32)
    assert y[0, 0] == -48387000 and y[1, 1] == -48387000 and y[1, 0] == -48387000 / 2


@pytest.mark.parametrize(
    "call, argument",
    [
        (lambda: hal.ops.quantize_int8(torch.zeros(4, 0)), "x"),
        (lambda: hal.ops.quantize_int8(torch.zeros(4, dtype=torch.int8)), "x"),
        (lambda: hal.ops.quantize_int8_weight(torch.zeros(4)), "w"),
        (
            lambda: hal.ops.int8_gemm(
                torch.zeros(2, 8, dtype=torch.int8), torch.ones(2), torch.zeros(3, 8, dtype=torch.int8), torch.ones(4)
            ),
            "b_scale",
        ),
        (
            lambda: hal.ops.int8_gemm(
                torch.zeros(2, 8, dtype=torch.int8),
                torch.ones(2, 1),
                torch.zeros(3, 8, dtype=torch.int8),
                torch.ones(3),
            ),
            "a_scale",
        ),
        (
            lambda: hal.ops.int8_gemm(
                torch.zeros(2, 8), torch.ones(2), torch.zeros(3, 8, dtype=torch.int8), torch.ones(3)
            ),
            "a",
        ),
        (
            lambda: hal.ops.int8_gemm(
                torch.zeros(1, 2**17, dtype=torch.int8),
                torch.ones(1),
                torch.zeros(1, 2**17, dtype=torch.int8),
                torch.ones(1),
            ),
            "a",
        ),
        (
            lambda: hal.ops.grouped_gemm(
                torch.zeros(2, 8, dtype=torch.int8), torch.zeros(1, 3, 8), torch.tensor([2]), x_scale=torch.ones(2)
            ),
            "w",
        ),
        (
            lambda: hal.ops.grouped_gemm(
                torch.zeros(2, 8, dtype=torch.int8),
                torch.zeros(1, 3, 8, dtype=torch.int8),
                torch.tensor([2]),
                x_scale=torch.ones(2),
                w_scale=torch.ones(1, 1, 1),
            ),
            "w_scale",
        ),
    ],
)
def test_int8_contracts_name_the_bad_argument(call, argument):
    with pytest.raises(hal.InvalidArgumentError) as info:
        call()
    assert info.value.argument == argument


def test_int8_grouped_gemm_is_the_per_group_int8_gemm():
    torch.manual_seed(5)
    q, s = hal.ops.quantize_int8(torch.randn(5, 64))
    wq, ws = hal.ops.quantize_int8_weight(torch.randn(2, 8, 64))
    y = hal.ops.grouped_gemm(q, wq, torch.tensor([3, 2]), x_scale=s, w_scale=ws)
    expected = torch.cat([hal.ops.int8_gemm(q[:3], s[:3], wq[0], ws[0]), hal.ops.int8_gemm(q[3:], s[3:], wq[1], ws[1])])
    assert y.dtype == torch.bfloat16 and compare(y, expected.double(), GEMM_TOLERANCE["bfloat16"]).ok
