"""DeepSeek V3 (also R1 / V3.1) on the HAL: every heavy operator — routing, expert GEMMs, attention, the
paged latent cache, FP8 linears — goes through :mod:`hal.ops`, so the backend selection decides where
it runs. Semantics: those of transformers' ``DeepseekV3ForCausalLM`` (the parity target)."""

from __future__ import annotations

import contextlib
import math
import os
from typing import Callable, ContextManager, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import hal
from hal.model.checkpoint import Checkpoint
from hal.model.config import ModelArgs

FP8_GROUP = 128  # activation groups of the FP8 GEMMs: K must be a multiple


#: what becomes of an FP8 checkpoint's weights: kept FP8, converted to W8A8 int8, or dequantised
FP8_WEIGHT_MODES = ("keep", "int8", "dequantize")


def quantized_activations(x: torch.Tensor, weight: torch.Tensor, scale_fmt: Optional[str]):
    """``x`` quantised the way the GEMM with ``weight`` takes it: per token to int8 for an int8 weight
    (:func:`hal.ops.quantize_int8`), in 1x128 groups to FP8 otherwise."""
    if weight.dtype == torch.int8:
        return hal.ops.quantize_int8(x)
    return hal.ops.quantize_fp8(x, FP8_GROUP, scale_fmt)


class Linear:
    """``y = x @ W.T``: a plain weight, FP8 e4m3 with 128x128 block scales kept quantised (activations
    are then quantised in 1x128 groups and the product is :func:`hal.ops.fp8_gemm`), or int8 with a scale
    per output channel (activations quantised per token, :func:`hal.ops.int8_gemm`)."""

    def __init__(
        self, weight: torch.Tensor, scale: Optional[torch.Tensor], dtype: torch.dtype, scale_fmt: Optional[str]
    ):
        self.weight, self.scale, self.dtype, self.scale_fmt = weight, scale, dtype, scale_fmt

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is None:
            return F.linear(x, self.weight)
        q, s = quantized_activations(x, self.weight, self.scale_fmt)
        gemm = hal.ops.int8_gemm if self.weight.dtype == torch.int8 else hal.ops.fp8_gemm
        return gemm(q, s, self.weight, self.scale, out_dtype=self.dtype)


class Weights:
    """Reads the model's weights from a :class:`Checkpoint`. FP8 ones, by ``fp8`` (one of
    :data:`FP8_WEIGHT_MODES`): kept quantised where the GEMM's K is a multiple of 128 (``"keep"``),
    dequantised and requantised once to int8 per output channel (``"int8"``,
    :func:`hal.ops.quantize_int8_weight`), or dequantised (:func:`hal.ops.dequantize_fp8`)."""

    def __init__(self, ckpt: Checkpoint, args: ModelArgs, dtype: torch.dtype, fp8: str):
        self.ckpt, self.args, self.dtype, self.fp8 = ckpt, args, dtype, fp8

    def dense(self, prefix: str, out_features: int, in_features: int) -> torch.Tensor:
        w, s = self.ckpt.weight(prefix, out_features, in_features, self.dtype)
        return w if s is None else _dequantized(w, s, self.dtype)

    def linear(self, prefix: str, out_features: int, in_features: int) -> Linear:
        w, s = self.ckpt.weight(prefix, out_features, in_features, self.dtype)
        if s is not None and self.fp8 == "int8":  # requantised from the exact (fp32) dequantised values
            with _on_host():
                w, s = hal.ops.quantize_int8_weight(_dequantized(w, s, torch.float32))
        elif s is not None and not (self.fp8 == "keep" and in_features % FP8_GROUP == 0):
            w, s = _dequantized(w, s, self.dtype), None
        return Linear(w, s, self.dtype, self.args.scale_fmt)

    def norm(self, name: str, size: int) -> torch.Tensor:
        return self.ckpt.tensor(name, (size,), self.dtype)


def _on_host() -> ContextManager:
    """Where load-time weight conversions run: on the host, where the checkpoint is read, by the CPU
    reference (an accelerator without FP8, e.g. an Atlas A2, serves no operator on e4m3 tensors)."""
    return hal.use_backend("cpu")


def _dequantized(w: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    with _on_host():
        return hal.ops.dequantize_fp8(w, scale, block_shape=(128, 128), out_dtype=dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm: normalise in fp32, round to x's dtype, then scale."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class Rope:
    """Rotary embedding of the ``qk_rope_head_dim`` dims, with YaRN frequency interpolation and cos/sin
    scaling (transformers' ``yarn`` rope parameters)."""

    def __init__(self, args: ModelArgs):
        dim, base = args.qk_rope_head_dim, args.rope_theta
        inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        self.attention_factor = 1.0
        if args.rope_factor > 1:
            factor = args.rope_factor

            def correction_dim(rotations: float) -> float:
                return (
                    dim
                    * math.log(args.original_max_position_embeddings / (rotations * 2 * math.pi))
                    / (2 * math.log(base))
                )

            low, high = correction_dim(args.beta_fast), correction_dim(args.beta_slow)
            if args.rope_truncate:
                low, high = math.floor(low), math.ceil(high)
            low, high = max(low, 0), min(high, dim - 1)
            ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 0.001)).clamp(0, 1)
            inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)

            def mscale(m: float) -> float:
                return 0.1 * m * math.log(factor) + 1.0

            self.attention_factor = (
                mscale(args.mscale) / mscale(args.mscale_all_dim)
                if args.mscale and args.mscale_all_dim
                else mscale(1.0)
            )
        self.inv_freq = inv_freq
        self.interleave = args.rope_interleave
        self._cos: Optional[torch.Tensor] = None
        self._sin: Optional[torch.Tensor] = None

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, S, heads, dim]``, ``positions`` ``[S]``, computed in fp32 and rounded once. Interleaved
        pairs stay interleaved (a fixed permutation of transformers' output layout, applied to queries and
        keys alike: same dot products)."""
        cos, sin = (t[None, :, None, :] for t in self._cos_sin(positions))
        xf = x.float()
        if self.interleave:
            a, b = xf[..., 0::2], xf[..., 1::2]
            out = torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)
        else:
            a, b = xf.chunk(2, dim=-1)
            out = torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)
        return out.to(x.dtype)

    def table(self, start: int, end: int, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """cos and sin ``[end - start, dim/2]`` of positions ``start..end-1`` as transformers' DeepseekV3
        computes them: in fp32, times the attention factor, rounded to the model dtype. Kept for every
        position seen so far (doubling), so a decode step slices instead of recomputing."""
        if self._cos is None or self._cos.shape[0] < end or self._cos.dtype != dtype:
            n = max(end, 2 * (0 if self._cos is None else self._cos.shape[0]))
            self._cos, self._sin = (t.to(dtype) for t in self._cos_sin(torch.arange(n)))
        return self._cos[start:end], self._sin[start:end]

    def _cos_sin(self, positions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """fp32 cos and sin ``[S, dim/2]`` of ``positions`` ``[S]``, times the attention factor."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE of ``x`` ``[B, S, heads, dim]`` with :meth:`table`'s ``cos``, ``sin`` as transformers'
        DeepseekV3 applies it: in x's dtype (each product and sum rounded), output de-interleaved (the
        rotated evens, then the odds); queries and keys alike, so the dot products are DeepSeek's."""
        a, b = (x[..., 0::2], x[..., 1::2]) if self.interleave else x.chunk(2, dim=-1)
        cos, sin = cos[:, None], sin[:, None]
        return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)


def _host_memory() -> Optional[int]:
    """Bytes the host can still allocate: Linux's MemAvailable, else its physical memory, else None (unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def zeroed_cache(
    shapes: Sequence[Tuple[int, ...]], dtype: torch.dtype, batch: int, capacity: int
) -> List[torch.Tensor]:
    """Zeroed tensors of ``shapes``, the cache of ``batch`` sequences of ``capacity`` tokens; refused, naming the
    memory it would take, when that is more than the host has (rather than a raw allocator error, or pages
    overcommitted until the process is killed)."""
    need = sum(math.prod(shape) for shape in shapes) * torch.empty(0, dtype=dtype).element_size()
    have = _host_memory()
    if have is not None and need > have:
        raise hal.InvalidArgumentError(
            "Transformer.new_cache",
            "capacity",
            f"a cache that fits in host memory ({have / 2**30:.3g} GiB available)",
            f"{capacity} tokens x batch {batch}, a cache of {need / 2**30:.3g} GiB",
        )
    return [torch.zeros(shape, dtype=dtype) for shape in shapes]


def check_token_ids(tokens, op: str, argument: str) -> None:
    """``tokens`` must be a tensor of integer token ids."""
    if (
        not isinstance(tokens, torch.Tensor)
        or tokens.is_floating_point()
        or tokens.is_complex()
        or tokens.dtype == torch.bool
    ):
        got = f"dtype {tokens.dtype}" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise hal.InvalidDtypeError(op, argument, "integer token ids (an integer tensor, e.g. torch.int64)", got)


def check_tokens(tokens, batch: int, vocab_size: int) -> None:
    """``Transformer.forward``'s ``tokens``: integer ids ``[batch, S]`` (the cache's batch) in ``[0, vocab_size)``."""
    check_token_ids(tokens, "Transformer.forward", "tokens")
    if tokens.dim() != 2 or tokens.shape[0] != batch:
        raise hal.InvalidArgumentError(
            "Transformer.forward",
            "tokens",
            f"int shape [B={batch}, S] (the cache's batch)",
            f"shape {tuple(tokens.shape)}",
        )
    if tokens.numel():
        low, high = (int(t) for t in torch.aminmax(tokens))
        if low < 0 or high >= vocab_size:
            raise hal.InvalidArgumentError(
                "Transformer.forward", "tokens", f"ids in [0, {vocab_size})", f"ids in [{low}, {high}]"
            )


class LatentCache:
    """The paged latent KV cache of every layer: ``[num_blocks, block_size, kv_lora_rank + rope_dim]``
    per layer, sequence ``b`` owning blocks ``block_table[b]`` (allocated once for ``capacity`` tokens)."""

    def __init__(self, args: ModelArgs, batch: int, capacity: int, dtype: torch.dtype, block_size: int = 64):
        blocks_per_seq = max(1, math.ceil(capacity / block_size))
        width = args.kv_lora_rank + args.qk_rope_head_dim
        self.block_size, self.capacity, self.length = block_size, blocks_per_seq * block_size, 0
        self.kv = zeroed_cache(
            [(batch * blocks_per_seq, block_size, width)] * args.num_hidden_layers, dtype, batch, capacity
        )
        self.block_table = torch.arange(batch * blocks_per_seq, dtype=torch.int32).view(batch, blocks_per_seq)

    def slots(self, new_tokens: int) -> torch.Tensor:
        """Cache slots of the next ``new_tokens`` positions of every sequence, ``[B * new_tokens]``."""
        if self.length + new_tokens > self.capacity:
            raise hal.InvalidArgumentError(
                "LatentCache",
                "new_tokens",
                f"at most {self.capacity - self.length} more tokens (capacity {self.capacity})",
                str(new_tokens),
            )
        pos = torch.arange(self.length, self.length + new_tokens)
        blocks = self.block_table[:, pos // self.block_size].long()
        return (blocks * self.block_size + pos % self.block_size).reshape(-1)


class Step:
    """What every layer of one forward shares, computed once per forward: the new tokens' RoPE cos / sin,
    their cache slots, and ``cu_seqlens`` (prefill) or ``seq_lens`` (decode)."""

    def __init__(self, cache: LatentCache, batch: int, seqlen: int, rope: Rope, dtype: torch.dtype):
        self.prefill = cache.length == 0
        self.cos, self.sin = rope.table(cache.length, cache.length + seqlen, dtype)
        self.slots = cache.slots(seqlen)
        self.cu_seqlens = torch.arange(0, batch * seqlen + 1, seqlen, dtype=torch.int32) if self.prefill else None
        self.seq_lens = None if self.prefill else torch.full((batch,), cache.length + seqlen, dtype=torch.int32)
        self._rotate = rope.rotate

    def rope(self, x: torch.Tensor) -> torch.Tensor:
        return self._rotate(x, self.cos, self.sin)


class MLA:
    """Multi-head latent attention: prefill in the naive form (:func:`hal.ops.mla_prefill`), later steps
    in the absorbed form over the paged latent cache (:func:`hal.ops.mla_decode`)."""

    def __init__(self, w: Weights, p: str, args: ModelArgs):
        h, d, nope = args.num_attention_heads, args.qk_head_dim, args.qk_nope_head_dim
        self.args = args
        if args.q_lora_rank is None:
            self.wq = w.linear(f"{p}.q_proj", h * d, args.hidden_size)
        else:
            self.wq_a = w.linear(f"{p}.q_a_proj", args.q_lora_rank, args.hidden_size)
            self.q_norm = w.norm(f"{p}.q_a_layernorm.weight", args.q_lora_rank)
            self.wq_b = w.linear(f"{p}.q_b_proj", h * d, args.q_lora_rank)
        self.wkv_a = w.linear(f"{p}.kv_a_proj_with_mqa", args.kv_lora_rank + args.qk_rope_head_dim, args.hidden_size)
        self.kv_norm = w.norm(f"{p}.kv_a_layernorm.weight", args.kv_lora_rank)
        # the absorbed form needs W_UK / W_UV per head: kept dense, and split once here
        self.wkv_b = w.dense(f"{p}.kv_b_proj", h * (nope + args.v_head_dim), args.kv_lora_rank)
        per_head = self.wkv_b.view(h, nope + args.v_head_dim, args.kv_lora_rank)
        self.w_uk = per_head[:, :nope].contiguous()  # [H, nope, rank]
        self.w_uv_t = per_head[:, nope:].transpose(1, 2).contiguous()  # [H, rank, v]
        self.wo = w.linear(f"{p}.o_proj", args.hidden_size, h * args.v_head_dim)

    def __call__(self, x: torch.Tensor, step: Step, cache: LatentCache, layer: int) -> torch.Tensor:
        a = self.args
        bsz, seqlen, _ = x.shape
        h, nope, rank = a.num_attention_heads, a.qk_nope_head_dim, a.kv_lora_rank
        q = self.wq(x) if a.q_lora_rank is None else self.wq_b(rms_norm(self.wq_a(x), self.q_norm, a.rms_norm_eps))
        q_nope, q_pe = q.view(bsz, seqlen, h, a.qk_head_dim).split([nope, a.qk_rope_head_dim], dim=-1)
        q_pe = step.rope(q_pe)
        kv = self.wkv_a(x)
        latent = rms_norm(kv[..., :rank], self.kv_norm, a.rms_norm_eps)
        k_pe = step.rope(kv[..., None, rank:])  # one rope key shared by all heads
        hal.ops.paged_cache_write(
            cache.kv[layer], torch.cat((latent, k_pe[:, :, 0]), dim=-1).view(bsz * seqlen, -1), step.slots
        )
        tokens = bsz * seqlen
        if step.prefill:  # expand the latent into per-head keys and values
            kv_full = F.linear(latent, self.wkv_b).view(bsz, seqlen, h, nope + a.v_head_dim)
            k_nope, v = kv_full.split([nope, a.v_head_dim], dim=-1)
            k = torch.cat((k_nope, k_pe.expand(-1, -1, h, -1)), dim=-1)
            qk = torch.cat((q_nope, q_pe), dim=-1)
            out, _ = hal.ops.mla_prefill(
                qk.reshape(tokens, h, -1),
                k.reshape(tokens, h, -1),
                v.reshape(tokens, h, -1),
                step.cu_seqlens,
                softmax_scale=a.softmax_scale,
                causal=True,
            )
            out = out.view(bsz, seqlen, h * a.v_head_dim)
        else:  # absorbed: q_nope through W_UK into the latent space, W_UV applied after attention
            q_lat = torch.bmm(q_nope.reshape(tokens, h, nope).transpose(0, 1), self.w_uk)  # [H, tokens, rank]
            q_abs = torch.cat((q_lat.transpose(0, 1).view(bsz, seqlen, h, rank), q_pe), dim=-1)
            out, _ = hal.ops.mla_decode(
                q_abs,
                cache.kv[layer],
                cache.block_table,
                step.seq_lens,
                softmax_scale=a.softmax_scale,
                head_dim_v=rank,
                causal=True,
            )
            out = torch.bmm(out.view(tokens, h, rank).transpose(0, 1), self.w_uv_t)  # [H, tokens, v]
            out = out.transpose(0, 1).reshape(bsz, seqlen, h * a.v_head_dim)
        return self.wo(out)


class MLP:
    """SwiGLU feed-forward (dense layers and shared experts)."""

    def __init__(self, w: Weights, p: str, dim: int, inter: int):
        self.w1 = w.linear(f"{p}.gate_proj", inter, dim)
        self.w3 = w.linear(f"{p}.up_proj", inter, dim)
        self.w2 = w.linear(f"{p}.down_proj", dim, inter)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


#: reads one expert projection: ``(prefix, out_features, in_features) -> (weight, scale or None)``
ProjectionReader = Callable[[str, int, int], Tuple[torch.Tensor, Optional[torch.Tensor]]]


class Experts:
    """The routed experts, laid out once at load for :func:`hal.ops.grouped_gemm`: ``w13`` ``[E, 2I, H]``
    (gate rows then up rows) and ``w2`` ``[E, H, I]``, FP8 with block scales when kept quantised, int8
    with per-channel scales (``[E, 2I]``, ``[E, H]``) when converted to W8A8."""

    #: the checkpoint names of an expert's gate, up and down projections (``<prefix>.<expert>.<name>``)
    projections = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, w: Weights, p: str, args: ModelArgs, read: Optional[ProjectionReader] = None):
        """``read`` reads one projection; by default as a :class:`Linear` of ``w`` (:func:`expert_reader`)."""
        dim, inter = args.hidden_size, args.moe_intermediate_size
        read = read or expert_reader(w, args)
        gate_name, up_name, down_name = self.projections
        w13, w2 = [], []
        for i in range(args.n_routed_experts):
            (gate, gate_scale), (up, up_scale) = (read(f"{p}.{i}.{n}", inter, dim) for n in (gate_name, up_name))
            w13.append((torch.cat((gate, up)), None if gate_scale is None else torch.cat((gate_scale, up_scale))))
            w2.append(read(f"{p}.{i}.{down_name}", dim, inter))
        self.w13, self.s13 = torch.stack([t for t, _ in w13]), _stack_scales([s for _, s in w13])
        self.w2, self.s2 = torch.stack([t for t, _ in w2]), _stack_scales([s for _, s in w2])
        self.dtype, self.scale_fmt = w.dtype, args.scale_fmt

    def _gemm(
        self, x: torch.Tensor, w: torch.Tensor, scale: Optional[torch.Tensor], group_sizes: torch.Tensor
    ) -> torch.Tensor:
        if scale is None:
            return hal.ops.grouped_gemm(x, w, group_sizes)
        q, s = quantized_activations(x, w, self.scale_fmt)
        return hal.ops.grouped_gemm(q, w, group_sizes, x_scale=s, w_scale=scale, out_dtype=self.dtype)

    def __call__(self, x_sorted: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
        gate, up = self._gemm(x_sorted, self.w13, self.s13, group_sizes).chunk(2, dim=-1)
        return self._gemm(F.silu(gate) * up, self.w2, self.s2, group_sizes)


def _stack_scales(scales: List[Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
    return None if scales[0] is None else torch.stack(scales)


def expert_reader(w: Weights, args: ModelArgs) -> ProjectionReader:
    """Expert projections read as the weights of ``w``'s :class:`Linear` layers; FP8 stays FP8 only where
    :func:`expert_k_aligned`, else it is dequantised."""
    fp8 = Weights(w.ckpt, w.args, w.dtype, w.fp8 if w.fp8 != "keep" or expert_k_aligned(args) else "dequantize")

    def read(prefix: str, out_features: int, in_features: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        linear = fp8.linear(prefix, out_features, in_features)
        return linear.weight, linear.scale

    return read


def expert_k_aligned(args: ModelArgs) -> bool:
    """Whether both expert GEMMs' K (and the concatenated gate / up blocks) align to FP8's 128."""
    return args.hidden_size % FP8_GROUP == 0 and args.moe_intermediate_size % FP8_GROUP == 0


class MoE:
    """DeepSeek MoE: fp32 router, :func:`hal.ops.topk_routing` (group-limited, bias for selection only),
    permute -> grouped GEMMs -> weighted combine, plus the shared experts."""

    def __init__(self, w: Weights, p: str, args: ModelArgs):
        e = args.n_routed_experts
        self.args = args
        self.gate = w.ckpt.tensor(f"{p}.gate.weight", (e, args.hidden_size), torch.float32)
        # no bias would also change the routing (groups scored by their maximum): a non-strict load fills in
        # zeros, as transformers does
        self.bias = w.ckpt.tensor(f"{p}.gate.e_score_correction_bias", (e,), torch.float32, default=0.0)
        self.experts = Experts(w, f"{p}.experts", args)
        self.shared = (
            MLP(w, f"{p}.shared_experts", args.hidden_size, args.moe_intermediate_size * args.n_shared_experts)
            if args.n_shared_experts
            else None
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        a = self.args
        flat = x.reshape(-1, x.shape[-1])
        logits = F.linear(flat.float(), self.gate)
        weights, ids = hal.ops.topk_routing(
            logits,
            a.num_experts_per_tok,
            scoring=a.scoring_func,
            bias=self.bias,
            n_group=a.n_group,
            topk_group=a.topk_group,
            renormalize=a.norm_topk_prob,
            scale=a.routed_scaling_factor,
        )
        x_sorted, perm = hal.ops.moe_permute(flat, ids, a.n_routed_experts)
        out = hal.ops.moe_unpermute(self.experts(x_sorted, perm.group_sizes), weights, perm).view_as(x)
        return out if self.shared is None else out + self.shared(x)


class Block:
    def __init__(self, w: Weights, layer: int, args: ModelArgs):
        p = f"model.layers.{layer}"
        self.attn_norm = w.norm(f"{p}.input_layernorm.weight", args.hidden_size)
        self.attn = MLA(w, f"{p}.self_attn", args)
        self.ffn_norm = w.norm(f"{p}.post_attention_layernorm.weight", args.hidden_size)
        self.ffn = (
            MoE(w, f"{p}.mlp", args)
            if args.is_moe_layer(layer)
            else MLP(w, f"{p}.mlp", args.hidden_size, args.intermediate_size)
        )
        self.eps = args.rms_norm_eps

    def __call__(self, x: torch.Tensor, step: Step, cache: LatentCache, layer: int) -> torch.Tensor:
        x = x + self.attn(rms_norm(x, self.attn_norm, self.eps), step, cache, layer)
        return x + self.ffn(rms_norm(x, self.ffn_norm, self.eps))


LayerContext = Callable[[int], ContextManager]


class Transformer:
    """The whole model. ``forward(tokens, cache)`` runs the next ``S`` tokens of every sequence and
    returns their logits; ``backend`` (None: the settings in force) is selected around every call."""

    def __init__(self, args: ModelArgs, w: Weights, backend: Optional[str]):
        self.args, self.dtype, self.backend = args, w.dtype, backend
        #: for an FP8 checkpoint, what became of its weights (one of FP8_WEIGHT_MODES) and why (set by
        #: :func:`hal.model.load`); None for a checkpoint without FP8 weights
        self.fp8: Optional[str] = None
        self.fp8_reason = ""
        self.embed = w.ckpt.tensor("model.embed_tokens.weight", (args.vocab_size, args.hidden_size), w.dtype)
        self.layers = [Block(w, i, args) for i in range(args.num_hidden_layers)]
        self.norm = w.norm("model.norm.weight", args.hidden_size)
        self.head = (
            self.embed
            if args.tie_word_embeddings
            else w.ckpt.tensor("lm_head.weight", (args.vocab_size, args.hidden_size), w.dtype)
        )
        self.rope = Rope(args)

    def new_cache(self, batch: int, capacity: int) -> LatentCache:
        return LatentCache(self.args, batch, capacity, self.dtype)

    @torch.inference_mode()
    def forward(
        self, tokens: torch.Tensor, cache: LatentCache, layer_context: Optional[LayerContext] = None
    ) -> torch.Tensor:
        """``tokens`` int ``[B, S]`` (the first call on an empty cache is the prefill) -> logits
        ``[B, S, vocab]`` in the model dtype. ``layer_context(i)`` (bisection) wraps layer ``i``."""
        check_tokens(tokens, cache.block_table.shape[0], self.args.vocab_size)
        step = Step(cache, tokens.shape[0], tokens.shape[1], self.rope, self.dtype)
        outer = hal.use_backend(self.backend) if self.backend else contextlib.nullcontext()
        with outer:
            x = F.embedding(tokens, self.embed)
            for i, block in enumerate(self.layers):
                with layer_context(i) if layer_context else contextlib.nullcontext():
                    x = block(x, step, cache, i)
        cache.length += tokens.shape[1]
        return F.linear(rms_norm(x, self.norm, self.args.rms_norm_eps), self.head)

    __call__ = forward
