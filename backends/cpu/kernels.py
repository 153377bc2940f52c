"""The CPU backend's fast kernels, where a contract's reference implementation is slow.

Each computes what its contract specifies, within the contract's tolerance, and hands every case it does
not speed up to the reference (``compute_dtype=torch.float32``). Where the CPU multiplies bf16 matrices in
hardware (AMX / AVX512-BF16, :func:`native_bf16_gemm`), bf16 work runs on bf16 matrix instructions that
accumulate in fp32, as the contracts allow; elsewhere it is computed in fp32. What each saves:

* :func:`grouped_gemm`: per expert, one GEMM into a slice of the output; bf16 operands stay bf16 (oneDNN,
  fp32 accumulation, one rounding), other float operands are converted per expert (no fp32 copy of the
  whole weight tensor); experts without rows are skipped.
* :func:`mla_prefill` / :func:`mla_decode`: PyTorch's CPU flash attention for bf16 (logits accumulated in
  fp32, online softmax, probabilities rounded to bf16 before ``P @ V``: what ``MLA_TOLERANCE`` admits).
  Prefill is one call per sequence where no mask beyond a plain causal one is needed; with windows, top-k
  lists (V3.2 / V4), a bottom-right causal mask or fewer kv heads than query heads, it takes chunks of
  queries, each over only the keys some query of the chunk attends, with the rest masked. Decode attends
  all heads' rows in one pass over the sequence's keys, a view of the cache when its pages are in order, a
  batch of equal-length sequences in one call (a core each), and only the keys a window or a top-k list
  selects (a one-token decode step then needs no mask). Where the native kernels of
  :mod:`hal.backends.cpu.native` run (AMX, AVX-512, AVX2, NEON), a bf16 step whose rows attend all their keys
  takes them instead. Other cases: fp32, per
  sequence, two matrix products shared by all heads, masked only when something is.
* :func:`quantize_fp8`, :func:`quantize_int8`: the same fp32 operations as the reference, applied to row
  chunks that stay in cache, in place, instead of full-size passes through memory; bf16 FP8 quantisation
  takes the native kernel of :mod:`hal.backends.cpu.native` where it runs.
* :func:`moe_unpermute`: the reference on chunks of tokens whose fp32 rows stay in cache.

These kernels read the values a contract value-checks (group sizes, sequence offsets and lengths, block
ids) anyway, and check them with the contract's own helpers, so bad ones raise its errors outside checked
mode too; the backend runs the other operators' value checks before their reference
(:mod:`hal.backends.cpu.backend`).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, List, Optional, Tuple

import torch

from hal.backends.cpu import native
from hal.formats import FP8_DTYPE, FP8_MAX, INT8_MAX
from hal.ops.grouped_gemm import check_group_sizes, grouped_gemm_out_dtype
from hal.ops.grouped_gemm import grouped_gemm as _grouped_gemm_op
from hal.ops.mla import attended_keys, check_cu_seqlens, checked_pages, sink_gate
from hal.ops.mla import mla_prefill as _mla_prefill_op
from hal.ops.quant import fp8_scales, int8_scales
from hal.ops.quant import quantize_fp8 as _quantize_fp8_op
from hal.ops.routing import MoePermutation
from hal.ops.routing import moe_unpermute as _moe_unpermute_op

_F32 = torch.float32
_CHUNK_ELEMENTS = 1 << 17  # fp32 working set of one quantisation chunk: 512 KiB, well inside L2
# PyTorch's CPU flash attention (bf16 GEMMs accumulating in fp32, online softmax in fp32, probabilities
# rounded to bf16 before P @ V, as MLA_TOLERANCE admits), with its lse. Private, so looked up, not assumed.
try:
    _flash_attention = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
except (AttributeError, RuntimeError):  # torch without it
    _flash_attention = None


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
    sizes = group_sizes.tolist()
    check_group_sizes(sizes, layout, x.shape)  # read anyway: unchecked bad sizes would leave rows unwritten
    if x_scale is not None or w_scale is not None:  # FP8 / FP4 / int8 operands: the reference dequantises
        return _grouped_gemm_op.reference_impl(
            x, w, group_sizes, layout=layout, x_scale=x_scale, w_scale=w_scale, out_dtype=out_dtype, compute_dtype=_F32
        )
    out_dtype = grouped_gemm_out_dtype(x, out_dtype)
    if x.dtype == w.dtype == out_dtype == torch.bfloat16 and x.is_cpu and native_bf16_gemm():
        compute, weight = torch.bfloat16, lambda g: w[g]  # oneDNN: fp32 accumulation, one rounding to bf16
    else:
        compute, weight = _F32, lambda g: w[g].to(_F32)  # converted per expert: still in cache for its GEMM
    xc = x.to(compute)
    if layout == "masked":
        y = xc.new_zeros(x.shape[0], x.shape[1], w.shape[1])  # the reference's zeros past the valid rows
        for g, size in enumerate(sizes):
            if size:
                torch.mm(xc[g, :size], weight(g).t(), out=y[g, :size])
        return y.to(out_dtype)
    y = xc.new_empty(x.shape[0], w.shape[1])
    start = 0
    for g, size in enumerate(sizes):
        if size:
            torch.mm(xc[start : start + size], weight(g).t(), out=y[start : start + size])
            start += size
    return y.to(out_dtype)


@functools.lru_cache(maxsize=None)
def native_bf16_gemm() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AMX or AVX512-BF16) through oneDNN: a bf16 GEMM
    with fp32 accumulation then runs several times faster than an fp32 one, while elsewhere bf16 GEMMs are
    emulated, far slower. torch.cpu's probes are private, so their absence reads as "no"."""
    probes = (getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return torch.backends.mkldnn.is_available() and any(probe() for probe in probes if probe is not None)


def _cpu_bf16_attention(q: torch.Tensor) -> bool:
    """Whether PyTorch's CPU flash attention serves this call: bf16 CPU tensors (the backend is portable: it
    also runs, in its fp32 paths, on other devices), a CPU with bf16 matrix instructions, a torch that has it."""
    return q.dtype == torch.bfloat16 and q.is_cpu and native_bf16_gemm() and _flash_attention_works()


@functools.lru_cache(maxsize=None)
def _flash_attention_works() -> bool:
    """Whether this torch has the CPU flash attention op with the signature used here, and its lse (a private
    op: probed once on a tiny problem, not assumed)."""
    if _flash_attention is None:
        return False
    x = torch.ones(1, 1, 2, 8, dtype=torch.bfloat16)
    try:
        out, lse = _flash_attention(x, x, x, 0.0, True, attn_mask=None, scale=1.0)
    except (RuntimeError, TypeError):
        return False
    # two keys of logit 8 for the second query (causal): lse = 8 + ln 2, a natural log as the contracts' is
    return out.shape == x.shape and lse.shape == (1, 1, 2) and abs(float(lse[0, 0, 1]) - 8 - math.log(2)) < 1e-4


def mla_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    *,
    softmax_scale: float,
    causal: bool = True,
    sinks: Optional[torch.Tensor] = None,
    window: Optional[int] = None,
    topk_indices: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    starts_q = cu_seqlens_q.tolist()
    check_cu_seqlens("cu_seqlens_q", starts_q, q.shape[0])  # read anyway: bad offsets would slice silently
    starts_k = starts_q if cu_seqlens_k is None else cu_seqlens_k.tolist()
    check_cu_seqlens("cu_seqlens_k", starts_k, k.shape[0])
    if not _cpu_bf16_attention(q):
        return _mla_prefill_op.reference_impl(
            q,
            k,
            v,
            cu_seqlens_q,
            cu_seqlens_k,
            softmax_scale=softmax_scale,
            causal=causal,
            sinks=sinks,
            window=window,
            topk_indices=topk_indices,
            compute_dtype=_F32,
        )
    tq, hq, d = q.shape
    dv = v.shape[2]
    # PyTorch's flash kernel takes one head dim (the narrower of q/k and v is zero-padded: exact), and a
    # top-left causal mask, which is the contract's bottom-right one when every sequence has as many keys as
    # queries; with as many kv heads as query heads and no other mask, a sequence is one flash call.
    plain = k.shape[1] == hq and window is None and topk_indices is None and (not causal or starts_q == starts_k)
    width = max(d, dv)
    shared = v is k  # MLA's latent keys are also its values: widened and gathered once
    q, k = _widened(q, width), _widened(k, width)
    v = k if shared else _widened(v, width)
    out = q.new_zeros((tq, hq, dv))
    lse = q.new_full((tq, hq), float("-inf"), dtype=_F32)
    for q0, q1, k0, k1 in zip(starts_q, starts_q[1:], starts_k, starts_k[1:]):
        if q1 == q0 or k1 == k0:  # no query, or no key to attend: out 0, lse -inf
            continue
        if plain:
            seq_out, seq_lse = _flash_attention(
                q[q0:q1].transpose(0, 1)[None],
                k[k0:k1].transpose(0, 1)[None],
                v[k0:k1].transpose(0, 1)[None],
                0.0,
                causal,
                attn_mask=None,
                scale=softmax_scale,
            )
            seq_out, seq_lse = seq_out[0, :, :, :dv].transpose(0, 1), seq_lse[0].t()  # [lq, Hq, Dv], [lq, Hq]
        else:
            seq_out, seq_lse = _masked_prefill(
                q[q0:q1],
                k[k0:k1],
                None if shared else v[k0:k1],
                dv,
                softmax_scale,
                causal,
                window,
                None if topk_indices is None else topk_indices[q0:q1],
            )
        if sinks is not None:
            seq_out = seq_out * sink_gate(seq_lse, sinks)[..., None]
        out[q0:q1], lse[q0:q1] = seq_out, seq_lse
    return out, lse


# query rows (queries x the query heads of a kv head) per masked flash call; its mask is these rows x the
# keys some of them attend
_FOLDED_ROWS = 512


def _masked_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: Optional[torch.Tensor],
    dv: int,
    softmax_scale: float,
    causal: bool,
    window: Optional[int],
    topk: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One sequence's attention where rows attend different keys (a window, a top-k list, a causal mask the
    flash kernel cannot express, or fewer kv heads than query heads): queries in chunks, each over only the
    keys some query of the chunk attends, with the rest masked. The query heads of a kv head are folded into
    rows, so the keys are read once per kv head. q ``[lq, Hq, W]``, k / v ``[lk, Hk, W]`` (``W`` padded; v
    ``None`` when the keys are the values) -> out ``[lq, Hq, dv]``, lse ``[lq, Hq]``."""
    lq, hq, width = q.shape
    lk, hk = k.shape[:2]
    group = hq // hk
    out = q.new_zeros((lq, hq, dv))
    lse = q.new_full((lq, hq), float("-inf"), dtype=_F32)
    num_keys = torch.tensor([lk], device=q.device)
    step = max(1, _FOLDED_ROWS // group)
    for c0 in range(0, lq, step):
        c1 = min(lq, c0 + step)
        allowed = attended_keys(
            num_keys, c1 - c0, lk, causal, window, None if topk is None else topk[None, c0:c1], first=c0, total=lq
        )[0]
        allowed, keys, values = _attended_only(allowed, k, v)
        if keys.shape[0] == 0:  # no query of the chunk attends anything
            continue
        values = keys if values is None else values
        mask = None
        if allowed is not None:  # rows folded query-major: row i * group + j is query i's head j of the group
            mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~allowed, float("-inf"))
            mask = mask.repeat_interleave(group, dim=0)[None, None]
        rows = q[c0:c1].view(c1 - c0, hk, group, width).transpose(0, 1).reshape(1, hk, (c1 - c0) * group, width)
        o, s = _flash_attention(
            rows,
            keys.transpose(0, 1)[None],
            values.transpose(0, 1)[None],
            0.0,
            False,
            attn_mask=mask,
            scale=softmax_scale,
        )
        o = o[0, :, :, :dv].reshape(hk, c1 - c0, group, dv).transpose(0, 1).reshape(c1 - c0, hq, dv)
        s = s[0].view(hk, c1 - c0, group).transpose(0, 1).reshape(c1 - c0, hq)
        if allowed is not None:
            empty = ~allowed.any(dim=1)  # queries that attend nothing: out 0, lse -inf
            o[empty], s[empty] = 0, float("-inf")
        out[c0:c1], lse[c0:c1] = o, s
    return out, lse


def mla_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    softmax_scale: float,
    head_dim_v: int = 512,
    causal: bool = True,
    sinks: Optional[torch.Tensor] = None,
    window: Optional[int] = None,
    topk_indices: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    b, sq, hq, d = q.shape
    masked = causal and sq > 1 or window is not None or topk_indices is not None
    fast = _cpu_bf16_attention(q)
    lengths = seq_lens.tolist()
    pages = checked_pages(kv_cache, block_table, lengths, sq, causal)  # read anyway: bad ids would go unseen
    if not masked and q.dtype == torch.bfloat16 and native.serves_mla_decode(sq * hq, d, head_dim_v, kv_cache):
        # the native kernel (also without bf16 matrix instructions: it sums in fp32 there): each sequence's pages
        # read in place, all heads' rows at once
        out, lse = native.mla_decode(
            q.reshape(b, sq * hq, d), kv_cache, block_table, seq_lens, softmax_scale, head_dim_v
        )
        out, lse = out.view(b, sq, hq, head_dim_v), lse.view(b, sq, hq)
    elif fast and not masked and b and lengths[0] > 0 and lengths.count(lengths[0]) == b:
        # one sequence, or equal lengths (hal.model's batches): one flash call, a core per sequence
        keys = _batch_keys(kv_cache, block_table, pages, lengths[0])
        out, lse = _flash_rows(q.reshape(b, sq * hq, d), keys, softmax_scale)
        out, lse = out[..., :head_dim_v].reshape(b, sq, hq, head_dim_v), lse.view(b, sq, hq)
    else:
        keys = [_sequence_keys(kv_cache, block_table[i], ids, n) for i, (ids, n) in enumerate(zip(pages, lengths))]
        # bf16 rows straight from the flash kernel when every sequence takes it; fp32 (rounded once) otherwise
        out = q.new_zeros((b, sq, hq, head_dim_v), dtype=q.dtype if fast and not masked else _F32)
        lse = q.new_full((b, sq, hq), float("-inf"), dtype=_F32)
        for i, seq_keys in enumerate(keys):
            allowed = None  # [Sq, L] where the rows attend different keys
            if masked and lengths[i]:
                allowed = attended_keys(
                    seq_lens[i : i + 1],
                    sq,
                    lengths[i],
                    causal,
                    window,
                    None if topk_indices is None else topk_indices[i : i + 1],
                )[0]
                allowed, seq_keys, _ = _attended_only(allowed, seq_keys)
            if seq_keys.shape[0] == 0:  # nothing attended: out 0, lse -inf (a sink keeps out at 0)
                continue
            if fast and allowed is None:  # every query row attends every key: one pass for all heads' rows
                row_out, row_lse = _attend_all(q[i].reshape(1, sq * hq, d), seq_keys, softmax_scale, head_dim_v)
                out[i], lse[i] = row_out.view(sq, hq, head_dim_v), row_lse.view(sq, hq)
            else:
                out[i], lse[i] = _attend_fp32(q[i], seq_keys.to(_F32), softmax_scale, head_dim_v, allowed)
    if sinks is not None:  # per sequence: torch's sigmoid rounds by an element's position (vectorised or
        for i in range(b):  # not), and a sequence must come out as it does alone
            out[i].mul_(sink_gate(lse[i], sinks)[..., None])
    return out.to(q.dtype), lse


def _attend_all(
    rows: torch.Tensor, keys: torch.Tensor, softmax_scale: float, head_dim_v: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Query rows ``[1, R, D]`` over ``keys`` ``[L, D]`` that are also the values (a top-k or window step's
    selected keys): the native kernel where it serves them (as one page), else PyTorch's flash attention.
    out ``[1, R, head_dim_v]``, lse ``[1, R]``."""
    length, d = keys.shape
    if keys.is_contiguous() and native.serves_mla_decode(rows.shape[1], d, head_dim_v, keys[None]):
        one_page = torch.zeros(1, 1, dtype=torch.int32)
        return native.mla_decode(
            rows, keys[None], one_page, torch.tensor([length], dtype=torch.int32), softmax_scale, head_dim_v
        )
    out, lse = _flash_rows(rows, keys[None], softmax_scale)
    return out[..., :head_dim_v], lse


def _flash_rows(rows: torch.Tensor, keys: torch.Tensor, softmax_scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's flash attention of query rows ``[B, R, D]`` over keys ``[B, L, D]`` that are also the values
    (the latent cache): out ``[B, R, D]``, lse ``[B, R]``. One task per sequence: B sequences use B cores."""
    keys = _unit_stride(keys)[:, None]
    out, lse = _flash_attention(
        _unit_stride(rows)[:, None], keys, keys, 0.0, False, attn_mask=None, scale=softmax_scale
    )
    return out[:, 0], lse[:, 0]


def _attended_only(
    allowed: torch.Tensor, keys: torch.Tensor, values: Optional[torch.Tensor] = None
) -> Tuple[Optional[torch.Tensor], torch.Tensor, Optional[torch.Tensor]]:
    """``allowed`` ``[rows, L]``, ``keys`` ``[L, ...]`` and ``values`` (``None``: the keys are the values) cut to
    the positions some row attends, and ``allowed`` ``None`` when every row then attends all of them: a
    window or a top-k list costs what it selects, not the whole context, and a one-token step needs no
    mask."""
    used = allowed.any(dim=0)
    if not bool(used.all()):
        columns = used.nonzero().squeeze(1)
        allowed, keys = allowed[:, columns], keys.index_select(0, columns)
        values = None if values is None else values.index_select(0, columns)
    return (None if bool(allowed.all()) else allowed), keys, values


def _in_order(ids: List[int]) -> bool:
    return ids == list(range(ids[0], ids[0] + len(ids)))


def _sequence_keys(kv_cache: torch.Tensor, block_ids: torch.Tensor, ids: List[int], length: int) -> torch.Tensor:
    """A sequence's first ``length`` keys ``[length, D]`` from its used blocks ``ids``: a view of the cache when
    they are in order (as :class:`hal.model` allocates them), else a gathered copy."""
    if not ids:
        return kv_cache.new_empty(0, kv_cache.shape[2])
    if not _in_order(ids):
        return _gathered_keys(kv_cache, block_ids[None, : len(ids)], length)[0]
    pages = kv_cache[ids[0] : ids[0] + len(ids)]
    return pages.reshape(-1, kv_cache.shape[2])[:length]  # a view unless the cache itself is strided


def _batch_keys(kv_cache: torch.Tensor, block_table: torch.Tensor, pages: List[List[int]], length: int) -> torch.Tensor:
    """The keys of equal-length sequences (used blocks ``pages``) as one ``[B, length, D]``: a view of the
    cache when each sequence's blocks are in order and the sequences lie at equal distances (hal.model's
    caches: each sequence's blocks follow the previous one's), else one gathered copy."""
    firsts = [ids[0] for ids in pages]
    step = firsts[1] - firsts[0] if len(firsts) > 1 else 0
    _, block_size, d = kv_cache.shape
    stride = kv_cache.stride()
    if (
        step >= 0
        and all(first == firsts[0] + i * step for i, first in enumerate(firsts))
        and all(_in_order(ids) for ids in pages)
        and stride[0] == block_size * stride[1]
    ):
        return kv_cache.as_strided(
            (len(pages), length, d),
            (step * stride[0], stride[1], stride[2]),
            kv_cache.storage_offset() + firsts[0] * stride[0],
        )
    return _gathered_keys(kv_cache, block_table[:, : len(pages[0])], length)


def _gathered_keys(kv_cache: torch.Tensor, block_ids: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` keys ``[B, length, D]`` of sequences whose used blocks are the rows of ``block_ids``
    ``[B, n]``, copied: slot by slot where the cache's slots are the rows of one matrix (the copy is then
    split over the cores), else block by block."""
    _, block_size, d = kv_cache.shape
    b = block_ids.shape[0]
    if kv_cache.stride(0) == block_size * kv_cache.stride(1):
        offsets = torch.arange(block_size, device=kv_cache.device)
        slots = (block_ids.long()[..., None] * block_size + offsets).flatten(1)[:, :length]
        return kv_cache.flatten(0, 1).index_select(0, slots.reshape(-1)).view(b, length, d)
    return kv_cache.index_select(0, block_ids.reshape(-1)).view(b, -1, d)[:, :length]


def _attend_fp32(
    q: torch.Tensor, keys: torch.Tensor, softmax_scale: float, head_dim_v: int, allowed: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Absorbed attention of one sequence's ``q`` ``[Sq, Hq, D]`` over its fp32 ``keys`` ``[L, D]``, in fp32:
    the logits and ``P @ V`` as two matrix products shared by all heads, masked by ``allowed`` ``[Sq, L]``
    unless it is ``None`` (every key attended)."""
    sq, hq, d = q.shape
    length = keys.shape[0]
    logits = torch.mm(q.reshape(sq * hq, d).to(_F32), keys.t()).mul_(softmax_scale).view(sq, hq, length)
    if allowed is not None:
        logits.masked_fill_(~allowed[:, None, :], float("-inf"))
    row_lse = torch.logsumexp(logits, dim=-1)  # [Sq, Hq]; -inf where nothing is attended
    probs = torch.exp(logits.sub_(row_lse.masked_fill(row_lse == float("-inf"), 0.0)[..., None]))
    return torch.mm(probs.view(sq * hq, length), keys[:, :head_dim_v]).view(sq, hq, head_dim_v), row_lse


def _widened(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t`` ``[..., D]`` zero-padded to ``width`` dims, with a unit last stride."""
    return _unit_stride(t if t.shape[-1] == width else torch.nn.functional.pad(t, (0, width - t.shape[-1])))


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` with a unit stride along its last dim, which PyTorch's flash kernel assumes without checking."""
    return t if t.stride(-1) == 1 else t.contiguous()


def moe_unpermute(y_sorted: torch.Tensor, weights: torch.Tensor, permutation: MoePermutation) -> torch.Tensor:
    """The reference on chunks of tokens whose fp32 rows fit in L2: the same products per token (bit for bit),
    without gathering every token's rows into one fp32 tensor ~3x slower to allocate, fill and read."""
    tokens, k = permutation.slot_rows.shape
    step = max(1, _CHUNK_ELEMENTS // max(1, k * y_sorted.shape[1]))
    if tokens <= step:
        return _moe_unpermute_op.reference_impl(y_sorted, weights, permutation, compute_dtype=_F32)
    out = y_sorted.new_empty((tokens, y_sorted.shape[1]))
    for t0 in range(0, tokens, step):
        chunk = permutation._replace(slot_rows=permutation.slot_rows[t0 : t0 + step])
        out[t0 : t0 + step] = _moe_unpermute_op.reference_impl(
            y_sorted, weights[t0 : t0 + step], chunk, compute_dtype=_F32
        )
    return out


def quantize_fp8(
    x: torch.Tensor, group_size: int = 128, scale_fmt: Optional[str] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    if x.numel() == 0:
        return _quantize_fp8_op.reference_impl(x, group_size, scale_fmt)
    if native.serves_quantize_fp8(x, group_size):
        return native.quantize_fp8_bf16(x, group_size, scale_fmt == "ue8m0")
    return _quantized_in_chunks(
        x,
        group_size,
        lambda amax: fp8_scales(amax, scale_fmt),
        lambda chunk: chunk.clamp_(-FP8_MAX, FP8_MAX),
        FP8_DTYPE,
    )


def quantize_int8(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    q, s = _quantized_in_chunks(
        x, x.shape[-1], int8_scales, lambda chunk: chunk.round_().clamp_(-INT8_MAX, INT8_MAX), torch.int8
    )
    return q, s.squeeze(-1)


def quantize_int8_weight(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return quantize_int8(w)  # per row of K: the same algorithm


def _quantized_in_chunks(
    x: torch.Tensor,
    group_size: int,
    scales: Callable[[torch.Tensor], torch.Tensor],
    finish: Callable[[torch.Tensor], torch.Tensor],
    q_dtype: torch.dtype,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The references' per-group quantisation of ``x`` ``[..., K]`` (groups of ``group_size`` along ``K``), a
    chunk of rows at a time in an fp32 copy that stays in L2 (the reference makes each step a pass over the
    whole tensor): ``s = scales(amax)``, ``q = finish(chunk / s)`` cast to ``q_dtype``. Returns ``q`` of
    ``x``'s shape and ``s`` ``[..., K // group_size]``; the same divisions, so the same bits."""
    k = x.shape[-1]
    rows = x.reshape(-1, k // group_size, group_size)
    q = torch.empty(rows.shape, dtype=q_dtype, device=x.device)
    s = torch.empty(rows.shape[:2], dtype=_F32, device=x.device)
    step = max(1, _CHUNK_ELEMENTS // k)
    for r0 in range(0, rows.shape[0], step):
        chunk = rows[r0 : r0 + step].to(_F32, copy=True)  # the fp32 working copy, divided in place below
        scale = scales(chunk.abs().amax(dim=-1))
        s[r0 : r0 + step] = scale
        q[r0 : r0 + step] = finish(chunk.div_(scale[..., None]))
    return q.reshape(x.shape), s.reshape(*x.shape[:-1], k // group_size)
