"""A TEST DOUBLE of ``torch_mlu_ops`` (tmo) and of the ``torch.mlu`` device queries: a CPU stand-in for
exactly the tmo operators :class:`~hal.backends.mlu.backend.MluBackend` calls, written from the
documented semantics (the docstrings of tmo's Python package, and vLLM-MLU's call sites; see
``docs/backends/mlu.md``). It is not Cambricon's code and says nothing about MLU hardware: a backend
built on it is registered as ``mlu-emulated`` and every result it produces is labelled EMULATED.

Two releases are emulated, because their signatures differ and the backend must adapt to both:

* ``1.6.0``: the oldest release vLLM-MLU accepts (``torch_mlu_ops >= 1.6.0``): ``group_gemm(a, b,
  m_list, expand_idx, c, alpha, beta, max_m=0)`` without ``output_dtype``; ``moe_softmax_topk`` without
  ``score_bias``; no ``scaled_matmul`` and no FP8 per-block ("a_groupwise-b_per_block")
  ``smooth_quant_group_gemm`` (assumed: they are documented for 1.12.1 only);
* ``1.12.1``: the newest documented release (``_version.py`` = ``'1.12.1+torch2.11.0'``).

Where a documented constraint rejects an argument, the double raises :class:`~hal.vendor.EmulatorRefusal`.
Where the documentation is silent (what an empty key set gives, the causal alignment of unequal query
and key lengths), the double either refuses or returns what a plain implementation gives (NaN), so that
the backend cannot come to rely on an undocumented behaviour.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from hal.errors import ConfigError
from hal.vendor import EmulatedLibrary

__all__ = [
    "TmoTestDouble",
    "Tmo1_6TestDouble",
    "Tmo1_12TestDouble",
    "TMO_VERSIONS",
    "tmo_test_double",
    "emulated_mlu_backend",
]

VLLM_MLU_TMO = "1.6.0"
NEWEST_TMO = "1.12.1"
TMO_VERSIONS = (VLLM_MLU_TMO, NEWEST_TMO)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_FP8 = torch.float8_e4m3fn
_DECODE_BLOCK_SIZES = (1, 2, 4, 8, 16, 32, 64)
_DEVICE_NAMES = {5: "MLU590", 3: "MLU370"}


class EmulatedMluRuntime:
    """Stand-in for the ``torch.mlu`` device queries the backend makes."""

    def __init__(self, capability: Tuple[int, int]) -> None:
        self.capability = capability

    def device_count(self) -> int:
        return 1

    def get_device_capability(self, device: Optional[int] = None) -> Tuple[int, int]:
        return self.capability

    def get_device_name(self, device: Optional[int] = None) -> str:
        return _DEVICE_NAMES.get(self.capability[0], f"MLU {self.capability[0]}xx")


class TmoTestDouble(EmulatedLibrary):
    """TEST DOUBLE of torch_mlu_ops on the CPU (see the module docstring): the operators whose signatures
    did not change; a subclass per emulated release adds the others. ``capability`` is the device
    capability the emulated MLU reports (MLU590: 5.0; FP8 compute needs major >= 6)."""

    version = ""

    def __init__(self, capability: Tuple[int, int] = (5, 0)) -> None:
        super().__init__()
        self.__version__ = f"{self.version}+torch{torch.__version__.split('+')[0]}"
        self.mlu = EmulatedMluRuntime(capability)
        self.emulates = (
            f"torch_mlu_ops {self.version} on an {self.mlu.get_device_name()} "
            f"(capability {capability[0]}.{capability[1]})"
        )

    # -- helpers -------------------------------------------------------------------------------
    def _require(self, op: str, ok: bool, why: str) -> None:
        if not ok:
            self.refuse(op, why)

    def _require_fp8_device(self, op: str) -> None:
        major = self.mlu.capability[0]
        self._require(op, major >= 6, f"float8 compute needs an MLU of capability >= 6, this one is {major}.x")

    # -- MoE -----------------------------------------------------------------------------------
    def moe_gen_idx(self, expert_id, expert_num, return_token2expert_idx=False):
        """-> (expand_idx: source token of each sorted (token, k) pair, combine_idx: the sorted row of each
        pair, token_count [E], cusum_token_count [E + 1]); pairs sorted by expert, in pair order within
        an expert."""
        self.record("moe_gen_idx")
        self._require("moe_gen_idx", expert_id.dtype == torch.int32, f"expert_id must be int32, got {expert_id.dtype}")
        self._require("moe_gen_idx", not return_token2expert_idx, "token2expert_idx is not emulated")
        top_k = expert_id.shape[-1]
        flat = expert_id.reshape(-1).long()
        order = torch.sort(flat, stable=True).indices
        combine = torch.empty_like(order)
        combine[order] = torch.arange(order.numel(), device=order.device)
        count = torch.bincount(flat, minlength=expert_num).to(torch.int32)
        cusum = torch.cat([count.new_zeros(1), count.cumsum(0).to(torch.int32)])
        return (order // top_k).to(torch.int32), combine.to(torch.int32), count, cusum

    def moe_expand_input(
        self, input, gather_idx, cusum_token_count=None, start_expert_id=0, expert_size=0, output=None
    ):
        self.record("moe_expand_input")
        self._require("moe_expand_input", gather_idx.dtype == torch.int32, "gather_idx must be int32")
        self._require("moe_expand_input", output is None, "output= is not emulated")
        idx = gather_idx.long()
        if cusum_token_count is not None:
            idx = idx[int(cusum_token_count[start_expert_id]) : int(cusum_token_count[start_expert_id + expert_size])]
        return input[idx]

    def _group_gemm(
        self,
        a,
        b,
        group_list,
        expand_idx,
        c,
        alpha,
        beta,
        max_in_group_list,
        bias=None,
        d=None,
        trans_a=False,
        trans_b=True,
        idx_offset=None,
        output_dtype=None,
    ):
        """d_i = a_i @ b[i].T per group of ``group_list`` rows (counts, not offsets), fp32 accumulation."""
        op = "group_gemm"
        self.record(op)
        self._require(
            op,
            a.dtype in _FLOATS and b.dtype == a.dtype,
            f"a and b must share one of half, bfloat16, float; got {a.dtype} and {b.dtype}",
        )
        self._require(op, b.dim() == 3 and trans_b and not trans_a, "only the (experts, n, k) weight form is emulated")
        self._require(op, group_list.dtype == torch.int32, "group_list must be int32")
        self._require(
            op,
            all(t is None for t in (expand_idx, c, alpha, beta, bias, d, idx_offset)),
            "expand_idx, c, alpha, beta, bias, d, idx_offset are not emulated",
        )
        counts = group_list.tolist()
        self._require(
            op,
            max(counts, default=0) <= max_in_group_list,
            f"max_in_group_list={max_in_group_list} is below the largest group {max(counts)}",
        )
        return _per_group(a.float(), b.float(), counts).to(output_dtype or a.dtype)

    def _int8_group_gemm(
        self, a, b, m_list, expand_idx, c, alpha, beta, a_scale, b_scale, dtype, max_m, bias=None, d=None
    ):
        """The int8 per-token / per-channel form: ``d_i = (a_i @ b[i].T) * a_scale_i.outer(b_scale[i])`` with
        a_scale (total_m) and b_scale (experts, n) float32 multipliers; int32 accumulation."""
        op = "smooth_quant_group_gemm"
        self.record(op)
        self._require(op, b.dtype == torch.int8 and b.dim() == 3, "int8 a needs int8 b (experts, n, k)")
        self._require(
            op,
            a_scale.dtype == torch.float32
            and tuple(a_scale.shape) == (a.shape[0],)
            and b_scale.dtype == torch.float32
            and tuple(b_scale.shape) == tuple(b.shape[:2]),
            "the per-token / per-channel form takes float a_scale (total_m) and b_scale (experts, n)",
        )
        self._require(op, dtype in (torch.float16, torch.bfloat16), f"dtype must be half or bfloat16, got {dtype}")
        self._require(op, all(t is None for t in (expand_idx, c, alpha, beta, bias, d)), "not emulated: c, bias ...")
        counts = m_list.tolist()
        self._require(op, max(counts, default=0) <= max_m, "max_m is below the largest group")
        acc = _per_group(a.double(), b.double(), counts).float()  # float64 holds the int32 sums exactly
        rows = torch.repeat_interleave(b_scale, torch.tensor(counts, dtype=torch.int64), dim=0)
        return (acc * a_scale[:, None] * rows).to(dtype)

    def _fp8_block_group_gemm(
        self,
        a,
        b,
        m_list,
        expand_idx,
        c,
        alpha,
        beta,
        a_scale,
        b_scale,
        dtype,
        max_m,
        bias=None,
        quant_flag=None,
        d=None,
        tile_config=None,
        a_calibration=None,
        b_calibration=None,
        a_quant_bit_size=8,
        a_lora=None,
        b_lora=None,
        idx_offset=None,
        is_symmetric_quant=True,
    ):
        """The int8 per-token form (:meth:`_int8_group_gemm`), or the FP8 "a_groupwise-b_per_block" form:
        a_scale (k_block, total_m), b_scale (experts, n_block, k_block), 128-wide blocks; scales are
        dequantisation multipliers."""
        op = "smooth_quant_group_gemm"
        if a.dtype == torch.int8:
            return self._int8_group_gemm(
                a, b, m_list, expand_idx, c, alpha, beta, a_scale, b_scale, dtype, max_m, bias, d
            )
        self.record(op)
        self._require_fp8_device(op)
        self._require(
            op,
            a.dtype == _FP8 and b.dtype == _FP8 and b_scale.dim() == 3,
            "a_groupwise-b_per_block only supports float8 a and b",
        )
        self._require(op, dtype in (torch.float16, torch.bfloat16), f"dtype must be half or bfloat16, got {dtype}")
        self._require(op, all(t is None for t in (expand_idx, c, alpha, beta, bias, d)), "not emulated: c, bias ...")
        counts = m_list.tolist()
        self._require(op, max(counts, default=0) <= max_m, "max_m is below the largest group")
        k = a.shape[1]
        a_deq = (a.float().view(-1, k // 128, 128) * a_scale.t().float()[..., None]).view(-1, k)
        b_deq = b.float() * b_scale.float().repeat_interleave(128, 1)[:, : b.shape[1]].repeat_interleave(128, 2)
        return _per_group(a_deq, b_deq, counts).to(dtype)

    def moe_combine_result(
        self,
        input,
        reduce_weight,
        gather_ids,
        residual,
        cusum_token_count,
        start_expert_id,
        expert_size,
        bias=None,
        output=None,
    ):
        """out[t] = sum_k input[gather_ids[t * topk + k]] * reduce_weight[t, k], fp32 accumulation."""
        op = "moe_combine_result"
        self.record(op)
        self._require(op, bias is None, "bias: Do not support yet, must be None")
        self._require(op, reduce_weight.dtype == torch.float32, "reduce_weight must be float32")
        self._require(op, residual is None and output is None, "residual, output are not emulated")
        t, k = reduce_weight.shape
        first, last = int(cusum_token_count[start_expert_id]), int(cusum_token_count[start_expert_id + expert_size])
        rows = gather_ids.long().view(t, k)
        local = ((rows >= first) & (rows < last)).float()  # rows of other experts' ranks count as 0
        out = torch.einsum("tk,tkn->tn", reduce_weight * local, input.float()[rows])
        return out.to(input.dtype)

    # -- routing -------------------------------------------------------------------------------
    def moe_sigmoid_topk(
        self,
        input,
        topk,
        normalize=False,
        num_expert_group=-1,
        topk_group=0,
        mask=None,
        normed_by="topk_logit",
        route_scale=1.0,
        score_bias=None,
        reduce_weight=None,
        expert_id=None,
    ):
        self.record("moe_sigmoid_topk")
        self._check_topk("moe_sigmoid_topk", input, mask, normed_by, reduce_weight, expert_id)
        self._require(
            "moe_sigmoid_topk",
            score_bias is None or num_expert_group > 1,
            "expert_group=1 with score_bias is not supported",
        )
        return _active_topk(
            input.float().sigmoid(),
            topk,
            normalize,
            num_expert_group,
            topk_group,
            route_scale,
            score_bias,
            -float("inf"),
        )

    def _softmax_topk(
        self,
        input,
        topk,
        normalize,
        num_expert_group,
        topk_group,
        mask,
        normed_by,
        route_scale,
        reduce_weight,
        expert_id,
        score_bias=None,
    ):
        self.record("moe_softmax_topk")
        self._check_topk("moe_softmax_topk", input, mask, normed_by, reduce_weight, expert_id)
        self._require("moe_softmax_topk", score_bias is None, "score_bias with softmax is not emulated")
        # the softmax variant fills the experts of dropped groups with 0.0 (not -inf)
        return _active_topk(
            input.float().softmax(-1), topk, normalize, num_expert_group, topk_group, route_scale, None, 0.0
        )

    def _check_topk(self, op, input, mask, normed_by, reduce_weight, expert_id) -> None:
        self._require(op, input.is_contiguous(), "input must be contiguous")
        self._require(op, input.dtype in _FLOATS, f"input must be float, half or bfloat16, got {input.dtype}")
        self._require(
            op,
            mask is None and reduce_weight is None and expert_id is None and normed_by == "topk_logit",
            "mask, reduce_weight=, expert_id=, normed_by other than 'topk_logit' are not emulated",
        )

    # -- attention -----------------------------------------------------------------------------
    def flash_attention(
        self,
        q,
        k,
        v,
        out,
        cu_seq_lens_q,
        cu_seq_lens_kv,
        alibi_slope,
        attn_bias,
        max_seq_len_q,
        max_seq_len_kv,
        softmax_scale,
        is_causal,
        window_size_left=-1,
        window_size_right=-1,
        compute_dtype=torch.float,
        return_lse=False,
        block_tables=None,
        k_quant_scale=None,
        v_quant_scale=None,
        q_quant_scale=None,
        out_quant_scale=None,
        out_dtype=torch.half,
        q2k_block_idx=None,
        q2k_block_num=None,
        variable_block_sizes=None,
        q_block_size=256,
        k_block_size=128,
        sink=None,
    ):
        """Packed varlen attention: q (total_q, H, D), k/v (total_kv, Hkv, D*); lse (H, total_q), natural log."""
        op = "flash_attention"
        self.record(op)
        self._require(op, q.dim() == 3 and cu_seq_lens_q is not None, "only the packed (total, H, D) form is emulated")
        self._require(op, q.dtype in _FLOATS and k.dtype == q.dtype and v.dtype == q.dtype, "q, k, v: one float dtype")
        self._require(
            op,
            all(
                t is None
                for t in (
                    alibi_slope,
                    attn_bias,
                    block_tables,
                    sink,
                    k_quant_scale,
                    v_quant_scale,
                    q_quant_scale,
                    out_quant_scale,
                )
            ),
            "alibi, attn_bias, paged k/v, sinks and quantised inputs are not emulated",
        )
        self._require(op, window_size_left == -1 and window_size_right == -1, "windows are not emulated")
        self._require(op, compute_dtype == torch.float, "compute_dtype other than float is not emulated")
        cq, ck = cu_seq_lens_q.tolist(), cu_seq_lens_kv.tolist()
        longest = [max((b - a for a, b in zip(cu, cu[1:])), default=0) for cu in (cq, ck)]
        self._require(
            op,
            longest[0] <= max_seq_len_q and longest[1] <= max_seq_len_kv,
            "max_seq_len_q / max_seq_len_kv below a sequence length",
        )
        hq = q.shape[1]
        result = q.new_zeros(q.shape[0], hq, v.shape[2], dtype=torch.float32)
        lse = q.new_full((hq, q.shape[0]), float("nan"), dtype=torch.float32)
        for b in range(len(cq) - 1):
            q0, q1, k0, k1 = cq[b], cq[b + 1], ck[b], ck[b + 1]
            # the causal alignment of unequal lengths is not documented
            self._require(op, not is_causal or q1 - q0 == k1 - k0, "is_causal with seq_q != seq_kv")
            causal = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool).tril() if is_causal else None
            o, s = _attention(q[q0:q1], k[k0:k1], v[k0:k1], softmax_scale, causal)
            result[q0:q1], lse[:, q0:q1] = o, s.t()
        result = result.to(out_dtype)
        if out is not None:
            out.copy_(result)
        return (result, lse) if return_lse else result

    def single_query_cached_kv_attn(
        self,
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        context_lens,
        k_cache_quant_scale,
        v_cache_quant_scale,
        alibi_slopes,
        max_context_len,
        windows_size_left,
        windows_size_right,
        softmax_scale,
        return_lse=False,
        kv_cache_quant_bit_size=-1,
        q_quant_scale=None,
        out_quant_scale=None,
        out_dtype=torch.half,
        compute_dtype=torch.float,
        head_size_v=-1,
        mask=None,
        cu_seq_q=None,
        max_seq_q=-1,
        sink=None,
    ):
        """Paged decode attention; MLA mode (v_cache=None): value = k_cache[..., :head_size_v]. q (B, seq_q,
        H, D), k_cache (blocks, H_kv, block_size, D); lse (B, H, seq_q). Only the first context_lens[b]
        positions are read."""
        op = "single_query_cached_kv_attn"
        self.record(op)
        self._require(op, q.dim() == 4 and q.shape[1] == 1, "only seq_q == 1 is emulated")
        self._require(op, k_cache.dim() == 4 and k_cache.shape[1] == 1, "only one kv head (MLA) is emulated")
        self._require(
            op,
            k_cache.shape[2] in _DECODE_BLOCK_SIZES,
            f"block_size must be one of {_DECODE_BLOCK_SIZES}, got {k_cache.shape[2]}",
        )
        self._require(op, v_cache is not None or head_size_v > 0, "v_cache=None needs head_size_v > 0")
        self._require(op, v_cache is None, "separate value caches are not emulated")
        self._require(op, windows_size_right == -1, "windows_size_right: Reserved parameter, set -1")
        self._require(op, windows_size_left == -1, "windows are not emulated")
        self._require(
            op,
            all(
                t is None
                for t in (
                    k_cache_quant_scale,
                    v_cache_quant_scale,
                    alibi_slopes,
                    q_quant_scale,
                    out_quant_scale,
                    mask,
                    cu_seq_q,
                    sink,
                )
            ),
            "quantised caches, alibi, masks, cu_seq_q and sinks are not emulated",
        )
        self._require(op, q.dtype in _FLOATS and k_cache.dtype == q.dtype, "q and k_cache: one float dtype")
        self._require(
            op,
            block_tables.dtype == torch.int32 and context_lens.dtype == torch.int32,
            "block_tables and context_lens must be int32",
        )
        lens = context_lens.tolist()
        self._require(op, max(lens, default=0) <= max_context_len, "max_context_len below a context length")
        batch, _, hq, _ = q.shape
        block_size = k_cache.shape[2]
        result = q.new_zeros(batch, 1, hq, head_size_v, dtype=torch.float32)
        lse = q.new_zeros(batch, hq, 1, dtype=torch.float32)
        for b, length in enumerate(lens):
            pos = torch.arange(length)
            keys = k_cache[block_tables[b, pos // block_size].long(), 0, pos % block_size]  # (length, D)
            o, s = _attention(q[b, 0][None], keys[:, None], keys[:, None, :head_size_v], softmax_scale, None)
            result[b, 0], lse[b, :, 0] = o[0], s[0]  # an empty context gives NaN: the docs do not say
        result = result.to(out_dtype)
        if out is not None:
            out.copy_(result)
        return (result, lse) if return_lse else result

    def reshape_paged_cache(self, k, v, k_cache, v_cache, slot_mapping, direction=False):
        """k_cache[slot // block_size, :, slot % block_size, :] = k[i] for every slot >= 0 (in place)."""
        op = "reshape_paged_cache"
        self.record(op)
        self._require(op, slot_mapping.dtype == torch.int32, "slot_mapping must be int32")
        self._require(op, v is None and v_cache is None and not direction, "only writing k (MLA) is emulated")
        self._require(op, k.dtype == k_cache.dtype, "k and k_cache: one dtype")
        keep = slot_mapping >= 0
        slots = slot_mapping[keep].long()
        block_size = k_cache.shape[2]
        k_cache[slots // block_size, :, slots % block_size] = k[keep]

    # -- GEMM ----------------------------------------------------------------------------------
    def matmul(
        self,
        a,
        b,
        bias=None,
        c=None,
        act_mode="none",
        alpha=1.0,
        beta=0.0,
        fast_act=True,
        approximate=True,
        dtype=None,
        a_scale=None,
        b_scale=None,
        trans_a=False,
        trans_b=True,
        tile_config=None,
        output=None,
    ):
        """a @ b.T (trans_b) with fp32 accumulation; only unscaled float operands are emulated (with scales,
        tmo's convention is ``input_max / dtype_max`` for float8 but ``dtype_max / input_max`` for int8)."""
        op = "matmul"
        self.record(op)
        self._require(op, a.dtype in _FLOATS and b.dtype == a.dtype, "only float a and b of one dtype are emulated")
        self._require(
            op,
            a_scale is None and b_scale is None and bias is None and c is None and act_mode == "none",
            "scales, bias, c and activations are not emulated",
        )
        self._require(op, trans_b and not trans_a and alpha == 1.0, "only a @ b.T is emulated")
        return (a.float() @ b.float().t()).to(dtype or a.dtype)

    def _scaled_matmul(
        self,
        a,
        b,
        a_scale,
        b_scale,
        output_dtype,
        bias=None,
        c=None,
        act_mode="none",
        quant_bit_size=8,
        alpha=1.0,
        beta=1.0,
        use_hp_active=False,
        a_quant_bit_size=-1,
        a_calib=None,
        b_calib=None,
        output=None,
        tile_config=None,
    ):
        """The int8 per-token / per-channel form: a (M, K), b (N, K) int8, a_scale (M), b_scale (N), int32
        accumulation; or the FP8 per-block form: a (M, K) with a_scale (M, K/128), b (N, K) with b_scale
        (ceil(N/128), K/128) ("only support fp8 and blocksize=groupsize=128"). Scales multiply."""
        op = "scaled_matmul"
        self.record(op)
        self._require(op, output_dtype in (torch.float16, torch.bfloat16), "output_dtype must be half or bfloat16")
        if a.dtype == torch.int8:
            self._require(
                op,
                b.dtype == torch.int8
                and a_scale.shape == a.shape[:1]
                and b_scale.shape == b.shape[:1]
                and a_scale.dtype == torch.float32
                and b_scale.dtype == torch.float32,
                "int8 a needs int8 b with float a_scale (M) and b_scale (N)",
            )
            self._require(op, all(t is None for t in (bias, c, output)) and act_mode == "none", "bias, c not emulated")
            acc = (a.double() @ b.double().t()).float()  # float64 holds the int32 sums exactly
            return (acc * a_scale[:, None] * b_scale).to(output_dtype)
        self._require_fp8_device(op)
        self._require(
            op,
            a.dtype == _FP8 and b.dtype == _FP8 and b_scale.dim() == 2 and a_scale.dim() == 2,
            "per_block groupwise quantization only supports fp8 a and b with 2-D scales",
        )
        self._require(op, all(t is None for t in (bias, c, output)) and act_mode == "none", "bias, c not emulated")
        k = a.shape[1]
        a_deq = (a.float().view(-1, k // 128, 128) * a_scale.float()[..., None]).view(-1, k)
        b_deq = b.float() * b_scale.float().repeat_interleave(128, 0)[: b.shape[0]].repeat_interleave(128, 1)
        return (a_deq @ b_deq.t()).to(output_dtype)


class Tmo1_12TestDouble(TmoTestDouble):
    """TEST DOUBLE of torch_mlu_ops 1.12.1, the newest documented release."""

    version = NEWEST_TMO

    def scaled_quantize(
        self,
        x,
        scale=None,
        zero=None,
        scale_ub=None,
        quant_type=torch.int8,
        quant_mode="dynamic_per_token",
        act_mode="none",
        active_coef=1.0,
        is_gated=False,
        quant_bit_size=8,
        scale_type=torch.float32,
        need_output_scale_trans=False,
        output_reduced=None,
        group_size=1,
    ):
        """Only dynamic per-token int8 without a smoothing vector (:meth:`per_row_int8`)."""
        op = "scaled_quantize"
        self.record(op)
        self._require(op, x.dtype in _FLOATS and x.dim() == 2, "x must be a 2-D float, half or bfloat16 tensor")
        self._require(
            op,
            quant_type == torch.int8 and quant_mode == "dynamic_per_token" and scale_type == torch.float32,
            "only dynamic_per_token int8 with float32 scales is emulated",
        )
        self._require(
            op,
            all(t is None for t in (scale, zero, scale_ub, output_reduced))
            and act_mode == "none"
            and not need_output_scale_trans
            and quant_bit_size == 8,
            "smoothing, zero points, activations and scale layouts are not emulated",
        )
        return self.per_row_int8(x)

    def group_gemm(
        self,
        a,
        b,
        group_list,
        expand_idx,
        c,
        alpha,
        beta,
        max_in_group_list,
        bias=None,
        d=None,
        trans_a=False,
        trans_b=True,
        tile_config=None,
        idx_offset=None,
        output_dtype=None,
    ):
        return self._group_gemm(
            a,
            b,
            group_list,
            expand_idx,
            c,
            alpha,
            beta,
            max_in_group_list,
            bias,
            d,
            trans_a,
            trans_b,
            idx_offset,
            output_dtype,
        )

    def moe_softmax_topk(
        self,
        input,
        topk,
        normalize=False,
        num_expert_group=-1,
        topk_group=0,
        mask=None,
        normed_by="topk_logit",
        route_scale=1.0,
        reduce_weight=None,
        expert_id=None,
        score_bias=None,
    ):
        return self._softmax_topk(
            input,
            topk,
            normalize,
            num_expert_group,
            topk_group,
            mask,
            normed_by,
            route_scale,
            reduce_weight,
            expert_id,
            score_bias,
        )

    smooth_quant_group_gemm = TmoTestDouble._fp8_block_group_gemm
    scaled_matmul = TmoTestDouble._scaled_matmul


class Tmo1_6TestDouble(TmoTestDouble):
    """TEST DOUBLE of torch_mlu_ops 1.6.0 (vLLM-MLU's minimum): 1.6's signatures, no ``scaled_matmul``."""

    version = VLLM_MLU_TMO

    def group_gemm(self, a, b, m_list, expand_idx, c, alpha, beta, max_m=0):
        return self._group_gemm(a, b, m_list, expand_idx, c, alpha, beta, max_m)

    def moe_softmax_topk(
        self,
        input,
        topk,
        normalize=False,
        num_expert_group=-1,
        topk_group=0,
        mask=None,
        normed_by="topk_logit",
        route_scale=1.0,
        reduce_weight=None,
        expert_id=None,
    ):
        return self._softmax_topk(
            input, topk, normalize, num_expert_group, topk_group, mask, normed_by, route_scale, reduce_weight, expert_id
        )

    def smooth_quant_group_gemm(
        self,
        a,
        b,
        m_list,
        expand_idx,
        c,
        alpha,
        beta,
        a_scale,
        b_scale,
        dtype,
        max_m,
        bias=None,
        quant_flag=None,
        d=None,
        tile_config=None,
        a_calibration=None,
        b_calibration=None,
        a_quant_bit_size=8,
        a_lora=None,
        b_lora=None,
    ):
        if isinstance(a, torch.Tensor) and a.dtype == torch.int8:  # the int8 smooth-quant form vLLM-MLU calls
            return self._int8_group_gemm(
                a, b, m_list, expand_idx, c, alpha, beta, a_scale, b_scale, dtype, max_m, bias, d
            )
        self.record("smooth_quant_group_gemm")
        self.refuse("smooth_quant_group_gemm", "the float8 a_groupwise-b_per_block form is not in torch_mlu_ops 1.6")


def _per_group(a: torch.Tensor, b: torch.Tensor, counts) -> torch.Tensor:
    out = a.new_empty(a.shape[0], b.shape[1])
    start = 0
    for g, size in enumerate(counts):
        out[start : start + size] = a[start : start + size] @ b[g].t()
        start += size
    return out


def _active_topk(scores, topk, normalize, num_expert_group, topk_group, route_scale, score_bias, masked_value):
    """tmo's documented moe_active_topk math (its docstring's reference, written anew)."""
    choice = scores if score_bias is None else scores + score_bias.float()
    if num_expert_group > 1:
        grouped = choice.unflatten(-1, (num_expert_group, -1))
        group_score = grouped.topk(2, dim=-1).values.sum(-1) if score_bias is not None else grouped.amax(-1)
        kept = torch.zeros_like(group_score, dtype=torch.bool).scatter_(
            -1, group_score.topk(topk_group, dim=-1).indices, True
        )
        choice = choice.masked_fill(~kept.repeat_interleave(grouped.shape[-1], -1), masked_value)
    expert_id = choice.topk(topk, dim=-1).indices
    weight = scores.gather(-1, expert_id)
    if normalize:
        weight = weight / weight.sum(-1, keepdim=True)
    return weight * route_scale, expert_id.to(torch.int32)


def _attention(q, k, v, scale, allowed):
    """q (Sq, H, D), k (L, Hk, D), v (L, Hk, Dv) -> out (Sq, H, Dv), lse (Sq, H); fp32."""
    group = q.shape[1] // max(k.shape[1], 1)
    kf = k.float().repeat_interleave(group, 1)
    vf = v.float().repeat_interleave(group, 1)
    logits = torch.einsum("shd,lhd->hsl", q.float(), kf) * scale
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    lse = logits.logsumexp(-1)
    out = torch.einsum("hsl,lhv->shv", (logits - lse[..., None]).exp(), vf)
    return out, lse.t()


def _parse_emulation(setting: str) -> Tuple[str, Tuple[int, int]]:
    """``HAL_MLU_EMULATE`` = ``"tmo=1.6.0,capability=6.0"`` (either part optional)."""
    values = {"tmo": NEWEST_TMO, "capability": "5.0"}
    for part in filter(None, (p.strip() for p in setting.split(","))):
        key, _, value = part.partition("=")
        if key not in values:
            raise ConfigError(f"HAL_MLU_EMULATE: unknown key {key!r} (known: tmo, capability)")
        values[key] = value
    if values["tmo"] not in TMO_VERSIONS:
        raise ConfigError(f"HAL_MLU_EMULATE: tmo={values['tmo']} is not emulated (emulated: {', '.join(TMO_VERSIONS)})")
    major, _, minor = values["capability"].partition(".")
    if not (major.isdigit() and (minor or "0").isdigit()):
        raise ConfigError(f"HAL_MLU_EMULATE: capability={values['capability']!r} is not MAJOR.MINOR")
    return values["tmo"], (int(major), int(minor or 0))


def tmo_test_double(version: str = NEWEST_TMO, capability: Tuple[int, int] = (5, 0)) -> TmoTestDouble:
    """The double of torch_mlu_ops ``version`` (one of :data:`TMO_VERSIONS`) on a device of ``capability``."""
    cls = Tmo1_6TestDouble if version == VLLM_MLU_TMO else Tmo1_12TestDouble
    return cls(capability)


def emulated_mlu_backend():
    """Factory of the ``mlu-emulated`` twin: :class:`MluBackend` over the double, configured by
    ``HAL_MLU_EMULATE`` (default: torch_mlu_ops 1.12.1 on an MLU590, capability 5.0)."""
    from hal.backends.mlu.backend import MluBackend

    version, capability = _parse_emulation(os.environ.get("HAL_MLU_EMULATE", ""))
    return MluBackend(lib=tmo_test_double(version, capability))
