"""Family 4: low-precision quantisation (FP8 e4m3 block quantisation, FP4 e2m1), dequantisation and the
block-scaled FP8 GEMM; W8A8 int8 (per-token / per-channel quantisation and GEMM).

Conventions (:mod:`hal.formats`): a *scale* is the dequantisation multiplier (``x ~= q * scale``, what
DeepSeek checkpoints call ``weight_scale_inv``); activation groups are ``1 x group_size`` along the last
dim, weight blocks ``128 x 128`` over ``[N, K]`` (edge blocks partial); UE8M0 scales are powers of two
stored as float32 values; FP4 is packed two values a byte, lower index in the low nibble.

The quantisers define *bits*: their reference semantics is the float32 algorithm stated in each
docstring whatever ``compute_dtype`` the reference is called with (the float64 "oracle" of a quantiser
returns the same bits). Their tolerances (``ulps`` on quantised values, ``rtol`` on scales) say how far
another correct formula of the same algorithm may land.

Why (which DeepSeek formula is the reference, the tolerances; on CUDA, divide by a tensor, not by a Python
number): docs/contracts.md#fp8-and-fp4-quantisation and docs/contracts.md#w8a8-int8.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from hal.contract import (
    FLOAT_DTYPES,
    Request,
    Tolerance,
    check,
    check_same_device,
    check_tensor,
    contract,
    dtype_name,
    is_int,
    result,
)
from hal.formats import (
    AMAX_FLOOR,
    FP4_GROUP,
    FP4_MAX,
    FP8_DTYPE,
    FP8_MAX,
    INT8_MAX,
    SCALE_FORMATS,
    by_block,
    ceil_pow2,
    dequantize_values,
    encode_fp4,
    fp4_dtypes,
    scale_dtypes,
    scale_shape,
)
from hal.ops.grouped_gemm import GEMM_TOLERANCE, INT8_MAX_K, dequantized_operands

__all__ = [
    "quantize_fp8",
    "quantize_fp8_weight",
    "dequantize_fp8",
    "fp8_gemm",
    "quantize_fp4",
    "dequantize_fp4",
    "quantize_int8",
    "quantize_int8_weight",
    "int8_gemm",
    "apply_int8_amax_floor",
    "fp8_scales",
    "int8_scales",
    "FP8_QUANT_TOLERANCE",
    "FP4_QUANT_TOLERANCE",
    "DEQUANT_TOLERANCE",
    "INT8_QUANT_TOLERANCE",
    "INT8_GEMM_TOLERANCE",
    "INT8_MAX_K",
]

_FP8_GEMM_BLOCK = 128
_OUT_DTYPES = ("bfloat16", "float16", "float32")
_IN_DTYPES = ("bfloat16", "float16", "float32")

# Tolerance keys of the quantisers: "<output dtype>" for fp32 scales (scale_fmt None / "fp32"): DeepSeek's
# other scale formulas land one fp32 ulp away, and one e4m3 step on q; "ue8m0:<output dtype>" for UE8M0
# scales, where the contract is bit-exact (docs/contracts.md#quantize_fp8-quantize_fp8_weight).
FP8_QUANT_TOLERANCE = {
    "float8_e4m3fn": Tolerance(rtol=0.0, atol=0.0, ulps=1),
    "float32": Tolerance(rtol=2**-23, atol=0.0),
    "ue8m0:float8_e4m3fn": Tolerance(rtol=0.0, atol=0.0, ulps=0),
    "ue8m0:float32": Tolerance(rtol=0.0, atol=0.0),
}

# FP4: UE8M0 scales only, x / s exact, round-to-nearest-even onto a fixed grid: bit-exact on the decoded
# values (a -0 nibble 0b1000 equals the reference's +0).
FP4_QUANT_TOLERANCE = {
    "uint8": Tolerance(rtol=0.0, atol=0.0, ulps=0),
    "float32": Tolerance(rtol=0.0, atol=0.0),
}

# Dequantisation: y = q * s, exact, rounded once to out_dtype; rtol one ulp at the bottom of a binade (an fp32
# intermediate, double rounding, passes), atol fp16's subnormal spacing. Why:
# docs/contracts.md#dequantize_fp8-dequantize_fp4.
DEQUANT_TOLERANCE = {
    "float32": Tolerance(rtol=2**-23, atol=0.0),
    "bfloat16": Tolerance(rtol=2**-7, atol=0.0),
    "float16": Tolerance(rtol=2**-10, atol=2**-24),
}


# --------------------------------------------------------------------------- shared validation / math


def _check_size(op: str, name: str, value: object) -> int:
    check(is_int(value) and value > 0, op, name, "a positive int", repr(value))
    return value


def _check_block_shape(op: str, block_shape: object) -> Tuple[int, ...]:
    ok = (
        isinstance(block_shape, (tuple, list))
        and len(block_shape) in (1, 2)
        and all(is_int(b) and b > 0 for b in block_shape)
    )
    check(ok, op, "block_shape", "a tuple of 1 or 2 positive ints", repr(block_shape))
    return tuple(block_shape)  # type: ignore[arg-type]


def _check_scale_fmt(op: str, scale_fmt: Optional[str]) -> str:
    check(scale_fmt is None or scale_fmt in SCALE_FORMATS, op, "scale_fmt", "None, 'fp32' or 'ue8m0'", repr(scale_fmt))
    return scale_fmt or "fp32"


def _check_out_dtype(op: str, out_dtype: object) -> torch.dtype:
    check(out_dtype in FLOAT_DTYPES, op, "out_dtype", "torch.bfloat16, torch.float16 or torch.float32", out_dtype)
    return out_dtype


def _check_scale_tensor(op: str, name: str, scale: object, shape: Tuple[int, ...], what: str) -> None:
    got = tuple(check_tensor(op, name, scale, dtypes=scale_dtypes()).shape)
    check(got == tuple(shape), op, name, f"shape {tuple(shape)} ({what})", f"shape {got}")


def fp8_scales(amax: torch.Tensor, scale_fmt: Optional[str]) -> torch.Tensor:
    """float32 amax -> dequantisation scales: max(amax, 1e-4) / 448 (an fp32 division by a *tensor*, which
    CUDA does not turn into a reciprocal multiplication), rounded up to a power of two for UE8M0."""
    amax = amax.clamp_min(AMAX_FLOOR)  # NaN stays NaN
    s = amax / torch.full_like(amax, FP8_MAX)
    return ceil_pow2(s) if scale_fmt == "ue8m0" else s


def _to_fp8(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp32 values / their (broadcast) scales, clamped to +-448, cast round-to-nearest-even to e4m3."""
    return (values / scales).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


# --------------------------------------------------------------------------- quantize_fp8 (act_quant)


@contract(
    family="quant",
    axes={"dtype": _IN_DTYPES, "scale_fmt": SCALE_FORMATS},
    tolerance=FP8_QUANT_TOLERANCE,
)
def quantize_fp8(
    x: torch.Tensor, group_size: int = 128, scale_fmt: Optional[str] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``x`` to FP8 e4m3 in groups of ``group_size`` consecutive elements along the last dim
    (DeepSeek ``act_quant``; DeepSeek and DeepGEMM use ``group_size=128``).

    Arguments:

    * ``x``: ``[..., K]`` bfloat16, float16 or float32 (at least 1-D, any layout),
      ``K % group_size == 0``. ``K == 0`` or empty leading dims give empty outputs.
    * ``group_size``: a positive int.
    * ``scale_fmt``: ``None`` or ``"fp32"`` (fp32 scales) or ``"ue8m0"`` (power-of-two scales, DeepSeek
      V3.1/V3.2 configs ``"scale_fmt": "ue8m0"``); other strings are rejected.

    Returns ``(q, s)``: ``q`` float8_e4m3fn of ``x``'s shape (contiguous) and ``s`` float32
    ``[..., K // group_size]``, the dequantisation multiplier: ``x ~= q * s`` group by group.

    Semantics, per group ``g`` of values ``x_g`` (all in float32, whatever ``x``'s dtype):

    1. ``amax = max(max|x_g|, 1e-4)`` (an all-zero group gives ``s = 1e-4 / 448`` and ``q = 0``);
    2. ``s = amax / 448``, one correctly rounded fp32 **division**;
    3. for ``"ue8m0"``: ``s = 2**ceil(log2(s))``, computed exactly from the fp32 bits
       (:func:`hal.formats.ceil_pow2`; never rounded down or to nearest);
    4. ``q = e4m3(clamp(x_g / s, -448, 448))``: an fp32 division, then the cast rounds to nearest, ties
       to even (values below half the smallest subnormal 2**-9 become zero, keeping their sign).

    A group holding NaN or +-inf gets a non-finite scale and unspecified ``q``; other groups are unaffected.

    Tolerance (:data:`FP8_QUANT_TOLERANCE`): fp32 scales: ``s`` within one fp32 ulp, ``q`` within one e4m3
    step; ``"ue8m0"``: ``q`` and ``s`` bit-exact.

    Why: docs/contracts.md#quantize_fp8-quantize_fp8_weight (V3's ``act_quant`` as the reference, V3.2's clamp).
    """
    op = "quantize_fp8"
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES)
    check(x.dim() >= 1, op, "x", "a tensor of at least 1 dim [..., K]", "a 0-D tensor")
    _check_size(op, "group_size", group_size)
    check(
        x.shape[-1] % group_size == 0,
        op,
        "x",
        f"last dim K divisible by group_size = {group_size}",
        f"K = {x.shape[-1]}",
    )
    fmt = _check_scale_fmt(op, scale_fmt)
    return Request(x.device, (("dtype", dtype_name(x.dtype)), ("scale_fmt", fmt)))


@quantize_fp8.reference
def _quantize_fp8_reference(x, group_size=128, scale_fmt=None, *, compute_dtype=torch.float32):
    # compute_dtype is ignored: the format defines the bits (float32 algorithm, see the docstring)
    groups = x.float().reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)
    s = fp8_scales(groups.abs().amax(dim=-1), scale_fmt)
    q = _to_fp8(groups, s.unsqueeze(-1))
    return q.reshape(x.shape), s


# --------------------------------------------------------------------------- quantize_fp8_weight


@contract(
    family="quant",
    axes={"dtype": _IN_DTYPES, "scale_fmt": SCALE_FORMATS},
    tolerance=FP8_QUANT_TOLERANCE,
)
def quantize_fp8_weight(
    w: torch.Tensor, block_size: int = 128, scale_fmt: Optional[str] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantise a weight ``w`` to FP8 e4m3 in ``block_size x block_size`` blocks (DeepSeek's 128x128
    checkpoint blocks, DeepGEMM ``per_block_cast_to_fp8``).

    Arguments: ``w`` 2-D ``[N, K]`` (nn.Linear layout) bfloat16, float16 or float32, any ``N``, ``K``
    (zero included); ``block_size`` a positive int; ``scale_fmt`` as in :func:`quantize_fp8`.

    Returns ``(q, s)``: ``q`` float8_e4m3fn ``[N, K]`` and ``s`` float32
    ``[ceil(N / block_size), ceil(K / block_size)]``; ``w[n, k] ~= q[n, k] * s[n // b, k // b]``.

    Semantics: those of :func:`quantize_fp8` with a block in place of a group: ``amax`` is the
    max ``|w|`` over the block's elements (edge blocks are partial: only the elements that exist
    count, exactly as if the weight were zero-padded), floored at 1e-4; ``s = amax / 448`` (fp32
    division), rounded up to a power of two for ``"ue8m0"``; ``q = e4m3(clamp(w / s, -448, 448))``.
    Tolerance and NaN/inf behaviour (per block): as :func:`quantize_fp8`.
    """
    op = "quantize_fp8_weight"
    check_tensor(op, "w", w, ndim=2, dtypes=FLOAT_DTYPES)
    _check_size(op, "block_size", block_size)
    fmt = _check_scale_fmt(op, scale_fmt)
    return Request(w.device, (("dtype", dtype_name(w.dtype)), ("scale_fmt", fmt)))


@quantize_fp8_weight.reference
def _quantize_fp8_weight_reference(w, block_size=128, scale_fmt=None, *, compute_dtype=torch.float32):
    # compute_dtype is ignored: the format defines the bits (float32 algorithm, see the docstring)
    b = block_size
    n, k = w.shape
    nb, kb = math.ceil(n / b), math.ceil(k / b)
    wf = w.float()
    mag = wf.abs()
    if nb * b != n or kb * b != k:  # zero padding leaves every block's max |w| unchanged
        mag = torch.nn.functional.pad(mag, (0, kb * b - k, 0, nb * b - n))
    s = fp8_scales(mag.reshape(nb, b, kb, b).amax(dim=(1, 3)), scale_fmt)
    q = by_block(wf, s, (b, b), _to_fp8)
    return q, s


# --------------------------------------------------------------------------- dequantize_fp8


@contract(
    family="quant",
    axes={"out_dtype": _OUT_DTYPES},
    tolerance=DEQUANT_TOLERANCE,
)
def dequantize_fp8(
    q: torch.Tensor,
    scale: torch.Tensor,
    *,
    block_shape: Sequence[int] = (128,),
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Dequantise block-scaled FP8: ``y = q * scale`` of its block, rounded once to ``out_dtype``
    (DeepSeek ``weight_dequant`` for ``block_shape=(128, 128)``).

    Arguments:

    * ``q``: float8_e4m3fn ``[..., K]`` (at least ``len(block_shape)`` dims).
    * ``block_shape``: ``(b,)`` for groups of ``b`` along the last dim (activations, as
      :func:`quantize_fp8` makes them), or ``(bm, bk)`` for blocks over the last two dims (weights, as
      :func:`quantize_fp8_weight` makes them); positive ints.
    * ``scale``: float32, or float8_e8m0fnu where torch has it (:func:`hal.formats.scale_dtypes`), of
      shape ``[..., ceil(K / b)]`` resp. ``[..., ceil(M / bm), ceil(K / bk)]`` (``q`` is
      ``[..., M, K]``); edge blocks are partial. Scale values are used as given (not checked).
    * ``out_dtype``: bfloat16 (DeepSeek's default dtype), float16 or float32.

    Returns ``y`` of ``q``'s shape and dtype ``out_dtype``: ``y[..., m, k] = q[..., m, k] *
    scale[..., m // bm, k // bk]`` (resp. ``scale[..., k // b]``), the product exact, then rounded once
    to ``out_dtype`` (IEEE round-to-nearest-even; beyond its range: +-inf). NaN in ``q`` gives NaN.

    Tolerance (:data:`DEQUANT_TOLERANCE`): one ulp of ``out_dtype`` at the bottom of a binade (an
    implementation may round the product to fp32 first).
    """
    op = "dequantize_fp8"
    check_tensor(op, "q", q, dtypes=(FP8_DTYPE,))
    block = _check_block_shape(op, block_shape)
    check(
        q.dim() >= len(block),
        op,
        "q",
        f"at least {len(block)} dims for block_shape {block}",
        f"{q.dim()}-D tensor of shape {tuple(q.shape)}",
    )
    _check_scale_tensor(op, "scale", scale, scale_shape(q.shape, block), f"one per {block} block of q")
    out = _check_out_dtype(op, out_dtype)
    device = check_same_device(op, q=q, scale=scale)
    return Request(device, (("out_dtype", dtype_name(out)),))


@dequantize_fp8.reference
def _dequantize_fp8_reference(q, scale, *, block_shape=(128,), out_dtype=torch.bfloat16, compute_dtype=torch.float32):
    y = dequantize_values(q, scale, tuple(block_shape), compute_dtype)
    return result(y, out_dtype, compute_dtype)


# --------------------------------------------------------------------------- fp8_gemm


@contract(
    family="quant",
    axes={"out_dtype": _OUT_DTYPES},
    tolerance=GEMM_TOLERANCE,
)
def fp8_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    *,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Block-scaled FP8 GEMM ``y = A @ B.T`` (DeepSeek ``fp8_gemm``; DeepGEMM ``fp8_gemm_nt`` with the
    SM90 recipe: 1x128 activation groups, 128x128 weight blocks).

    Arguments:

    * ``a``: float8_e4m3fn ``[..., K]`` (at least 1-D), ``K % 128 == 0``; ``a_scale`` ``[..., K/128]``
      (as :func:`quantize_fp8` with ``group_size=128`` returns).
    * ``b``: float8_e4m3fn ``[N, K]`` (nn.Linear layout, "NT"); ``b_scale``
      ``[ceil(N/128), K/128]`` (as :func:`quantize_fp8_weight` returns).
    * Scales: float32, or float8_e8m0fnu where torch has it; used as given.
    * ``out_dtype``: bfloat16 (DeepSeek's default dtype), float16 or float32.

    Returns ``y`` ``[..., N]`` in ``out_dtype``::

        y[m, n] = sum_kb (sum_{k in kb} qa[m, k] * qb[n, k]) * a_scale[m, kb] * b_scale[n // 128, kb]

    over the ``K/128`` blocks ``kb`` of 128 consecutive k, i.e. the exact product of the dequantised
    operands, accumulated in at least fp32 and rounded once to ``out_dtype``. ``K == 0`` gives zeros.

    Tolerance: :data:`hal.ops.grouped_gemm.GEMM_TOLERANCE` with ``n = K + 3`` and
    ``magnitude = |A| @ |B|.T`` of the dequantised operands. Why: docs/contracts.md#fp8_gemm.
    """
    op = "fp8_gemm"
    check_tensor(op, "a", a, dtypes=(FP8_DTYPE,))
    check(a.dim() >= 1, op, "a", "a tensor of at least 1 dim [..., K]", "a 0-D tensor")
    check_tensor(op, "b", b, ndim=2, dtypes=(FP8_DTYPE,))
    K = a.shape[-1]
    check(K % _FP8_GEMM_BLOCK == 0, op, "a", "last dim K divisible by 128", f"K = {K}")
    check(b.shape[1] == K, op, "b", f"shape [N, K = {K}] (K matching a.shape[-1])", f"shape {tuple(b.shape)}")
    _check_scale_tensor(
        op, "a_scale", a_scale, tuple(a.shape[:-1]) + (K // _FP8_GEMM_BLOCK,), "one per 128 elements of a along K"
    )
    _check_scale_tensor(
        op, "b_scale", b_scale, scale_shape(b.shape, (_FP8_GEMM_BLOCK, _FP8_GEMM_BLOCK)), "one per 128x128 block of b"
    )
    out = _check_out_dtype(op, out_dtype)
    device = check_same_device(op, a=a, a_scale=a_scale, b=b, b_scale=b_scale)
    return Request(device, (("out_dtype", dtype_name(out)),))


@fp8_gemm.reference
def _fp8_gemm_reference(a, a_scale, b, b_scale, *, out_dtype=torch.bfloat16, compute_dtype=torch.float32):
    M, K = math.prod(a.shape[:-1]), a.shape[-1]
    ad, bd = dequantized_operands(a.reshape(M, K), b, a_scale.reshape(M, K // _FP8_GEMM_BLOCK), b_scale, compute_dtype)
    y = ad @ bd.t()
    return result(y.reshape(*a.shape[:-1], b.shape[0]), out_dtype, compute_dtype)


# --------------------------------------------------------------------------- quantize_fp4


@contract(
    family="quant",
    axes={"dtype": _IN_DTYPES},
    tolerance=FP4_QUANT_TOLERANCE,
)
def quantize_fp4(w: torch.Tensor, group_size: int = FP4_GROUP) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``w`` to packed FP4 e2m1 with a UE8M0 scale per ``group_size`` consecutive elements along
    the last dim (DeepSeek V4 expert weights, DeepGEMM's FP4 operand: ``group_size=32``).

    Arguments: ``w`` ``[..., K]`` bfloat16, float16 or float32 (at least 1-D), ``K`` even and
    ``K % group_size == 0``; ``group_size`` a positive int.

    Returns ``(q, s)``: ``q`` uint8 ``[..., K // 2]``, two e2m1 values a byte, the lower index in the low
    nibble (:mod:`hal.formats`), and ``s`` float32 ``[..., K // group_size]``, powers of two:
    ``w ~= e2m1(q) * s`` group by group.

    Semantics, per group (float32 whatever ``w``'s dtype): ``amax = max(max|w_g|, 1e-4)``;
    ``s = 2**ceil(log2(amax / 6))`` (fp32 division, then rounded up to a power of two exactly,
    :func:`hal.formats.ceil_pow2`), so ``|w_g / s| <= 6`` never clips; each ``w_g / s`` (exact: ``s`` is
    a power of two) is rounded to the nearest e2m1 value ``{0, 0.5, 1, 1.5, 2, 3, 4, 6}`` with its
    sign, ties to the even code (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4,
    5 -> 4). Values that round to zero are written as +0 (nibble 0b0000).

    A group holding NaN or +-inf gets a non-finite scale and unspecified codes.
    Tolerance (:data:`FP4_QUANT_TOLERANCE`): bit-exact, compared on the decoded values
    (:func:`hal.formats.unpack_fp4`: a -0 nibble 0b1000 also conforms). Why: docs/contracts.md#quantize_fp4.
    """
    op = "quantize_fp4"
    check_tensor(op, "w", w, dtypes=FLOAT_DTYPES)
    check(w.dim() >= 1, op, "w", "a tensor of at least 1 dim [..., K]", "a 0-D tensor")
    _check_size(op, "group_size", group_size)
    K = w.shape[-1]
    check(K % 2 == 0, op, "w", "an even last dim K (two FP4 values a byte)", f"K = {K}")
    check(K % group_size == 0, op, "w", f"last dim K divisible by group_size = {group_size}", f"K = {K}")
    return Request(w.device, (("dtype", dtype_name(w.dtype)),))


@quantize_fp4.reference
def _quantize_fp4_reference(w, group_size=FP4_GROUP, *, compute_dtype=torch.float32):
    # compute_dtype is ignored: the format defines the bits (float32 algorithm, see the docstring)
    groups = w.float().reshape(*w.shape[:-1], w.shape[-1] // group_size, group_size)
    amax = groups.abs().amax(dim=-1).clamp_min(AMAX_FLOOR)
    s = ceil_pow2(amax / torch.full_like(amax, FP4_MAX))
    q = encode_fp4((groups / s.unsqueeze(-1)).reshape(w.shape))
    return q, s


# --------------------------------------------------------------------------- dequantize_fp4


@contract(
    family="quant",
    axes={"out_dtype": _OUT_DTYPES},
    tolerance=DEQUANT_TOLERANCE,
)
def dequantize_fp4(
    q: torch.Tensor, scale: torch.Tensor, *, group_size: int = FP4_GROUP, out_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Dequantise packed FP4 e2m1: ``y = e2m1(q) * scale`` of its group, rounded once to ``out_dtype``.

    Arguments: ``q`` packed ``[..., K // 2]`` (at least 1-D) uint8, or torch.float4_e2m1fn_x2 where
    torch has it (:func:`hal.formats.fp4_dtypes`), lower index in the low nibble; ``group_size`` a
    positive int dividing ``K``; ``scale`` ``[..., K // group_size]`` float32 or float8_e8m0fnu
    (UE8M0 by the format; a float32 scale that is not a power of two is applied as the multiplier it
    is); ``out_dtype`` bfloat16, float16 or float32.

    Returns ``y`` ``[..., K]`` in ``out_dtype``, ``y[..., k] = e2m1(q)[..., k] * scale[..., k //
    group_size]``, the product exact, then rounded once to ``out_dtype`` (exact for power-of-two scales
    in the range of ``out_dtype``; beyond it +-inf). Nibble 0b1000 decodes to -0.

    Tolerance: :data:`DEQUANT_TOLERANCE` (as :func:`dequantize_fp8`).
    """
    op = "dequantize_fp4"
    check_tensor(op, "q", q, dtypes=fp4_dtypes())
    check(q.dim() >= 1, op, "q", "a tensor of at least 1 dim [..., K // 2]", "a 0-D tensor")
    _check_size(op, "group_size", group_size)
    K = 2 * q.shape[-1]
    check(K % group_size == 0, op, "group_size", f"a divisor of K = 2 * q.shape[-1] = {K}", repr(group_size))
    _check_scale_tensor(
        op, "scale", scale, tuple(q.shape[:-1]) + (K // group_size,), f"one per {group_size} values of q"
    )
    out = _check_out_dtype(op, out_dtype)
    device = check_same_device(op, q=q, scale=scale)
    return Request(device, (("out_dtype", dtype_name(out)),))


@dequantize_fp4.reference
def _dequantize_fp4_reference(q, scale, *, group_size=FP4_GROUP, out_dtype=torch.bfloat16, compute_dtype=torch.float32):
    y = dequantize_values(q, scale, (group_size,), compute_dtype)
    return result(y, out_dtype, compute_dtype)


# --------------------------------------------------------------------------- symmetric int8 (W8A8)

# Quantisers: "int8" for q (within one integer step: other tie rules and x * fl(1/s)), "float32" for the
# scales (one fp32 ulp: amax * fl(1/127)); docs/contracts.md#quantize_int8-quantize_int8_weight.
INT8_QUANT_TOLERANCE = {
    "int8": Tolerance(rtol=0.0, atol=0.0, ulps=1),
    "float32": Tolerance(rtol=2**-23, atol=0.0),
}

# int8_gemm: an exact int32 sum, then at most four relative roundings: one ulp of out_dtype at the bottom of a
# binade, 2**-21 for float32 (docs/contracts.md#int8_gemm); atol 2**-24 is fp16's subnormal spacing.
INT8_GEMM_TOLERANCE = {
    "float32": Tolerance(rtol=2**-21, atol=0.0),
    "bfloat16": Tolerance(rtol=2**-7, atol=0.0),
    "float16": Tolerance(rtol=2**-10, atol=2**-24),
}


def int8_scales(amax: torch.Tensor) -> torch.Tensor:
    """float32 amax -> dequantisation scales max(amax, 1e-4) / 127 (fp32 division by a tensor)."""
    amax = amax.clamp_min(AMAX_FLOOR)  # NaN stays NaN
    return amax / torch.full_like(amax, INT8_MAX)


def _to_int8(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp32 values / their (broadcast) scales, rounded half to even, clamped to +-127, as int8."""
    return torch.round(values / scales).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)


def apply_int8_amax_floor(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """For a backend whose per-row int8 quantiser has no amax floor (the vendors' kernels divide by
    ``rowmax / 127`` as is): rows whose scale ``s`` lies below the contract's ``1e-4 / 127`` (all-zero
    rows, where such a kernel divides 0 by 0, and rows of tiny values) get the contract's values.
    ``x`` ``[..., K]``, ``q`` int8 ``[..., K]``, ``s`` float32 ``[...]``; elementwise, no host sync."""
    floor = int8_scales(s.new_zeros(()))
    small = s < floor  # NaN scales (non-finite rows) stay as they are
    return torch.where(small[..., None], _to_int8(x.float(), floor), q), torch.where(small, floor, s)


def _check_int8_rows(op: str, name: str, t: torch.Tensor) -> None:
    check(t.shape[-1] >= 1, op, name, "a last dim K >= 1 (one scale per row of K values)", f"K = {t.shape[-1]}")


@contract(
    family="quant",
    axes={"dtype": _IN_DTYPES},
    tolerance=INT8_QUANT_TOLERANCE,
)
def quantize_int8(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token symmetric int8 quantisation of activations (W8A8: Ascend ``npu_dynamic_quant``,
    Cambricon tmo ``per_token_smooth_quantize`` / ``scaled_quantize`` without a smoothing vector).

    Arguments: ``x`` ``[..., K]`` bfloat16, float16 or float32, at least 1-D, ``K >= 1`` (empty leading
    dims give empty outputs).

    Returns ``(q, s)``: ``q`` int8 of ``x``'s shape (contiguous) and ``s`` float32 ``x.shape[:-1]``, the
    dequantisation multiplier of each row: ``x[..., k] ~= q[..., k] * s[...]``.

    Semantics, per row (all in float32, whatever ``x``'s dtype):

    1. ``amax = max(max_k |x_k|, 1e-4)``;
    2. ``s = amax / 127``, one correctly rounded fp32 division;
    3. ``q = clamp(round(x / s), -127, 127)``: an fp32 division rounded to the nearest integer, ties to
       even. -128 is never written.

    A row holding NaN or +-inf gets a non-finite scale and unspecified ``q``.
    Tolerance (:data:`INT8_QUANT_TOLERANCE`): ``q`` within one step of the reference, ``s`` within one
    fp32 ulp. Why (the floor, the tie rule): docs/contracts.md#quantize_int8-quantize_int8_weight.
    """
    op = "quantize_int8"
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES)
    check(x.dim() >= 1, op, "x", "a tensor of at least 1 dim [..., K]", "a 0-D tensor")
    _check_int8_rows(op, "x", x)
    return Request(x.device, (("dtype", dtype_name(x.dtype)),))


@quantize_int8.reference
def _quantize_int8_reference(x, *, compute_dtype=torch.float32):
    # compute_dtype is ignored: the format defines the bits (float32 algorithm, see the docstring)
    xf = x.float()
    s = int8_scales(xf.abs().amax(dim=-1))
    return _to_int8(xf, s.unsqueeze(-1)), s


@contract(
    family="quant",
    axes={"dtype": _IN_DTYPES},
    tolerance=INT8_QUANT_TOLERANCE,
)
def quantize_int8_weight(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8 quantisation of a weight (W8A8 weights, e.g. an FP8 checkpoint's
    weights dequantised and converted once at load).

    Arguments: ``w`` ``[N, K]`` (nn.Linear layout) or ``[G, N, K]`` (one weight per expert), bfloat16,
    float16 or float32, ``K >= 1``.

    Returns ``(q, s)``: ``q`` int8 of ``w``'s shape and ``s`` float32 ``[N]`` resp. ``[G, N]``:
    ``w[..., n, k] ~= q[..., n, k] * s[..., n]``.

    Semantics: those of :func:`quantize_int8` with an output channel (a row of ``K`` input weights) in
    place of a token: ``s = max(amax, 1e-4) / 127``, ``q = clamp(round(w / s), -127, 127)`` (fp32,
    ties to even). Tolerance (:data:`INT8_QUANT_TOLERANCE`) and NaN/inf behaviour: as
    :func:`quantize_int8`.
    """
    op = "quantize_int8_weight"
    check_tensor(op, "w", w, dtypes=FLOAT_DTYPES)
    check(w.dim() in (2, 3), op, "w", "a 2-D [N, K] or 3-D [G, N, K] tensor", f"{w.dim()}-D of shape {tuple(w.shape)}")
    _check_int8_rows(op, "w", w)
    return Request(w.device, (("dtype", dtype_name(w.dtype)),))


@quantize_int8_weight.reference
def _quantize_int8_weight_reference(w, *, compute_dtype=torch.float32):
    return _quantize_int8_reference(w)  # per row of K: the same algorithm


@contract(
    family="quant",
    axes={"out_dtype": _OUT_DTYPES},
    tolerance=INT8_GEMM_TOLERANCE,
)
def int8_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    *,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """W8A8 GEMM ``y = A @ B.T`` with per-token activation scales and per-channel weight scales
    (Ascend ``npu_quant_matmul`` with ``pertoken_scale``; Cambricon tmo ``scaled_matmul`` /
    ``smooth_quant_matmul``).

    Arguments:

    * ``a``: int8 ``[..., K]`` (at least 1-D), ``1 <= K <= INT8_MAX_K`` (= 131071: ``K * 128 * 128 <
      2**31``, so an int32 accumulator cannot overflow); ``a_scale`` float32 ``a.shape[:-1]`` (as
      :func:`quantize_int8` returns).
    * ``b``: int8 ``[N, K]`` (nn.Linear layout, "NT"); ``b_scale`` float32 ``[N]`` (as
      :func:`quantize_int8_weight` returns).
    * Any int8 value (-128 included) is accepted; scales are used as given.
    * ``out_dtype``: bfloat16 (default), float16 or float32.

    Returns ``y`` ``[..., N]`` in ``out_dtype``::

        y[m, n] = (sum_k a[m, k] * b[n, k]) * a_scale[m] * b_scale[n]

    the integer sum exact (int32 accumulation), then scaled and rounded to ``out_dtype``.

    Tolerance (:data:`INT8_GEMM_TOLERANCE`): relative, one ulp of ``out_dtype`` at the bottom of a
    binade (bf16 2**-7, fp16 2**-10; fp32 2**-21). Why: docs/contracts.md#int8_gemm.
    """
    op = "int8_gemm"
    check_tensor(op, "a", a, dtypes=(torch.int8,))
    check(a.dim() >= 1, op, "a", "a tensor of at least 1 dim [..., K]", "a 0-D tensor")
    check_tensor(op, "b", b, ndim=2, dtypes=(torch.int8,))
    K = a.shape[-1]
    check(1 <= K <= INT8_MAX_K, op, "a", f"last dim K in [1, {INT8_MAX_K}] (int32 accumulation)", f"K = {K}")
    check(b.shape[1] == K, op, "b", f"shape [N, K = {K}] (K matching a.shape[-1])", f"shape {tuple(b.shape)}")
    for name, scale, shape, what in (
        ("a_scale", a_scale, tuple(a.shape[:-1]), "one per row of a"),
        ("b_scale", b_scale, (b.shape[0],), "one per row (output channel) of b"),
    ):
        check_tensor(op, name, scale, dtypes=(torch.float32,))
        check(tuple(scale.shape) == shape, op, name, f"shape {shape} ({what})", f"shape {tuple(scale.shape)}")
    out = _check_out_dtype(op, out_dtype)
    device = check_same_device(op, a=a, a_scale=a_scale, b=b, b_scale=b_scale)
    return Request(device, (("out_dtype", dtype_name(out)),))


@int8_gemm.reference
def _int8_gemm_reference(a, a_scale, b, b_scale, *, out_dtype=torch.bfloat16, compute_dtype=torch.float32):
    K = a.shape[-1]
    # float64 holds every int8 dot product exactly (|sum| < 2**31): the exact int32 accumulation
    acc = (a.reshape(-1, K).double() @ b.double().t()).to(compute_dtype)
    y = acc * a_scale.reshape(-1, 1).to(compute_dtype) * b_scale.to(compute_dtype)
    return result(y.reshape(*a.shape[:-1], b.shape[0]), out_dtype, compute_dtype)
