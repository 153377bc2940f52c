"""TEST DOUBLE of ``torch_npu``: a CPU stand-in for exactly the torch_npu operators the Ascend backend
calls, written from the vendor documentation (op-plugin's ``torch_npu-<op>.md`` pages and
``op_plugin_functions.yaml``; see ``docs/backends/ascend.md``). It is not torch_npu and says nothing
about hardware: every backend built on it is registered ``emulated`` and its reports say EMULATED.

What it reproduces, per operator: the signature (keyword names and defaults the backend uses), the
output conventions (lists, int32 ids, tuples, placeholder outputs) and the documented refusals (block
size, head counts, group limits, dtype combinations, bias dtype, renormalisation with sigmoid). The W8A8
operators (``npu_dynamic_quant``, ``npu_quant_matmul``, GMM's int8 -> int32 form) are emulated in the
forms the backend uses. Where the
documentation leaves a behaviour open, the double picks the answer a careless backend would get wrong:
rows attending no key come back NaN, and undocumented inputs (empty batches, zero-length sequences) are
refused, so the backend must handle them itself.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import List, Optional, Sequence, Tuple

import torch

from hal.vendor import EmulatedLibrary

__all__ = ["TorchNpuTestDouble", "SOC_VERSIONS", "FIA_MASK_SIZE", "MLA_BLOCK_SIZE", "emulated_a2", "emulated_950"]

#: ``torch_npu.npu.get_soc_version()`` values the double can pretend to be (vllm-ascend's table:
#: 220-225 Atlas A2, 250-255 Atlas A3, 260 Ascend 950, 200-205 Atlas 310P).
SOC_VERSIONS = {"a2": 223, "a3": 253, "950": 260, "310p": 202}

FIA_MASK_SIZE = 2048  # sparse_mode 3 (rightDownCausal) takes a 2048 x 2048 "optimised" mask
MLA_BLOCK_SIZE = 128  # the paged latent cache block size the MLA decode kernels serve (vllm-ascend: [128])
_MLA_HEADS = (1, 2, 4, 8, 16, 32, 64, 128)
_GMM_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_FIA_DTYPES = (torch.bfloat16, torch.float16)


class TorchNpuTestDouble(EmulatedLibrary):
    """TEST DOUBLE of the torch_npu operators the Ascend backend calls (see the module docstring)."""

    emulates = "torch_npu 2.10.0.post4 / CANN 9.1.0 operators, as documented"
    __version__ = "2.10.0.post4+emulated"

    def __init__(self, soc: str = "a2") -> None:
        super().__init__()
        version = SOC_VERSIONS[soc]
        self.soc = soc
        # the runtime calls the backend makes: torch_npu.npu.get_soc_version() / device_count()
        self.npu = SimpleNamespace(get_soc_version=lambda: version, device_count=lambda: 1)

    # -------------------------------------------------------------------- grouped GEMM
    def npu_grouped_matmul(
        self,
        x: List[torch.Tensor],
        weight: List[torch.Tensor],
        *,
        bias=None,
        scale=None,
        offset=None,
        antiquant_scale=None,
        antiquant_offset=None,
        per_token_scale=None,
        group_list: Optional[torch.Tensor] = None,
        split_item: int = 0,
        group_type: Optional[int] = None,
        group_list_type: int = 0,
        act_type: int = 0,
        output_dtype=None,
    ) -> List[torch.Tensor]:
        """The single-tensor MoE form only (one x [M, K], one weight [E, K, N], split_item 2/3, m-axis
        grouping): ``y[rows of e] = x[rows of e] @ weight[e]``; returns a one-element list."""
        op = "npu_grouped_matmul"
        self.record(op)
        if not (isinstance(x, list) and isinstance(weight, list) and len(x) == 1 and len(weight) == 1):
            self.refuse(op, "x and weight are lists of tensors (the double emulates the single-tensor form)")
        xs, w = x[0], weight[0]
        if split_item not in (2, 3) or group_type != 0:
            self.refuse(op, "the single-tensor MoE form needs split_item 2/3 and group_type 0")
        if xs.dim() != 2 or w.dim() != 3:
            self.refuse(op, f"x must be 2-D and weight 3-D [E, K, N], got {tuple(xs.shape)} and {tuple(w.shape)}")
        if (
            any(v is not None for v in (bias, scale, offset, antiquant_scale, antiquant_offset, per_token_scale))
            or act_type != 0
        ):
            self.refuse(op, "the double emulates the unscaled forms only (no bias, scales or activation)")
        int8 = xs.dtype == torch.int8
        if int8:  # vllm-ascend's int32-output W8A8 form: the raw int32 sums, dequantised by the caller
            if w.dtype != torch.int8 or output_dtype != torch.int32:
                self.refuse(
                    op,
                    f"int8 x with {w.dtype} weight, output_dtype {output_dtype}: the double emulates "
                    "int8 x int8 -> int32 only",
                )
        elif xs.dtype not in _GMM_DTYPES or w.dtype != xs.dtype:
            self.refuse(
                op,
                f"x/weight dtypes {xs.dtype}/{w.dtype}: the unquantised table lists fp16/fp16, bf16/bf16 and fp32/fp32",
            )
        elif output_dtype is not None and output_dtype != xs.dtype:
            self.refuse(op, f"output_dtype {output_dtype} for {xs.dtype} x (the table allows None or x's dtype)")
        if xs.shape[0] == 0:
            self.refuse(op, "empty x (zero rows) is not documented")
        if w.shape[0] > 1024:
            self.refuse(op, f"{w.shape[0]} groups: the single-tensor form takes at most 1024")
        if xs.shape[1] >= 65536 or w.shape[2] >= 65536:
            self.refuse(op, "the last dim of x and weight must be < 65536")
        if w.shape[1] != xs.shape[1]:
            self.refuse(op, f"weight must be [E, K={xs.shape[1]}, N], got {tuple(w.shape)}")
        counts = self._group_counts(op, group_list, group_list_type, w.shape[0], xs.shape[0])
        # float64 holds the int8 sums exactly (the int32 accumulator); float operands accumulate in fp32
        acc = torch.float64 if int8 else torch.float32
        y = torch.empty(xs.shape[0], w.shape[2], dtype=acc, device=xs.device)
        start = 0
        for e, size in enumerate(counts):
            y[start : start + size] = xs[start : start + size].to(acc) @ w[e].to(acc)
            start += size
        return [y.to(output_dtype or xs.dtype)]

    def _group_counts(
        self, op: str, group_list: Optional[torch.Tensor], group_list_type: int, groups: int, rows: int
    ) -> List[int]:
        if group_list is None or group_list.dtype != torch.int64 or group_list.dim() != 1:
            self.refuse(op, "group_list must be a 1-D int64 tensor")
        if group_list.shape[0] != groups:
            self.refuse(op, f"group_list has {group_list.shape[0]} entries for {groups} groups")
        values = group_list.tolist()
        if group_list_type == 1:
            counts = values
        elif group_list_type == 0:
            counts = [b - a for a, b in zip([0] + values[:-1], values)]
        else:
            self.refuse(op, "group_list_type 2 needs int8 x and weight on A2/A3")
        if min(counts, default=0) < 0 or sum(counts) != rows:
            self.refuse(op, f"group_list {values} (type {group_list_type}) does not cover the {rows} rows of x")
        return counts

    # -------------------------------------------------------------------- W8A8 quantisation
    def npu_dynamic_quant(
        self,
        input: torch.Tensor,
        *,
        smooth_scales=None,
        group_index=None,
        dst_type=None,
        quant_mode: str = "pertoken",
        dst_type_max: float = 0.0,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Symmetric per-token int8 (:meth:`per_row_int8`: scale fp32 of shape ``x.shape[:-1]``)."""
        op = "npu_dynamic_quant"
        self.record(op)
        if input.dtype not in _FIA_DTYPES or input.dim() < 2:
            self.refuse(op, f"input must be float16/bfloat16 with dim > 1, got {input.dtype} {input.dim()}-D")
        if (
            smooth_scales is not None
            or group_index is not None
            or dst_type not in (None, torch.int8)
            or quant_mode != "pertoken"
            or dst_type_max != 0.0
        ):
            self.refuse(op, "the double emulates the plain per-token int8 form only")
        if input.numel() == 0:
            self.refuse(op, "empty input is not documented")
        if input.dim() != 2:
            self.refuse(op, "the double emulates 2-D input [tokens, K]")
        return self.per_row_int8(input)

    def npu_quant_matmul(
        self,
        x1: torch.Tensor,
        x2: torch.Tensor,
        scale: torch.Tensor,
        *,
        offset=None,
        pertoken_scale: Optional[torch.Tensor] = None,
        bias=None,
        output_dtype=None,
        x1_dtype=None,
        x2_dtype=None,
        pertoken_scale_dtype=None,
        scale_dtype=None,
        group_sizes=None,
        y_scale=None,
    ) -> torch.Tensor:
        """W8A8 per-token form: ``y = (x1 @ x2) * scale * pertoken_scale`` with ``x1`` int8 ``[M, K]``, ``x2``
        int8 ``[K, N]``, ``scale`` fp32 ``(N,)``, ``pertoken_scale`` fp32 ``(M,)``; int32 accumulation,
        output bf16 or fp16 (the A2/A3 table for fp32 scales)."""
        op = "npu_quant_matmul"
        self.record(op)
        if (
            x1.dtype != torch.int8
            or x2.dtype != torch.int8
            or x1.dim() != 2
            or x2.dim() != 2
            or x2.shape[0] != x1.shape[1]
        ):
            self.refuse(
                op,
                f"the double emulates int8 x1 [M, K] and x2 [K, N], got {x1.dtype} {tuple(x1.shape)} "
                f"and {x2.dtype} {tuple(x2.shape)}",
            )
        if any(
            v is not None
            for v in (offset, bias, x1_dtype, x2_dtype, pertoken_scale_dtype, scale_dtype, group_sizes, y_scale)
        ):
            self.refuse(op, "the double emulates the per-token W8A8 form only (no offset, bias, dtype overrides)")
        if scale.dtype != torch.float32 or tuple(scale.shape) not in ((1,), (x2.shape[1],)):
            self.refuse(op, "scale must be float32 of shape (1,) or (N,)")
        if (
            pertoken_scale is None
            or pertoken_scale.dtype != torch.float32
            or tuple(pertoken_scale.shape) != (x1.shape[0],)
        ):
            self.refuse(op, "pertoken_scale must be float32 (M,)")
        if output_dtype not in (torch.bfloat16, torch.float16):
            self.refuse(
                op,
                f"output_dtype {output_dtype}: fp32 scales with a per-token scale give bf16 or fp16 "
                "(None would give int8, not emulated)",
            )
        if max(x1.shape[1], x2.shape[1]) > 65535:
            self.refuse(op, "the last dims of x1 and x2 must be <= 65535")
        if x1.shape[0] == 0:
            self.refuse(op, "empty x1 (zero rows) is not documented")
        acc = (x1.double() @ x2.double()).float()  # the exact int32 sums
        return (acc * scale * pertoken_scale[:, None]).to(output_dtype)

    # -------------------------------------------------------------------- routing
    def npu_moe_gating_top_k(
        self,
        x: torch.Tensor,
        k: int,
        *,
        bias: Optional[torch.Tensor] = None,
        k_group: int = 1,
        group_count: int = 1,
        group_select_mode: int = 0,
        renorm: int = 0,
        norm_type: int = 0,
        out_flag: bool = False,
        routed_scaling_factor: float = 1.0,
        eps: float = 1e-20,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The documented "equivalent computation logic": score (0 softmax, 1 sigmoid), add the bias for
        selection, group by ``group_count`` (mode 0 max, 1 top-2 sum), keep ``k_group`` groups (others
        -inf), stable top-k, weights from the unbiased scores, sigmoid renormalised by ``sum + eps``,
        times ``routed_scaling_factor``. Returns ``(y [T, k] x.dtype, ids int32, normOut fp32)``."""
        op = "npu_moe_gating_top_k"
        self.record(op)
        if x.dim() != 2 or x.dtype not in _GMM_DTYPES:
            self.refuse(op, "x must be 2-D float16/bfloat16/float32")
        experts = x.shape[1]
        if experts > 2048:
            self.refuse(op, f"{experts} experts: the last dim of x must be <= 2048")
        if bias is not None and (bias.dim() != 1 or bias.shape[0] != experts or bias.dtype != x.dtype):
            self.refuse(
                op, f"bias must be 1-D [{experts}] with x's dtype {x.dtype}, got {bias.dtype} {tuple(bias.shape)}"
            )
        if renorm != 0:
            self.refuse(op, "renorm: only 0 is supported")
        if norm_type not in (0, 1):
            self.refuse(op, f"norm_type {norm_type}: 0 (softmax) or 1 (sigmoid)")
        if group_select_mode not in (0, 1):
            self.refuse(op, f"group_select_mode {group_select_mode}: 0 (max) or 1 (top-2 sum)")
        if group_count < 1 or experts % group_count or experts // group_count <= 2:
            self.refuse(op, f"group_count {group_count}: must divide {experts} experts into groups of more than 2")
        if -(-(experts // group_count) // 32) * 32 * group_count > 2048:
            self.refuse(op, "align32(E / group_count) * group_count must be <= 2048")
        if not 1 <= k_group <= group_count:
            self.refuse(op, f"k_group {k_group}: 1 <= k_group <= group_count = {group_count}")
        if not 1 <= k <= experts // group_count * k_group:
            self.refuse(op, f"k {k}: 1 <= k <= E / group_count * k_group")
        xf = x.float()
        scores = xf.softmax(-1) if norm_type == 0 else xf.sigmoid()
        choice = scores if bias is None else scores + bias.float()
        if group_count > 1:
            grouped = choice.view(x.shape[0], group_count, -1)
            group_score = grouped.amax(-1) if group_select_mode == 0 else grouped.topk(2, -1).values.sum(-1)
            kept = torch.sort(group_score, dim=-1, descending=True, stable=True).indices[:, :k_group]
            dropped = torch.ones_like(group_score, dtype=torch.bool).scatter_(1, kept, False)
            choice = grouped.masked_fill(dropped[..., None], float("-inf")).view(x.shape[0], experts)
        ids = torch.sort(choice, dim=-1, descending=True, stable=True).indices[:, :k]
        y = scores.gather(1, ids)
        if norm_type == 1:
            y = y / (y.sum(-1, keepdim=True) + eps)
        y = y * routed_scaling_factor
        norm_out = scores if out_flag else scores.new_empty(0)
        return y.to(x.dtype), ids.to(torch.int32), norm_out

    def npu_moe_init_routing_v2(
        self,
        x: torch.Tensor,
        expert_idx: torch.Tensor,
        *,
        scale=None,
        offset=None,
        active_num: int = -1,
        expert_capacity: int = -1,
        expert_num: int = -1,
        drop_pad_mode: int = 0,
        expert_tokens_num_type: int = 0,
        expert_tokens_num_flag: bool = False,
        quant_mode: int = -1,
        active_expert_range: Sequence[int] = (),
        row_idx_type: int = 0,
    ):
        """Dropless, unquantised form: a stable sort of the flattened ``expert_idx`` (slot ``t * k + j``).
        Returns ``(expanded_x, expanded_row_idx int32 [T*k], expert_tokens int64 [E], expanded_scale)``;
        with ``row_idx_type=0`` (gather) row ``r`` of ``expanded_x`` came from slot ``expanded_row_idx[r]``."""
        op = "npu_moe_init_routing_v2"
        self.record(op)
        if x.dim() != 2 or x.dtype not in _GMM_DTYPES + (torch.int8,):
            self.refuse(op, "x must be 2-D float16/bfloat16/float32/int8")
        if expert_idx.dim() != 2 or expert_idx.dtype != torch.int32 or expert_idx.shape[0] != x.shape[0]:
            self.refuse(op, "expert_idx must be int32 [num_rows, k]")
        if x.shape[0] == 0:
            self.refuse(op, "empty x (zero rows) is not documented")
        if drop_pad_mode != 0 or quant_mode != -1 or scale is not None or offset is not None:
            self.refuse(op, "the double emulates the dropless, unquantised form only")
        if not 0 < expert_num <= 10240:
            self.refuse(op, f"expert_num {expert_num}: 1..10240")
        if expert_tokens_num_type not in (0, 1) or not expert_tokens_num_flag:
            self.refuse(op, "the double emulates expert_tokens_num_flag=True with type 0 (cumsum) or 1 (count)")
        if row_idx_type != 0:
            self.refuse(op, "the double emulates row_idx_type 0 (gather indices) only")
        slots = expert_idx.numel()
        if active_num != slots:
            self.refuse(op, f"active_num {active_num}: the double emulates active_num = num_rows * k = {slots}")
        if active_expert_range and list(active_expert_range) != [0, expert_num]:
            self.refuse(op, "the double emulates the full expert range [0, expert_num] only")
        flat = expert_idx.reshape(-1).long()
        if bool(((flat < 0) | (flat >= expert_num)).any()):
            self.refuse(op, "expert ids outside [0, expert_num)")
        order = torch.sort(flat, stable=True).indices
        counts = torch.bincount(flat, minlength=expert_num)
        tokens = counts if expert_tokens_num_type == 1 else counts.cumsum(0)
        return (
            x[order // expert_idx.shape[1]],
            order.to(torch.int32),
            tokens.to(torch.int64),
            torch.empty(0, dtype=torch.float32),
        )

    def npu_moe_token_unpermute(
        self,
        permuted_tokens: torch.Tensor,
        sorted_indices: torch.Tensor,
        probs: Optional[torch.Tensor] = None,
        padded_mode: bool = False,
        restore_shape=None,
    ) -> torch.Tensor:
        """``out[t] = sum_j probs[t, j] * permuted_tokens[r]`` where row ``r`` holds slot
        ``sorted_indices[r] = t * k + j`` (the inverse of ``npu_moe_token_permute``). The arithmetic
        runs in the tokens' dtype (the documentation states no wider accumulation)."""
        op = "npu_moe_token_unpermute"
        self.record(op)
        if padded_mode or restore_shape is not None:
            self.refuse(op, "padded_mode / restore_shape are not emulated")
        if sorted_indices.dtype != torch.int32 or sorted_indices.dim() != 1:
            self.refuse(op, "sorted_indices must be 1-D int32")
        if permuted_tokens.dtype not in _GMM_DTYPES:
            self.refuse(op, "permuted_tokens must be float16/bfloat16/float32")
        if probs is None or probs.dim() != 2 or probs.numel() != sorted_indices.numel():
            self.refuse(op, "probs [T, k] matching sorted_indices is required by the double")
        if permuted_tokens.shape[0] == 0:
            self.refuse(op, "empty permuted_tokens is not documented")
        dtype = permuted_tokens.dtype
        restored = permuted_tokens.new_empty(permuted_tokens.shape)
        restored[sorted_indices.long()] = permuted_tokens
        weighted = restored.view(probs.shape[0], probs.shape[1], -1) * probs.to(dtype)[..., None]
        return weighted.sum(1).to(dtype)

    # -------------------------------------------------------------------- attention
    def npu_fused_infer_attention_score(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *,
        atten_mask: Optional[torch.Tensor] = None,
        actual_seq_lengths: Optional[Sequence[int]] = None,
        actual_seq_lengths_kv: Optional[Sequence[int]] = None,
        block_table: Optional[torch.Tensor] = None,
        query_rope: Optional[torch.Tensor] = None,
        key_rope: Optional[torch.Tensor] = None,
        num_heads: int = 1,
        scale: float = 1.0,
        input_layout: str = "BSH",
        num_key_value_heads: int = 0,
        sparse_mode: int = 0,
        block_size: int = 0,
        antiquant_mode: int = 0,
        softmax_lse_flag: bool = False,
        **unsupported,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The two MLA forms of FIA (v1 keyword names):

        * prefill, ``input_layout="TND"``: ``query`` [T, N, 128] + ``query_rope`` [T, N, 64], ``key``
          likewise, ``value`` [T, N, 128], cumulative ``actual_seq_lengths(_kv)``; ``softmax_lse_flag``
          gives lse ``[T, N, 1]`` fp32 (natural log);
        * decode over a paged latent cache, ``input_layout="BSND"``: ``query`` [B, S, N, 512] +
          ``query_rope`` [B, S, N, 64], ``key`` = ``value`` = latent cache [blocks, 128, 512],
          ``key_rope`` [blocks, 128, 64], ``block_table`` int32, per-batch ``actual_seq_lengths_kv``;
          one kv head; N in {1, 2, 4, ..., 128}; no lse (a placeholder comes back).

        ``sparse_mode`` 0 = no mask, 3 = rightDownCausal with a 2048 x 2048 upper-triangular mask.
        """
        op = "npu_fused_infer_attention_score"
        self.record(op)
        if unsupported:
            self.refuse(op, f"arguments not emulated: {sorted(unsupported)}")
        if query_rope is None or key_rope is None:
            self.refuse(op, "the double emulates the MLA forms only (query_rope and key_rope both given)")
        if query.dtype not in _FIA_DTYPES or any(t.dtype != query.dtype for t in (key, value, query_rope, key_rope)):
            self.refuse(
                op,
                f"query/key/value/rope dtypes must all be float16 or bfloat16, got {query.dtype}, "
                f"{key.dtype}, {value.dtype}, {query_rope.dtype}, {key_rope.dtype}",
            )
        if antiquant_mode != 0:
            self.refuse(op, "antiquant_mode must be 0")
        if query_rope.shape[-1] != 64 or key_rope.shape[-1] != 64:
            self.refuse(op, "the rope head dim must be 64")
        if sparse_mode == 3:
            if (
                atten_mask is None
                or tuple(atten_mask.shape) != (FIA_MASK_SIZE, FIA_MASK_SIZE)
                or atten_mask.dtype not in (torch.bool, torch.int8, torch.uint8)
                or not torch.equal(atten_mask.bool(), torch.ones_like(atten_mask, dtype=torch.bool).triu(1))
            ):
                self.refuse(op, "sparse_mode 3 needs the 2048 x 2048 upper-triangular (optimised) atten_mask")
        elif sparse_mode != 0 or atten_mask is not None:
            self.refuse(op, "the double emulates sparse_mode 0 (no mask) and 3 (rightDownCausal) only")
        if input_layout == "TND":
            return self._fia_prefill(
                op,
                query,
                key,
                value,
                query_rope,
                key_rope,
                actual_seq_lengths,
                actual_seq_lengths_kv,
                num_heads,
                num_key_value_heads,
                scale,
                sparse_mode,
                softmax_lse_flag,
                block_table,
            )
        if input_layout == "BSND":
            return self._fia_decode(
                op,
                query,
                key,
                value,
                query_rope,
                key_rope,
                actual_seq_lengths_kv,
                block_table,
                block_size,
                num_heads,
                num_key_value_heads,
                scale,
                sparse_mode,
                softmax_lse_flag,
            )
        self.refuse(op, f"input_layout {input_layout!r} is not emulated (TND prefill, BSND paged decode)")
        raise AssertionError  # unreachable: refuse raises

    def _fia_prefill(
        self, op, q, k, v, q_rope, k_rope, seq_q, seq_kv, num_heads, kv_heads, scale, sparse_mode, lse_flag, block_table
    ):
        if q.dtype != torch.bfloat16:
            self.refuse(op, "the TND layout supports bfloat16 only")
        if block_table is not None:
            self.refuse(op, "TND prefill takes no block_table")
        if q.dim() != 3 or q.shape[2] != 128 or k.shape[2] != 128 or v.shape[2] != 128:
            self.refuse(op, "with rope, query/key/value head dims must all be 128")
        t, n = q.shape[0], q.shape[1]
        if num_heads != n or kv_heads not in (0, n) or k.shape[1] != n or v.shape[1] != n:
            self.refuse(op, "the MLA prefill form takes num_key_value_heads = num_heads (heads of key/value)")
        if t == 0 or seq_q is None or seq_kv is None or len(seq_q) != len(seq_kv) or not 1 <= len(seq_q) <= 4096:
            self.refuse(op, "TND needs cumulative actual_seq_lengths and actual_seq_lengths_kv of 1..4096 entries")
        if list(seq_q) != sorted(seq_q) or seq_q[-1] != t or list(seq_kv) != sorted(seq_kv) or seq_kv[-1] != k.shape[0]:
            self.refuse(op, "actual_seq_lengths(_kv) must be non-decreasing cumulative ends")
        out = torch.full((t, n, 128), float("nan"), dtype=torch.float32)
        lse = torch.full((t, n, 1), float("nan"), dtype=torch.float32)
        qf = torch.cat([q, q_rope], -1).float()
        kf = torch.cat([k, k_rope], -1).float()
        for (q0, q1), (k0, k1) in zip(zip([0] + list(seq_q[:-1]), seq_q), zip([0] + list(seq_kv[:-1]), seq_kv)):
            o, s = _attention(qf[q0:q1], kf[k0:k1], v[k0:k1].float(), scale, sparse_mode == 3)
            out[q0:q1], lse[q0:q1, :, 0] = o, s
        return out.to(q.dtype), (lse if lse_flag else torch.empty(0))

    def _fia_decode(
        self,
        op,
        q,
        key,
        value,
        q_rope,
        k_rope,
        seq_kv,
        block_table,
        block_size,
        num_heads,
        kv_heads,
        scale,
        sparse_mode,
        lse_flag,
    ):
        if lse_flag:
            self.refuse(op, "the MLA decode form (D=512) returns no softmax_lse")
        if q.dim() != 4 or q.shape[3] != 512:
            self.refuse(op, "the MLA decode form takes query [B, S, N, 512]")
        b, s, n = q.shape[0], q.shape[1], q.shape[2]
        if n != num_heads or n not in _MLA_HEADS:
            self.refuse(op, f"num_heads {num_heads} (query has {n}): the MLA form needs N in {_MLA_HEADS}")
        if kv_heads != 1:
            self.refuse(op, "the MLA decode form needs num_key_value_heads = 1")
        if value is not key:
            self.refuse(op, "the MLA decode form reads value from the latent cache: pass key as value")
        if (
            block_size != MLA_BLOCK_SIZE
            or key.dim() != 3
            or tuple(key.shape[1:]) != (MLA_BLOCK_SIZE, 512)
            or tuple(k_rope.shape) != (key.shape[0], MLA_BLOCK_SIZE, 64)
        ):
            self.refuse(
                op,
                f"the paged MLA cache must be [blocks, {MLA_BLOCK_SIZE}, 512] + [blocks, "
                f"{MLA_BLOCK_SIZE}, 64] with block_size {MLA_BLOCK_SIZE}, got block_size {block_size}, "
                f"{tuple(key.shape)}",
            )
        if block_table is None or block_table.dtype != torch.int32 or block_table.shape[0] != b:
            self.refuse(op, "block_table must be int32 [B, max_blocks]")
        if seq_kv is None or len(seq_kv) != b or min(seq_kv) < 1 or max(seq_kv) > block_table.shape[1] * MLA_BLOCK_SIZE:
            self.refuse(
                op,
                "actual_seq_lengths_kv: one length in [1, max_blocks * block_size] per batch "
                "(a zero length is not documented)",
            )
        out = torch.empty(b, s, n, 512, dtype=torch.float32)
        for i, length in enumerate(seq_kv):
            pos = torch.arange(length)
            blocks = block_table[i, pos // MLA_BLOCK_SIZE].long()
            if bool(((blocks < 0) | (blocks >= key.shape[0])).any()):
                self.refuse(op, f"block_table row {i} addresses blocks outside the cache")
            latent = key[blocks, pos % MLA_BLOCK_SIZE].float()
            keys = torch.cat([latent, k_rope[blocks, pos % MLA_BLOCK_SIZE].float()], -1)
            queries = torch.cat([q[i], q_rope[i]], -1).float().reshape(s * n, 576)
            # rightDownCausal per query token: token j of S sees the first length - S + 1 + j keys
            o, _ = _attention(
                queries[:, None], keys[:, None], latent[:, None], scale, sparse_mode == 3, rows_per_query=n
            )
            out[i] = o.reshape(s, n, 512)
        return out.to(q.dtype), torch.zeros(1, dtype=torch.float32)


def _attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool, rows_per_query: int = 1
) -> Tuple[torch.Tensor, torch.Tensor]:
    """fp32 attention, q ``[Lq, N, D]``, k ``[Lk, Nk, D]``, v ``[Lk, Nk, Dv]`` (``Nk`` 1 or N); causal is
    bottom-right aligned over query tokens of ``rows_per_query`` consecutive rows. A row attending no
    key comes back NaN (undocumented)."""
    lq, lk = q.shape[0], k.shape[0]
    logits = torch.einsum("qnd,knd->nqk", q, k.expand(lk, q.shape[1], -1)) * scale
    if causal:
        token = torch.arange(lq) // rows_per_query
        tokens = math.ceil(lq / rows_per_query)
        allowed = torch.arange(lk)[None, :] <= (lk - tokens + token)[:, None]
        logits = logits.masked_fill(~allowed[None], float("-inf"))
    lse = torch.logsumexp(logits, -1)  # -inf for an empty row
    p = torch.exp(logits - lse[..., None])  # NaN for an empty row
    out = torch.einsum("nqk,knv->qnv", p, v.expand(lk, q.shape[1], -1))
    lse = lse.transpose(0, 1)
    return out.masked_fill((lse == float("-inf"))[..., None], float("nan")), lse


def emulated_a2():
    """The ``ascend-emulated`` backend: the production AscendBackend over the double, as an Atlas A2."""
    from hal.backends.ascend.backend import AscendBackend

    return AscendBackend(TorchNpuTestDouble("a2"))


def emulated_950():
    """The ``ascend-950-emulated`` backend: as :func:`emulated_a2`, pretending to be an Ascend 950."""
    from hal.backends.ascend.backend import AscendBackend

    return AscendBackend(TorchNpuTestDouble("950"))
