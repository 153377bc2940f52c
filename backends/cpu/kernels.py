"""The CPU backend's fast kernels, where a contract's reference implementation is slow.

Each computes the same thing as its contract's reference with ``compute_dtype=torch.float32`` (bf16/fp16
inputs computed in fp32, one rounding to the output dtype) and hands every case it does not speed up to
that reference. What each saves:

* :func:`grouped_gemm`: no fp32 copy of the whole weight tensor; each expert's weight is converted just
  before its GEMM (it is still in cache when the GEMM reads it), experts without rows are skipped, and
  the GEMMs write straight into slices of one output.
* :func:`mla_decode`: the absorbed form per sequence over only its own pages (no ``[B, Lmax]`` padded
  gather, no mask when every key is attended), logits and ``P @ V`` as two plain matrix products shared
  by all heads.
* :func:`quantize_fp8`: the same fp32 operations as the reference, applied to row chunks that stay in
  cache, in place, instead of five full-size passes through memory.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from hal.contract import FLOAT_DTYPES
from hal.formats import FP8_DTYPE, FP8_MAX
from hal.ops.grouped_gemm import grouped_gemm as _grouped_gemm_op
from hal.ops.mla import attended_keys, sink_gate
from hal.ops.quant import fp8_scales
from hal.ops.quant import quantize_fp8 as _quantize_fp8_op

_F32 = torch.float32
_CHUNK_ELEMENTS = 1 << 17  # fp32 working set of one quantisation chunk: 512 KiB, well inside L2


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, group_sizes: torch.Tensor, *, layout: str = "contiguous",
                 x_scale: Optional[torch.Tensor] = None, w_scale: Optional[torch.Tensor] = None,
                 out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    if x_scale is not None or w_scale is not None:  # FP8 / FP4 / int8 operands: the reference dequantises
        return _grouped_gemm_op.reference_impl(x, w, group_sizes, layout=layout, x_scale=x_scale,
                                               w_scale=w_scale, out_dtype=out_dtype, compute_dtype=_F32)
    out_dtype = out_dtype or (x.dtype if x.dtype in FLOAT_DTYPES else torch.bfloat16)
    xf = x.to(_F32)
    sizes = group_sizes.tolist()
    if layout == "masked":
        y = xf.new_zeros(x.shape[0], x.shape[1], w.shape[1])  # the reference's zeros past the valid rows
        for g, size in enumerate(sizes):
            if size:
                torch.mm(xf[g, :size], w[g].to(_F32).t(), out=y[g, :size])
        return y.to(out_dtype)
    y = xf.new_empty(x.shape[0], w.shape[1])
    start = 0
    for g, size in enumerate(sizes):
        if size:
            torch.mm(xf[start:start + size], w[g].to(_F32).t(), out=y[start:start + size])
            start += size
    return y.to(out_dtype)


def mla_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, *,
               softmax_scale: float, head_dim_v: int = 512, causal: bool = True,
               sinks: Optional[torch.Tensor] = None, window: Optional[int] = None,
               topk_indices: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    b, sq, hq, d = q.shape
    block_size = kv_cache.shape[1]
    out = q.new_zeros((b, sq, hq, head_dim_v), dtype=_F32)
    lse = q.new_full((b, sq, hq), float("-inf"), dtype=_F32)
    for i, length in enumerate(seq_lens.tolist()):
        if length == 0:
            continue
        used = (length + block_size - 1) // block_size
        keys = kv_cache[block_table[i, :used].to(torch.int64)].reshape(-1, d)[:length].to(_F32)  # [L, D]
        logits = torch.mm(q[i].reshape(sq * hq, d).to(_F32), keys.t()).mul_(softmax_scale).view(sq, hq, length)
        if causal and sq > 1 or window is not None or topk_indices is not None:
            topk = None if topk_indices is None else topk_indices[i:i + 1]
            allowed = attended_keys(seq_lens[i:i + 1], sq, length, causal, window, topk)[0]  # [Sq, L]
            logits.masked_fill_(~allowed[:, None, :], float("-inf"))
        row_lse = torch.logsumexp(logits, dim=-1)  # [Sq, Hq]; -inf where nothing is attended
        probs = torch.exp(logits.sub_(row_lse.masked_fill(row_lse == float("-inf"), 0.0)[..., None]))
        row_out = torch.mm(probs.view(sq * hq, length), keys[:, :head_dim_v]).view(sq, hq, head_dim_v)
        if sinks is not None:
            row_out.mul_(sink_gate(row_lse, sinks)[..., None])
        out[i], lse[i] = row_out, row_lse
    return out.to(q.dtype), lse


def quantize_fp8(x: torch.Tensor, group_size: int = 128,
                 scale_fmt: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    if x.numel() == 0:
        return _quantize_fp8_op.reference_impl(x, group_size, scale_fmt)
    k = x.shape[-1]
    rows = x.reshape(-1, k // group_size, group_size)
    q = torch.empty(rows.shape, dtype=FP8_DTYPE, device=x.device)
    s = torch.empty(rows.shape[:2], dtype=_F32, device=x.device)
    step = max(1, _CHUNK_ELEMENTS // k)
    for r0 in range(0, rows.shape[0], step):
        chunk = rows[r0:r0 + step].to(_F32, copy=True)  # the fp32 working copy, divided in place below
        scale = fp8_scales(chunk.abs().amax(dim=-1), scale_fmt)
        s[r0:r0 + step] = scale
        q[r0:r0 + step] = chunk.div_(scale[..., None]).clamp_(-FP8_MAX, FP8_MAX)
    return q.reshape(x.shape), s.reshape(*x.shape[:-1], k // group_size)
