"""Family 3: MLA / latent attention: ragged (varlen) prefill, absorbed decode over a paged latent cache,
sliding windows, attention sinks and sparse top-k attention (DeepSeek V3 / V3.2 DSA / V4).

Conventions shared by the operators of this family:

* **Masks are intersected.** ``causal`` is bottom-right aligned: query ``i`` (0-based) of a sequence with
  ``lq`` queries and ``lk`` keys sees key ``j`` iff ``j <= lk - lq + i`` (the queries are the *last* ``lq``
  positions of the sequence, as in chunked prefill and speculative decode). ``window=W`` adds
  ``j > lk - lq + i - W`` (with ``causal``: the ``W`` most recent keys, its own position included; without
  it only the look-back is limited, like flash-attn's ``window_size=(W - 1, -1)``). ``topk_indices`` (the
  V3.2 / V4 sparse attention) restricts a query to the listed key positions of its own sequence.
* **Softmax** ``p_j = exp(s_j - lse)`` over the attended keys, ``s_j = softmax_scale * (q . k_j)`` and
  ``lse = log(sum_j exp(s_j))`` (natural log), computed in the compute dtype (fp32 on the CPU backend);
  the probabilities are *not* rounded to the input dtype before the ``P @ V`` product.
* **Sinks** (V4 / gpt-oss): a per-head logit ``sink[h]`` joins the softmax denominator only, i.e. the output
  is scaled by ``exp(lse) / (exp(lse) + exp(sink[h]))``; the returned ``lse`` excludes the sink (FlashMLA's
  convention).
* **A query that attends no key** returns ``out = 0`` and ``lse = -inf`` (log of an empty sum; FlashMLA
  returns ``+inf``: a backend mapping to it must convert).
* **No default softmax scale.** DeepSeek's is ``192**-0.5 * mscale**2`` (~0.1352 for V3), not derivable from
  the 576-wide keys of the absorbed decode.

Why: docs/contracts.md#mla-attention.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

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
    is_int,
    is_number,
    result,
)
from hal.errors import InvalidArgumentError

__all__ = [
    "mla_prefill",
    "mla_decode",
    "paged_cache_write",
    "MLA_TOLERANCE",
    "attention_error_n",
    "attended_keys",
    "gather_paged_keys",
    "sink_gate",
    "checked_pages",
    "check_sequence_pages",
    "check_cu_seqlens",
    "used_blocks",
]

_DTYPES = ("bfloat16", "float16", "float32")
_BOOL = ("true", "false")
_ATTENTION_AXES = {"dtype": _DTYPES, "causal": _BOOL, "sinks": _BOOL, "window": _BOOL, "sparse": _BOOL}

# --------------------------------------------------------------------------- tolerance
#
# Keys: the output dtype ("bfloat16", "float16", "float32") for ``out``, and "lse" for the float32 lse.
# Both are compared with ``hal.numerics.compare(actual, oracle, tol, n=n, magnitude=m)`` where
#
# * ``n = attention_error_n(q, k, softmax_scale=..., num_keys=L)`` (one number per call):
#       n = 5 * L + 3 * (D + 9) * S + 32 + c_p
#   L = the largest number of keys any query row attends (its reduction length), D = the q/k head dim,
#   S = softmax_scale * max_t |q_t|_2 * max_j |k_j|_2 (a bound of every |logit|), and c_p = 2**16 for bf16 q,
#   2**13 for fp16, 0 for fp32 (kernels rounding the probabilities to q's dtype before P @ V);
# * ``magnitude`` for ``out`` = the same attention with the values replaced by ``|v|`` (same logits,
#   same masks and sinks): ``sum_j p_j |v_j|``; for ``lse`` = ones.
#
# The derivation (fp32 throughout, in any order; subnormals may flush to zero): docs/contracts.md#mla-tolerance.
MLA_TOLERANCE = {
    "float32": Tolerance(rtol=2**-23, atol=2**-149, acc_eps=2**-24),
    "bfloat16": Tolerance(rtol=2**-7, atol=2**-133, acc_eps=2**-24),
    "float16": Tolerance(rtol=2**-10, atol=2**-24, acc_eps=2**-24),
    "lse": Tolerance(rtol=2**-22, atol=0.0, acc_eps=2**-24),
}

_PROBABILITY_ROUNDING = {torch.bfloat16: 2**16, torch.float16: 2**13}


def attention_error_n(q: torch.Tensor, k: torch.Tensor, *, softmax_scale: float, num_keys: int) -> float:
    """The ``n`` to pass to :func:`hal.numerics.compare` with :data:`MLA_TOLERANCE` (see the comment above it).

    ``q`` holds the queries ``[..., D]``, ``k`` the keys ``[..., D]`` they attend (for :func:`mla_decode`,
    the latent keys of the used cache positions), ``num_keys`` the largest number of keys one query
    attends. Any larger ``n`` is also sound, just looser."""
    d = q.shape[-1]

    def max_norm(t: torch.Tensor) -> float:
        return float(t.detach().double().reshape(-1, d).norm(dim=-1).max()) if t.numel() else 0.0

    s = abs(float(softmax_scale)) * max_norm(q) * max_norm(k)
    return 5 * num_keys + 3 * (d + 9) * s + 32 + _PROBABILITY_ROUNDING.get(q.dtype, 0)


# --------------------------------------------------------------------------- shared validation / math


def _check_common(
    op: str, hq: int, softmax_scale: object, causal: object, sinks: Optional[torch.Tensor], window: object
) -> None:
    ok = is_number(softmax_scale) and math.isfinite(softmax_scale) and softmax_scale > 0
    check(ok, op, "softmax_scale", "a finite float > 0 (DeepSeek: 192**-0.5 * mscale**2)", repr(softmax_scale))
    check(isinstance(causal, bool), op, "causal", "a bool", repr(causal))
    check(window is None or (is_int(window) and window >= 1), op, "window", "None or an int >= 1", repr(window))
    if sinks is not None:
        check_tensor(op, "sinks", sinks, ndim=1, dtypes=(torch.float32,))
        check(sinks.shape[0] == hq, op, "sinks", f"shape [Hq={hq}]", f"shape {tuple(sinks.shape)}")


def _features(
    dtype: torch.dtype,
    causal: bool,
    sinks: Optional[torch.Tensor],
    window: Optional[int],
    topk_indices: Optional[torch.Tensor],
) -> Tuple[Tuple[str, str], ...]:
    def flag(b: bool) -> str:
        return "true" if b else "false"

    return (
        ("dtype", dtype_name(dtype)),
        ("causal", flag(causal)),
        ("sinks", flag(sinks is not None)),
        ("window", flag(window is not None)),
        ("sparse", flag(topk_indices is not None)),
    )


def attended_keys(
    num_keys: torch.Tensor,
    sq: int,
    length: int,
    causal: bool,
    window: Optional[int],
    topk_indices: Optional[torch.Tensor],
    *,
    first: int = 0,
    total: Optional[int] = None,
) -> torch.Tensor:
    """Boolean ``[N, sq, length]``: which key position each query attends. Row ``n`` has ``num_keys[n]``
    keys (positions past it are padding), and ``total`` queries (default ``first + sq``), its last
    ``total`` positions, of which these are queries ``first .. first + sq - 1`` (all of them by default)."""
    device = num_keys.device
    lk = num_keys.to(torch.int64)
    pos = torch.arange(length, device=device)
    allowed = (pos[None, None, :] < lk[:, None, None]).expand(lk.shape[0], sq, length)
    rows = torch.arange(first, first + sq, device=device)
    last = lk[:, None] - (first + sq if total is None else total) + rows[None, :]  # newest key each may see
    if causal:
        allowed = allowed & (pos[None, None, :] <= last[..., None])
    if window is not None:
        allowed = allowed & (pos[None, None, :] > last[..., None] - window)
    if topk_indices is not None:
        idx = topk_indices.to(torch.int64)
        valid = (idx >= 0) & (idx < lk[:, None, None])
        target = torch.where(valid, idx, torch.full_like(idx, length))  # invalid entries -> a dump column
        chosen = torch.zeros(lk.shape[0], sq, length + 1, dtype=torch.bool, device=device)
        chosen.scatter_(2, target, True)
        allowed = allowed & chosen[..., :length]
    return allowed


def sink_gate(lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """The factor a per-head sink scales ``out`` by: ``exp(lse) / (exp(lse) + exp(sink))``, and 0 for a row
    that attends nothing (``lse = -inf``: its ``out`` stays 0, for a ``-inf`` sink too). ``sinks`` broadcasts
    over ``lse``'s last (head) dim."""
    return torch.sigmoid(lse - sinks).masked_fill(lse == float("-inf"), 0.0)


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    softmax_scale: float,
    sinks: Optional[torch.Tensor],
    compute_dtype: torch.dtype,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax attention. q ``[N, Sq, Hq, D]``, k ``[N, L, Hk, D]``, v ``[N, L, Hk, Dv]``, allowed
    ``[N, Sq, L]`` -> out ``[N, Sq, Hq, Dv]``, lse ``[N, Sq, Hq]`` (both in ``compute_dtype``)."""
    n, sq, hq, d = q.shape
    hk = k.shape[2]
    qg = q.to(compute_dtype).reshape(n, sq, hk, hq // hk, d)  # query head h uses kv head h // (Hq // Hk)
    logits = torch.einsum("nshgd,nlhd->nhgsl", qg, k.to(compute_dtype)) * softmax_scale
    logits = logits.masked_fill(~allowed[:, None, None], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # -inf where nothing is attended
    p = torch.exp(logits - lse.masked_fill(lse == float("-inf"), 0.0)[..., None])
    out = torch.einsum("nhgsl,nlhv->nshgv", p, v.to(compute_dtype)).reshape(n, sq, hq, v.shape[-1])
    lse = lse.permute(0, 3, 1, 2).reshape(n, sq, hq)
    if sinks is not None:
        out = out * sink_gate(lse, sinks.to(compute_dtype))[..., None]
    return out, lse


# --------------------------------------------------------------------------- mla_prefill


@contract(family="mla", axes=_ATTENTION_AXES, tolerance=MLA_TOLERANCE)
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
    """Attention over a ragged batch of sequences (varlen prefill; the naive, non-absorbed MLA form).

    Arguments (see the module docstring for masks, softmax, sinks and empty rows):

    * ``q`` ``[Tq, Hq, Dqk]``, ``k`` ``[Tk, Hk, Dqk]``, ``v`` ``[Tk, Hk, Dv]``: one dtype among bf16, fp16,
      fp32. ``Dv`` may differ from ``Dqk`` (DeepSeek: 192 and 128). ``Hq % Hk == 0``; query head ``h`` uses
      kv head ``h // (Hq // Hk)`` (MHA, GQA, MQA).
    * ``cu_seqlens_q``, ``cu_seqlens_k``: int32 ``[B + 1]``, cumulative token counts: sequence ``b`` owns
      queries ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` and keys ``cu_seqlens_k[b]:cu_seqlens_k[b+1]``. They
      start at 0, never decrease and end at ``Tq`` / ``Tk`` (value-checked). ``cu_seqlens_k=None`` means
      the same as ``cu_seqlens_q`` (then ``Tk == Tq``). Empty sequences are allowed.
    * ``softmax_scale``: required, > 0; never derived from the head dim (module docstring).
    * ``causal``: bottom-right aligned: query ``i`` of a sequence with ``lq`` queries and ``lk`` keys sees
      key ``j <= lk - lq + i``; when ``lk < lq`` the first queries see nothing (out 0, lse -inf).
    * ``window``: int ``W >= 1``: additionally ``j > lk - lq + i - W``.
    * ``topk_indices``: int32 ``[Tq, topk]``: key positions *within the query's own sequence* (0-based) that
      it may attend; ``-1`` pads, any entry outside ``[0, lk)`` is ignored, duplicates count once; the
      attended set is these positions intersected with the causal / window masks. Shared by all heads.
    * ``sinks``: float32 ``[Hq]``, per-head sink logit (scales out by ``exp(lse) / (exp(lse) + exp(sink))``;
      ``-inf`` = no sink for that head).

    Returns ``(out, lse)``: ``out`` ``[Tq, Hq, Dv]`` in q's dtype, ``lse`` float32 ``[Tq, Hq]``, the natural
    log-sum-exp of the scaled logits over the attended keys, excluding the sink; a query that attends no
    key gets ``out = 0``, ``lse = -inf``. ``softmax_scale`` multiplies the fp32 dot product ``q . k``.

    Tolerance: :data:`MLA_TOLERANCE` (``out`` under its dtype, ``lse`` under ``"lse"``) with
    ``n = attention_error_n(q, k, softmax_scale=softmax_scale, num_keys=<longest attended key set>)``
    and ``magnitude`` = this op applied to ``v.abs()`` (``out``) or ones (``lse``).
    """
    op = "mla_prefill"
    check_tensor(op, "q", q, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor(op, "k", k, ndim=3, dtypes=(q.dtype,))
    check_tensor(op, "v", v, ndim=3, dtypes=(q.dtype,))
    check_tensor(op, "cu_seqlens_q", cu_seqlens_q, ndim=1, dtypes=(torch.int32,))
    if cu_seqlens_k is not None:
        check_tensor(op, "cu_seqlens_k", cu_seqlens_k, ndim=1, dtypes=(torch.int32,))
    if topk_indices is not None:
        check_tensor(op, "topk_indices", topk_indices, ndim=2, dtypes=(torch.int32,))
    device = check_same_device(
        op, q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, sinks=sinks, topk_indices=topk_indices
    )
    tq, hq, dqk = q.shape
    tk, hk = k.shape[0], k.shape[1]
    check(hq >= 1 and dqk >= 1, op, "q", "shape [Tq, Hq >= 1, Dqk >= 1]", f"shape {tuple(q.shape)}")
    check(hk >= 1 and hq % hk == 0, op, "k", f"a head count Hk >= 1 dividing Hq = {hq}", f"shape {tuple(k.shape)}")
    check(k.shape[2] == dqk, op, "k", f"head dim {dqk} (q's)", f"shape {tuple(k.shape)}")
    check(
        v.shape[0] == tk and v.shape[1] == hk and v.shape[2] >= 1,
        op,
        "v",
        f"shape [Tk={tk}, Hk={hk}, Dv >= 1] (k's tokens and heads)",
        f"shape {tuple(v.shape)}",
    )
    check(cu_seqlens_q.shape[0] >= 1, op, "cu_seqlens_q", "B + 1 >= 1 entries", "an empty tensor")
    if cu_seqlens_k is None:
        check(tk == tq, op, "k", f"Tk == Tq = {tq} when cu_seqlens_k is None", f"Tk = {tk}")
    else:
        check(
            cu_seqlens_k.shape[0] == cu_seqlens_q.shape[0],
            op,
            "cu_seqlens_k",
            f"{cu_seqlens_q.shape[0]} entries (the B + 1 of cu_seqlens_q)",
            f"{cu_seqlens_k.shape[0]}",
        )
    if topk_indices is not None:
        check(
            topk_indices.shape[0] == tq,
            op,
            "topk_indices",
            f"shape [Tq={tq}, topk]",
            f"shape {tuple(topk_indices.shape)}",
        )
    _check_common(op, hq, softmax_scale, causal, sinks, window)
    return Request(device, _features(q.dtype, causal, sinks, window, topk_indices))


@mla_prefill.value_checks
def _mla_prefill_values(q, k, v, cu_seqlens_q, cu_seqlens_k=None, **_):
    check_cu_seqlens("cu_seqlens_q", cu_seqlens_q.tolist(), q.shape[0])
    if cu_seqlens_k is not None:
        check_cu_seqlens("cu_seqlens_k", cu_seqlens_k.tolist(), k.shape[0])


def check_cu_seqlens(name: str, offsets: List[int], total: int) -> None:
    """:func:`mla_prefill`'s value checks of ``cu_seqlens_q`` / ``_k`` (read into ``offsets``): also for
    implementations that read them anyway."""
    op = "mla_prefill"
    check(offsets[0] == 0, op, name, "a first entry of 0", offsets[0])
    check(all(a <= b for a, b in zip(offsets, offsets[1:])), op, name, "non-decreasing offsets", offsets)
    check(offsets[-1] == total, op, name, f"a last entry equal to the token count {total}", offsets[-1])


@mla_prefill.reference
def _mla_prefill_reference(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k=None,
    *,
    softmax_scale,
    causal=True,
    sinks=None,
    window=None,
    topk_indices=None,
    compute_dtype=torch.float32,
):
    tq, hq = q.shape[0], q.shape[1]
    out = q.new_zeros((tq, hq, v.shape[2]), dtype=compute_dtype)
    lse = q.new_full((tq, hq), float("-inf"), dtype=compute_dtype)
    starts_q = cu_seqlens_q.tolist()
    starts_k = starts_q if cu_seqlens_k is None else cu_seqlens_k.tolist()
    for b in range(len(starts_q) - 1):  # one dense attention per sequence
        q0, q1, k0, k1 = starts_q[b], starts_q[b + 1], starts_k[b], starts_k[b + 1]
        if q1 == q0:
            continue
        lk = torch.tensor([k1 - k0], device=q.device)
        topk = None if topk_indices is None else topk_indices[None, q0:q1]
        allowed = attended_keys(lk, q1 - q0, k1 - k0, causal, window, topk)
        o, s = _attend(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], allowed, softmax_scale, sinks, compute_dtype)
        out[q0:q1], lse[q0:q1] = o[0], s[0]
    return result(out, q.dtype, compute_dtype), result(lse, torch.float32, compute_dtype)


# --------------------------------------------------------------------------- mla_decode


@contract(family="mla", axes=_ATTENTION_AXES, tolerance=MLA_TOLERANCE)
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
    """Absorbed-form MLA decode: multi-query attention of every head over one paged latent KV cache.

    In DeepSeek's absorbed MLA, ``q = [q_nope @ W_UK | q_rope]`` (D = 512 + 64 = 576), each cached key is
    ``[c_kv | k_rope]`` and the value is ``c_kv`` (its first 512 dims); ``W_UV`` is applied to the output
    afterwards. This op is the attention in between (FlashMLA's ``flash_mla_with_kvcache``).

    Arguments (see the module docstring for masks, softmax, sinks and empty rows):

    * ``q`` ``[B, Sq, Hq, D]`` bf16/fp16/fp32; ``Sq >= 1`` new tokens per sequence (speculative decode).
    * ``kv_cache`` ``[num_blocks, block_size, D]``, q's dtype: the latent cache shared by all heads. Key
      position ``p`` of sequence ``b`` lives at ``kv_cache[block_table[b, p // block_size], p % block_size]``;
      its value is ``key[:head_dim_v]``.
    * ``block_table`` int32 ``[B, max_blocks]``: entries past a sequence's used blocks
      (``ceil(seq_len / block_size)``) are never read and may hold anything (e.g. -1); neither are cache
      slots past ``seq_len`` (they may hold garbage, even NaN).
    * ``seq_lens`` int32 ``[B]``: keys of each sequence in the cache, *including* its ``Sq`` new tokens
      (already written, e.g. by :func:`paged_cache_write`). ``0`` is an empty (padding) sequence.
    * ``head_dim_v``: ``1 <= head_dim_v <= D`` (DeepSeek V3: 512 of 576; V4 uses the full key as value).
    * ``causal``: bottom-right: query ``s`` sees positions ``p <= seq_len - Sq + s``. Needs
      ``seq_len >= Sq`` unless ``seq_len == 0``. ``causal=False``: every query sees all ``seq_len`` keys.
    * ``window``, ``sinks`` as in :func:`mla_prefill`.
    * ``topk_indices`` int32 ``[B, Sq, topk]``: logical key positions within the sequence (not cache
      slots); ``-1`` pads, entries outside ``[0, seq_len)`` are ignored, duplicates count once; intersected
      with the causal / window masks.

    Returns ``(out, lse)``: ``out`` ``[B, Sq, Hq, head_dim_v]`` in q's dtype, ``lse`` float32 ``[B, Sq, Hq]``
    (natural log, sink excluded; note FlashMLA's lse layout is ``[B, Hq, Sq]``). An empty sequence or a
    query attending no key gives ``out = 0``, ``lse = -inf``.

    Value checks: ``0 <= seq_lens <= max_blocks * block_size``, used block ids in ``[0, num_blocks)``,
    ``seq_len >= Sq`` (or 0) when causal.
    Tolerance: :data:`MLA_TOLERANCE` with ``n = attention_error_n(q, keys, ...)`` over the used keys, and
    ``magnitude`` = the same attention (same keys, masks, sinks) over values ``|key[:head_dim_v]|``, e.g.
    :func:`mla_prefill` on the gathered keys (``cu_seqlens_q = Sq * arange(B + 1)``, ``cu_seqlens_k`` =
    cumulative ``seq_lens``, ``v = |keys[..., :head_dim_v]|``), which is this op's dense equivalent.
    """
    op = "mla_decode"
    check_tensor(op, "q", q, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor(op, "kv_cache", kv_cache, ndim=3, dtypes=(q.dtype,))
    check_tensor(op, "block_table", block_table, ndim=2, dtypes=(torch.int32,))
    check_tensor(op, "seq_lens", seq_lens, ndim=1, dtypes=(torch.int32,))
    if topk_indices is not None:
        check_tensor(op, "topk_indices", topk_indices, ndim=3, dtypes=(torch.int32,))
    device = check_same_device(
        op, q=q, kv_cache=kv_cache, block_table=block_table, seq_lens=seq_lens, sinks=sinks, topk_indices=topk_indices
    )
    b, sq, hq, d = q.shape
    block_size = kv_cache.shape[1]
    check(sq >= 1 and hq >= 1 and d >= 1, op, "q", "shape [B, Sq >= 1, Hq >= 1, D >= 1]", f"shape {tuple(q.shape)}")
    check(
        kv_cache.shape[2] == d and block_size >= 1,
        op,
        "kv_cache",
        f"shape [num_blocks, block_size >= 1, D={d}] (q's head dim)",
        f"shape {tuple(kv_cache.shape)}",
    )
    check(
        block_table.shape[0] == b, op, "block_table", f"shape [B={b}, max_blocks]", f"shape {tuple(block_table.shape)}"
    )
    check(seq_lens.shape[0] == b, op, "seq_lens", f"shape [B={b}]", f"shape {tuple(seq_lens.shape)}")
    check(is_int(head_dim_v) and 1 <= head_dim_v <= d, op, "head_dim_v", f"an int in [1, D={d}]", repr(head_dim_v))
    if topk_indices is not None:
        check(
            tuple(topk_indices.shape[:2]) == (b, sq),
            op,
            "topk_indices",
            f"shape [B={b}, Sq={sq}, topk]",
            f"shape {tuple(topk_indices.shape)}",
        )
    _check_common(op, hq, softmax_scale, causal, sinks, window)
    return Request(device, _features(q.dtype, causal, sinks, window, topk_indices))


@mla_decode.value_checks
def _mla_decode_values(q, kv_cache, block_table, seq_lens, *, causal=True, **_):
    checked_pages(kv_cache, block_table, seq_lens.tolist(), q.shape[1], causal)


def checked_pages(
    kv_cache: torch.Tensor, block_table: torch.Tensor, lengths: List[int], sq: int, causal: bool
) -> List[List[int]]:
    """:func:`mla_decode`'s value checks, reading the block table once: the ids of the blocks holding each
    sequence's first ``lengths[b]`` keys (``seq_lens`` read into a list), checked by
    :func:`check_sequence_pages`; for implementations that read them anyway."""
    block_size = kv_cache.shape[1]
    table = block_table[:, : used_blocks(max(lengths, default=0), block_size)].tolist()
    pages = [ids[: used_blocks(n, block_size)] for ids, n in zip(table, lengths)]
    for ids, n in zip(pages, lengths):
        check_sequence_pages(n, ids, block_table.shape[1], kv_cache, sq, causal)
    return pages


def used_blocks(length: int, block_size: int) -> int:
    """How many pages of ``block_size`` slots a sequence of ``length`` tokens uses (0 for length <= 0)."""
    return -(-max(length, 0) // block_size)


def check_sequence_pages(
    length: int, used_ids: List[int], max_blocks: int, kv_cache: torch.Tensor, sq: int, causal: bool
) -> None:
    """The value checks of one sequence of :func:`mla_decode` (its length and the block ids of its used pages):
    also for implementations that read these values anyway."""
    op = "mla_decode"
    capacity = max_blocks * kv_cache.shape[1]
    check(0 <= length <= capacity, op, "seq_lens", f"lengths in [0, max_blocks * block_size = {capacity}]", length)
    check(
        not causal or length == 0 or length >= sq,
        op,
        "seq_lens",
        f"lengths >= Sq = {sq} (the new tokens are in the cache) or 0, when causal",
        length,
    )
    num_blocks = kv_cache.shape[0]
    if used_ids and not (0 <= min(used_ids) and max(used_ids) < num_blocks):  # the ids listed only on failure
        bad = sorted({i for i in used_ids if not 0 <= i < num_blocks})
        raise InvalidArgumentError(
            op, "block_table", f"used block ids in [0, num_blocks = {num_blocks})", f"ids {bad[:8]}"
        )


def gather_paged_keys(kv_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
    """The keys of each sequence as a dense ``[B, Lmax, D]`` tensor, zeros past ``seq_len`` (only used
    blocks and slots are read: the rest may hold garbage)."""
    b = block_table.shape[0]
    block_size = kv_cache.shape[1]
    lens = seq_lens.to(torch.int64)
    length = int(lens.max()) if b else 0
    pos = torch.arange(length, device=kv_cache.device)
    present = pos[None, :] < lens[:, None]
    blocks = block_table[:, pos // block_size].to(torch.int64)
    blocks = torch.where(present, blocks, torch.zeros_like(blocks))  # unused entries may hold anything
    keys = kv_cache[blocks, (pos % block_size)[None, :].expand(b, length)]
    return keys.masked_fill(~present[..., None], 0)


@mla_decode.reference
def _mla_decode_reference(
    q,
    kv_cache,
    block_table,
    seq_lens,
    *,
    softmax_scale,
    head_dim_v=512,
    causal=True,
    sinks=None,
    window=None,
    topk_indices=None,
    compute_dtype=torch.float32,
):
    keys = gather_paged_keys(kv_cache, block_table, seq_lens)
    allowed = attended_keys(seq_lens, q.shape[1], keys.shape[1], causal, window, topk_indices)
    k = keys[:, :, None, :]  # one kv head shared by all query heads
    out, lse = _attend(q, k, k[..., :head_dim_v], allowed, softmax_scale, sinks, compute_dtype)
    return result(out, q.dtype, compute_dtype), result(lse, torch.float32, compute_dtype)


# --------------------------------------------------------------------------- paged_cache_write


@contract(family="mla", axes={"dtype": _DTYPES}, tolerance={d: Tolerance(rtol=0.0) for d in _DTYPES})
def paged_cache_write(kv_cache: torch.Tensor, kv: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """**MUTATES ``kv_cache`` IN PLACE** (the only HAL operator that writes into an argument); returns None.

    Writes the latent KV of ``T`` new tokens into the paged cache:
    ``kv_cache.view(-1, D)[slot_mapping[i]] = kv[i]`` for every ``i`` with ``slot_mapping[i] != -1``
    (``-1`` = skip, e.g. padding tokens). A slot is ``block_id * block_size + offset``.

    * ``kv_cache`` ``[num_blocks, block_size, D]`` bf16/fp16/fp32, contiguous (it is written through a flat
      view).
    * ``kv`` ``[T, D]`` in kv_cache's dtype (no conversion: written bit-exactly).
    * ``slot_mapping`` int32/int64 ``[T]``, values in ``[-1, num_blocks * block_size)``; the non-negative
      slots must be distinct (two writes to one slot would race on a parallel device). Value-checked.

    Everything outside the addressed slots is left untouched. Exact: tolerance 0.
    """
    op = "paged_cache_write"
    check_tensor(op, "kv_cache", kv_cache, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor(op, "kv", kv, ndim=2, dtypes=(kv_cache.dtype,))
    check_tensor(op, "slot_mapping", slot_mapping, ndim=1, dtypes=INDEX_DTYPES)
    device = check_same_device(op, kv_cache=kv_cache, kv=kv, slot_mapping=slot_mapping)
    check(
        kv_cache.is_contiguous(),
        op,
        "kv_cache",
        "a contiguous tensor (written in place through a flat view)",
        f"strides {kv_cache.stride()}",
    )
    d = kv_cache.shape[2]
    check(kv.shape[1] == d, op, "kv", f"shape [T, D={d}] (kv_cache's last dim)", f"shape {tuple(kv.shape)}")
    check(
        slot_mapping.shape[0] == kv.shape[0],
        op,
        "slot_mapping",
        f"shape [T={kv.shape[0]}] (one slot per row of kv)",
        f"shape {tuple(slot_mapping.shape)}",
    )
    return Request(device, (("dtype", dtype_name(kv_cache.dtype)),))


@paged_cache_write.value_checks
def _paged_cache_write_values(kv_cache, kv, slot_mapping):
    op = "paged_cache_write"
    if not slot_mapping.numel():
        return
    capacity = kv_cache.shape[0] * kv_cache.shape[1]
    lo, hi = (int(v) for v in torch.aminmax(slot_mapping))
    check(
        lo >= -1 and hi < capacity,
        op,
        "slot_mapping",
        f"slots in [-1, num_blocks * block_size = {capacity})",
        f"values in [{lo}, {hi}]",
    )
    if slot_mapping.numel() > 1:  # one slot (a decode step) is distinct by itself
        slots = slot_mapping[slot_mapping >= 0]
        check(
            torch.unique(slots).numel() == slots.numel(),
            op,
            "slot_mapping",
            "distinct slots (-1 aside)",
            "a slot written twice",
        )


@paged_cache_write.reference
def _paged_cache_write_reference(kv_cache, kv, slot_mapping, *, compute_dtype=torch.float32):
    del compute_dtype  # a copy: no arithmetic
    keep = slot_mapping >= 0
    if not bool(keep.all()):  # -1 slots (padding) skipped
        slot_mapping, kv = slot_mapping[keep], kv[keep]
    kv_cache.view(-1, kv_cache.shape[2]).index_copy_(0, slot_mapping.to(torch.int64), kv)  # distinct slots
    return None
