"""DeepSeek V4 on the HAL: every heavy operator — routing (hash and top-k), expert GEMMs, the grouped output
projection, attention with sinks over the sliding window and the compressed entries, the paged key cache,
FP8 linears — goes through :mod:`hal.ops`. Semantics: those of transformers' ``DeepseekV4ForCausalLM``
(the parity target). Small glue (embedding, norms, RoPE, mHC mixing, the compressors' pooling, the
indexer's scores, the clamped SwiGLU) is plain PyTorch.

Attention of one layer, for the query at position ``t``: keys are the token keys ``t - W < p <= t``
(``W = sliding_window``) and, in compressed layers, the pooled entries ``e`` whose window has closed
(``e < (t + 1) // rate``): all of them (HCA), or the ``index_topk`` the lightning indexer scores best (CSA).
Key and value are the same vector; a per-head sink joins the softmax."""

from __future__ import annotations

import contextlib
import math
from typing import Dict, Iterable, List, Optional

import torch
import torch.nn.functional as F

import hal
from hal.formats import FP8_DTYPE, is_fp4
from hal.model.checkpoint import SCALE_SUFFIX, Checkpoint
from hal.model.config import V4Args
from hal.model.deepseek_v3 import Experts as V3Experts
from hal.model.deepseek_v3 import LayerContext, Rope, _on_host, check_tokens, expert_k_aligned, zeroed_cache
from hal.model.deepseek_v3 import Weights as V3Weights

#: what becomes of FP4 expert weights: kept packed for the grouped GEMM, or dequantised on load
FP4_WEIGHT_MODES = ("keep", "dequantize")

#: The released checkpoints' names (DeepSeek's, e.g. ``layers.3.ffn.experts.7.w1.scale``) as rewrites of the
#: names this module reads, those transformers' ``save_pretrained`` writes (``model.layers.3.ffn.experts.7.w1.
#: weight_scale_inv``): no ``model.`` prefix, DeepSeek's top-level names, block scales (FP8 and FP4) under
#: ``<module>.scale``. The rest (``attn.wq_a``, per-expert ``w1`` / ``w3`` / ``w2``, ...) is the same in both.
RELEASED_NAMES = (
    (r"^model\.embed_tokens\.weight$", "embed.weight"),
    (r"^model\.norm\.weight$", "norm.weight"),
    (r"^model\.hc_head\.hc_(fn|base|scale)$", r"hc_head_\1"),
    (r"^model\.layers\.", "layers."),
    (r"\.weight" + SCALE_SUFFIX + "$", ".scale"),
)


def released_layout(file_names: Iterable[str]) -> bool:
    """Whether a checkpoint holding ``file_names`` names its tensors as the released ones (``layers.<i>.*``)."""
    return any(name.startswith("layers.") for name in file_names)


class Weights(V3Weights):
    """V3's weight reader, plus FP4 expert weights by ``fp4`` (one of :data:`FP4_WEIGHT_MODES`): kept packed
    with their scales (``"keep"``), or dequantised (:func:`hal.ops.dequantize_fp4`, on the host); None for a
    checkpoint without FP4 experts. A checkpoint in the released naming is read through
    :data:`RELEASED_NAMES`."""

    def __init__(self, ckpt: Checkpoint, args: V4Args, dtype: torch.dtype, fp8: str, fp4: Optional[str]):
        super().__init__(ckpt, args, dtype, fp8)
        self.fp4 = fp4
        if released_layout(ckpt.file_names()):
            ckpt.read_as(RELEASED_NAMES)

    def fp4_expert(self, prefix: str, out_features: int, in_features: int):
        """``(packed uint8 weight, float32 scales)`` kept, or ``(weight in dtype, None)`` dequantised."""
        q, s = self.ckpt.fp4_weight(prefix, out_features, in_features)
        if self.fp4 == "keep":
            return q, s
        with _on_host():
            return hal.ops.dequantize_fp4(q, s, out_dtype=self.dtype), None


def fp4_activation_dtype(args: V4Args, fp8: str, dtype: torch.dtype) -> torch.dtype:
    """What the experts' FP4 GEMMs multiply the weights with: FP8 activations (1x128 groups, DeepGEMM's
    ``fp8_fp4`` GEMMs) when the model keeps its FP8 linears and both GEMMs' K align to 128, else ``dtype``."""
    return FP8_DTYPE if fp8 == "keep" and expert_k_aligned(args) else dtype


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """V4's RMSNorm: float32 weight, normalised and scaled in float32, rounded once to x's dtype."""
    xf = x.float()
    return (weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps))).to(x.dtype)


def unit_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm without a weight (per query head, and before the mHC projections)."""
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps).to(x.dtype)


def rope_tail(x: torch.Tensor, positions: torch.Tensor, rope: Rope) -> torch.Tensor:
    """RoPE on the last ``qk_rope_head_dim`` dims of ``x`` ``[B, S, heads, D]`` (V4 lays heads out as
    ``[nope | rope]``); negative positions rotate back."""
    d = 2 * rope.inv_freq.numel()
    return torch.cat((x[..., :-d], rope(x[..., -d:], positions)), dim=-1)


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    return F.silu(gate.clamp(max=limit)) * up.clamp(-limit, limit)


class Cache:
    """Per layer, a paged key cache ``[num_blocks, block_size, head_dim]`` and its block table: logical
    positions ``[0, tokens)`` hold the token keys, ``[tokens, tokens + capacity // rate)`` a compressed
    layer's entries. Plus the compressors' pending tokens and the indexer's keys (plain tensors)."""

    def __init__(self, args: V4Args, batch: int, capacity: int, dtype: torch.dtype, block_size: int = 64):
        self.block_size, self.length = block_size, 0
        self.tokens = max(1, math.ceil(capacity / block_size)) * block_size
        blocks = [
            math.ceil((self.tokens + (capacity // rate if rate else 0)) / block_size) for rate in args.compress_rates
        ]
        self.kv = zeroed_cache([(batch * n, block_size, args.head_dim) for n in blocks], dtype, batch, capacity)
        self.block_table = [torch.arange(batch * n, dtype=torch.int32).view(batch, n) for n in blocks]
        self.entries = [0] * args.num_hidden_layers
        self.pending: List[Dict[str, dict]] = [{} for _ in range(args.num_hidden_layers)]
        self.index_keys: List[Optional[torch.Tensor]] = [None] * args.num_hidden_layers

    def slots(self, layer: int, positions: torch.Tensor) -> torch.Tensor:
        """Cache slots of logical ``positions`` ``[P]`` of every sequence, ``[B * P]``."""
        blocks = self.block_table[layer][:, positions // self.block_size].long()
        return (blocks * self.block_size + positions % self.block_size).reshape(-1)


class Compressor:
    """Pools every ``rate`` tokens into one entry: ``norm(sum_j softmax_j(gate_j + ape_j) * kv_j)``, RoPE'd
    at the window's first position. Overlapping (CSA): entry ``e`` pools the first half of window ``e - 1``'s
    projections with the second half of window ``e``'s. Tokens of an open window (and, overlapping, the
    last closed one) wait in ``pending`` for the next call."""

    def __init__(self, w: Weights, p: str, args: V4Args, rate: int, width: int, overlap: bool, rope: Rope):
        c = 2 if overlap else 1
        self.wkv = w.linear(f"{p}.wkv", c * width, args.hidden_size)
        self.wgate = w.linear(f"{p}.wgate", c * width, args.hidden_size)
        self.ape = w.ckpt.tensor(f"{p}.ape", (rate, c * width), torch.float32)
        self.norm = w.ckpt.tensor(f"{p}.norm.weight", (width,), torch.float32)
        self.rate, self.width, self.overlap, self.rope, self.eps = rate, width, overlap, rope, args.rms_norm_eps

    def __call__(self, x: torch.Tensor, pending: dict) -> torch.Tensor:
        """The entries ``x`` ``[B, S, H]`` (the next S tokens) closes, ``[B, n, width]``."""
        kv, gate = self.wkv(x), self.wgate(x)
        start, emitted = pending.get("start", 0), pending.get("count", 0)
        if "kv" in pending:
            kv, gate = torch.cat((pending["kv"], kv), dim=1), torch.cat((pending["gate"], gate), dim=1)
        b, n, r, d = kv.shape[0], kv.shape[1] // self.rate, self.rate, self.width
        win = kv[:, : n * r].view(b, n, r, kv.shape[-1])
        score = gate[:, : n * r].view(b, n, r, kv.shape[-1]) + self.ape  # float32
        if self.overlap:  # window 0 has no predecessor: its first half gets weight 0
            prev_kv = torch.cat((torch.zeros_like(win[:, :1, :, :d]), win[:, :-1, :, :d]), dim=1)
            prev_score = torch.cat((torch.full_like(score[:, :1, :, :d], float("-inf")), score[:, :-1, :, :d]), dim=1)
            win, score = torch.cat((prev_kv, win[..., d:]), dim=2), torch.cat((prev_score, score[..., d:]), dim=2)
        pooled = (win * score.softmax(dim=2, dtype=torch.float32).to(win.dtype)).sum(dim=2)
        first = start // r  # the window pending[0] starts
        new = rms_norm(pooled[:, emitted - first :], self.norm, self.eps)
        new = rope_tail(new[:, :, None], torch.arange(emitted, first + n) * r, self.rope)[:, :, 0]
        count = first + n
        keep = (count - 1 if self.overlap and count else count) * r
        pending.update(start=keep, count=count, kv=kv[:, keep - start :], gate=gate[:, keep - start :])
        return new


class Indexer:
    """CSA's lightning indexer: its own overlapping compressor (``index_head_dim`` wide), queries from the
    q LoRA residual; entry ``e`` scores ``sum_h w_h * relu(q_h . k_e) / sqrt(index_head_dim)`` and the
    ``index_topk`` best closed entries are kept."""

    def __init__(self, w: Weights, p: str, args: V4Args, rate: int, rope: Rope):
        self.compressor = Compressor(w, f"{p}.compressor", args, rate, args.index_head_dim, True, rope)
        self.wq_b = w.linear(f"{p}.wq_b", args.index_n_heads * args.index_head_dim, args.q_lora_rank)
        self.weights_proj = w.linear(f"{p}.weights_proj", args.index_n_heads, args.hidden_size)
        self.args, self.rate, self.rope = args, rate, rope

    def __call__(
        self, x: torch.Tensor, q_residual: torch.Tensor, positions: torch.Tensor, cache: Cache, layer: int
    ) -> torch.Tensor:
        """int64 ``[B, S, min(index_topk, entries)]``: the chosen entries, -1 where fewer are closed."""
        a = self.args
        b, s, _ = x.shape
        new = self.compressor(x, cache.pending[layer].setdefault("indexer", {}))
        old = cache.index_keys[layer]
        keys = cache.index_keys[layer] = new if old is None else torch.cat((old, new), dim=1)
        q = rope_tail(self.wq_b(q_residual).view(b, s, a.index_n_heads, a.index_head_dim), positions, self.rope)
        scores = F.relu(torch.einsum("bshd,btd->bsht", q.float(), keys.float())) * a.index_head_dim**-0.5
        head_weights = self.weights_proj(x).float() * a.index_n_heads**-0.5
        scores = (scores * head_weights[..., None]).sum(dim=2)
        closed = torch.arange(keys.shape[1])[None, :] < ((positions + 1) // self.rate)[:, None]  # [S, entries]
        chosen = scores.masked_fill(~closed, float("-inf")).topk(min(a.index_topk, keys.shape[1]), dim=-1).indices
        return chosen.masked_fill(~closed.expand(b, -1, -1).gather(2, chosen), -1)


class Attention:
    """Shared-KV multi-query attention with sinks over the sliding window (and the compressed entries),
    then the grouped low-rank output projection."""

    def __init__(self, w: Weights, p: str, args: V4Args, layer: int, main_rope: Rope, compress_rope: Rope):
        h, d, q_rank = args.num_attention_heads, args.head_dim, args.q_lora_rank
        self.args, self.kind, self.rate = args, args.layer_types[layer], args.compress_rates[layer]
        self.rope = main_rope if self.kind == "sliding_attention" else compress_rope
        self.wq_a = w.linear(f"{p}.wq_a", q_rank, args.hidden_size)
        self.q_norm = w.ckpt.tensor(f"{p}.q_norm.weight", (q_rank,), torch.float32)
        self.wq_b = w.linear(f"{p}.wq_b", h * d, q_rank)
        self.wkv = w.linear(f"{p}.wkv", d, args.hidden_size)
        self.kv_norm = w.ckpt.tensor(f"{p}.norm.weight", (d,), torch.float32)
        g = args.o_groups
        # one [o_lora_rank, heads * head_dim / g] block per group: the "experts" of a grouped GEMM
        self.wo_a = w.dense(f"{p}.wo_a", g * args.o_lora_rank, h * d // g).view(g, args.o_lora_rank, -1)
        self.wo_b = w.linear(f"{p}.wo_b", args.hidden_size, g * args.o_lora_rank)
        self.sinks = w.ckpt.tensor(f"{p}.attn_sink", (h,), torch.float32)
        self.compressor = self.indexer = None
        if self.rate:
            csa = self.kind == "compressed_sparse_attention"
            self.compressor = Compressor(w, f"{p}.compressor", args, self.rate, d, csa, compress_rope)
            if csa:
                self.indexer = Indexer(w, f"{p}.indexer", args, self.rate, compress_rope)

    def _compressed(self, x: torch.Tensor, q_residual: torch.Tensor, positions: torch.Tensor, cache: Cache, layer: int):
        """Pool the closed windows into the cache; ``(new entries [B, n, D], chosen entries [B, S, k])``."""
        new = self.compressor(x, cache.pending[layer].setdefault("attention", {}))
        first, cache.entries[layer] = cache.entries[layer], cache.entries[layer] + new.shape[1]
        entry_positions = cache.tokens + torch.arange(first, cache.entries[layer])
        hal.ops.paged_cache_write(cache.kv[layer], new.reshape(-1, new.shape[-1]), cache.slots(layer, entry_positions))
        if self.indexer is not None:
            return new, self.indexer(x, q_residual, positions, cache, layer)
        entries = torch.arange(cache.entries[layer])
        closed = entries[None, :] < ((positions + 1) // self.rate)[:, None]
        return new, torch.where(closed, entries, -1).expand(x.shape[0], -1, -1)

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, cache: Cache, layer: int) -> torch.Tensor:
        a = self.args
        b, s, _ = x.shape
        h, d, eps = a.num_attention_heads, a.head_dim, a.rms_norm_eps
        q_residual = rms_norm(self.wq_a(x), self.q_norm, eps)
        q = rope_tail(unit_rms_norm(self.wq_b(q_residual).view(b, s, h, d), eps), positions, self.rope)
        kv = rope_tail(rms_norm(self.wkv(x), self.kv_norm, eps)[:, :, None], positions, self.rope)[:, :, 0]
        hal.ops.paged_cache_write(cache.kv[layer], kv.reshape(b * s, d), cache.slots(layer, positions))
        common = dict(softmax_scale=d**-0.5, sinks=self.sinks)
        if self.rate:  # attended keys listed explicitly: the window's tokens and the chosen entries
            new, chosen = self._compressed(x, q_residual, positions, cache, layer)
            window = positions[:, None] - torch.arange(a.sliding_window)[None, :]
            window = window.masked_fill(window < 0, -1).expand(b, -1, -1)
            offset = s if cache.length == 0 else cache.tokens  # where the entries start among the keys
            listed = torch.cat((window, torch.where(chosen >= 0, chosen + offset, -1)), dim=-1).to(torch.int32)
            common.update(causal=False, topk_indices=listed)
        else:
            common.update(causal=True, window=a.sliding_window)
        if cache.length == 0:  # prefill: the new keys (and entries) of each sequence, dense
            keys = kv if not self.rate else torch.cat((kv, new), dim=1)
            length = keys.shape[1]
            cu_q = torch.arange(0, b * s + 1, s, dtype=torch.int32)
            cu_k = torch.arange(0, b * length + 1, length, dtype=torch.int32)
            if self.rate:
                common["topk_indices"] = common["topk_indices"].reshape(b * s, -1)
            keys = keys.reshape(b * length, 1, d)
            out, _ = hal.ops.mla_prefill(q.reshape(b * s, h, d), keys, keys, cu_q, cu_k, **common)
        else:  # decode over the paged cache
            used = cache.tokens + cache.entries[layer] if self.rate else cache.length + s
            seq_lens = torch.full((b,), used, dtype=torch.int32)
            out, _ = hal.ops.mla_decode(q, cache.kv[layer], cache.block_table[layer], seq_lens, head_dim_v=d, **common)
        # the value carried the key's rotation: rotate the output's rope dims back to the query's frame
        out = rope_tail(out.view(b, s, h, d), -positions, self.rope)
        g = a.o_groups
        grouped = out.reshape(b * s, g, -1).transpose(0, 1).reshape(g * b * s, -1)  # rows sorted by group
        sizes = torch.full((g,), b * s, dtype=torch.int32)
        low_rank = hal.ops.grouped_gemm(grouped, self.wo_a, sizes).view(g, b * s, -1).transpose(0, 1)
        return self.wo_b(low_rank.reshape(b, s, -1))


class MLP:
    """The shared expert: clamped SwiGLU."""

    def __init__(self, w: Weights, p: str, args: V4Args):
        dim, inter = args.hidden_size, args.moe_intermediate_size
        self.w1, self.w3 = w.linear(f"{p}.w1", inter, dim), w.linear(f"{p}.w3", inter, dim)
        self.w2 = w.linear(f"{p}.w2", dim, inter)
        self.limit = args.swiglu_limit

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(clamped_swiglu(self.w1(x), self.w3(x), self.limit))


class Experts(V3Experts):
    """The routed experts as V3's (``w13`` ``[E, 2I, H]``, ``w2`` ``[E, H, I]`` for the grouped GEMM), read from
    V4's ``w1`` (gate) / ``w3`` (up) / ``w2`` (down) names, with the clamped SwiGLU. FP4 experts kept packed
    (``w13`` uint8 ``[E, 2I, H / 2]``, scales ``[E, 2I, H / 32]``) multiply :func:`fp4_activation_dtype`
    activations."""

    projections = ("w1", "w3", "w2")

    def __init__(self, w: Weights, p: str, args: V4Args):
        super().__init__(w, p, args, read=w.fp4_expert if args.fp4_experts else None)
        self.limit = args.swiglu_limit
        self.fp4_x_dtype = fp4_activation_dtype(args, w.fp8, w.dtype)

    def _gemm(
        self, x: torch.Tensor, w: torch.Tensor, scale: Optional[torch.Tensor], group_sizes: torch.Tensor
    ) -> torch.Tensor:
        if is_fp4(w) and self.fp4_x_dtype != FP8_DTYPE:
            return hal.ops.grouped_gemm(x, w, group_sizes, w_scale=scale, out_dtype=self.dtype)
        return super()._gemm(x, w, scale, group_sizes)

    def __call__(self, x_sorted: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
        gate, up = self._gemm(x_sorted, self.w13, self.s13, group_sizes).chunk(2, dim=-1)
        return self._gemm(clamped_swiglu(gate, up, self.limit), self.w2, self.s2, group_sizes)


class MoE:
    """Hash-routed (``tid2eid[token]``, :func:`hal.ops.hash_routing`) or top-k routed
    (:func:`hal.ops.topk_routing`, bias for selection only) experts, renormalised and scaled, plus the
    shared expert."""

    def __init__(self, w: Weights, p: str, args: V4Args, layer: int):
        e = args.n_routed_experts
        self.args = args
        self.gate = w.ckpt.tensor(f"{p}.gate.weight", (e, args.hidden_size), w.dtype)
        self.table = self.bias = None
        if args.hash_layers[layer]:
            self.table = w.ckpt.ids(f"{p}.gate.tid2eid", (args.vocab_size, args.num_experts_per_tok), e)
        else:
            self.bias = w.ckpt.tensor(f"{p}.gate.bias", (e,), torch.float32, default=0.0)  # zeros: as transformers
        self.experts = Experts(w, f"{p}.experts", args)
        self.shared = MLP(w, f"{p}.shared_experts", args)

    def __call__(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        a = self.args
        flat = x.reshape(-1, x.shape[-1])
        logits = F.linear(flat, self.gate)
        options = dict(scoring=a.scoring_func, renormalize=True, scale=a.routed_scaling_factor)
        if self.table is not None:
            weights, ids = hal.ops.hash_routing(tokens.reshape(-1), self.table, logits, **options)
        else:
            weights, ids = hal.ops.topk_routing(logits, a.num_experts_per_tok, bias=self.bias, **options)
        x_sorted, perm = hal.ops.moe_permute(flat, ids, a.n_routed_experts)
        out = hal.ops.moe_unpermute(self.experts(x_sorted, perm.group_sizes), weights, perm).view_as(x)
        return out + self.shared(x)


def hc_mix(streams: torch.Tensor, fn: torch.Tensor, eps: float) -> torch.Tensor:
    """The mHC mixing logits of ``streams`` ``[B, S, N, H]``: a linear map of their RMS-normalised
    concatenation, in float32."""
    return F.linear(unit_rms_norm(streams.flatten(2).float(), eps), fn)


class HyperConnection:
    """Manifold-constrained hyper-connection around one sub-layer: collapses the ``hc_mult`` residual streams
    into its input (weights ``pre``), then spreads its output back (``post``) on top of the streams mixed by
    ``comb``, a Sinkhorn-normalised (doubly stochastic) ``[N, N]`` matrix."""

    def __init__(self, w: Weights, p: str, args: V4Args):
        n = args.hc_mult
        self.fn = w.ckpt.tensor(f"{p}_fn", ((2 + n) * n, n * args.hidden_size), torch.float32)
        self.base = w.ckpt.tensor(f"{p}_base", ((2 + n) * n,), torch.float32)
        self.scale = w.ckpt.tensor(f"{p}_scale", (3,), torch.float32)
        self.args = args

    def weights(self, streams: torch.Tensor):
        """``(pre [B, S, N], post [B, S, N], comb [B, S, N, N])``, float32."""
        a, n = self.args, self.args.hc_mult
        pre, post, comb = hc_mix(streams, self.fn, a.rms_norm_eps).split([n, n, n * n], dim=-1)
        pre_b, post_b, comb_b = self.base.split([n, n, n * n])
        pre = torch.sigmoid(pre * self.scale[0] + pre_b) + a.hc_eps
        post = 2 * torch.sigmoid(post * self.scale[1] + post_b)
        comb = torch.softmax(comb.unflatten(-1, (n, n)) * self.scale[2] + comb_b.view(n, n), dim=-1) + a.hc_eps
        comb = comb / (comb.sum(dim=-2, keepdim=True) + a.hc_eps)
        for _ in range(a.hc_sinkhorn_iters - 1):
            comb = comb / (comb.sum(dim=-1, keepdim=True) + a.hc_eps)
            comb = comb / (comb.sum(dim=-2, keepdim=True) + a.hc_eps)
        return pre, post, comb

    def __call__(self, streams: torch.Tensor, sublayer) -> torch.Tensor:
        pre, post, comb = self.weights(streams)
        out = sublayer((pre[..., None] * streams).sum(dim=2).to(streams.dtype))
        dtype = streams.dtype
        # stream k receives sum_j comb[j, k] * stream j
        return post.to(dtype)[..., None] * out[:, :, None] + comb.to(dtype).transpose(-1, -2) @ streams


class Block:
    def __init__(self, w: Weights, layer: int, args: V4Args, main_rope: Rope, compress_rope: Rope):
        p = f"model.layers.{layer}"
        self.attn_hc, self.ffn_hc = HyperConnection(w, f"{p}.hc_attn", args), HyperConnection(w, f"{p}.hc_ffn", args)
        self.attn_norm = w.ckpt.tensor(f"{p}.attn_norm.weight", (args.hidden_size,), torch.float32)
        self.attn = Attention(w, f"{p}.attn", args, layer, main_rope, compress_rope)
        self.ffn_norm = w.ckpt.tensor(f"{p}.ffn_norm.weight", (args.hidden_size,), torch.float32)
        self.ffn = MoE(w, f"{p}.ffn", args, layer)
        self.eps = args.rms_norm_eps

    def __call__(
        self, streams: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor, cache: Cache, layer: int
    ) -> torch.Tensor:
        streams = self.attn_hc(
            streams, lambda x: self.attn(rms_norm(x, self.attn_norm, self.eps), positions, cache, layer)
        )
        return self.ffn_hc(streams, lambda x: self.ffn(rms_norm(x, self.ffn_norm, self.eps), tokens))


def _rope(args) -> Rope:
    rope = Rope(args)
    rope.attention_factor = 1.0  # V4 never scales cos/sin (transformers pins YaRN's attention_factor to 1)
    return rope


class Transformer:
    """The whole model: ``forward(tokens, cache)`` runs the next ``S`` tokens of every sequence and returns
    their logits; ``backend`` (None: the settings in force) is selected around every call."""

    def __init__(self, args: V4Args, w: Weights, backend: Optional[str]):
        self.args, self.dtype, self.backend = args, w.dtype, backend
        self.fp8: Optional[str] = None  # as V3's: set by hal.model.load for an FP8 checkpoint
        self.fp8_reason = ""
        #: for FP4 experts, what became of them (one of FP4_WEIGHT_MODES) and why (set by hal.model.load)
        self.fp4: Optional[str] = None
        self.fp4_reason = ""
        h, n = args.hidden_size, args.hc_mult
        self.embed = w.ckpt.tensor("model.embed_tokens.weight", (args.vocab_size, h), w.dtype)
        main_rope, compress_rope = _rope(args.main_rope), _rope(args.compress_rope)
        self.layers = [Block(w, i, args, main_rope, compress_rope) for i in range(args.num_hidden_layers)]
        self.hc_fn = w.ckpt.tensor("model.hc_head.hc_fn", (n, n * h), torch.float32)
        self.hc_base = w.ckpt.tensor("model.hc_head.hc_base", (n,), torch.float32)
        self.hc_scale = w.ckpt.tensor("model.hc_head.hc_scale", (1,), torch.float32)
        self.norm = w.ckpt.tensor("model.norm.weight", (h,), torch.float32)
        self.head = (
            self.embed if args.tie_word_embeddings else w.ckpt.tensor("head.weight", (args.vocab_size, h), w.dtype)
        )

    def new_cache(self, batch: int, capacity: int) -> Cache:
        return Cache(self.args, batch, capacity, self.dtype)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache: Cache, layer_context: Optional[LayerContext] = None) -> torch.Tensor:
        """``tokens`` int ``[B, S]`` (the first call on an empty cache is the prefill) -> logits
        ``[B, S, vocab]`` in the model dtype. ``layer_context(i)`` (bisection) wraps layer ``i``."""
        a = self.args
        check_tokens(tokens, cache.block_table[0].shape[0], a.vocab_size)
        if cache.length + tokens.shape[1] > cache.tokens:
            raise hal.InvalidArgumentError(
                "Transformer.forward",
                "tokens",
                f"at most {cache.tokens - cache.length} more tokens (cache capacity {cache.tokens})",
                str(tokens.shape[1]),
            )
        positions = torch.arange(cache.length, cache.length + tokens.shape[1])
        with hal.use_backend(self.backend) if self.backend else contextlib.nullcontext():
            x = F.embedding(tokens, self.embed)
            streams = x[:, :, None].expand(-1, -1, a.hc_mult, -1).contiguous()
            for i, block in enumerate(self.layers):
                with layer_context(i) if layer_context else contextlib.nullcontext():
                    streams = block(streams, tokens, positions, cache, i)
        cache.length += tokens.shape[1]
        pre = torch.sigmoid(hc_mix(streams, self.hc_fn, a.rms_norm_eps) * self.hc_scale + self.hc_base) + a.hc_eps
        x = (pre[..., None] * streams).sum(dim=2).to(streams.dtype)
        return F.linear(rms_norm(x, self.norm, a.rms_norm_eps), self.head)

    __call__ = forward
