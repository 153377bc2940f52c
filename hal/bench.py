"""``hal bench``: what each operator costs on a backend, as a ratio to its limit measured in the same run.

Every figure pairs an operator with a *limit* it cannot beat on this machine, timed back to back in each
repetition (after warm-up), so a machine that is busier or slower moves both: the headline is the median
of the per-repetition ratios, with their spread (min and max). Absolute times are reported beside them.

* GEMMs: a dense fp32 ``torch.mm`` of the same FLOPs (ratio = achieved share of its throughput).
* Memory-bound operators: a memory copy of the same bytes (ratio = achieved share of copy bandwidth).
* MLA decode: its roofline, the larger of reading the latent cache once (a copy of those bytes) and its
  FLOPs at the dense fp32 GEMM rate measured in this run, with the sequence's pages in order (as
  :mod:`hal.model` allocates them) and scattered (as a serving system's allocator leaves them), for one
  sequence and a batch of 4; also DeepSeek's "naive" decode (per-head keys and values decompressed into
  the cache, einsum attention), and a top-k sparse step against a dense one over the same context.
* Every other operator on a DeepSeek-shaped problem, without a target: routing, the MoE permutations, the
  paged cache write, the quantisers and dequantisers against a memory copy of the bytes they move; the
  FP8 / int8 GEMMs and the causal prefill attention against a dense fp32 GEMM of the same FLOPs.
* Dispatch: a HAL operator call against a direct call of the implementation it reaches (a no-op, so that
  only the HAL's own time is measured); the first call of a signature and checked mode beside it.
* The model: ``hal.model`` on tiny random DeepSeek V3 and V4 checkpoints against transformers'
  ``DeepseekV3ForCausalLM`` / ``DeepseekV4ForCausalLM`` on the same checkpoint and tokens (skipped when
  transformers is missing); the targets are V3's.

A benchmark, not a test: nothing here asserts a time. See docs/performance.md.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

import hal
from hal.backend import Backend
from hal.contract import Op, all_ops
from hal.dispatch import route
from hal.hookspecs import hookimpl
from hal.registry import BackendSpec, register_plugin, unregister_plugin

__all__ = ["Figure", "SIZES", "run", "render"]


@dataclass(frozen=True)
class Size:
    """Problem sizes: DeepSeek V3 shapes scaled down to a 2-core CPU (``default``) or to seconds (``tiny``)."""

    experts: int
    gemm_tokens: int  # routed token copies (tokens x top-k) over all experts
    hidden: int  # K of the expert GEMM
    expert_width: int  # N of the expert GEMM
    heads: int  # MLA query heads (DeepSeek V3: 128)
    context: int  # MLA decode keys per sequence
    quant_tokens: int
    model_context: int  # tokens of the model's prompt
    decode_steps: int
    reps: int
    sample_s: float  # a timed sample lasts about this long (short calls are repeated within it)
    scaling: Dict[str, Tuple[int, ...]] = field(default_factory=dict)


SIZES = {
    "tiny": Size(
        experts=8,
        gemm_tokens=64,
        hidden=128,
        expert_width=64,
        heads=2,
        context=256,
        quant_tokens=16,
        model_context=32,
        decode_steps=2,
        reps=3,
        sample_s=0.002,
        scaling={"tokens": (32, 64), "experts": (4, 8), "context": (128, 256)},
    ),
    "default": Size(
        experts=64,
        gemm_tokens=8192,
        hidden=1024,
        expert_width=512,
        heads=16,
        context=4096,
        quant_tokens=2048,
        model_context=2048,
        decode_steps=16,
        reps=7,
        sample_s=0.05,
        scaling={"tokens": (1024, 4096, 16384), "experts": (16, 64, 256), "context": (1024, 4096, 16384)},
    ),
}

_LATENT, _ROPE, _NOPE, _HEAD_V = 512, 64, 128, 128  # DeepSeek V3's MLA widths (kept: they set the roofline)
_MLA_SCALE = (_NOPE + _ROPE) ** -0.5
_ACTIVATION_K = 7168 // 2  # activations quantised per token: half of V3's hidden size
_TOP_K = 8  # V3's experts per token


@dataclass
class Figure:
    """One measurement: the operator's time, its limit's, and their ratio over the repetitions."""

    name: str
    limit: str  # what the operator is compared with
    ratio: float  # median over repetitions; meaning given by ``ratio_means``
    ratio_min: float
    ratio_max: float
    ratio_means: str
    op_ms: float  # medians, milliseconds
    limit_ms: float
    target: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)


def _seconds(fn: Callable[[], Any], number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def _calls_per_sample(fn: Callable[[], Any], min_s: float) -> int:
    """How many calls make one timed sample last about ``min_s`` (short calls are timed in batches)."""
    once = _seconds(fn, 1)
    return max(1, min(10000, int(min_s / max(once, 1e-7))))


def _paired(fn: Callable[[], Any], limit: Callable[[], Any], size: Size) -> Tuple[List[float], List[float]]:
    """Per repetition, the seconds per call of ``fn`` and of ``limit``, timed back to back after warm-up."""
    for f in (fn, limit, fn, limit):  # warm-up: allocator, caches, lazy initialisation
        f()
    n_fn, n_limit = _calls_per_sample(fn, size.sample_s), _calls_per_sample(limit, size.sample_s)
    times: Tuple[List[float], List[float]] = ([], [])
    for _ in range(size.reps):
        times[0].append(_seconds(fn, n_fn))
        times[1].append(_seconds(limit, n_limit))
    return times


def _figure(
    name: str,
    limit_name: str,
    op_s: Sequence[float],
    limit_s: Sequence[float],
    *,
    means: str,
    limit_over_op: bool = True,
    target: Optional[str] = None,
    **extra: Any,
) -> Figure:
    """``limit_over_op``: ratio = limit time / op time (share of the limit's speed); else op / limit."""
    ratios = [(b / a) if limit_over_op else (a / b) for a, b in zip(op_s, limit_s)]
    return Figure(
        name,
        limit_name,
        statistics.median(ratios),
        min(ratios),
        max(ratios),
        means,
        statistics.median(op_s) * 1e3,
        statistics.median(limit_s) * 1e3,
        target,
        extra,
    )


def _bf16(*shape: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape) * scale).to(torch.bfloat16)


def _uneven_groups(tokens: int, experts: int) -> torch.Tensor:
    """Group sizes adding up to ``tokens``, skewed as routing makes them (some experts hot, some empty)."""
    popularity = torch.distributions.Dirichlet(torch.full((experts,), 0.5)).sample()
    ids = torch.multinomial(popularity, tokens, replacement=True)
    return torch.bincount(ids, minlength=experts)


def _copy_of(nbytes: int) -> Callable[[], Any]:
    """A memory copy that reads ``nbytes / 2`` and writes ``nbytes / 2`` bytes (``nbytes`` moved in all)."""
    src = torch.empty(max(1, nbytes // 2), dtype=torch.uint8).random_()
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def _dense_gemm(flops: float, k: int, n: int) -> Callable[[], Any]:
    """A dense fp32 ``[M, k] @ [k, n]`` with M chosen so that it does ``flops`` FLOPs."""
    m = max(1, round(flops / (2 * k * n)))
    a, b, out = torch.randn(m, k), torch.randn(k, n), torch.empty(m, n)
    return lambda: torch.mm(a, b, out=out)


def _bytes(value: Any) -> int:
    """Bytes of the tensors in ``value``: a tensor, or tuples / lists of them (other values count 0)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_bytes(v) for v in value)
    return 0


def _against_copy(
    size: Size,
    name: str,
    op: Op,
    args: tuple,
    kwargs: Optional[dict] = None,
    *,
    moved: Optional[int] = None,
    target: Optional[str] = None,
) -> Figure:
    """A memory-bound call against a memory copy of the bytes it moves: ``moved``, else its tensor arguments
    (read) and its results (written)."""
    kwargs = kwargs or {}
    call = lambda: op(*args, **kwargs)  # noqa: E731
    moved = _bytes(args) + _bytes(call()) if moved is None else moved
    op_s, copy_s = _paired(call, _copy_of(moved), size)
    return _figure(
        name,
        "memory copy, same bytes",
        op_s,
        copy_s,
        means="share of copy bandwidth",
        target=target,
        gb_per_s=moved / statistics.median(op_s) / 1e9,
    )


def _against_dense(
    size: Size, name: str, call: Callable[[], Any], flops: float, target: Optional[str] = None
) -> Figure:
    """A compute-bound call against a dense fp32 GEMM of the same FLOPs (at the expert GEMM's K and N)."""
    op_s, dense_s = _paired(call, _dense_gemm(flops, size.hidden, size.expert_width), size)
    return _figure(
        name,
        "dense fp32 GEMM, same FLOPs",
        op_s,
        dense_s,
        means="share of dense fp32 GEMM throughput",
        target=target,
        gflops=flops / statistics.median(op_s) / 1e9,
        dense_gflops=flops / statistics.median(dense_s) / 1e9,
    )


# --------------------------------------------------------------------------- operators


def bench_grouped_gemm(size: Size, experts: int, tokens: int) -> Figure:
    k, n = size.hidden, size.expert_width
    groups = _uneven_groups(tokens, experts)
    x, w = _bf16(tokens, k), _bf16(experts, n, k, scale=k**-0.5)
    return _against_dense(
        size,
        f"grouped_gemm bf16 {experts} experts, {tokens} rows, K={k}, N={n}",
        lambda: hal.ops.grouped_gemm(x, w, groups),
        2.0 * tokens * k * n,
        target=">= 0.85",
    )


def _mla_problem(heads: int, context: int, block_size: int = 64, scattered: bool = True, batch: int = 1):
    d = _LATENT + _ROPE
    blocks = (context + block_size - 1) // block_size
    kv_cache = _bf16(batch * blocks, block_size, d)
    # a server's pages, or hal.model's (each sequence's pages in order, after the previous sequence's)
    order = torch.randperm(batch * blocks) if scattered else torch.arange(batch * blocks)
    block_table = order.to(torch.int32).view(batch, blocks)
    seq_lens = torch.full((batch,), context, dtype=torch.int32)
    q = _bf16(batch, 1, heads, d)
    return q, kv_cache, block_table, seq_lens


def _absorbed_decode(
    q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, **options: Any
) -> Callable[[], Any]:
    """One absorbed decode step of an :func:`_mla_problem` through the HAL."""
    return lambda: hal.ops.mla_decode(
        q, kv_cache, block_table, seq_lens, softmax_scale=_MLA_SCALE, head_dim_v=_LATENT, **options
    )


def bench_mla_sparse(size: Size, context: int) -> Figure:
    """A V3.2 / V4 top-k decode step (each query attends ``context // 8`` listed keys of ``context``) against a
    dense step over all of them: what a sparse step costs, which should follow the keys it selects."""
    problem = _mla_problem(size.heads, context, scattered=False)
    chosen = context // 8
    listed = torch.randperm(context, generator=torch.Generator().manual_seed(0))[:chosen]
    listed = listed.to(torch.int32).view(1, 1, chosen)
    op_s, dense_s = _paired(
        _absorbed_decode(*problem, causal=False, topk_indices=listed), _absorbed_decode(*problem, causal=False), size
    )
    return _figure(
        f"mla_decode top-k sparse, {size.heads} heads, {chosen} of {context} keys",
        f"dense decode over all {context} keys",
        op_s,
        dense_s,
        means="time / dense decode time",
        limit_over_op=False,
    )


def _naive_mla_decode(heads: int, context: int) -> Callable[[], Any]:
    """DeepSeek's ``attn_impl="naive"`` decode step: per-head keys ``[nope | rope]`` and values decompressed
    into the cache (bf16), scores by einsum, softmax in fp32, rounded back, einsum with the values."""
    k = _bf16(1, context, heads, _NOPE + _ROPE)
    v = _bf16(1, context, heads, _HEAD_V)
    q = _bf16(1, 1, heads, _NOPE + _ROPE)

    def step():
        scores = torch.einsum("bshd,bthd->bsht", q, k) * _MLA_SCALE
        return torch.einsum("bsht,bthd->bshd", scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype), v)

    return step


def bench_mla_decode(size: Size, context: int, dense_gflops: float, scattered: bool, batch: int = 1) -> Figure:
    """Absorbed decode of ``batch`` sequences against its roofline: the larger of reading their latent caches
    once (a copy of their bytes) and their FLOPs at this run's dense fp32 GEMM rate."""
    heads = size.heads
    problem = _mla_problem(heads, context, scattered=scattered, batch=batch)
    cache_bytes = batch * context * (_LATENT + _ROPE) * problem[1].element_size()
    flops = 2.0 * batch * heads * context * (_LATENT + _ROPE + _LATENT)
    op_s, copy_s = _paired(_absorbed_decode(*problem), _copy_of(2 * cache_bytes), size)
    compute_s = flops / (dense_gflops * 1e9)
    pages = ("scattered pages" if scattered else "pages in order") + (f", batch of {batch}" if batch > 1 else "")
    return _figure(
        f"mla_decode absorbed, {heads} heads, {context} keys, {pages}",
        "roofline: max(copy of the latent cache, FLOPs at the dense fp32 GEMM rate)",
        op_s,
        [max(c, compute_s) for c in copy_s],
        means="time / roofline time",
        limit_over_op=False,
        target="<= 1.5",
        cache_mb=cache_bytes / 2**20,
        bound="memory" if statistics.median(copy_s) > compute_s else "compute",
    )


def bench_mla_naive(size: Size, context: int) -> Figure:
    """Absorbed decode (pages in order) against DeepSeek's naive decode of the same step."""
    op_s, naive_s = _paired(
        _absorbed_decode(*_mla_problem(size.heads, context, scattered=False)),
        _naive_mla_decode(size.heads, context),
        size,
    )
    return _figure(
        f"mla_decode absorbed vs naive, {size.heads} heads, {context} keys",
        "DeepSeek's naive decode (decompressed per-head K/V cache, einsum)",
        op_s,
        naive_s,
        means="speed-up over naive",
        target=">= 10",
    )


def bench_quantize_fp8(size: Size, tokens: int) -> Figure:
    x = _bf16(tokens, _ACTIVATION_K)
    return _against_copy(
        size,
        f"quantize_fp8 bf16 [{tokens}, {_ACTIVATION_K}] group 128",
        hal.ops.quantize_fp8,
        (x, 128),
        target=">= 0.2",
    )  # exact rounding without hardware FP8: docs/performance.md


def _operator_cases(size: Size) -> List[Callable[[], Figure]]:
    """A figure for each operator the figures above leave out, on DeepSeek-shaped problems; no targets. Inputs
    in FP8 / FP4 / int8 come from the reference quantisers, so a backend is measured on what it serves."""
    tokens, k = size.quant_tokens, _ACTIVATION_K
    experts = 4 * size.experts  # V3's router: 256 experts in 8 groups, 4 groups kept, 8 experts a token
    w_shape = (4 * size.expert_width, 2 * size.hidden)  # a weight matrix [N, K]
    w = _bf16(*w_shape)
    rows = size.gemm_tokens // _TOP_K  # tokens routed to the experts, _TOP_K rows each
    m, kk, n = rows, size.hidden, size.expert_width  # the quantised GEMMs: one expert GEMM's shape, dense
    ops = hal.ops
    quant_fp8, quant_fp8_w = ops.quantize_fp8.reference_impl, ops.quantize_fp8_weight.reference_impl
    quant_int8, quant_int8_w = ops.quantize_int8.reference_impl, ops.quantize_int8_weight.reference_impl
    weight = f"weight [{w_shape[0]}, {w_shape[1]}]"

    def routing() -> Figure:
        logits, bias = torch.randn(tokens, experts), torch.randn(experts) * 0.1
        return _against_copy(
            size,
            f"topk_routing V3 gate, {tokens} tokens, {experts} experts, top-{_TOP_K}",
            ops.topk_routing,
            (logits, _TOP_K),
            dict(scoring="sigmoid", bias=bias, n_group=8, topk_group=4, renormalize=True, scale=2.5),
        )

    def hashed() -> Figure:
        vocab = 1024
        table = torch.randint(0, experts, (vocab, _TOP_K), dtype=torch.int32)
        ids, logits = torch.randint(0, vocab, (tokens,)), torch.randn(tokens, experts)
        return _against_copy(
            size,
            f"hash_routing V4, {tokens} tokens, {experts} experts, top-{_TOP_K}",
            ops.hash_routing,
            (ids, table, logits),
            dict(scoring="sqrtsoftplus", renormalize=True),
        )

    def permute() -> Figure:
        x, ids = _bf16(rows, size.hidden), _routed_ids(rows, size.experts)
        return _against_copy(
            size,
            f"moe_permute bf16 {rows} tokens x top-{_TOP_K}, H={size.hidden}, {size.experts} experts",
            ops.moe_permute,
            (x, ids, size.experts),
        )

    def unpermute() -> Figure:
        ids = _routed_ids(rows, size.experts)
        permutation = ops.moe_permute.reference_impl(_bf16(rows, 1), ids, size.experts)[1]
        y, weights = _bf16(ids.numel(), size.hidden), torch.rand(ids.shape)
        return _against_copy(
            size,
            f"moe_unpermute bf16 {rows} tokens x top-{_TOP_K}, H={size.hidden}",
            ops.moe_unpermute,
            (y, weights, permutation),
        )

    def cache_write() -> Figure:
        new, block = size.model_context, 64
        blocks = 2 * -(-new // block)
        cache, kv = _bf16(blocks, block, _LATENT + _ROPE), _bf16(new, _LATENT + _ROPE)
        slots = torch.randperm(blocks * block)[:new]
        return _against_copy(
            size,
            f"paged_cache_write bf16 {new} tokens into scattered slots, D={_LATENT + _ROPE}",
            ops.paged_cache_write,
            (cache, kv, slots),
            moved=2 * _bytes(kv) + _bytes(slots),
        )

    def quantised_gemm(name: str, a: tuple, b: tuple, op: Op) -> Callable[[], Figure]:
        return lambda: _against_dense(
            size, f"{name} [{m}, {kk}] x [{n}, {kk}]^T -> bf16", lambda: op(a[0], a[1], b[0], b[1]), 2.0 * m * kk * n
        )

    def prefill() -> Figure:
        length, heads, dqk = size.model_context, size.heads, _NOPE + _ROPE
        q, key, v = _bf16(length, heads, dqk), _bf16(length, heads, dqk), _bf16(length, heads, _HEAD_V)
        cu = torch.tensor([0, length], dtype=torch.int32)
        flops = 2.0 * heads * length * (length + 1) / 2 * (dqk + _HEAD_V)
        return _against_dense(
            size,
            f"mla_prefill causal bf16, {heads} heads, {length} tokens",
            lambda: ops.mla_prefill(q, key, v, cu, softmax_scale=_MLA_SCALE),
            flops,
        )

    x_gemm, w_gemm = _bf16(m, kk), _bf16(n, kk, scale=kk**-0.5)
    fp4 = ops.quantize_fp4.reference_impl(w)
    return [
        routing,
        hashed,
        permute,
        unpermute,
        cache_write,
        lambda: bench_quantize_fp8(size, tokens),
        lambda: _against_copy(
            size, f"quantize_fp8_weight bf16 {weight}, 128x128 blocks", ops.quantize_fp8_weight, (w,)
        ),
        lambda: _against_copy(
            size,
            f"dequantize_fp8 {weight}, 128x128 blocks -> bf16",
            ops.dequantize_fp8,
            quant_fp8_w(w),
            dict(block_shape=(128, 128)),
        ),
        lambda: _against_copy(size, f"quantize_fp4 bf16 {weight}, group 32", ops.quantize_fp4, (w,)),
        lambda: _against_copy(size, f"dequantize_fp4 {weight}, group 32 -> bf16", ops.dequantize_fp4, fp4),
        lambda: _against_copy(
            size, f"quantize_int8 bf16 [{tokens}, {k}] per token", ops.quantize_int8, (_bf16(tokens, k),)
        ),
        lambda: _against_copy(size, f"quantize_int8_weight bf16 {weight} per channel", ops.quantize_int8_weight, (w,)),
        quantised_gemm("fp8_gemm", quant_fp8(x_gemm), quant_fp8_w(w_gemm), ops.fp8_gemm),
        quantised_gemm("int8_gemm", quant_int8(x_gemm), quant_int8_w(w_gemm), ops.int8_gemm),
        prefill,
    ]


def _routed_ids(tokens: int, experts: int) -> torch.Tensor:
    """Distinct expert ids ``[tokens, min(_TOP_K, experts)]`` for each token, as a router picks them."""
    return torch.rand(tokens, experts).topk(min(_TOP_K, experts), dim=-1).indices


def _dispatch_cases() -> Dict[str, Tuple[Op, tuple, dict]]:
    """Small calls of several operators, where the per-call overhead is what a decode step feels."""
    logits = torch.randn(4, 64)
    return {
        "quantize_fp8": (hal.ops.quantize_fp8, (torch.randn(4, 128),), {}),
        "grouped_gemm": (
            hal.ops.grouped_gemm,
            (torch.randn(8, 32), torch.randn(4, 16, 32), torch.tensor([2, 2, 2, 2])),
            {},
        ),
        "topk_routing": (hal.ops.topk_routing, (logits,), dict(top_k=2, scoring="sigmoid")),
        "mla_decode": (hal.ops.mla_decode, _mla_problem(2, 64, 16), dict(softmax_scale=0.1, head_dim_v=512)),
    }


class _NullBackend(Backend):
    """Every operator as a no-op, for :func:`bench_dispatch` only: the time a call spends in the HAL before
    it reaches an implementation is then measured alone, free of a kernel's run-to-run noise (a kernel of
    tens of microseconds varies by more than the overhead being measured)."""

    vendor = "hal bench (no-op implementations)"
    portable = True

    def __init__(self) -> None:
        super().__init__()
        for op in all_ops().values():
            self.add_implementation(op.name, _no_op(op))


def _no_op(op: Op) -> Callable[..., None]:
    def no_op(*args: Any, **kwargs: Any) -> None:
        return None

    no_op.__signature__ = op.signature  # type: ignore[attr-defined]  # what add_implementation checks
    return no_op


_NULL = "bench-null"


class _NullPlugin:
    @hookimpl
    def hal_backends(self):
        return [BackendSpec(name=_NULL, factory=f"{__name__}:_NullBackend")]


def bench_dispatch(size: Size) -> List[Figure]:
    """A HAL operator call against a direct call of the implementation it reaches (a no-op, so that only the
    overhead is timed): the hot path, where the call's signature was validated before. Also reported:
    ``validation_us``, the contract's checks alone (what the first call of a signature pays on top), and a
    call in checked mode (every check, values included, on every call)."""
    if not register_plugin(_NullPlugin(), _NULL):
        raise RuntimeError(f"hal bench: a plugin named '{_NULL}' is already registered in this process")
    try:
        return [
            _dispatch_figure(name, op, args, kwargs, size) for name, (op, args, kwargs) in _dispatch_cases().items()
        ]
    finally:
        unregister_plugin(_NULL)


def _dispatch_figure(name: str, op: Op, args: tuple, kwargs: dict, size: Size) -> Figure:
    with hal.use_backend(_NULL):
        impl = route(op).impl
        if impl is None:
            raise RuntimeError(f"hal bench: the null backend does not serve {op.name}")
        call_s, direct_s = _paired(lambda: op(*args, **kwargs), lambda: impl(*args, **kwargs), size)
    with hal.use_backend(_NULL, checked=True):
        checked_s, _ = _paired(lambda: op(*args, **kwargs), lambda: None, size)
    validate_s, _ = _paired(lambda: op.validate(*args, **kwargs), lambda: None, size)
    overhead = [(a - b) * 1e6 for a, b in zip(call_s, direct_s)]
    return Figure(
        f"dispatch overhead, {name}",
        "direct call of the implementation",
        statistics.median(overhead),
        min(overhead),
        max(overhead),
        "microseconds per call",
        statistics.median(call_s) * 1e3,
        statistics.median(direct_s) * 1e3,
        "< 2 us",
        {
            "validation_us": statistics.median(validate_s) * 1e6,
            "checked_mode_us": (statistics.median(checked_s) - statistics.median(direct_s)) * 1e6,
        },
    )


# --------------------------------------------------------------------------- the model


def _timed(fn: Callable[[], Any]) -> Tuple[Any, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def _hal_run(model, prompt: torch.Tensor, steps: int) -> Tuple[List[int], float, float]:
    """Greedy tokens, prefill seconds and decode seconds per token of ``hal.model``."""
    cache = model.new_cache(1, prompt.shape[1] + steps)
    logits, prefill_s = _timed(lambda: model(prompt, cache))
    tokens = [int(logits[0, -1].argmax())]
    start = time.perf_counter()
    for _ in range(steps - 1):
        tokens.append(int(model(torch.tensor([[tokens[-1]]]), cache)[0, -1].argmax()))
    return tokens, prefill_s, (time.perf_counter() - start) / max(steps - 1, 1)


def _hf_run(model, prompt: torch.Tensor, steps: int) -> Tuple[List[int], float, float]:
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out, prefill_s = _timed(lambda: model(prompt, cache=cache, use_cache=True))
        tokens = [int(out.logits[0, -1].argmax())]
        start = time.perf_counter()
        for _ in range(steps - 1):
            out = model(torch.tensor([[tokens[-1]]]), cache=cache, use_cache=True)
            tokens.append(int(out.logits[0, -1].argmax()))
    return tokens, prefill_s, (time.perf_counter() - start) / max(steps - 1, 1)


_MODEL_TARGETS = {
    "deepseek_v3": {"prefill": ">= 3", "decode": ">= 10"}
}  # the project's stated targets (docs/performance.md): V3's only


def bench_model(size: Size, backend: str, notes: List[str], arch: str = "deepseek_v3") -> List[Figure]:
    """A tiny ``arch`` model's prefill and decode against transformers' on the same checkpoint (notes: why
    something was skipped)."""
    import hal.model
    from hal.model.tiny import make_tiny

    name = "tiny " + arch.replace("deepseek_v", "V")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        from transformers import AutoModelForCausalLM
    except ImportError:
        transformers = None  # type: ignore[assignment]
        notes.append(f"transformers is not installed: the {name} peer comparison is skipped")
    with tempfile.TemporaryDirectory() as tmp:
        make_tiny(arch, tmp)
        ours = hal.model.load(tmp, backend=backend, dtype=torch.bfloat16)
        peer = None
        if transformers:
            try:
                peer = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16).eval()
            except (ValueError, KeyError) as exc:  # a transformers without this architecture
                notes.append(
                    f"transformers {transformers.__version__} cannot load the {name} checkpoint ({exc}): "
                    "the peer comparison is skipped"
                )
    prompt = torch.randint(2, ours.args.vocab_size, (1, size.model_context), generator=torch.Generator().manual_seed(0))
    steps = size.decode_steps
    runs: Dict[str, List[Tuple[Any, ...]]] = {"hal": [], "transformers": []}  # (tokens, prefill s, decode s)
    for _ in range(1 + size.reps // 2):  # the first repetition is the warm-up
        runs["hal"].append(_hal_run(ours, prompt, steps))
        if peer is not None:
            runs["transformers"].append(_hf_run(peer, prompt, steps))
    figures = []
    ctx = size.model_context
    if peer is None:
        for phase, i, per in (("prefill", 1, ctx), ("decode", 2, 1)):
            rates = [per / r[i] for r in runs["hal"][1:]]
            figures.append(
                Figure(
                    f"{name} {phase} tokens/s at {ctx} context",
                    "(no peer measured)",
                    statistics.median(rates),
                    min(rates),
                    max(rates),
                    "tokens per second",
                    statistics.median(r[i] for r in runs["hal"][1:]) * 1e3,
                    float("nan"),
                )
            )
        return figures
    same = all(h[0] == p[0] for h, p in zip(runs["hal"], runs["transformers"]))
    # where they first part (repetition, step, hal's token, transformers'), for a reader to follow up
    parted: Dict[str, Any] = (
        {}
        if same
        else {
            "first_difference": next(
                (
                    (rep, step, a, b)
                    for rep, (h, p) in enumerate(zip(runs["hal"], runs["transformers"]))
                    for step, (a, b) in enumerate(zip(h[0], p[0]))
                    if a != b
                ),
                None,
            )
        }
    )
    for phase, i in (("prefill", 1), ("decode", 2)):
        ours_s = [r[i] for r in runs["hal"][1:]]
        peer_s = [r[i] for r in runs["transformers"][1:]]
        per = ctx if phase == "prefill" else 1
        figures.append(
            _figure(
                f"{name} {phase} at {ctx} context",
                f"transformers {transformers.__version__} {type(peer).__name__}, same checkpoint and tokens",
                ours_s,
                peer_s,
                means="speed-up over transformers",
                target=_MODEL_TARGETS.get(arch, {}).get(phase),
                identical_greedy_tokens=same,
                **parted,
                tokens_per_s=per / statistics.median(ours_s),
                peer_tokens_per_s=per / statistics.median(peer_s),
            )
        )
    return figures


# --------------------------------------------------------------------------- driver


def run(size_name: str = "default", backend: str = "cpu", model: bool = True) -> Dict[str, Any]:
    """Every measurement on ``backend``; returns what ``--json`` writes. A figure whose operator the backend
    does not serve (e.g. FP8 on a chip without it) is skipped with a note saying why."""
    size = SIZES[size_name]
    torch.manual_seed(0)
    notes: List[str] = []

    def measured(bench: Callable[..., Any], *args: Any) -> List[Figure]:
        try:
            found = bench(*args)
        except hal.UnsupportedError as exc:
            notes.append(f"skipped: {exc}")
            return []
        return found if isinstance(found, list) else [found]

    figures: List[Figure] = []
    with hal.use_backend(backend):
        figures += measured(bench_grouped_gemm, size, size.experts, size.gemm_tokens)
        dense_gflops = _dense_gflops(size)
        for batch in (1, 4):
            for scattered in (False, True):
                figures += measured(bench_mla_decode, size, size.context, dense_gflops, scattered, batch)
        figures += measured(bench_mla_naive, size, size.context)
        figures += measured(bench_mla_sparse, size, 4 * size.context)
        for case in _operator_cases(size):
            figures += measured(case)
        figures += bench_dispatch(size)
        scaling = {
            "tokens": [
                f for tokens in size.scaling["tokens"] for f in measured(bench_grouped_gemm, size, size.experts, tokens)
            ],
            "experts": [
                f
                for experts in size.scaling["experts"]
                for f in measured(bench_grouped_gemm, size, experts, size.gemm_tokens)
            ],
            "context": [
                f
                for context in size.scaling["context"]
                for f in measured(bench_mla_decode, size, context, dense_gflops, False)
            ],
        }
    if model:
        for arch in ("deepseek_v3", "deepseek_v4"):
            figures += measured(bench_model, size, backend, notes, arch)
    return {
        "backend": backend,
        "size": size_name,
        "machine": _machine(),
        "figures": [asdict(f) for f in figures],
        "scaling": {axis: [asdict(f) for f in fs] for axis, fs in scaling.items()},
        "notes": notes,
    }


def _dense_gflops(size: Size) -> float:
    """This run's dense fp32 GEMM rate at the expert GEMM's K and N: MLA decode's roofline compute rate."""
    flops = 2.0 * size.gemm_tokens * size.hidden * size.expert_width
    dense = _dense_gemm(flops, size.hidden, size.expert_width)
    dense_s, _ = _paired(dense, lambda: None, size)
    return flops / statistics.median(dense_s) / 1e9


def _machine() -> Dict[str, Any]:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def render(data: Dict[str, Any]) -> str:
    """The report as text: one line per figure, ratio first."""
    m = data["machine"]
    from hal.registry import registry

    lines = [
        f"hal bench: backend {data['backend']}{registry().emulated_label(data['backend'])}, size {data['size']}, "
        f"{m['cores']} cores ({m['torch_threads']} torch threads), torch {m['torch']}",
        f"{'ratio':>8} {'min..max':>15}  {'target':>7}  {'op ms':>9} {'limit ms':>9}  figure (ratio = ...; limit)",
    ]

    def line(f: Dict[str, Any]) -> str:
        spread = f"{f['ratio_min']:.2f}..{f['ratio_max']:.2f}"
        return (
            f"{f['ratio']:8.2f} {spread:>15}  {f['target'] or '':>7}  {f['op_ms']:9.3f} {f['limit_ms']:9.3f}  "
            f"{f['name']} ({f['ratio_means']}; {f['limit']})"
            + "".join(f"; {k}={v:.3g}" if isinstance(v, float) else f"; {k}={v}" for k, v in f["extra"].items())
        )

    lines += [line(f) for f in data["figures"]]
    for axis, figures in data["scaling"].items():
        lines.append(f"scaling with {axis}:")
        lines += [line(f) for f in figures]
    lines += [f"note: {n}" for n in data["notes"]]
    return "\n".join(lines) + "\n"


def main(size: str, backend: str, json_path: Optional[str], model: bool = True) -> int:
    data = run(size, backend, model)
    print(render(data), end="")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(data, f, indent=2)
    return 0
