"""Low-precision formats shared by the contracts: FP8 e4m3, FP4 e2m1 (packed), UE8M0 scales, symmetric int8.

Conventions (DeepSeek / DeepGEMM, see docs/contracts.md):

* A scale is the *dequantisation multiplier*: ``x ~= q * scale`` (checkpoints call it
  ``weight_scale_inv``).
* UE8M0 scales are powers of two, stored here as float32 values (``2**e``); a tensor of dtype
  ``torch.float8_e8m0fnu`` (newer torch) is accepted wherever a UE8M0 scale is.
* FP4 e2m1 values are packed two a byte, the element with the lower index in the low nibble; a
  nibble is ``sign << 3 | code`` with codes 0..7 = 0, 0.5, 1, 1.5, 2, 3, 4, 6. Packed tensors have
  dtype ``torch.uint8`` (or ``torch.float4_e2m1fn_x2`` where torch has it) and last dim ``K // 2``.
* Symmetric int8 (W8A8): quantisers write values in ``[-127, 127]`` (never -128) with one float32 scale
  per row (activations: per token; weights: per output channel), ``x ~= q * scale``.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence, Tuple

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
FP4_MAX = 6.0
INT8_MAX = 127.0
AMAX_FLOOR = 1e-4
SCALE_FORMATS = ("fp32", "ue8m0")
FP4_GROUP = 32

_FP4_DTYPES = tuple(d for d in (torch.uint8, getattr(torch, "float4_e2m1fn_x2", None)) if d is not None)
_UE8M0_DTYPE = getattr(torch, "float8_e8m0fnu", None)
_E2M1_CODES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# The midpoints between neighbouring e2m1 magnitudes, where rounding to nearest changes code. A value on a
# midpoint takes the even code: down at 0.25, 1.25, 2.5 and 5, up at 0.75, 1.75 and 3.5, so those three are
# listed one fp32 step lower. The code of |v| is then the number of these points below it.
_E2M1_ROUNDING_POINTS = tuple(
    float(torch.tensor(x, dtype=torch.float32).nextafter(torch.tensor(0.0)) if up else x)
    for x, up in ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))
)


def is_fp4(t: torch.Tensor) -> bool:
    """Whether ``t`` holds packed FP4 e2m1 values (see module docstring)."""
    return t.dtype in _FP4_DTYPES


def fp4_dtypes() -> Tuple[torch.dtype, ...]:
    return _FP4_DTYPES


def scale_dtypes() -> Tuple[torch.dtype, ...]:
    """Dtypes a scale tensor may have: float32, and float8_e8m0fnu where torch has it."""
    return (torch.float32,) + ((_UE8M0_DTYPE,) if _UE8M0_DTYPE is not None else ())


def scale_as_float(scale: torch.Tensor) -> torch.Tensor:
    """A scale tensor as float32 (exact for UE8M0 storage)."""
    return scale if scale.dtype == torch.float32 else scale.float()


def ceil_pow2(s: torch.Tensor) -> torch.Tensor:
    """Round positive float32 values *up* to a power of two, exactly (by exponent bits, no log2).

    Subnormals round up to the smallest normal power of two; 0, inf and NaN pass through.
    """
    s = s.float()
    bits = s.view(torch.int32)
    exponent = (bits >> 23) & 0xFF
    exponent = exponent + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    rounded = (exponent << 23).view(torch.float32)
    return torch.where(torch.isfinite(s) & (s > 0), rounded, s)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Packed e2m1 ``[..., K // 2]`` -> float32 values ``[..., K]`` (exact): each byte's two values, low nibble
    first, looked up in a table of the 256 bytes."""
    table = _fp4_pairs().to(packed.device)
    values = table.index_select(0, packed.view(torch.uint8).reshape(-1).to(torch.int32))
    return values.view(*packed.shape[:-1], 2 * packed.shape[-1])


@functools.lru_cache(maxsize=None)
def _fp4_pairs() -> torch.Tensor:
    """``[256, 2]`` float32: the e2m1 values of byte ``b``'s low and high nibbles."""
    codes = torch.tensor(_E2M1_CODES + tuple(-v for v in _E2M1_CODES), dtype=torch.float32)
    every = torch.arange(256)
    return torch.stack((codes[every & 0xF], codes[every >> 4]), dim=-1)


def encode_fp4(values: torch.Tensor) -> torch.Tensor:
    """Round float values (already divided by their scale, ``|v| <= 6``) to the nearest e2m1 value
    (ties to the even code) and pack them, ``[..., K]`` -> uint8 ``[..., K // 2]``."""
    v = values.float().clamp(-FP4_MAX, FP4_MAX)
    magnitude = v.abs()
    code = torch.zeros(v.shape, dtype=torch.uint8, device=v.device)
    for point in _E2M1_ROUNDING_POINTS:  # code = how many of them lie below |v|
        code += magnitude > point
    nibble = code | ((v < 0) & (code != 0)).to(torch.uint8) << 3
    pairs = nibble.unflatten(-1, (nibble.shape[-1] // 2, 2))  # (not view(..., -1, 2): fails on 0 rows)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)


def expand_scale(scale: torch.Tensor, shape: Sequence[int], block: Sequence[int]) -> torch.Tensor:
    """Broadcast a block scale over the last ``len(block)`` dims of ``shape`` (edge blocks partial)."""
    s = scale_as_float(scale)
    for i, b in enumerate(block):
        dim = len(shape) - len(block) + i
        if b != 1:
            s = s.repeat_interleave(b, dim=dim).narrow(dim, 0, shape[dim])
    return s


def by_block(
    values: torch.Tensor,
    scale: torch.Tensor,
    block: Sequence[int],
    op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.mul,
) -> torch.Tensor:
    """``op(values, s)`` where ``s`` holds each value's block scale (``scale`` in ``values``' dtype, over
    blocks of the last ``len(block)`` dims, as :func:`expand_scale` broadcasts it), ``op`` elementwise. When
    the blocks tile those dims exactly, ``scale`` is broadcast over a blocked view of ``values`` instead of
    being expanded to their size."""
    lead = values.dim() - len(block)
    dims = values.shape[lead:]
    if any(n % b for n, b in zip(dims, block)):  # partial edge blocks
        return op(values, expand_scale(scale, values.shape, block).to(values.dtype))
    s = scale_as_float(scale).to(values.dtype)
    blocked = values.shape[:lead] + tuple(x for n, b in zip(dims, block) for x in (n // b, b))
    s = s.reshape(s.shape[:lead] + tuple(x for n, b in zip(dims, block) for x in (n // b, 1)))
    return op(values.reshape(blocked), s).reshape(values.shape)


def scale_shape(shape: Sequence[int], block: Sequence[int]) -> Tuple[int, ...]:
    """Shape of the scale tensor of a tensor of ``shape`` quantised in ``block`` blocks (last dims)."""
    lead = len(shape) - len(block)
    return tuple(shape[:lead]) + tuple(math.ceil(n / b) for n, b in zip(shape[lead:], block))


def fp8_values(q: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn values as float32, exactly. On the CPU, where torch converts FP8 one value at a time,
    they are looked up two at a time in a table of that conversion (65536 pairs), ~2x faster."""
    if q.device.type != "cpu" or q.numel() % 2 or not q.is_contiguous():
        return q.float()
    pairs = q.reshape(-1).view(torch.int16).to(torch.int32) & 0xFFFF
    return _fp8_pairs().index_select(0, pairs).view(q.shape)


@functools.lru_cache(maxsize=None)
def _fp8_pairs() -> torch.Tensor:
    """``[65536, 2]`` float32: row ``i`` holds the two e4m3 values whose bytes, read as an int16, are ``i``."""
    every = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16)
    return every.view(torch.uint8).view(FP8_DTYPE).float().view(-1, 2)


def dequantize_values(
    q: torch.Tensor, scale: torch.Tensor, block: Sequence[int], compute_dtype: torch.dtype
) -> torch.Tensor:
    """FP8 or packed-FP4 values times their block scales, in ``compute_dtype``."""
    values = unpack_fp4(q) if is_fp4(q) else fp8_values(q) if q.dtype == FP8_DTYPE else q
    return by_block(values.to(compute_dtype), scale, block)
