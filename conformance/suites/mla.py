"""MLA / latent attention: ragged prefill, absorbed paged decode, paged cache writes.

Properties checked (tolerances: ``MLA_TOLERANCE`` with ``n = attention_error_n(q, k, softmax_scale=...,
num_keys=<longest attended key set>)`` and ``magnitude`` = the same attention over ``|v|``, as the contract
prescribes; ``lse`` uses magnitude 1):

* ``mla_prefill``: ``out`` and ``lse`` agree with the float64 oracle (masks intersected, sinks, empty
  rows ``out = 0, lse = -inf``); reversing the order of the sequences of the ragged batch (``cu_seqlens``
  rebuilt) permutes the rows of the result and changes nothing else.
* ``mla_decode``: agreement with the oracle; **absorbed = decompressed**: gathering each sequence's keys
  out of the paged cache through ``block_table`` into a dense ``K`` (``V = K[:, :head_dim_v]``) and running
  plain (prefill) attention gives the same ``out`` / ``lse``; **page tables are an addressing detail**:
  moving the physical blocks of ``kv_cache`` (and remapping ``block_table``) changes nothing.
* ``paged_cache_write``: afterwards slot ``s = block * block_size + offset`` of every ``slot_mapping[i] != -1``
  holds ``kv[i]`` bit for bit, every other slot (``-1`` rows write nothing) keeps its bits, even NaN
  garbage; writing the same tokens in the reverse order gives the same cache.

Drawn inputs (decode): about one example in four is production-shaped — 63..128 query heads (on the tile
boundaries 63, 64, 65, 127, 128 a third of the time), DeepSeek's page sizes 64 and 128, contexts of up to
65..2100 keys with partial last pages — the rest tiny. Prefill likewise: 8, 16 or 3 heads, ragged sequences
of up to 130..256 query tokens (on the 64 / 128 tile boundaries a third of the time) and keys past 128, T = 1
and empty sequences among others; cache writes: pages of 64 / 128 slots, 2..40 blocks, up to 700 tokens
scattered or in one run ending mid-page. Otherwise: tiny shapes (1..4 heads incl. 3,
GQA/MQA, qk head dim != v head dim), ragged batches with empty sequences, lengths at and across page
boundaries, decode batches of equal lengths, pages shuffled or in order (each sequence's after the previous
one's, as a model allocates them), speculative decode (Sq 1..3), unused block-table entries of -1, unused
cache slots holding garbage or NaN, windows shorter than the context, per-head sinks, top-k lists with -1
padding, out-of-range entries, duplicates and all -1 rows, drawn softmax scales.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Mapping, Optional

import torch
from hypothesis import strategies as st

from hal.conformance.core import Case, Recorder, Suite, note, suite
from hal.conformance.strategies import TensorSpec, dim, empty, large, tensor_specs, tiling
from hal.contract import dtype_name
from hal.ops.mla import attention_error_n, mla_prefill

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
F64 = torch.float64


def _cumulative(lengths) -> torch.Tensor:
    return torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32)


SPECS = tensor_specs(scales=(1.0, 0.25, 4.0))  # built once: building strategies dominates a draw otherwise
SEEDS = st.integers(0, 2**31 - 1)
BOOLS = st.booleans()


@functools.lru_cache(maxsize=None)
def _ints(lo: int, hi: int, size: Optional[int] = None) -> st.SearchStrategy:
    """Cached strategies (making and validating one costs more than drawing from it): an int, or a list."""
    return st.integers(lo, hi) if size is None else st.lists(st.integers(lo, hi), min_size=size, max_size=size)


@functools.lru_cache(maxsize=None)
def _pick(options: tuple) -> st.SearchStrategy:
    return st.sampled_from(options)


@functools.lru_cache(maxsize=None)
def _floats(lo: float, hi: float, size: Optional[int] = None) -> st.SearchStrategy:
    return st.floats(lo, hi) if size is None else st.lists(st.floats(lo, hi), min_size=size, max_size=size)


def _values(data: st.DataObject, label: str, shape, dtype: torch.dtype) -> torch.Tensor:
    spec = data.draw(SPECS, label=label)
    if spec.kind == "wide_range":  # 2**-20..2**20 scaled to 2**-34..2**8: logits stay far from fp32 overflow
        spec = TensorSpec(spec.kind, spec.scale * 2**-14, spec.seed)
    return spec.make(shape, dtype, max_value=8.0)


def _tame(q: torch.Tensor, k: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """q scaled by a power of two (exact) so that every |logit| <= S = scale * max|q_t| * max|k_j| <= 32: with
    sinks in [-6, 6], exp(lse - sink) stays far from fp32 underflow (no bf16/fp32 result below the smallest
    subnormal, which MLA_TOLERANCE's atol = 0 could not accept), and the error bound n stays meaningful."""
    norm = lambda t: float(t.double().reshape(-1, t.shape[-1]).norm(dim=-1).max()) if t.numel() else 0.0  # noqa
    s = softmax_scale * norm(q) * norm(k)
    return q * 2.0 ** -math.ceil(math.log2(s / 32)) if s > 32 else q


# DeepSeek's own head dims (qk, nope / latent, v): the shapes vendor kernels are specialised for, so a
# backend's kernel path (not only its fallback for odd shapes) is certified.
PREFILL_DIMS = (192, 128, 128)  # MHA prefill: 128 nope + 64 rope, v 128
DECODE_DIMS = (576, 512, 512)  # absorbed decode: 512 latent + 64 rope, v = the latent


def _head_dims(data: st.DataObject, deepseek: tuple):
    """(qk head dim = latent/nope + rope part, the latent/nope part, a v head dim != qk head dim): small, or
    DeepSeek's ``deepseek`` dims."""
    if data.draw(_pick(("small", "DeepSeek")), label="head dims") == "DeepSeek":
        return deepseek
    nope = data.draw(_pick((8, 16)), label="nope / latent dim")
    d = nope + data.draw(_pick((4, 8)), label="rope dim")
    return d, nope, data.draw(_pick(tuple(x for x in (8, 16, nope // 2 + 1) if x != d)), label="v head dim")


def _options(data: st.DataObject, f: Mapping[str, str], hq: int) -> dict:
    kw = {"softmax_scale": data.draw(_floats(0.05, 1.5), label="softmax_scale"), "causal": f["causal"] == "true"}
    if f["window"] == "true":
        kw["window"] = data.draw(_ints(1, 8), label="window")
    if f["sinks"] == "true":
        sinks = data.draw(_floats(-6, 6, hq), label="sinks (per head)")
        kw["sinks"] = torch.tensor(sinks, dtype=torch.float32)
    return kw


def _topk_rows(g: torch.Generator, lq: int, lk: int, topk: int) -> torch.Tensor:
    """[lq, topk] key positions: in range, out of range (lk, lk+1), duplicates, -1 padding, all -1 rows."""
    idx = torch.randint(-1, lk + 2, (lq, topk), generator=g)
    real = torch.randint(0, topk + 1, (lq, 1), generator=g)  # leading real entries per row, the rest pads
    return torch.where(torch.arange(topk)[None, :] < real, idx, -1).to(torch.int32)


def _longest(
    cu_q: torch.Tensor, cu_k: torch.Tensor, causal: bool, window: Optional[int], topk: Optional[torch.Tensor]
) -> int:
    """The largest number of keys one query attends (the contract's masks, restated)."""
    most = 0
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b in range(len(cq) - 1):
        lq, lk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        j, last = torch.arange(lk)[None, :], lk - lq + torch.arange(lq)[:, None]  # newest key query i may see
        seen = torch.ones(lq, lk, dtype=torch.bool)
        if causal:
            seen &= j <= last
        if window is not None:
            seen &= j > last - window
        if topk is not None:
            seen &= (topk[cq[b] : cq[b + 1], :, None] == j[:, None, :]).any(1)
        most = max(most, int(seen.sum(1).max()) if lq and lk else 0)
    return most


def _attention_checks(rec: Recorder, contract, what: str, out, lse, exact_out, exact_lse, magnitude, n) -> None:
    rec.close(f"out{what}", out, exact_out, contract.tolerance[dtype_name(out.dtype)], n=n, magnitude=magnitude)
    rec.close(f"lse{what}", lse, exact_lse, contract.tolerance["lse"], n=n, magnitude=torch.ones_like(exact_lse))


def _prefill_kwargs(kw: Mapping) -> dict:
    return {k: kw[k] for k in ("softmax_scale", "causal", "sinks", "window", "topk_indices") if k in kw}


@suite
class MlaPrefillSuite(Suite):
    op = "mla_prefill"
    example_seconds = 1.0  # slowest example measured: 0.07 s
    boundary = ("Hq>=16", "queries>64", "keys>128", "keys:tail", "T=1", "an empty sequence among others")

    def draw(self, data: st.DataObject, f: Mapping[str, str]) -> Case:
        dtype = DTYPES[f["dtype"]]
        big = large(data)
        if big:  # production-shaped: DeepSeek's per-rank head counts (128 heads over 8 or 16 ranks)
            hq = data.draw(_pick((8, 16, 3)), label="Hq")
            hk = data.draw(_pick((hq, 1)), label="Hk")
        else:
            hq = data.draw(_pick((1, 2, 3, 4)), label="Hq")
            hk = data.draw(_pick(tuple(h for h in (1, 2, 3, 4) if hq % h == 0)), label="Hk")
        d, _, dv = _head_dims(data, PREFILL_DIMS)
        b = data.draw(_ints(1, 3), label="batch")
        if big:  # ragged sequences past the 64 / 128 tiles (at, just below and above them a third of the time)
            most = 256 if hq * b <= 16 else 130
            lens_q = [
                0 if empty(data, f"query length {i} = 0") else dim(data, f"query length {i}", 1, most, 64)
                for i in range(b)
            ]
        else:
            lens_q = data.draw(_ints(0, 8, b), label="query lengths")
        shared = data.draw(BOOLS, label="cu_seqlens_k=None (keys = queries)")
        if shared:
            lens_k = lens_q
        elif big:  # keys = cached prefix + the new queries (chunked prefill), or any length
            lens_k = [n + dim(data, f"prefix {i}", 0, most // 2, 64) for i, n in enumerate(lens_q)]
        else:
            lens_k = data.draw(_ints(0, 12, b), label="key lengths")
        classes = tiling("queries", max(lens_q), 64) | tiling("keys", max(lens_k), 128)
        if hq >= 16:
            classes.add("Hq>=16")
        if 1 in lens_q:
            classes.add("T=1")
        if b > 1 and 0 in lens_q:
            classes.add("an empty sequence among others")
        note(batch=b, Hq=hq, queries=sum(lens_q), keys=max(lens_k), boundary=classes)
        q = _values(data, "q values", (sum(lens_q), hq, d), dtype)
        k = _values(data, "k values", (sum(lens_k), hk, d), dtype)
        v = _values(data, "v values", (sum(lens_k), hk, dv), dtype)
        kw = _options(data, f, hq)
        q = _tame(q, k, kw["softmax_scale"])
        if f["sparse"] == "true":
            g = torch.Generator().manual_seed(data.draw(SEEDS, label="top-k seed"))
            topk = data.draw(_ints(1, 6), label="topk")
            kw["topk_indices"] = torch.cat([_topk_rows(g, a, c, topk) for a, c in zip(lens_q, lens_k)])
        return Case((q, k, v, _cumulative(lens_q), None if shared else _cumulative(lens_k)), kw)

    def check(self, rec: Recorder, case: Case, output, oracle, run) -> None:
        q, k, v, cu_q, cu_k = case.args
        kw = case.kwargs
        out, lse = output
        rec.holds(out.dtype == q.dtype and lse.dtype == torch.float32, "out has q's dtype, lse is float32")
        cu_k = cu_q if cu_k is None else cu_k
        longest = _longest(cu_q, cu_k, kw["causal"], kw.get("window"), kw.get("topk_indices"))
        n = attention_error_n(q, k, softmax_scale=kw["softmax_scale"], num_keys=longest)
        magnitude, _ = self.contract.reference_impl(q, k, v.abs(), *case.args[3:], **kw, compute_dtype=F64)
        _attention_checks(rec, self.contract, "", out, lse, oracle[0], oracle[1], magnitude, n)
        b = cu_q.shape[0] - 1
        if b > 1:  # sequences are independent: reverse their order, rows follow
            cq, ck = cu_q.tolist(), cu_k.tolist()
            rows_q = torch.cat([torch.arange(cq[i], cq[i + 1]) for i in reversed(range(b))])
            rows_k = torch.cat([torch.arange(ck[i], ck[i + 1]) for i in reversed(range(b))])
            rev_kw = dict(kw)
            if "topk_indices" in kw:
                rev_kw["topk_indices"] = kw["topk_indices"][rows_q]
            rev_cu_q = _cumulative(cu_q.diff().flip(0).tolist())
            rev_cu_k = None if case.args[4] is None else _cumulative(cu_k.diff().flip(0).tolist())
            out2, lse2 = run(Case((q[rows_q], k[rows_k], v[rows_k], rev_cu_q, rev_cu_k), rev_kw))
            _attention_checks(
                rec,
                self.contract,
                " (sequences reversed)",
                out2,
                lse2,
                oracle[0][rows_q],
                oracle[1][rows_q],
                magnitude[rows_q],
                n,
            )


@suite
class MlaDecodeSuite(Suite):
    op = "mla_decode"
    example_seconds = 2.0  # slowest example measured: 0.05 s (64-128 heads, ~2000 keys; a first call 0.5 s)
    boundary = ("Hq>64", "DeepSeek page size", "keys>1000", "keys:tail", "Sq>1")

    def draw(self, data: st.DataObject, f: Mapping[str, str]) -> Case:
        dtype, causal = DTYPES[f["dtype"]], f["causal"] == "true"
        big = large(data)
        hq = dim(data, "Hq", 63, 128, tile=64) if big else data.draw(_pick((1, 2, 3, 4)), label="Hq")
        d, latent, _ = _head_dims(data, DECODE_DIMS)
        head_dim_v = data.draw(_pick((latent, latent // 2 + 1)), label="head_dim_v")
        b = data.draw(_ints(1, 2 if big else 3), label="batch")
        sq = data.draw(_ints(1, 2 if big else 3), label="Sq (new tokens per sequence)")
        bs = data.draw(_pick((64, 128)), label="block_size") if big else data.draw(_ints(1, 8), label="block_size")
        lens = []
        equal = b > 1 and data.draw(BOOLS, label="equal lengths")
        for i in range(1 if equal else b):
            n = (
                data.draw(_ints(65, 2100), label=f"seq_len {i}")
                if big
                else data.draw(_ints(0, 20), label=f"seq_len {i}")
            )
            if data.draw(BOOLS, label="snap to a page boundary"):
                n = max(0, round(n / bs) * bs + data.draw(_pick((0, -1, 1)), label="+-1"))
            lens.append(max(n, sq) if causal and n else n)  # causal needs seq_len >= Sq (or 0)
        lens *= b if equal else 1
        used = [-(-n // bs) for n in lens]
        longest = max(lens)
        classes = tiling("Hq", hq, 64) | tiling("keys", longest, 64) | {f"block_size={bs}"}
        if bs in (64, 128):
            classes.add("DeepSeek page size")
        note(
            batch=b,
            Sq=sq,
            Hq=hq,
            block_size=bs,
            pages=max(used),
            keys=longest,
            boundary=classes | ({"keys>1000"} if longest > 1000 else set()) | ({"Sq>1"} if sq > 1 else set()),
        )
        max_blocks = max(used) + data.draw(_ints(0, 1), label="spare table columns")
        num_blocks = sum(used) + data.draw(_ints(0, 2), label="spare blocks")
        g = torch.Generator().manual_seed(data.draw(SEEDS, label="layout seed"))
        in_order = data.draw(BOOLS, label="pages in order")
        free = (
            torch.arange(num_blocks).flip(0)
            if in_order
            # popped from the end: 0, 1, 2, ...
            else torch.randperm(max(num_blocks, 1), generator=g)[:num_blocks]
        ).tolist()
        table = torch.full((b, max_blocks), -1, dtype=torch.int32)  # unused entries: -1
        for i, u in enumerate(used):
            table[i, :u] = torch.tensor([free.pop() for _ in range(u)], dtype=torch.int32)
        garbage = data.draw(_pick(("nan", "values")), label="unused cache slots")
        cache = torch.full((num_blocks, bs, d), float("nan"), dtype=dtype)
        if garbage == "values":
            cache = _values(data, "garbage", cache.shape, dtype)
        keys = _values(data, "key values", (sum(lens), d), dtype)
        pos = torch.cat([torch.arange(n) for n in lens])
        blocks = torch.cat([table[i, :u].repeat_interleave(bs)[:n] for i, (n, u) in enumerate(zip(lens, used))])
        cache[blocks.long(), pos % bs] = keys
        kw = _options(data, f, hq)
        kw["head_dim_v"] = head_dim_v
        if f["sparse"] == "true":
            topk = data.draw(_ints(1, 6), label="topk")
            kw["topk_indices"] = torch.stack([_topk_rows(g, sq, n, topk) for n in lens])
        q = _tame(_values(data, "q values", (b, sq, hq, d), dtype), keys, kw["softmax_scale"])
        return Case((q, cache, table, torch.tensor(lens, dtype=torch.int32)), kw)

    def check(self, rec: Recorder, case: Case, output, oracle, run) -> None:
        q, cache, table, lens = case.args
        kw = case.kwargs
        b, sq, hq, d = q.shape
        bs, dv = cache.shape[1], kw["head_dim_v"]
        out, lse = output
        rec.holds(out.dtype == q.dtype and lse.dtype == torch.float32, "out has q's dtype, lse is float32")
        # The decompressed (naive) form: key p of sequence i is cache[table[i, p // bs], p % bs], V = K[:, :dv];
        # values [V | |V|] give the attention and the contract's magnitude in one pass.
        keys = torch.cat(
            [cache[table[i, torch.arange(n) // bs].long(), torch.arange(n) % bs] for i, n in enumerate(lens.tolist())]
        )[:, None, :]
        cu_q, cu_k = _cumulative([sq] * b), _cumulative(lens.tolist())
        dense_kw = _prefill_kwargs(kw)
        if "topk_indices" in kw:
            dense_kw["topk_indices"] = kw["topk_indices"].reshape(b * sq, -1)
        values = torch.cat([keys[..., :dv], keys[..., :dv].abs()], dim=-1)
        naive, naive_lse = mla_prefill.reference_impl(
            q.reshape(b * sq, hq, d), keys, values, cu_q, cu_k, **dense_kw, compute_dtype=F64
        )
        shape = (b, sq, hq, dv)
        naive_out, magnitude = naive[..., :dv].reshape(shape), naive[..., dv:].reshape(shape)
        longest = _longest(cu_q, cu_k, kw["causal"], kw.get("window"), dense_kw.get("topk_indices"))
        n = attention_error_n(q, keys, softmax_scale=kw["softmax_scale"], num_keys=longest)
        _attention_checks(rec, self.contract, "", out, lse, oracle[0], oracle[1], magnitude, n)
        _attention_checks(
            rec,
            self.contract,
            " vs the decompressed (dense K, V = K[:, :head_dim_v]) attention",
            out,
            lse,
            naive_out,
            naive_lse.reshape(b, sq, hq),
            magnitude,
            n,
        )
        nb = cache.shape[0]
        if nb > 1:  # physical block i moves to nb - 1 - i; the table follows: attention is unchanged
            moved = torch.where(table >= 0, nb - 1 - table, table)
            out2, lse2 = run(Case((q, cache.flip(0), moved, lens), kw))
            _attention_checks(
                rec,
                self.contract,
                " (kv_cache blocks permuted, block_table remapped)",
                out2,
                lse2,
                oracle[0],
                oracle[1],
                magnitude,
                n,
            )


@suite
class PagedCacheWriteSuite(Suite):
    """Mutates ``kv_cache`` (``arg0``): the runner copies the written cache back into the case, and keeps
    the cache as it was before the call in ``case.before``."""

    op = "paged_cache_write"
    mutates = ("arg0",)
    boundary = ("DeepSeek page size", "blocks>=16", "tokens>128", "tokens:tail", "a partly written page")

    def draw(self, data: st.DataObject, f: Mapping[str, str]) -> Case:
        dtype = DTYPES[f["dtype"]]
        big = large(data)
        if big:  # DeepSeek's pages, many blocks, hundreds of tokens
            bs = data.draw(_pick((64, 128)), label="block_size")
            nb = dim(data, "num_blocks", 2, 40, tile=16)
            d = data.draw(_pick((8, 20, 576)), label="D") if nb * bs <= 1024 else data.draw(_pick((8, 20)), label="D")
        else:
            nb, bs = data.draw(_ints(1, 4), label="num_blocks"), data.draw(_ints(1, 8), label="block_size")
            d = data.draw(_pick((1, 8, 20)), label="D")
        cache = _values(data, "cache garbage", (nb, bs, d), dtype)
        if data.draw(BOOLS, label="NaN garbage"):
            cache[::2] = float("nan")
        if big:
            writes = dim(data, "tokens written", 1, min(nb * bs, 700))
        else:
            writes = data.draw(_ints(0, nb * bs), label="tokens written")
        pads = data.draw(_ints(0, 3), label="padding tokens (slot -1)")
        g = torch.Generator().manual_seed(data.draw(SEEDS, label="slot seed"))
        if big and data.draw(BOOLS, label="one run of consecutive slots (a prefill's), else scattered"):
            start = data.draw(_ints(0, nb * bs - writes), label="first slot")
            written = torch.arange(start, start + writes)
        else:
            written = torch.randperm(nb * bs, generator=g)[:writes]
        slots = torch.cat([written, torch.full((pads,), -1)])
        slots = slots[torch.randperm(writes + pads, generator=g)]
        classes = tiling("tokens", writes, 128) | {f"block_size={bs}"}
        if bs in (64, 128):
            classes.add("DeepSeek page size")
        if nb >= 16:
            classes.add("blocks>=16")
        pages = torch.bincount(written // bs, minlength=nb)
        if bool(((pages > 0) & (pages < bs)).any()):
            classes.add("a partly written page")
        note(blocks=nb, block_size=bs, tokens=writes, boundary=classes)
        slot_dtype = data.draw(_pick((torch.int32, torch.int64)), label="slot_mapping dtype")
        kv = _values(data, "kv values", (writes + pads, d), dtype)
        return Case((cache, kv, slots.to(slot_dtype)), {})

    def check(self, rec: Recorder, case: Case, output, oracle, run) -> None:
        cache, kv, slots = case.args
        pristine = case.before["arg0"]
        rec.holds(output is None, "paged_cache_write returns None")
        bs, bits = cache.shape[1], BITS[cache.dtype]
        expected = pristine.clone()
        for i, s in enumerate(slots.tolist()):
            if s >= 0:
                expected[s // bs, s % bs] = kv[i]
        rec.equal(
            "kv_cache bits (slot s = block*block_size+offset holds kv[i]; other slots unchanged)",
            cache.view(bits),
            expected.view(bits),
        )
        fresh = pristine.clone()
        run(Case((fresh, kv.flip(0), slots.flip(0)), {}))
        rec.equal("kv_cache bits (tokens written in reverse order)", fresh.view(bits), expected.view(bits))
