"""Family 1: grouped GEMM for MoE experts (plain, block-scaled low-precision and W8A8 int8 operands)."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from hal.contract import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    Request,
    Tolerance,
    check,
    check_same_device,
    check_tensor,
    contract,
    dtype_name,
    result,
)
from hal.formats import FP4_GROUP, FP8_DTYPE, dequantize_values, fp4_dtypes, is_fp4, scale_dtypes, scale_shape

__all__ = ["grouped_gemm", "check_group_sizes", "grouped_gemm_out_dtype"]

INT8_MAX_K = 2**31 // (128 * 128) - 1  # int32 accumulation of int8 products cannot overflow: K * 128 * 128 < 2**31
INT8_SCALES = (torch.float32,)

_FP8_ACT_BLOCK = (1, 128)
_FP8_WEIGHT_BLOCK = (128, 128)
_FP4_WEIGHT_BLOCK = (1, FP4_GROUP)

# fp32 accumulation (an n-term dot product is within n * 2**-24 * sum|terms| of exact, in any order), then one
# rounding to the output dtype: rtol one ulp at the bottom of a binade (double rounding passes). Subnormals may be
# flushed to zero. Why: docs/contracts.md#grouped-gemm.
GEMM_TOLERANCE = {
    "float32": Tolerance(rtol=2**-23, atol=0.0, acc_eps=2**-24),
    "bfloat16": Tolerance(rtol=2**-7, atol=0.0, acc_eps=2**-24),
    "float16": Tolerance(rtol=2**-10, atol=2**-24, acc_eps=2**-24),
}


@contract(
    family="grouped_gemm",
    axes={
        "layout": ("contiguous", "masked"),
        "x_dtype": ("bfloat16", "float16", "float32", "float8_e4m3fn", "int8"),
        "w_dtype": ("bfloat16", "float16", "float32", "float8_e4m3fn", "fp4_e2m1", "int8"),
        "out_dtype": ("bfloat16", "float16", "float32"),
    },
    tolerance=GEMM_TOLERANCE,
)
def grouped_gemm(
    x: torch.Tensor,
    w: torch.Tensor,
    group_sizes: torch.Tensor,
    *,
    layout: str = "contiguous",
    x_scale: Optional[torch.Tensor] = None,
    w_scale: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Multiply each group of rows of ``x`` by its expert's weight: ``y[rows of g] = x[rows of g] @ w[g].T``.

    Layouts:

    * ``"contiguous"`` (prefill): ``x`` is ``[M, K]`` with rows sorted by group; group ``g`` owns the
      ``group_sizes[g]`` rows after those of groups ``< g``. Zero-size groups are allowed;
      ``sum(group_sizes) == M``. Returns ``[M, N]``.
    * ``"masked"`` (decode, DeepEP low-latency output): ``x`` is ``[G, max_m, K]`` and
      ``group_sizes[g] <= max_m`` rows of ``x[g]`` are valid. Returns ``[G, max_m, N]``; rows at or past
      ``group_sizes[g]`` are unspecified (the reference writes zeros): read only valid rows.

    Operands:

    * ``w`` is ``[G, N, K]`` (nn.Linear layout per expert) in bf16/fp16/fp32, or FP8 e4m3 with
      ``w_scale`` float32 ``[G, ceil(N/128), ceil(K/128)]`` (128x128 blocks), or packed FP4 e2m1
      ``[G, N, K/2]`` with UE8M0 ``w_scale`` ``[G, N, K/32]`` (one scale per 32 along K).
    * ``x`` is bf16/fp16/fp32, or FP8 e4m3 with ``x_scale`` float32 ``[..., K/128]`` (1x128 groups, as
      :func:`hal.ops.quantize_fp8` returns), ``K % 128 == 0``.
    * W8A8: ``x`` int8 with a per-row (per-token) ``x_scale`` float32 ``x.shape[:-1]`` (``[M]``, resp.
      ``[G, max_m]``; as :func:`hal.ops.quantize_int8` returns) together with ``w`` int8 with a
      per-output-channel ``w_scale`` float32 ``[G, N]`` (as :func:`hal.ops.quantize_int8_weight`
      returns); an int8 operand needs the other one int8. ``K <= 131071`` (int32 accumulation).
    * ``group_sizes`` is int32/int64 ``[G]``, non-negative.
    * ``out_dtype`` defaults to ``x.dtype`` for float ``x``, ``bfloat16`` for FP8 or int8 ``x``.

    Semantics: ``y[m, n] = sum_k X[m, k] * W[g(m), n, k]`` where ``X``, ``W`` are the dequantised
    operands (value times block, row or channel scale; subnormal operands and products may be flushed
    to zero), accumulated in at least fp32 (for block-scaled operands, per 128-wide K block then across
    blocks; for int8 operands an exact int32 sum scaled by ``x_scale[m] * w_scale[g, n]`` is within the
    tolerance) and rounded once to ``out_dtype``.
    Tolerance: :data:`GEMM_TOLERANCE` with ``n = K`` (``n = K + 3`` when an operand is scaled).
    Why: docs/contracts.md#grouped-gemm.
    """
    op = "grouped_gemm"
    check(layout in ("contiguous", "masked"), op, "layout", "'contiguous' or 'masked'", repr(layout))
    x_ndim = 2 if layout == "contiguous" else 3
    check_tensor(op, "x", x, ndim=x_ndim, dtypes=FLOAT_DTYPES + (FP8_DTYPE, torch.int8))
    check_tensor(op, "w", w, ndim=3, dtypes=FLOAT_DTYPES + (FP8_DTYPE, torch.int8) + fp4_dtypes())
    check_tensor(op, "group_sizes", group_sizes, ndim=1, dtypes=INDEX_DTYPES)
    device = check_same_device(op, x=x, w=w, group_sizes=group_sizes, x_scale=x_scale, w_scale=w_scale)
    G, N = w.shape[0], w.shape[1]
    K = x.shape[-1]
    w_fp4 = is_fp4(w)
    check(
        w.shape[2] * (2 if w_fp4 else 1) == K,
        op,
        "w",
        f"last dim {K // 2 if w_fp4 else K} ({'packed FP4, ' if w_fp4 else ''}matching x.shape[-1] = {K})",
        f"shape {tuple(w.shape)}",
    )
    check(group_sizes.shape[0] == G, op, "group_sizes", f"{G} entries (one per group of w)", f"{group_sizes.shape[0]}")
    if layout == "masked":
        check(x.shape[0] == G, op, "x", f"shape [G={G}, max_m, K] for the masked layout", tuple(x.shape))
    int8 = x.dtype == torch.int8
    check(
        int8 == (w.dtype == torch.int8),
        op,
        "x" if w.dtype == torch.int8 else "w",
        "int8 x and int8 w together (W8A8)",
        f"x {dtype_name(x.dtype)}, w {dtype_name(w.dtype)}",
    )
    if int8:
        check(K <= INT8_MAX_K, op, "x", f"K <= {INT8_MAX_K} for int8 operands (int32 accumulation)", f"K = {K}")
        _check_scale(op, "x_scale", x_scale, True, tuple(x.shape[:-1]), "an int8 x (one per row)", INT8_SCALES)
        _check_scale(op, "w_scale", w_scale, True, (G, N), "an int8 w (one per output channel)", INT8_SCALES)
    else:
        _check_scale(
            op,
            "x_scale",
            x_scale,
            x.dtype == FP8_DTYPE,
            scale_shape(x.shape, _FP8_ACT_BLOCK),
            "an FP8 x (1x128 groups along K)",
        )
    if x.dtype == FP8_DTYPE:
        check(K % 128 == 0, op, "x", "K divisible by 128 for FP8 activations", f"K = {K}")
    if w_fp4:
        check(K % FP4_GROUP == 0, op, "w", f"K divisible by {FP4_GROUP} for FP4 weights", f"K = {K}")
        expected: Tuple[int, ...] = (G, N, K // FP4_GROUP)
    else:
        expected = scale_shape(w.shape, _FP8_WEIGHT_BLOCK)
    if not int8:
        _check_scale(op, "w_scale", w_scale, w.dtype == FP8_DTYPE or w_fp4, expected, "a low-precision w")
    if out_dtype is not None:
        check(out_dtype in FLOAT_DTYPES, op, "out_dtype", "bfloat16, float16 or float32", out_dtype)
    out = grouped_gemm_out_dtype(x, out_dtype)
    return Request(
        device,
        (
            ("layout", layout),
            ("x_dtype", dtype_name(x.dtype)),
            ("w_dtype", "fp4_e2m1" if w_fp4 else dtype_name(w.dtype)),
            ("out_dtype", dtype_name(out)),
        ),
    )


def grouped_gemm_out_dtype(x: torch.Tensor, out_dtype: Optional[torch.dtype]) -> torch.dtype:
    """:func:`grouped_gemm`'s output dtype: ``out_dtype`` when given, else ``x``'s for float ``x`` and
    bfloat16 for FP8 or int8 ``x``."""
    return out_dtype or (x.dtype if x.dtype in FLOAT_DTYPES else torch.bfloat16)


@grouped_gemm.value_checks
def _grouped_gemm_values(x, w, group_sizes, *, layout="contiguous", **_):
    check_group_sizes(group_sizes.tolist(), layout, x.shape)


def check_group_sizes(sizes: List[int], layout: str, x_shape: Sequence[int]) -> None:
    """The value checks of ``group_sizes`` (read into ``sizes``): for implementations that read them anyway."""
    op = "grouped_gemm"
    check(min(sizes, default=0) >= 0, op, "group_sizes", "non-negative sizes", sizes)
    if layout == "contiguous":
        check(
            sum(sizes) == x_shape[0],
            op,
            "group_sizes",
            f"sizes adding up to x.shape[0] = {x_shape[0]}",
            f"sizes adding up to {sum(sizes)}",
        )
    else:
        check(max(sizes, default=0) <= x_shape[1], op, "group_sizes", f"valid counts <= max_m = {x_shape[1]}", sizes)


def _check_scale(
    op: str,
    name: str,
    scale: Optional[torch.Tensor],
    needed: bool,
    shape: tuple,
    what: str,
    dtypes: Optional[tuple] = None,
) -> None:
    if not needed:
        check(scale is None, op, name, "None (its operand is not scaled)", "a tensor")
        return
    check(scale is not None, op, name, f"a scale tensor for {what}", "None")
    scale = check_tensor(op, name, scale, dtypes=dtypes or scale_dtypes())
    check(tuple(scale.shape) == tuple(shape), op, name, f"shape {tuple(shape)}", f"shape {tuple(scale.shape)}")


def dequantized_operands(
    x: torch.Tensor,
    w: torch.Tensor,
    x_scale: Optional[torch.Tensor],
    w_scale: Optional[torch.Tensor],
    compute_dtype: torch.dtype,
):
    """``x`` and ``w`` as plain tensors of ``compute_dtype`` (block, row or channel scales applied)."""
    if x_scale is not None:
        x = (
            _row_scaled(x, x_scale, compute_dtype)
            if x.dtype == torch.int8
            else dequantize_values(x, x_scale, _FP8_ACT_BLOCK, compute_dtype)
        )
    if w_scale is not None:
        w = (
            _row_scaled(w, w_scale, compute_dtype)
            if w.dtype == torch.int8
            else dequantize_values(w, w_scale, _FP4_WEIGHT_BLOCK if is_fp4(w) else _FP8_WEIGHT_BLOCK, compute_dtype)
        )
    return x.to(compute_dtype), w.to(compute_dtype)


def _row_scaled(q: torch.Tensor, scale: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
    """int8 values ``[..., K]`` times their row scale ``[...]``."""
    return q.to(compute_dtype) * scale.to(compute_dtype).unsqueeze(-1)


@grouped_gemm.reference
def _grouped_gemm_reference(
    x, w, group_sizes, *, layout="contiguous", x_scale=None, w_scale=None, out_dtype=None, compute_dtype=torch.float32
):
    out_dtype = grouped_gemm_out_dtype(x, out_dtype)
    xd, wd = dequantized_operands(x, w, x_scale, w_scale, compute_dtype)
    if layout == "masked":
        y = torch.bmm(xd, wd.transpose(1, 2))
        valid = torch.arange(x.shape[1], device=x.device)[None, :] < group_sizes.to(x.device)[:, None]
        return result(y * valid[..., None], out_dtype, compute_dtype)
    y = xd.new_empty(x.shape[0], w.shape[1])
    start = 0
    for g, size in enumerate(group_sizes.tolist()):
        torch.mm(xd[start : start + size], wd[g].t(), out=y[start : start + size])
        start += size
    return result(y, out_dtype, compute_dtype)
