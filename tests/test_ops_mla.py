"""MLA / latent attention contracts: ragged prefill, paged absorbed decode, paged cache writes.

Semantics are checked against an independent loop transcription of the math (float64), decode against
prefill over the same keys laid out densely, the absorbed decode against the naive (decompressed) MLA,
and the public ops (CPU backend) against the float64 oracle under the contract's tolerance.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import hal
from hal.numerics import assert_within, compare

PREFILL = hal.ops.mla_prefill
DECODE = hal.ops.mla_decode
WRITE = hal.ops.paged_cache_write
TOL = hal.ops.mla.MLA_TOLERANCE
F64 = torch.float64
INF = float("inf")


def cumulative(lengths):
    return torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32)


# --------------------------------------------------------------------------- independent statement


def naive_attention(q, k, v, cu_q, cu_k, scale, causal=True, window=None, topk=None, sinks=None):
    """A loop transcription of the contract, in float64: for every query, list the keys it attends
    (bottom-right causal, window, top-k membership), then softmax with the sink as an extra logit column
    that carries no value. lse excludes the sink."""
    q, k, v = q.double(), k.double(), v.double()
    tq, hq, _ = q.shape
    group = hq // k.shape[1]
    out = torch.zeros(tq, hq, v.shape[2], dtype=F64)
    lse = torch.full((tq, hq), -INF, dtype=F64)
    cq = cu_q.tolist()
    ck = cq if cu_k is None else cu_k.tolist()
    for b in range(len(cq) - 1):
        lq, lk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        for i in range(lq):
            t = cq[b] + i
            keys = []
            for j in range(lk):
                if causal and not j <= lk - lq + i:
                    continue
                if window is not None and not j > lk - lq + i - window:
                    continue
                if topk is not None and j not in topk[t].tolist():
                    continue
                keys.append(ck[b] + j)
            if not keys:
                continue
            for h in range(hq):
                kh = h // group
                logits = [scale * float(q[t, h] @ k[j, kh]) for j in keys]
                columns = logits + ([float(sinks[h])] if sinks is not None else [])
                m = max(columns)
                weights = [math.exp(c - m) for c in columns]
                z = sum(weights)
                out[t, h] = sum(w / z * v[j, kh] for w, j in zip(weights, keys))
                lse[t, h] = m + math.log(sum(weights[: len(keys)]))
    return out, lse


def prefill_inputs(
    dtype=torch.float32, lens_q=(3, 0, 5, 3), lens_k=(3, 2, 7, 1), hq=4, hk=2, dqk=12, dv=8, topk=5, seed=0
):
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(lens_q), sum(lens_k)
    q = torch.randn(tq, hq, dqk, generator=g).to(dtype)
    k = torch.randn(tk, hk, dqk, generator=g).to(dtype)
    v = torch.randn(tk, hk, dv, generator=g).to(dtype)
    # per query: positions in [-1, lk + 1]: -1 padding, out-of-range entries and duplicates included
    idx = torch.cat([torch.randint(-1, lk + 2, (lq, topk), generator=g) for lq, lk in zip(lens_q, lens_k)])
    sinks = torch.randn(hq, generator=g)
    return q, k, v, cumulative(lens_q), cumulative(lens_k), idx.to(torch.int32), sinks


def magnitude_prefill(q, k, v, cu_q, cu_k, **kw):
    return PREFILL.reference_impl(q, k, v.abs(), cu_q, cu_k, compute_dtype=F64, **kw)[0]


# --------------------------------------------------------------------------- prefill semantics


@pytest.mark.parametrize(
    "causal, window, sparse, sink", list(itertools.product((True, False), (None, 2), (False, True), (False, True)))
)
def test_prefill_reference_matches_naive_loop(causal, window, sparse, sink):
    q, k, v, cu_q, cu_k, idx, sinks = prefill_inputs()
    kw = dict(
        softmax_scale=0.3,
        causal=causal,
        window=window,
        topk_indices=idx if sparse else None,
        sinks=sinks if sink else None,
    )
    out, lse = PREFILL.reference_impl(q, k, v, cu_q, cu_k, compute_dtype=F64, **kw)
    assert out.dtype == F64 and lse.dtype == F64
    exp_out, exp_lse = naive_attention(
        q, k, v, cu_q, cu_k, 0.3, causal, window, idx if sparse else None, sinks if sink else None
    )
    torch.testing.assert_close(out, exp_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, exp_lse, rtol=1e-12, atol=1e-12)


def test_prefill_hand_computed_softmax_lse_and_sink():
    # logits 0 and ln 3 -> p = 1/4, 3/4; out = 4/4 + 8*3/4 = 7; lse = ln 4; a sink of ln 4 halves out
    q = torch.ones(1, 1, 1)
    k = torch.tensor([0.0, math.log(3)]).view(2, 1, 1)
    v = torch.tensor([4.0, 8.0]).view(2, 1, 1)
    cu_q, cu_k = cumulative([1]), cumulative([2])
    out, lse = PREFILL(q, k, v, cu_q, cu_k, softmax_scale=1.0)
    assert out.shape == (1, 1, 1) and lse.shape == (1, 1) and lse.dtype == torch.float32
    assert out.item() == pytest.approx(7.0, rel=1e-6) and lse.item() == pytest.approx(math.log(4), rel=1e-6)
    out_s, lse_s = PREFILL(q, k, v, cu_q, cu_k, softmax_scale=1.0, sinks=torch.tensor([math.log(4)]))
    assert out_s.item() == pytest.approx(3.5, rel=1e-6)
    assert lse_s.item() == lse.item(), "the returned lse excludes the sink"


def test_prefill_causal_is_bottom_right_aligned():
    # 2 queries, 4 keys: query 0 sees keys 0..2, query 1 sees 0..3 (they are the last two positions)
    q = torch.zeros(2, 1, 4)
    k = torch.randn(4, 1, 4)
    v = torch.arange(4.0).view(4, 1, 1)
    out, lse = PREFILL(q, k, v, cumulative([2]), cumulative([4]), softmax_scale=1.0)
    assert out[:, 0, 0].tolist() == pytest.approx([1.0, 1.5])  # zero logits: plain averages
    assert lse[:, 0].tolist() == pytest.approx([math.log(3), math.log(4)])


def test_prefill_query_without_keys_gives_zero_and_minus_inf():
    q, k, v, cu_q, cu_k, idx, sinks = prefill_inputs()
    out, lse = PREFILL(q, k, v, cu_q, cu_k, softmax_scale=0.3, sinks=sinks)
    # last sequence: 3 queries, 1 key -> queries 0 and 1 (lk - lq + i < 0) see nothing
    assert torch.all(out[-3:-1] == 0) and torch.all(lse[-3:-1] == -INF)
    assert torch.isfinite(lse[-1]).all()
    none = torch.full_like(idx, -1)
    out, lse = PREFILL(q, k, v, cu_q, cu_k, softmax_scale=0.3, topk_indices=none)
    assert torch.all(out == 0) and torch.all(lse == -INF)


def test_prefill_without_cu_seqlens_k_uses_q_offsets_and_mha():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(7, 3, 8, generator=g) for _ in range(3))
    cu = cumulative([4, 3])
    out, lse = PREFILL(q, k, v, cu, softmax_scale=0.5)
    exp_out, exp_lse = naive_attention(q, k, v, cu, None, 0.5)
    torch.testing.assert_close(out.double(), exp_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse.double(), exp_lse, rtol=1e-5, atol=1e-6)


def test_prefill_window_one_attends_own_position_only():
    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(5, 2, 6, generator=g), torch.randn(5, 1, 6, generator=g), torch.randn(5, 1, 3, generator=g)
    out, lse = PREFILL(q, k, v, cumulative([5]), softmax_scale=0.7, window=1)
    torch.testing.assert_close(out, v.expand(5, 2, 3))
    torch.testing.assert_close(lse, 0.7 * torch.einsum("thd,td->th", q, k[:, 0]))


def test_prefill_topk_selects_exactly_the_listed_keys():
    g = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(1, 2, 8, generator=g), torch.randn(6, 1, 8, generator=g), torch.randn(6, 1, 4, generator=g)
    idx = torch.tensor([[4, -1, 1, 4, 9, -1]], dtype=torch.int32)  # keys {1, 4}: padding, duplicate, >= lk
    out, lse = PREFILL(q, k, v, cumulative([1]), cumulative([6]), softmax_scale=0.4, causal=False, topk_indices=idx)
    sel = torch.tensor([1, 4])
    ref_out, ref_lse = PREFILL(q, k[sel], v[sel], cumulative([1]), cumulative([2]), softmax_scale=0.4, causal=False)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)


# --------------------------------------------------------------------------- paged layout helpers


def page(keys_per_seq, block_size, dtype=torch.float32, seed=0, spare_blocks=2, in_order=False):
    """Lay out each sequence's keys ``[L_b, D]`` in a paged cache with a shuffled block table (``in_order``:
    each sequence's blocks in order, after the previous sequence's, as hal.model allocates them). Unused
    cache slots hold NaN, unused block-table entries -1."""
    g = torch.Generator().manual_seed(seed)
    d = keys_per_seq[0].shape[1]
    needed = [-(-k.shape[0] // block_size) for k in keys_per_seq]
    total = sum(needed) + spare_blocks
    order = list(range(total - 1, -1, -1)) if in_order else torch.randperm(total, generator=g).tolist()
    cache = torch.full((total, block_size, d), float("nan"), dtype=dtype)
    table = torch.full((len(keys_per_seq), max(needed, default=0) + 1), -1, dtype=torch.int32)
    for b, keys in enumerate(keys_per_seq):
        for i in range(needed[b]):
            blk = order.pop()
            table[b, i] = blk
            chunk = keys[i * block_size : (i + 1) * block_size]
            cache[blk, : chunk.shape[0]] = chunk.to(dtype)
    lens = torch.tensor([k.shape[0] for k in keys_per_seq], dtype=torch.int32)
    return cache, table, lens


def decode_as_prefill(q, keys_per_seq, dv, topk=None):
    """The same decode problem in mla_prefill's dense ragged layout (one kv head, v = key[:dv])."""
    b, sq = q.shape[:2]
    k = torch.cat(keys_per_seq)[:, None, :]
    args = (
        q.reshape(b * sq, *q.shape[2:]),
        k,
        k[..., :dv],
        cumulative([sq] * b),
        cumulative([x.shape[0] for x in keys_per_seq]),
    )
    return args, (None if topk is None else topk.reshape(b * sq, -1))


def decode_inputs(dtype=torch.float32, lens=(4, 5, 0, 8, 3), sq=2, hq=4, d=20, seed=0, topk=6):
    g = torch.Generator().manual_seed(seed)
    keys = [torch.randn(n, d, generator=g).to(dtype) for n in lens]
    q = torch.randn(len(lens), sq, hq, d, generator=g).to(dtype)
    idx = torch.stack([torch.randint(-1, n + 2, (sq, topk), generator=g) for n in lens]).to(torch.int32)
    sinks = torch.randn(hq, generator=g)
    return q, keys, idx, sinks


# --------------------------------------------------------------------------- decode semantics


@pytest.mark.parametrize(
    "block_size, lens",
    [
        (4, (4, 5, 0, 8, 3)),  # seq_len == block_size, block_size + 1, empty, two full pages
        (4, (3, 7, 2)),  # block_size - 1, 2 * block_size - 1
        (1, (2, 3)),
        (16, (2, 16, 17)),
    ],
)
@pytest.mark.parametrize(
    "causal, window, sparse, sink",
    [
        (True, None, False, False),
        (False, None, False, False),
        (True, 3, False, True),
        (True, None, True, False),
        (False, 2, True, True),
    ],
)
def test_paged_decode_equals_dense_prefill(block_size, lens, causal, window, sparse, sink):
    q, keys, idx, sinks = decode_inputs(lens=lens)
    cache, table, seq_lens = page(keys, block_size)
    kw = dict(softmax_scale=0.25, causal=causal, window=window, sinks=sinks if sink else None)
    out, lse = DECODE.reference_impl(
        q, cache, table, seq_lens, head_dim_v=16, compute_dtype=F64, topk_indices=idx if sparse else None, **kw
    )
    assert out.shape == (len(lens), 2, 4, 16) and lse.shape == (len(lens), 2, 4)
    args, topk = decode_as_prefill(q, keys, 16, idx if sparse else None)
    exp_out, exp_lse = naive_attention(
        *args, scale=0.25, causal=causal, window=window, topk=topk, sinks=sinks if sink else None
    )
    torch.testing.assert_close(out.reshape(exp_out.shape), exp_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse.reshape(exp_lse.shape), exp_lse, rtol=1e-12, atol=1e-12)
    # and the public op (CPU backend, fp32) reads the pages the same way: NaN garbage never leaks
    out32, lse32 = DECODE(q, cache, table, seq_lens, head_dim_v=16, topk_indices=idx if sparse else None, **kw)
    torch.testing.assert_close(out32.double(), out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse32.double(), lse, rtol=1e-5, atol=1e-5)


def test_block_table_order_does_not_matter():
    q, keys, _, _ = decode_inputs(lens=(9, 6), sq=1)
    a = DECODE(q, *page(keys, 2, seed=1), softmax_scale=0.3, head_dim_v=8)
    b = DECODE(q, *page(keys, 2, seed=2), softmax_scale=0.3, head_dim_v=8)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def naive_mla(q_nope, q_pe, c_kv, k_pe, w_uk, w_uv, scale):
    """DeepSeek's naive MLA: decompress per-head keys / values, then ordinary causal attention."""
    h = q_nope.shape[1]
    k_nope = torch.einsum("hdc,tc->thd", w_uk, c_kv)
    k = torch.cat([k_nope, k_pe[:, None, :].expand(-1, h, -1)], dim=-1)
    v = torch.einsum("hdc,tc->thd", w_uv, c_kv)
    q = torch.cat([q_nope, q_pe], dim=-1)
    return naive_attention(q, k, v, cumulative([q.shape[0]]), cumulative([k.shape[0]]), scale)


def test_absorbed_decode_equals_naive_decompressed_mla():
    g = torch.Generator().manual_seed(7)
    h, r, dr, dn, dv, t, sq = 2, 512, 64, 128, 128, 9, 2  # DeepSeek's dims: keys 512 + 64 = 576 wide
    c_kv = torch.randn(t, r, generator=g, dtype=F64)
    k_pe = torch.randn(t, dr, generator=g, dtype=F64)
    w_uk = torch.randn(h, dn, r, generator=g, dtype=F64) / r**0.5
    w_uv = torch.randn(h, dv, r, generator=g, dtype=F64) / r**0.5
    q_nope = torch.randn(sq, h, dn, generator=g, dtype=F64)
    q_pe = torch.randn(sq, h, dr, generator=g, dtype=F64)
    mscale = 0.1 * math.log(40) + 1.0
    scale = (dn + dr) ** -0.5 * mscale**2
    exp_out, exp_lse = naive_mla(q_nope, q_pe, c_kv, k_pe, w_uk, w_uv, scale)

    q_abs = torch.cat([torch.einsum("shd,hdc->shc", q_nope, w_uk), q_pe], dim=-1)[None]  # [1, Sq, H, 576]
    latent = torch.cat([c_kv, k_pe], dim=-1)
    # the math, exactly: the float64 reference on float64 data
    cache, table, lens = page([latent], 4, dtype=F64)
    out_lat, lse = DECODE.reference_impl(q_abs, cache, table, lens, softmax_scale=scale, compute_dtype=F64)
    out = torch.einsum("shc,hdc->shd", out_lat[0], w_uv)
    torch.testing.assert_close(out, exp_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse[0], exp_lse, rtol=1e-10, atol=1e-10)
    # the public op on fp32 operands (default head_dim_v=512)
    cache32, table32, lens32 = page([latent.float()], 64)
    out_lat32, lse32 = DECODE(q_abs.float(), cache32, table32, lens32, softmax_scale=scale)
    assert out_lat32.shape == (1, sq, h, 512)
    out32 = torch.einsum("shc,hdc->shd", out_lat32[0].double(), w_uv)
    torch.testing.assert_close(out32, exp_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse32[0].double(), exp_lse, rtol=1e-5, atol=1e-4)


def test_decode_multi_token_causal_equals_one_token_decodes_of_prefixes():
    # query s of Sq=3 over seq_len 7 is a single-token decode over the first 7 - 3 + s + 1 keys
    q, keys, _, _ = decode_inputs(lens=(7, 5), sq=3)
    cache, table, lens = page(keys, 4)
    out, lse = DECODE(q, cache, table, lens, softmax_scale=0.3, head_dim_v=16)
    for s in range(3):
        prefix = lens - 3 + s + 1
        o, l_ = DECODE(
            q[:, s : s + 1].contiguous(), cache, table, prefix.to(torch.int32), softmax_scale=0.3, head_dim_v=16
        )
        torch.testing.assert_close(out[:, s : s + 1], o, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(lse[:, s : s + 1], l_, rtol=1e-6, atol=1e-6)


def test_decode_window_one_sees_its_own_position_only():
    q, keys, _, _ = decode_inputs(lens=(6, 4), sq=2)
    cache, table, lens = page(keys, 4)
    out, lse = DECODE(q, cache, table, lens, softmax_scale=0.3, head_dim_v=16, window=1)
    for b, n in enumerate(lens.tolist()):
        for s in range(2):
            p = n - 2 + s
            torch.testing.assert_close(out[b, s], keys[b][p, :16].expand(4, 16))
            torch.testing.assert_close(lse[b, s], 0.3 * q[b, s] @ keys[b][p], rtol=1e-5, atol=1e-5)


def test_decode_window_equals_topk_of_most_recent_keys():
    q, keys, _, _ = decode_inputs(lens=(9, 3, 6), sq=2)
    cache, table, lens = page(keys, 4)
    w = 4
    last = lens[:, None] - 2 + torch.arange(2)[None]
    recent = (last[..., None] - torch.arange(w)).to(torch.int32)  # may go negative: ignored entries
    a = DECODE(q, cache, table, lens, softmax_scale=0.3, head_dim_v=16, window=w)
    b = DECODE(q, cache, table, lens, softmax_scale=0.3, head_dim_v=16, causal=False, topk_indices=recent)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    big = DECODE(q, cache, table, lens, softmax_scale=0.3, head_dim_v=16, window=100)
    plain = DECODE(q, cache, table, lens, softmax_scale=0.3, head_dim_v=16)
    torch.testing.assert_close(big, plain, rtol=0, atol=0)


def test_decode_sinks_are_an_extra_softmax_column_without_value():
    q, keys, _, sinks = decode_inputs(lens=(5, 8), sq=1)
    cache, table, lens = page(keys, 4)
    out, lse = DECODE(q, cache, table, lens, softmax_scale=0.3, head_dim_v=16, sinks=sinks)
    plain_out, plain_lse = DECODE(q, cache, table, lens, softmax_scale=0.3, head_dim_v=16)
    torch.testing.assert_close(lse, plain_lse, rtol=0, atol=0)
    for b, n in enumerate(lens.tolist()):
        logits = 0.3 * torch.einsum("hd,td->ht", q[b, 0].double(), keys[b].double())
        full = torch.softmax(torch.cat([logits, sinks.double()[:, None]], dim=1), dim=1)  # [H, n + 1]
        expected = full[:, :n] @ keys[b][:, :16].double()
        torch.testing.assert_close(out[b, 0].double(), expected, rtol=1e-5, atol=1e-6)


def test_decode_sparse_topk_with_padding_duplicates_and_out_of_range():
    q, keys, _, _ = decode_inputs(lens=(8, 5), sq=1)
    cache, table, lens = page(keys, 4)
    idx = torch.tensor([[[6, -1, 2, 6, 11, -1]], [[-1, -1, -1, -1, 4, 5]]], dtype=torch.int32)
    out, lse = DECODE(q, cache, table, lens, softmax_scale=0.3, head_dim_v=16, causal=False, topk_indices=idx)
    for b, chosen in enumerate(([2, 6], [4])):
        sub = keys[b][chosen]
        o, l_ = DECODE(q[b : b + 1], *page([sub], 4), softmax_scale=0.3, head_dim_v=16, causal=False)
        torch.testing.assert_close(out[b : b + 1], o, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(lse[b : b + 1], l_, rtol=1e-6, atol=1e-6)
    empty = torch.full_like(idx, -1)
    out, lse = DECODE(q, cache, table, lens, softmax_scale=0.3, head_dim_v=16, topk_indices=empty)
    assert torch.all(out == 0) and torch.all(lse == -INF)


def test_decode_sparse_is_intersected_with_causal():
    q, keys, _, _ = decode_inputs(lens=(6,), sq=2)
    cache, table, lens = page(keys, 4)
    idx = torch.tensor([[[0, 5], [0, 5]]], dtype=torch.int32)  # position 5 is in query 0's future
    out, _ = DECODE(q, cache, table, lens, softmax_scale=0.3, head_dim_v=16, topk_indices=idx)
    torch.testing.assert_close(out[0, 0], keys[0][0, :16].expand(4, 16))
    only = DECODE(q[:, 1:], *page([keys[0][[0, 5]]], 4), softmax_scale=0.3, head_dim_v=16, causal=False)[0]
    torch.testing.assert_close(out[:, 1:], only, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("causal", [True, False])
def test_decode_empty_sequences_give_zero_and_minus_inf(causal):
    q, keys, _, sinks = decode_inputs(lens=(0, 3, 0), sq=1)
    cache, table, lens = page(keys, 4)
    table[0] = 7  # never read: no used block
    out, lse = DECODE(q, cache, table, lens, softmax_scale=0.3, head_dim_v=16, causal=causal, sinks=sinks)
    assert torch.all(out[[0, 2]] == 0) and torch.all(lse[[0, 2]] == -INF)
    assert torch.isfinite(out[1]).all() and torch.isfinite(lse[1]).all()
    q, keys, _, _ = decode_inputs(lens=(0, 0), sq=1)
    out, lse = DECODE(
        q,
        torch.zeros(0, 4, q.shape[-1]),
        torch.zeros(2, 0, dtype=torch.int32),
        torch.zeros(2, dtype=torch.int32),
        softmax_scale=0.3,
        head_dim_v=16,
        causal=causal,
    )
    assert out.shape == (2, 1, 4, 16) and torch.all(out == 0) and torch.all(lse == -INF)


def test_decode_and_prefill_do_not_mutate_inputs():
    q, keys, idx, sinks = decode_inputs()
    cache, table, lens = page(keys, 4)
    cache = torch.nan_to_num(cache)
    before = [t.clone() for t in (q, cache, table, lens, idx, sinks)]
    DECODE(q, cache, table, lens, softmax_scale=0.3, head_dim_v=16, topk_indices=idx, sinks=sinks)
    for a, b in zip(before, (q, cache, table, lens, idx, sinks)):
        assert torch.equal(a, b)
    args = prefill_inputs()
    before = [t.clone() for t in args]
    PREFILL(*args[:5], softmax_scale=0.3, topk_indices=args[5], sinks=args[6])
    for a, b in zip(before, args):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- tolerance vs the float64 oracle

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("features", [dict(), dict(window=3, sinks=True, sparse=True), dict(causal=False, sinks=True)])
def test_prefill_within_tolerance_of_oracle(dtype, features):
    q, k, v, cu_q, cu_k, idx, sinks = prefill_inputs(
        dtype, lens_q=(9, 1, 0, 6), lens_k=(9, 12, 3, 6), hq=8, hk=2, dqk=24, dv=16, seed=11
    )
    kw = dict(
        softmax_scale=24**-0.5,
        causal=features.get("causal", True),
        window=features.get("window"),
        sinks=sinks if features.get("sinks") else None,
        topk_indices=idx if features.get("sparse") else None,
    )
    out, lse = PREFILL(q, k, v, cu_q, cu_k, **kw)
    assert out.dtype == dtype and lse.dtype == torch.float32 and out.shape == (16, 8, 16)
    exact_out, exact_lse = PREFILL.reference_impl(q, k, v, cu_q, cu_k, compute_dtype=F64, **kw)
    n = hal.ops.mla.attention_error_n(q, k, softmax_scale=kw["softmax_scale"], num_keys=12)
    assert_within(
        out, exact_out, TOL[str(dtype)[6:]], n=n, magnitude=magnitude_prefill(q, k, v, cu_q, cu_k, **kw), what="out"
    )
    assert_within(lse, exact_lse, TOL["lse"], n=n, magnitude=torch.ones_like(exact_lse), what="lse")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("features", [dict(), dict(window=4, sinks=True, sparse=True)])
def test_decode_within_tolerance_of_oracle(dtype, features):
    q, keys, idx, sinks = decode_inputs(dtype, lens=(11, 0, 4, 17), sq=2, hq=8, d=72, seed=12)
    cache, table, lens = page(keys, 8, dtype=dtype)
    kw = dict(
        softmax_scale=72**-0.5,
        head_dim_v=64,
        window=features.get("window"),
        sinks=sinks if features.get("sinks") else None,
        topk_indices=idx if features.get("sparse") else None,
    )
    out, lse = DECODE(q, cache, table, lens, **kw)
    assert out.dtype == dtype and out.shape == (4, 2, 8, 64) and lse.shape == (4, 2, 8)
    exact_out, exact_lse = DECODE.reference_impl(q, cache, table, lens, compute_dtype=F64, **kw)
    args, topk = decode_as_prefill(q, keys, 64, kw.pop("topk_indices"))
    kw.pop("head_dim_v")
    magnitude = PREFILL.reference_impl(
        args[0], args[1], args[2].abs(), *args[3:], topk_indices=topk, compute_dtype=F64, **kw
    )[0].reshape(exact_out.shape)
    n = hal.ops.mla.attention_error_n(q, torch.cat(keys), softmax_scale=kw["softmax_scale"], num_keys=17)
    assert_within(out, exact_out, TOL[str(dtype)[6:]], n=n, magnitude=magnitude, what="out")
    assert_within(lse, exact_lse, TOL["lse"], n=n, magnitude=torch.ones_like(exact_lse), what="lse")


def test_tolerance_catches_wrong_mask_and_wrong_scale():
    q, k, v, cu_q, cu_k, _, _ = prefill_inputs(
        torch.float32, lens_q=(9, 6), lens_k=(9, 12), hq=8, hk=2, dqk=24, dv=16, seed=11
    )
    exact_out, exact_lse = PREFILL.reference_impl(q, k, v, cu_q, cu_k, softmax_scale=0.2, compute_dtype=F64)
    n = hal.ops.mla.attention_error_n(q, k, softmax_scale=0.2, num_keys=12)
    mag = magnitude_prefill(q, k, v, cu_q, cu_k, softmax_scale=0.2)
    for wrong in (
        dict(softmax_scale=0.2, causal=False),
        dict(softmax_scale=0.2 * 1.01),
        dict(softmax_scale=0.2, window=8),
    ):
        out, lse = PREFILL(q, k, v, cu_q, cu_k, **wrong)
        assert not compare(out, exact_out, TOL["float32"], n=n, magnitude=mag).ok, wrong
    out, lse = PREFILL(q, k, v, cu_q, cu_k, softmax_scale=0.2)
    assert compare(out, exact_out, TOL["float32"], n=n, magnitude=mag).ok


def test_error_n_grows_with_keys_scale_and_low_precision_probabilities():
    q, k = torch.ones(2, 4), torch.ones(3, 4)
    base = hal.ops.mla.attention_error_n(q, k, softmax_scale=0.5, num_keys=3)
    assert base == pytest.approx(5 * 3 + 3 * 13 * (0.5 * 2 * 2) + 32)
    assert hal.ops.mla.attention_error_n(q.bfloat16(), k.bfloat16(), softmax_scale=0.5, num_keys=3) == base + 2**16
    assert hal.ops.mla.attention_error_n(q, k, softmax_scale=1.0, num_keys=30) > base


# --------------------------------------------------------------------------- paged_cache_write


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_cache_write_round_trip_with_skipped_slots(dtype, slot_dtype):
    g = torch.Generator().manual_seed(8)
    cache = torch.randn(3, 4, 6, generator=g).to(dtype)
    kv = torch.randn(5, 6, generator=g).to(dtype)
    slots = torch.tensor([7, -1, 0, 11, -1], dtype=slot_dtype)
    before = cache.clone()
    assert WRITE(cache, kv, slots) is None
    flat, old = cache.view(-1, 6), before.view(-1, 6)
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(flat[s], kv[i])
    untouched = torch.ones(12, dtype=torch.bool)
    untouched[[7, 0, 11]] = False
    assert torch.equal(flat[untouched], old[untouched])


def test_cache_write_then_decode_equals_dense_attention():
    g = torch.Generator().manual_seed(9)
    block_size, lens = 4, [5, 8, 1]
    keys = [torch.randn(n, 20, generator=g) for n in lens]
    cache = torch.zeros(7, block_size, 20)
    table = torch.full((3, 3), -1, dtype=torch.int32)
    free = [6, 2, 0, 5, 3, 1, 4]
    slots = []
    for b, n in enumerate(lens):
        for i in range(-(-n // block_size)):
            table[b, i] = free.pop()
        slots += [int(table[b, p // block_size]) * block_size + p % block_size for p in range(n)]
    kv = torch.cat(keys)
    WRITE(cache, torch.cat([kv, kv[:2]]), torch.tensor(slots + [-1, -1]))  # two padding tokens
    q = torch.randn(3, 1, 4, 20, generator=g)
    out, lse = DECODE(q, cache, table, torch.tensor(lens, dtype=torch.int32), softmax_scale=0.3, head_dim_v=16)
    args, _ = decode_as_prefill(q, keys, 16)
    exp_out, exp_lse = naive_attention(*args, scale=0.3)
    torch.testing.assert_close(out.reshape(exp_out.shape).double(), exp_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse.reshape(exp_lse.shape).double(), exp_lse, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- validation errors


def _prefill_args(**change):
    q, k, v, cu_q, cu_k, idx, sinks = prefill_inputs()
    args = dict(
        q=q,
        k=k,
        v=v,
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        softmax_scale=0.3,
        causal=True,
        sinks=sinks,
        window=None,
        topk_indices=idx,
    )
    args.update(change)
    return args


I32 = torch.int32


@pytest.mark.usefixtures("checked")  # value checks run in checked mode
@pytest.mark.parametrize(
    "change, argument, exc",
    [
        (dict(q=torch.randn(11, 4)), "q", hal.InvalidArgumentError),
        (dict(q=torch.randn(11, 4, 12).to(I32)), "q", hal.InvalidDtypeError),
        (dict(q=torch.randn(11, 0, 12)), "q", hal.InvalidArgumentError),
        (dict(k=torch.randn(13, 2, 12).double()), "k", hal.InvalidDtypeError),
        (dict(k=torch.randn(13, 2, 10)), "k", hal.InvalidArgumentError),
        (dict(k=torch.randn(13, 3, 12), v=torch.randn(13, 3, 8)), "k", hal.InvalidArgumentError),
        (dict(k=torch.randn(13, 12)), "k", hal.InvalidArgumentError),
        (dict(v=torch.randn(13, 2, 8).half()), "v", hal.InvalidDtypeError),
        (dict(v=torch.randn(12, 2, 8)), "v", hal.InvalidArgumentError),
        (dict(v=torch.randn(13, 1, 8)), "v", hal.InvalidArgumentError),
        (dict(cu_seqlens_q=cumulative([3, 0, 5, 3]).long()), "cu_seqlens_q", hal.InvalidDtypeError),
        (dict(cu_seqlens_q=cumulative([3, 0, 5, 3])[None]), "cu_seqlens_q", hal.InvalidArgumentError),
        (dict(cu_seqlens_q=torch.tensor([1, 3, 3, 8, 11], dtype=I32)), "cu_seqlens_q", hal.InvalidArgumentError),
        (dict(cu_seqlens_q=torch.tensor([0, 3, 2, 8, 11], dtype=I32)), "cu_seqlens_q", hal.InvalidArgumentError),
        (dict(cu_seqlens_q=torch.tensor([0, 3, 3, 8, 10], dtype=I32)), "cu_seqlens_q", hal.InvalidArgumentError),
        (dict(cu_seqlens_q=torch.zeros(0, dtype=I32)), "cu_seqlens_q", hal.InvalidArgumentError),
        (dict(cu_seqlens_k=cumulative([3, 2, 8])), "cu_seqlens_k", hal.InvalidArgumentError),
        (dict(cu_seqlens_k=cumulative([3, 2, 7, 2])), "cu_seqlens_k", hal.InvalidArgumentError),
        (dict(cu_seqlens_k=torch.tensor([0, 3, 5, 4, 13], dtype=I32)), "cu_seqlens_k", hal.InvalidArgumentError),
        (dict(cu_seqlens_k=None), "k", hal.InvalidArgumentError),  # Tk = 13 != Tq = 11
        (dict(softmax_scale=0.0), "softmax_scale", hal.InvalidArgumentError),
        (dict(softmax_scale=float("nan")), "softmax_scale", hal.InvalidArgumentError),
        (dict(softmax_scale=None), "softmax_scale", hal.InvalidArgumentError),
        (dict(softmax_scale=torch.tensor(0.3)), "softmax_scale", hal.InvalidArgumentError),
        (dict(causal=1), "causal", hal.InvalidArgumentError),
        (dict(window=0), "window", hal.InvalidArgumentError),
        (dict(window=2.0), "window", hal.InvalidArgumentError),
        (dict(window=True), "window", hal.InvalidArgumentError),
        (dict(sinks=torch.randn(3)), "sinks", hal.InvalidArgumentError),
        (dict(sinks=torch.randn(4).bfloat16()), "sinks", hal.InvalidDtypeError),
        (dict(sinks=torch.randn(4, 1)), "sinks", hal.InvalidArgumentError),
        (dict(topk_indices=torch.zeros(10, 5, dtype=I32)), "topk_indices", hal.InvalidArgumentError),
        (dict(topk_indices=torch.zeros(11, 5, dtype=torch.int64)), "topk_indices", hal.InvalidDtypeError),
        (dict(topk_indices=torch.zeros(11, 1, 5, dtype=I32)), "topk_indices", hal.InvalidArgumentError),
    ],
)
def test_prefill_bad_input_names_the_argument(change, argument, exc):
    with pytest.raises(exc, match=f"argument '{argument}'"):
        PREFILL(**_prefill_args(**change))


def test_softmax_scale_is_required():
    args = _prefill_args()
    del args["softmax_scale"]
    with pytest.raises(TypeError, match="softmax_scale"):
        PREFILL(**args)
    q, keys, _, _ = decode_inputs()
    with pytest.raises(TypeError, match="softmax_scale"):
        DECODE(q, *page(keys, 4))


def _decode_args(**change):
    q, keys, idx, sinks = decode_inputs()  # lens (4, 5, 0, 8, 3), Sq 2, Hq 4, D 20
    cache, table, lens = page(keys, 4)  # 8 blocks of 4, table [5, 3]
    args = dict(
        q=q,
        kv_cache=cache,
        block_table=table,
        seq_lens=lens,
        softmax_scale=0.3,
        head_dim_v=16,
        causal=True,
        sinks=sinks,
        window=None,
        topk_indices=idx,
    )
    args.update(change)
    return args


def _table_with(b, i, value):
    args = _decode_args()
    table = args["block_table"].clone()
    table[b, i] = value
    return table


@pytest.mark.usefixtures("checked")  # value checks run in checked mode
@pytest.mark.parametrize(
    "change, argument, exc",
    [
        (dict(q=torch.randn(5, 4, 20)), "q", hal.InvalidArgumentError),
        (dict(q=torch.randn(5, 0, 4, 20)), "q", hal.InvalidArgumentError),
        (dict(q=torch.randn(5, 2, 4, 20).to(I32)), "q", hal.InvalidDtypeError),
        (dict(kv_cache=torch.randn(8, 4, 20).bfloat16()), "kv_cache", hal.InvalidDtypeError),
        (dict(kv_cache=torch.randn(8, 4, 18)), "kv_cache", hal.InvalidArgumentError),
        (dict(kv_cache=torch.randn(8, 4, 1, 20)), "kv_cache", hal.InvalidArgumentError),
        (dict(kv_cache=torch.randn(8, 0, 20)), "kv_cache", hal.InvalidArgumentError),
        (dict(block_table=torch.zeros(5, 3, dtype=torch.int64)), "block_table", hal.InvalidDtypeError),
        (dict(block_table=torch.zeros(4, 3, dtype=I32)), "block_table", hal.InvalidArgumentError),
        (dict(block_table=torch.zeros(15, dtype=I32)), "block_table", hal.InvalidArgumentError),
        (dict(block_table=_table_with(1, 1, -1)), "block_table", hal.InvalidArgumentError),  # used block -1
        (dict(block_table=_table_with(3, 0, 8)), "block_table", hal.InvalidArgumentError),  # == num_blocks
        (dict(seq_lens=torch.tensor([4, 5, 0, 8], dtype=I32)), "seq_lens", hal.InvalidArgumentError),
        (dict(seq_lens=torch.tensor([4, 5, 0, 8, 3])), "seq_lens", hal.InvalidDtypeError),
        (dict(seq_lens=torch.tensor([4, 5, -1, 8, 3], dtype=I32)), "seq_lens", hal.InvalidArgumentError),
        (dict(seq_lens=torch.tensor([4, 5, 0, 13, 3], dtype=I32)), "seq_lens", hal.InvalidArgumentError),  # > 3 * 4
        (dict(seq_lens=torch.tensor([4, 5, 0, 8, 1], dtype=I32)), "seq_lens", hal.InvalidArgumentError),  # < Sq
        (dict(head_dim_v=21), "head_dim_v", hal.InvalidArgumentError),
        (dict(head_dim_v=0), "head_dim_v", hal.InvalidArgumentError),
        (dict(head_dim_v=16.0), "head_dim_v", hal.InvalidArgumentError),
        (dict(softmax_scale=-1.0), "softmax_scale", hal.InvalidArgumentError),
        (dict(causal="yes"), "causal", hal.InvalidArgumentError),
        (dict(window=-3), "window", hal.InvalidArgumentError),
        (dict(sinks=torch.randn(5)), "sinks", hal.InvalidArgumentError),
        (dict(sinks=torch.randn(4).double()), "sinks", hal.InvalidDtypeError),
        (dict(topk_indices=torch.zeros(5, 1, 6, dtype=I32)), "topk_indices", hal.InvalidArgumentError),
        (dict(topk_indices=torch.zeros(5, 2, dtype=I32)), "topk_indices", hal.InvalidArgumentError),
        (dict(topk_indices=torch.zeros(5, 2, 6)), "topk_indices", hal.InvalidDtypeError),
    ],
)
def test_decode_bad_input_names_the_argument(change, argument, exc):
    with pytest.raises(exc, match=f"argument '{argument}'"):
        DECODE(**_decode_args(**change))


def test_decode_short_sequence_is_fine_without_causal():
    args = _decode_args(seq_lens=torch.tensor([4, 5, 0, 8, 1], dtype=I32), causal=False, topk_indices=None)
    out, lse = DECODE(**args)
    assert torch.isfinite(lse[4]).all()


def test_mixed_devices_are_rejected():
    args = _decode_args(block_table=torch.zeros(5, 3, dtype=I32, device="meta"))
    with pytest.raises(hal.DeviceMismatchError, match="argument 'block_table'"):
        DECODE(**args)
    with pytest.raises(hal.DeviceMismatchError, match="argument 'v'"):
        PREFILL(**_prefill_args(v=torch.randn(13, 2, 8, device="meta")))


@pytest.mark.usefixtures("checked")  # value checks run in checked mode
@pytest.mark.parametrize(
    "cache, kv, slots, argument, exc",
    [
        (torch.zeros(3, 4, 6), torch.zeros(2, 5), torch.tensor([0, 1]), "kv", hal.InvalidArgumentError),
        (torch.zeros(3, 4, 6), torch.zeros(2, 6).half(), torch.tensor([0, 1]), "kv", hal.InvalidDtypeError),
        (torch.zeros(3, 4, 6), torch.zeros(2, 1, 6), torch.tensor([0, 1]), "kv", hal.InvalidArgumentError),
        (torch.zeros(12, 6), torch.zeros(2, 6), torch.tensor([0, 1]), "kv_cache", hal.InvalidArgumentError),
        (torch.zeros(3, 4, 6).to(I32), torch.zeros(2, 6), torch.tensor([0, 1]), "kv_cache", hal.InvalidDtypeError),
        (
            torch.zeros(3, 6, 4).transpose(1, 2),
            torch.zeros(2, 6),
            torch.tensor([0, 1]),
            "kv_cache",
            hal.InvalidArgumentError,
        ),
        (torch.zeros(3, 4, 6), torch.zeros(2, 6), torch.tensor([0.0, 1.0]), "slot_mapping", hal.InvalidDtypeError),
        (torch.zeros(3, 4, 6), torch.zeros(2, 6), torch.tensor([[0, 1]]), "slot_mapping", hal.InvalidArgumentError),
        (torch.zeros(3, 4, 6), torch.zeros(2, 6), torch.tensor([0, 1, 2]), "slot_mapping", hal.InvalidArgumentError),
        (torch.zeros(3, 4, 6), torch.zeros(2, 6), torch.tensor([0, 12]), "slot_mapping", hal.InvalidArgumentError),
        (torch.zeros(3, 4, 6), torch.zeros(2, 6), torch.tensor([-2, 1]), "slot_mapping", hal.InvalidArgumentError),
        (torch.zeros(3, 4, 6), torch.zeros(3, 6), torch.tensor([5, -1, 5]), "slot_mapping", hal.InvalidArgumentError),
    ],
)
def test_cache_write_bad_input_names_the_argument(cache, kv, slots, argument, exc):
    before = cache.clone()
    with pytest.raises(exc, match=f"argument '{argument}'"):
        WRITE(cache, kv, slots)
    assert torch.equal(cache, before), "a rejected write leaves the cache untouched"


def test_cache_write_accepts_repeated_padding_and_empty_batches():
    cache = torch.zeros(2, 2, 3)
    WRITE(cache, torch.ones(3, 3), torch.tensor([-1, 3, -1], dtype=I32))
    assert cache.view(-1, 3)[3].tolist() == [1.0, 1.0, 1.0] and cache.sum() == 3
    WRITE(cache, torch.ones(0, 3), torch.zeros(0, dtype=torch.int64))
    assert cache.sum() == 3


def test_features_reported_to_backends():
    args = _prefill_args(window=4)
    req = PREFILL.validate(**args)
    assert dict(req.features) == {
        "dtype": "float32",
        "causal": "true",
        "sinks": "true",
        "window": "true",
        "sparse": "true",
    }
    req = DECODE.validate(**_decode_args(causal=False, sinks=None, topk_indices=None))
    assert dict(req.features) == {
        "dtype": "float32",
        "causal": "false",
        "sinks": "false",
        "window": "false",
        "sparse": "false",
    }
    assert dict(WRITE.validate(torch.zeros(1, 2, 3).half(), torch.zeros(1, 3).half(), torch.tensor([0])).features) == {
        "dtype": "float16"
    }
    for op in (PREFILL, DECODE):
        assert set(op.axes) == {"dtype", "causal", "sinks", "window", "sparse"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_rounding_probabilities_to_input_dtype_is_within_tolerance(dtype):
    """A FlashMLA-style computation (fp32 logits, unnormalised probabilities rounded to q's dtype for the
    P @ V product, fp32 denominator) must pass: the c_p term of the tolerance admits it."""
    q, keys, _, _ = decode_inputs(dtype, lens=(40, 33), sq=1, hq=8, d=72, seed=13)
    cache, table, lens = page(keys, 16, dtype=dtype)
    scale = 72**-0.5
    exact_out, exact_lse = DECODE.reference_impl(
        q, cache, table, lens, softmax_scale=scale, head_dim_v=64, causal=False, compute_dtype=F64
    )
    n = hal.ops.mla.attention_error_n(q, torch.cat(keys), softmax_scale=scale, num_keys=40)
    for b, key in enumerate(keys):
        logits = scale * torch.einsum("hd,td->ht", q[b, 0].float(), key.float())
        p = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
        out = (p.to(dtype).float() @ key[:, :64].float()) / p.sum(dim=1, keepdim=True)
        mag = torch.softmax(logits.double(), dim=1) @ key[:, :64].double().abs()
        assert_within(out.to(dtype), exact_out[b, 0], TOL[str(dtype)[6:]], n=n, magnitude=mag)


def test_error_n_admits_probabilities_rounded_to_bf16():
    # bf16 keeps 8 significant bits: rounding a probability costs up to 2**-8 of it, not 2**-9. A kernel that
    # rounds exp(logit - max) to bf16 before P @ V (PyTorch's CPU flash attention, FlashMLA) must stay within
    # the bound on this cancelling example (two near-equal keys, values -1 and 1), which 2**-9 rejected.
    q, k = torch.ones(1, 1).bfloat16(), torch.tensor([[-2.6875], [-2.671875], [0.0]]).bfloat16()
    v = torch.tensor([[-1.0], [1.0], [0.00592041015625]]).bfloat16()
    p = torch.softmax(q.double() @ k.double().t(), -1)
    exact, magnitude = p @ v.double(), p @ v.double().abs()
    e = torch.exp(q.double() @ k.double().t())  # the max logit is 0
    rounded_p = ((e.bfloat16().double() @ v.double()) / e.sum()).bfloat16()
    n = hal.ops.mla.attention_error_n(q, k, softmax_scale=1.0, num_keys=3)
    assert compare(rounded_p, exact, TOL["bfloat16"], n=n, magnitude=magnitude).ok
    assert not compare(rounded_p, exact, TOL["bfloat16"], n=n - 2**15, magnitude=magnitude).ok


@pytest.fixture(params=("bf16-matrix-instructions", "flash-without-native-kernel", "fp32-only"))
def cpu_paths(request, monkeypatch):
    """The CPU kernel paths (bf16 matrix instructions: the native decode kernel's best variant where it runs,
    PyTorch's flash attention; and fp32, without the native kernel), whatever this CPU has. Every variant of the
    native kernel: the ``native_variant`` tests below."""
    from hal.backends.cpu import kernels

    monkeypatch.setattr(kernels, "native_bf16_gemm", lambda: request.param != "fp32-only")
    if request.param != "bf16-matrix-instructions":
        monkeypatch.setattr(kernels.native, "serves_mla_decode", lambda *args: False)


@pytest.mark.usefixtures("cpu_paths")
def test_cpu_attention_takes_strided_inputs():
    # PyTorch's flash kernel assumes a unit last stride without checking: the CPU kernels must hand it one
    g = torch.Generator().manual_seed(3)
    wide = lambda *shape: torch.randn(*shape[:-1], 2 * shape[-1], generator=g).bfloat16()[..., ::2]  # noqa: E731
    q, k, v = wide(6, 2, 16), wide(6, 2, 16), wide(6, 2, 16)
    cu = torch.tensor([0, 6], dtype=I32)
    for causal in (True, False):
        got = PREFILL(q, k, v, cu, softmax_scale=0.3, causal=causal)
        want = PREFILL(q.contiguous(), k.contiguous(), v.contiguous(), cu, softmax_scale=0.3, causal=causal)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    cache = wide(3, 4, 20)
    qd = wide(1, 1, 4, 20)
    table, lens = torch.tensor([[0, 1, 2]], dtype=I32), torch.tensor([10], dtype=I32)
    got = DECODE(qd, cache, table, lens, softmax_scale=0.3, head_dim_v=16)
    want = DECODE(qd.contiguous(), cache.contiguous(), table, lens, softmax_scale=0.3, head_dim_v=16)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.usefixtures("cpu_paths")
@pytest.mark.parametrize("hk", (1, 2, 4))
@pytest.mark.parametrize("folded_rows", (1, 12, 4096))
def test_masked_prefill_in_chunks_of_queries_is_within_tolerance(monkeypatch, hk, folded_rows):
    # windows, top-k lists, bottom-right causal masks and fewer kv heads than query heads: the CPU kernel
    # attends chunks of queries (query heads of a kv head folded into rows), each over the keys some query of
    # the chunk attends, the others masked; a query attending nothing gets out 0 and lse -inf
    from hal.backends.cpu import kernels

    monkeypatch.setattr(kernels, "_FOLDED_ROWS", folded_rows)
    q, k, v, cu_q, cu_k, idx, sinks = prefill_inputs(
        torch.bfloat16, lens_q=(20, 5), lens_k=(26, 5), hq=4, hk=hk, dqk=24, dv=16, topk=6, seed=13
    )
    idx[3] = -1  # attends nothing
    for kw in (
        dict(causal=True),
        dict(window=5, sinks=sinks),
        dict(causal=False, topk_indices=idx, sinks=sinks),
        dict(window=3, topk_indices=idx),
    ):
        kw = dict(softmax_scale=24**-0.5, **kw)
        out, lse = PREFILL(q, k, v, cu_q, cu_k, **kw)
        exact_out, exact_lse = PREFILL.reference_impl(q, k, v, cu_q, cu_k, compute_dtype=F64, **kw)
        n = hal.ops.mla.attention_error_n(q, k, softmax_scale=kw["softmax_scale"], num_keys=26)
        assert_within(
            out, exact_out, TOL["bfloat16"], n=n, magnitude=magnitude_prefill(q, k, v, cu_q, cu_k, **kw), what="out"
        )
        assert_within(lse, exact_lse, TOL["lse"], n=n, magnitude=torch.ones_like(exact_lse), what="lse")
        if "topk_indices" in kw:
            assert torch.equal(out[3], torch.zeros_like(out[3])) and bool((lse[3] == float("-inf")).all())
        shared = PREFILL(q, k, k, cu_q, cu_k, **kw)  # MLA's keys are its values: the same as an equal copy
        assert all(torch.equal(a, b) for a, b in zip(shared, PREFILL(q, k, k.clone(), cu_q, cu_k, **kw)))


@pytest.mark.usefixtures("cpu_paths")
@pytest.mark.parametrize("dtype", DTYPES)
def test_an_empty_batch_decodes_to_empty_outputs(dtype):
    q, cache = torch.randn(0, 1, 4, 20).to(dtype), torch.randn(3, 4, 20).to(dtype)
    table, lens = torch.zeros(0, 2, dtype=I32), torch.zeros(0, dtype=I32)
    out, lse = DECODE(q, cache, table, lens, softmax_scale=0.3, head_dim_v=16)
    assert out.shape == (0, 1, 4, 16) and out.dtype == dtype and lse.shape == (0, 1, 4)


@pytest.mark.usefixtures("cpu_paths")
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
def test_decode_over_pages_in_order_equals_scattered_and_strided_caches(dtype):
    # pages in order are read as a view of the cache (also of a cache stored blocks-second), others gathered
    q, keys, _, _ = decode_inputs(dtype, lens=(10,), sq=1, seed=4)
    in_order, in_order_table, lens = page(keys, 4, dtype=dtype, in_order=True)
    scattered, table, _ = page(keys, 4, dtype=dtype)
    blocks_second = in_order.transpose(0, 1).contiguous().transpose(0, 1)  # same values, strided storage
    results = [
        DECODE(q, cache, t, lens, softmax_scale=0.3, head_dim_v=16)
        for cache, t in ((in_order, in_order_table), (scattered, table), (blocks_second, in_order_table))
    ]
    assert all(torch.equal(a, b) for other in results[1:] for a, b in zip(results[0], other))


@pytest.mark.usefixtures("cpu_paths")
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
def test_one_token_decode_attends_exactly_the_keys_its_window_or_topk_selects(dtype):
    # the CPU kernel gathers the selected keys and attends them unmasked (a long context then costs what the
    # window or the top-k list selects): the same as attending those keys given on their own
    q, (keys,), _, _ = decode_inputs(dtype, lens=(12,), sq=1, seed=5)
    cache, table, lens = page([keys], 4, dtype=dtype)
    top = torch.tensor([[[9, -1, 2, 9, 30]]], dtype=I32)  # padding, a duplicate, one out of range
    for options, chosen in (
        (dict(window=5), range(7, 12)),
        (dict(window=40), range(12)),
        (dict(topk_indices=top, causal=False), [2, 9]),
    ):
        got = DECODE(q, cache, table, lens, softmax_scale=0.3, head_dim_v=16, **options)
        alone = DECODE(q, *page([keys[list(chosen)]], 4, dtype=dtype), softmax_scale=0.3, head_dim_v=16)
        assert all(torch.equal(a, b) for a, b in zip(got, alone)), options


@pytest.mark.usefixtures("cpu_paths")
@pytest.mark.parametrize(
    "pages", ["each sequence after the previous", "the same, cache stored blocks-second (gathered)", "scattered"]
)
def test_a_batch_of_equal_lengths_decodes_as_each_sequence_alone(pages):
    # the CPU kernel attends a batch of equal-length sequences in one flash call (one core per sequence):
    # each must come out exactly as it does alone, sinks included
    q, keys, _, sinks = decode_inputs(torch.bfloat16, lens=(10, 10, 10), sq=1, seed=6)
    cache, table, lens = page(keys, 4, dtype=torch.bfloat16, in_order=pages != "scattered")
    if "blocks-second" in pages:
        cache = cache.transpose(0, 1).contiguous().transpose(0, 1)  # same values, strided storage
    for extra in ({}, {"sinks": sinks}):
        out, lse = DECODE(q, cache, table, lens, softmax_scale=0.3, head_dim_v=16, **extra)
        for b in range(3):
            alone = DECODE(
                q[b : b + 1], cache, table[b : b + 1], lens[b : b + 1], softmax_scale=0.3, head_dim_v=16, **extra
            )
            assert torch.equal(out[b : b + 1], alone[0]) and torch.equal(lse[b : b + 1], alone[1]), (pages, extra, b)


@pytest.mark.usefixtures("cpu_paths")
def test_sinks_scale_a_batched_sequence_as_they_do_alone():
    # torch's sigmoid rounds an element by its position (vectorised loop or scalar tail), so a sink gate
    # computed over a whole batch can differ in its last bit from the sequence's own and flip a bf16 output.
    # This sink and key are such a case on torch 2.13: 16 heads give 16 gates alone, 32 in a batch of 2
    sink, key = -1.667490005493164, 1.0703125
    cache = torch.full((2, 1, 8), key, dtype=torch.bfloat16)
    table, lens = torch.tensor([[0], [1]], dtype=I32), torch.tensor([1, 1], dtype=I32)
    q = torch.zeros(2, 1, 16, 8, dtype=torch.bfloat16)  # lse 0 and out = the key, exactly, before the sink
    sinks = torch.full((16,), sink)
    out, _ = DECODE(q, cache, table, lens, softmax_scale=1.0, head_dim_v=8, sinks=sinks)
    alone, _ = DECODE(q[:1], cache, table[:1], lens[:1], softmax_scale=1.0, head_dim_v=8, sinks=sinks)
    assert torch.equal(out[:1], alone)


@pytest.mark.parametrize(
    "block_size, lens", [(64, (4096, 1, 0, 100)), (32, (33, 31, 32)), (7, (50, 3)), (100, (1000, 257)), (1, (40,))]
)
@pytest.mark.parametrize("hq, d, dv", [(16, 576, 512), (3, 64, 32), (1, 32, 32)])
@pytest.mark.parametrize("sinks, selection", [(False, None), (True, None), (False, "window"), (True, "topk")])
def test_native_decode_within_tolerance_of_oracle(
    monkeypatch, native_variant, block_size, lens, hq, d, dv, sinks, selection
):
    # each variant of the native kernel (AMX tiles, vdpbf16ps, or fp32 FMAs; online softmax, pages read in place
    # or copied where a block of 32 keys crosses a page or the end; a window's or a top-k list's keys gathered
    # first) on the shapes it serves, against the float64 oracle
    from hal.backends.cpu import kernels

    monkeypatch.setattr(kernels, "native_bf16_gemm", lambda: True)  # (window and top-k steps: bf16 paths only)
    assert kernels.native.serves_mla_decode(hq, d, dv, torch.empty(1, 1, d, dtype=torch.bfloat16))
    calls = []
    kernel = kernels.native.mla_decode
    monkeypatch.setattr(kernels.native, "mla_decode", lambda *args: calls.append(1) or kernel(*args))
    q, keys, idx, sink_logits = decode_inputs(torch.bfloat16, lens=lens, sq=1, hq=hq, d=d, seed=len(lens) + d, topk=40)
    q = q * 0.5
    cache, table, seq_lens = page(keys, block_size, dtype=torch.bfloat16)
    kw = dict(
        softmax_scale=d**-0.5,
        head_dim_v=dv,
        sinks=sink_logits if sinks else None,
        window=37 if selection == "window" else None,
        topk_indices=idx if selection == "topk" else None,
    )
    out, lse = DECODE(q, cache, table, seq_lens, **kw)
    assert calls, "the native kernel was not used"
    exact_out, exact_lse = DECODE.reference_impl(q, cache, table, seq_lens, compute_dtype=F64, **kw)
    args, topk = decode_as_prefill(q, keys, dv, kw.pop("topk_indices"))
    kw.pop("head_dim_v")
    magnitude = PREFILL.reference_impl(
        args[0], args[1], args[2].abs(), *args[3:], topk_indices=topk, compute_dtype=F64, **kw
    )[0].reshape(exact_out.shape)
    n = hal.ops.mla.attention_error_n(q, torch.cat(keys), softmax_scale=kw["softmax_scale"], num_keys=max(lens))
    assert_within(out, exact_out, TOL["bfloat16"], n=n, magnitude=magnitude, what="out")
    assert_within(lse, exact_lse, TOL["lse"], n=n, magnitude=torch.ones_like(exact_lse), what="lse")


def test_native_decode_of_a_sequence_is_the_same_alone_in_a_batch_and_on_any_number_of_threads(native_variant):
    # long sequences are attended in two halves shared out among the threads: the split depends only on the
    # sequence's length, so its result does not depend on the batch around it or on the threads
    from hal.backends.cpu import kernels

    assert kernels.native.serves_mla_decode(16, 64, 64, torch.empty(1, 1, 64, dtype=torch.bfloat16))
    q, keys, _, _ = decode_inputs(torch.bfloat16, lens=(1500, 700, 511, 3000, 40), sq=1, hq=16, d=64, seed=9)
    cache, table, lens = page(keys, 64, dtype=torch.bfloat16)
    batch = DECODE(q, cache, table, lens, softmax_scale=0.125, head_dim_v=64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = DECODE(q, cache, table, lens, softmax_scale=0.125, head_dim_v=64)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(batch, one_thread))
    for b in range(len(keys)):
        alone = DECODE(q[b : b + 1], cache, table[b : b + 1], lens[b : b + 1], softmax_scale=0.125, head_dim_v=64)
        assert torch.equal(batch[0][b : b + 1], alone[0]) and torch.equal(batch[1][b : b + 1], alone[1]), b


@pytest.mark.parametrize("where", ["query", "key, latent dims", "key, value dims"])
def test_native_decode_propagates_nan_as_the_reference_does(native_variant, where):
    # a NaN among the attended numbers makes out and lse NaN where the reference's are (compare: "NaN where
    # NaN"); the kernel's exponential must not turn a NaN logit into a zero probability
    from hal.backends.cpu import kernels

    assert kernels.native.serves_mla_decode(4, 64, 32, torch.empty(1, 1, 64, dtype=torch.bfloat16))
    q, keys, _, _ = decode_inputs(torch.bfloat16, lens=(600, 40), sq=1, hq=4, d=64, seed=5)
    if where == "query":
        q[0, 0, 2, 7] = float("nan")
    else:
        keys[0][333, 40 if where == "key, latent dims" else 5] = float("nan")
    cache, table, lens = page(keys, 16, dtype=torch.bfloat16)
    out, lse = DECODE(q, cache, table, lens, softmax_scale=0.125, head_dim_v=32)
    exact_out, exact_lse = DECODE.reference_impl(
        q, cache, table, lens, compute_dtype=F64, softmax_scale=0.125, head_dim_v=32
    )
    assert exact_out.isnan().any()
    assert torch.equal(out.isnan(), exact_out.isnan()) and torch.equal(lse.isnan(), exact_lse.isnan())
