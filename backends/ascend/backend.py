"""The Huawei Ascend backend: HAL contracts mapped onto torch_npu operators.

Each kernel translates the contract's arguments into the vendor operator's conventions (weight layout,
group lists, int32 ids, cumulative lengths, the 128-slot latent cache, power-of-two head counts) and
serves a request the operator cannot serve, or whose documented semantics differ from the contract,
through :meth:`~hal.vendor.VendorBackend.reference_path`; ``self.paths`` records which one ran. What
maps to what, per SoC, and why each fallback exists: ``docs/backends/ascend.md``.

The code is device-agnostic PyTorch around the vendor calls: on an NPU the tensors live on ``npu``, in
the emulated twin (:mod:`hal.backends.ascend.torch_npu_double`) on the CPU.
"""
from __future__ import annotations

import functools
import os
import platform
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from hal.backend import Availability, Support, implements
from hal.ops.mla import attended_keys, gather_paged_keys
from hal.ops.quant import apply_int8_amax_floor
from hal.ops.routing import RENORM_EPS, MoePermutation, invert_permutation
from hal.vendor import VendorBackend

__all__ = ["AscendBackend", "NORM_TYPE_SIGMOID", "soc_generation", "FP8_OPS", "ALWAYS_REFERENCE"]

#: ``npu_moe_gating_top_k(norm_type=...)`` for sigmoid scoring. The English 26.1.0 page says "1 enables
#: Softmax, 0 Sigmoid"; its own equivalent-computation code (``if norm_type == 0: softmax else
#: sigmoid``), the Chinese master page ("1 表示使用 Sigmoid") and every caller (vllm-ascend, sglang) say
#: 1 = sigmoid. The code and the callers win; tests/test_backend_ascend.py pins it.
NORM_TYPE_SIGMOID = 1
_GROUP_SELECT_MAX, _GROUP_SELECT_TOP2_SUM = 0, 1      # npu_moe_gating_top_k group_select_mode
_GROUP_LIST_COUNTS = 1                                 # npu_grouped_matmul group_list_type: per-group counts
_EXPERT_TOKENS_COUNT = 1                               # npu_moe_init_routing_v2 expert_tokens_num_type
_SPARSE_NONE, _SPARSE_RIGHT_DOWN_CAUSAL = 0, 3        # npu_fused_infer_attention_score sparse_mode
_FIA_MASK_SIZE = 2048                                  # sparse_mode 3 takes this "optimised" mask
_MLA_BLOCK = 128                                       # latent cache block size of the MLA decode kernel
_MLA_LATENT, _MLA_ROPE = 512, 64                       # absorbed MLA key = [c_kv 512 | k_rope 64]
_PREFILL_NOPE, _PREFILL_V = 128, 128                   # non-absorbed prefill: qk 128 + 64 rope, v 128
_MAX_MLA_HEADS = 128
_QUANT_MATMUL_MAX_DIM = 65535                          # npu_quant_matmul: last dims of x1 / x2 at most this
_QUANT_MATMUL_OUT = (torch.bfloat16, torch.float16)    # int8 x int8, fp32 scale + fp32 pertoken_scale -> these

#: The quantisation contracts. Atlas A2/A3 have no FP8 (no fp8 dtype in any documented table): they
#: are not offered there. On Ascend 950 they run on the reference path: DeepSeek's 1x128 / 128x128
#: block scales are not a documented npu_dynamic_quant / npu_quant_matmul / GMM mode (those document
#: per-token, per-channel and MX 1x32 scales), so the conservative path is taken.
FP8_OPS = ("quantize_fp8", "quantize_fp8_weight", "dequantize_fp8", "fp8_gemm", "quantize_fp4", "dequantize_fp4")
_FP8_REASON = ("no documented torch_npu mode for DeepSeek's 1x128 / 128x128 block scales (npu_dynamic_quant and "
               "npu_quant_matmul document per-token, per-channel and MX 1x32 scales)")

#: Operators always served by the reference path (plain PyTorch on the NPU), and why.
ALWAYS_REFERENCE: Dict[str, str] = {
    "hash_routing": "npu_moe_gating_top_k's tid2eid hash form is absent from the 26.1.0 documentation",
    "paged_cache_write": "a scatter into the HAL's cache layout; npu_kv_rmsnorm_rope_cache also fuses "
                         "RMSNorm and RoPE, which the contract does not",
    **{op: _FP8_REASON for op in FP8_OPS},
    "quantize_int8_weight": "run once at load; npu_dynamic_quant's per-channel mode is tested on Ascend 950 only "
                            "(aclnnDynamicQuantV3) and quantises over the other axis",
}

_GENERATIONS = ((range(220, 226), "Atlas A2"), (range(250, 256), "Atlas A3"), (range(260, 261), "Ascend 950"),
                (range(200, 206), "Atlas 310P"))
_SERVED_GENERATIONS = ("Atlas A2", "Atlas A3", "Ascend 950")
_FP8_GENERATIONS = ("Ascend 950",)
_FLOAT_AXIS = ("bfloat16", "float16", "float32")


def soc_generation(version: int) -> str:
    """``torch_npu.npu.get_soc_version()`` -> the product generation (vllm-ascend's table)."""
    return next((name for versions, name in _GENERATIONS if version in versions), f"unknown SoC {version}")


def _cann_version() -> str:
    """CANN toolkit version from the install info ``set_env.sh`` points ASCEND_TOOLKIT_HOME at."""
    home = os.environ.get("ASCEND_TOOLKIT_HOME")
    if not home:
        return "unknown (ASCEND_TOOLKIT_HOME is not set: source /usr/local/Ascend/ascend-toolkit/set_env.sh)"
    info = Path(home) / f"{platform.machine()}-linux" / "ascend_toolkit_install.info"
    try:
        lines = info.read_text().splitlines()
    except OSError:
        return f"unknown (no {info})"
    return next((ln.split("=", 1)[1].strip() for ln in lines if ln.startswith("version=")), f"unknown ({info})")


class AscendBackend(VendorBackend):
    vendor = "Huawei Ascend (torch_npu)"
    device_type = "npu"
    device_name = "NPU"
    library = "torch_npu"
    install_hint = 'on an Ascend machine with CANN: pip install "xpu-hal[ascend]"; see docs/backends/ascend.md'
    native_hint = ("CANN libraries missing from the library path: source /usr/local/Ascend/ascend-toolkit/set_env.sh "
                   "(and /usr/local/Ascend/nnal/atb/set_env.sh)")

    def __init__(self, lib=None) -> None:
        super().__init__(lib)
        self.add_reference_implementations(ALWAYS_REFERENCE)
        self._causal_masks: Dict[torch.device, torch.Tensor] = {}

    # -- detection -------------------------------------------------------------------------------
    def visible_devices(self) -> int:
        return self.lib.npu.device_count()

    @functools.cached_property
    def soc(self) -> str:
        """The SoC generation, detected (never assumed); raises when torch_npu cannot be loaded."""
        version = self.lib.npu.get_soc_version()
        return f"{soc_generation(version)} (get_soc_version {version})"

    def _generation(self) -> Optional[str]:
        try:
            return self.soc.split(" (")[0]
        except Exception:  # not installed / not loadable: probe() says why
            return None

    def probe(self) -> Availability:
        found = super().probe()
        if found.available and self._generation() not in _SERVED_GENERATIONS:
            return Availability(False, f"torch_npu runs on a {self.soc}; this backend serves "
                                       f"{', '.join(_SERVED_GENERATIONS)}")
        return found

    def versions(self) -> Dict[str, str]:
        found: Dict[str, str] = {}
        try:
            found["torch_npu"] = str(self.lib.__version__)
            found["SoC"] = self.soc
        except Exception as exc:
            found["torch_npu"] = f"not loaded ({type(exc).__name__})"
        found["CANN"] = "emulated" if self.emulated else _cann_version()
        found["reference path"] = ", ".join(op for op in ALWAYS_REFERENCE if op in self.capabilities()) + \
            "; and requests outside the kernels' documented limits (docs/backends/ascend.md)"
        return found

    def capabilities(self) -> Dict[str, Support]:
        """What the detected SoC serves: without FP8 (Atlas A2/A3, or undetected) no FP8/FP4 operand."""
        caps = super().capabilities()
        if self._generation() in _FP8_GENERATIONS:
            return caps
        for op in FP8_OPS:
            caps.pop(op, None)
        # W8A8 int8 is what Atlas A2/A3 offer for quantised checkpoints (npu_dynamic_quant + GMM)
        caps["grouped_gemm"] = Support({**caps["grouped_gemm"].axes, "x_dtype": frozenset(_FLOAT_AXIS + ("int8",)),
                                        "w_dtype": frozenset(_FLOAT_AXIS + ("int8",))})
        return caps

    # -- grouped GEMM ------------------------------------------------------------------------------
    @implements("grouped_gemm")
    def grouped_gemm(self, x, w, group_sizes, *, layout="contiguous", x_scale=None, w_scale=None, out_dtype=None):
        op = "grouped_gemm"
        groups, n, k = w.shape
        rows = x.reshape(-1, k)
        int8 = x.dtype == torch.int8
        plain = x.dtype == w.dtype and x.dtype in (torch.bfloat16, torch.float16, torch.float32) and \
            out_dtype in (None, x.dtype)
        if not (plain or int8) or rows.shape[0] == 0 or groups > 1024 or max(n, k) >= 65536:
            return self.reference_path(op, x, w, group_sizes, layout=layout, x_scale=x_scale, w_scale=w_scale,
                                       out_dtype=out_dtype)
        if layout == "contiguous":
            counts = group_sizes.to(torch.int64)
        else:  # masked [G, max_m, K]: every group owns max_m rows; rows past its count are unspecified
            counts = torch.full((groups,), x.shape[1], dtype=torch.int64, device=x.device)
        # GMM computes x[M, K] @ w[e] with w [E, K, N]; a transposed view of [E, N, K] is accepted: no copy.
        # int8: the exact int32 products (output_dtype=int32, vllm-ascend's form), scaled here in fp32: the
        # documented per-token form wants bf16 weight scales for a bf16 output, and rounding the contract's
        # fp32 scales to bf16 moves the result by up to 2**-9, beyond the tolerance.
        y = self.lib.npu_grouped_matmul([rows], [w.transpose(1, 2)], group_list=counts,
                                        group_list_type=_GROUP_LIST_COUNTS, group_type=0, split_item=2,
                                        output_dtype=torch.int32 if int8 else None)[0]
        self.served(op, "npu_grouped_matmul")
        if int8:
            channel_scales = torch.repeat_interleave(w_scale, counts, dim=0, output_size=rows.shape[0])
            y = (y.float() * x_scale.reshape(-1, 1) * channel_scales).to(out_dtype or torch.bfloat16)
        return y if layout == "contiguous" else y.view(groups, x.shape[1], n)

    # -- W8A8 int8 ---------------------------------------------------------------------------------
    @implements("quantize_int8")
    def quantize_int8(self, x):
        op = "quantize_int8"
        rows = x.reshape(-1, x.shape[-1])
        if x.dtype not in (torch.bfloat16, torch.float16) or rows.shape[0] == 0:  # documented: fp16/bf16 x
            return self.reference_path(op, x)
        q, s = self.lib.npu_dynamic_quant(rows)  # dst_type None: int8, per token, scale = rowmax / 127
        self.served(op, "npu_dynamic_quant")
        q, s = apply_int8_amax_floor(rows, q, s)  # the kernel has no amax floor
        return q.view(x.shape), s.view(x.shape[:-1])

    @implements("int8_gemm")
    def int8_gemm(self, a, a_scale, b, b_scale, *, out_dtype=torch.bfloat16):
        op = "int8_gemm"
        k, n = a.shape[-1], b.shape[0]
        rows = a.reshape(-1, k)
        if out_dtype not in _QUANT_MATMUL_OUT or rows.shape[0] == 0 or max(k, n) > _QUANT_MATMUL_MAX_DIM:
            return self.reference_path(op, a, a_scale, b, b_scale, out_dtype=out_dtype)
        # x2 is [K, N]: the transposed view of the [N, K] weight, as vllm-ascend passes it
        y = self.lib.npu_quant_matmul(rows, b.t(), b_scale, pertoken_scale=a_scale.reshape(-1),
                                      output_dtype=out_dtype)
        self.served(op, "npu_quant_matmul")
        return y.view(*a.shape[:-1], n)

    # -- routing ---------------------------------------------------------------------------------
    @implements("topk_routing")
    def topk_routing(self, logits, top_k, *, scoring="softmax", bias=None, n_group=1, topk_group=1,
                     renormalize=False, scale=1.0):
        op = "topk_routing"
        tokens, experts = logits.shape
        per_group = experts // n_group
        # The kernel's sigmoid path always renormalises; its softmax path is "not yet supported" on the
        # Chinese master page; sqrt-softplus is not documented. Its limits: E <= 2048, groups of > 2
        # experts, align32(E / n_group) * n_group <= 2048.
        if scoring != "sigmoid" or not renormalize or tokens == 0 or experts > 2048 or per_group <= 2 or \
                -(-per_group // 32) * 32 * n_group > 2048:
            return self.reference_path(op, logits, top_k, scoring=scoring, bias=bias, n_group=n_group,
                                       topk_group=topk_group, renormalize=renormalize, scale=scale)
        # fp32 in (the contract scores in fp32; the kernel wants bias in x's dtype): exact conversions
        weights, ids, _ = self.lib.npu_moe_gating_top_k(
            logits.float(), top_k, bias=None if bias is None else bias.float(),
            k_group=topk_group if n_group > 1 else 1, group_count=n_group,
            group_select_mode=_GROUP_SELECT_TOP2_SUM if bias is not None else _GROUP_SELECT_MAX, renorm=0,
            norm_type=NORM_TYPE_SIGMOID, routed_scaling_factor=float(scale), eps=RENORM_EPS)
        self.served(op, "npu_moe_gating_top_k")
        return weights, ids

    @implements("moe_permute")
    def moe_permute(self, x, ids, num_experts):
        op = "moe_permute"
        if ids.numel() == 0 or num_experts > 10240:
            return self.reference_path(op, x, ids, num_experts)
        x_sorted, sorted_slots, counts, _ = self.lib.npu_moe_init_routing_v2(
            x, ids.to(torch.int32), active_num=ids.numel(), expert_num=num_experts,
            expert_tokens_num_type=_EXPERT_TOKENS_COUNT, expert_tokens_num_flag=True,
            active_expert_range=[0, num_experts])
        self.served(op, "npu_moe_init_routing_v2")
        return x_sorted, MoePermutation(counts.to(torch.int32), sorted_slots,
                                        invert_permutation(sorted_slots).view(ids.shape))

    @implements("moe_unpermute")
    def moe_unpermute(self, y_sorted, weights, permutation):
        op = "moe_unpermute"
        if y_sorted.shape[0] == 0:
            return self.reference_path(op, y_sorted, weights, permutation)
        # The contract defines the combine by slot_rows; the kernel takes its inverse (row -> slot).
        # fp32 operands: the documentation promises no wider accumulation for bf16/fp16 tokens.
        out = self.lib.npu_moe_token_unpermute(y_sorted.float(), invert_permutation(permutation.slot_rows.reshape(-1)),
                                               probs=weights.float())
        self.served(op, "npu_moe_token_unpermute")
        return out.to(y_sorted.dtype)

    # -- MLA -------------------------------------------------------------------------------------
    def _causal_mask(self, device: torch.device) -> torch.Tensor:
        if device not in self._causal_masks:
            ones = torch.ones(_FIA_MASK_SIZE, _FIA_MASK_SIZE, dtype=torch.bool, device=device)
            self._causal_masks[device] = ones.triu(1)
        return self._causal_masks[device]

    def _masking(self, causal: bool, device: torch.device) -> dict:
        if causal:
            return {"sparse_mode": _SPARSE_RIGHT_DOWN_CAUSAL, "atten_mask": self._causal_mask(device)}
        return {"sparse_mode": _SPARSE_NONE}

    @implements("mla_prefill")
    def mla_prefill(self, q, k, v, cu_seqlens_q, cu_seqlens_k=None, *, softmax_scale, causal=True, sinks=None,
                    window=None, topk_indices=None):
        op = "mla_prefill"
        tokens, heads, dqk = q.shape
        batch = cu_seqlens_q.shape[0] - 1
        # FIA's MLA prefill: TND (bf16 only), qk = 128 + 64 rope, v 128, kv heads = q heads, <= 4096 sequences
        if q.dtype != torch.bfloat16 or dqk != _PREFILL_NOPE + _MLA_ROPE or v.shape[2] != _PREFILL_V or \
                k.shape[1] != heads or tokens == 0 or batch > 4096 or \
                sinks is not None or window is not None or topk_indices is not None:
            return self.reference_path(op, q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale=softmax_scale,
                                       causal=causal, sinks=sinks, window=window, topk_indices=topk_indices)
        cu_k = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k
        out, lse = self.lib.npu_fused_infer_attention_score(
            q[..., :_PREFILL_NOPE].contiguous(), k[..., :_PREFILL_NOPE].contiguous(), v.contiguous(),
            query_rope=q[..., _PREFILL_NOPE:].contiguous(), key_rope=k[..., _PREFILL_NOPE:].contiguous(),
            num_heads=heads, num_key_value_heads=heads, input_layout="TND", scale=softmax_scale,
            actual_seq_lengths=cu_seqlens_q[1:].tolist(), actual_seq_lengths_kv=cu_k[1:].tolist(),
            softmax_lse_flag=True, **self._masking(causal, q.device))
        self.served(op, "npu_fused_infer_attention_score")
        # rows attending no key (empty key sets, or causal queries before the first key): the kernel's
        # output there is undocumented; the contract's is out = 0, lse = -inf
        lens_q, lens_k = cu_seqlens_q.diff().long(), cu_k.diff().long()
        seq = torch.repeat_interleave(torch.arange(batch, device=q.device), lens_q, output_size=tokens)
        newest = lens_k[seq] - 1 - ((lens_q[seq] - 1 - (torch.arange(tokens, device=q.device) -
                                                         cu_seqlens_q[:-1].long()[seq])) if causal else 0)
        empty = newest < 0
        return out.masked_fill(empty[:, None, None], 0), lse[..., 0].masked_fill(empty[:, None], float("-inf"))

    @implements("mla_decode")
    def mla_decode(self, q, kv_cache, block_table, seq_lens, *, softmax_scale, head_dim_v=512, causal=True,
                   sinks=None, window=None, topk_indices=None):
        op = "mla_decode"
        batch, sq, heads, d = q.shape
        # FIA's absorbed-MLA decode: fp16/bf16, key = [latent 512 | rope 64], value = the latent, N <= 128
        if q.dtype not in (torch.bfloat16, torch.float16) or d != _MLA_LATENT + _MLA_ROPE or \
                head_dim_v != _MLA_LATENT or heads > _MAX_MLA_HEADS or batch == 0 or \
                sinks is not None or window is not None or topk_indices is not None:
            return self.reference_path(op, q, kv_cache, block_table, seq_lens, softmax_scale=softmax_scale,
                                       head_dim_v=head_dim_v, causal=causal, sinks=sinks, window=window,
                                       topk_indices=topk_indices)
        lens = seq_lens.tolist()  # FIA takes host lengths
        # The boundary conversion: the used keys of each sequence, re-paged into 128-slot blocks and split
        # into the latent and rope caches the kernel reads (blocks past a sequence's length hold zeros).
        keys = gather_paged_keys(kv_cache, block_table, seq_lens)
        blocks = max(1, -(-keys.shape[1] // _MLA_BLOCK))
        pages = F.pad(keys, (0, 0, 0, blocks * _MLA_BLOCK - keys.shape[1])).view(batch * blocks, _MLA_BLOCK, d)
        table = torch.arange(batch * blocks, dtype=torch.int32, device=q.device).view(batch, blocks)
        padded = 1 << (heads - 1).bit_length()  # the kernel takes 1, 2, 4, ..., 128 query heads
        qp = F.pad(q, (0, 0, 0, padded - heads))
        latent = pages[..., :_MLA_LATENT].contiguous()
        out, _ = self.lib.npu_fused_infer_attention_score(
            qp[..., :_MLA_LATENT].contiguous(), latent, latent, query_rope=qp[..., _MLA_LATENT:].contiguous(),
            key_rope=pages[..., _MLA_LATENT:].contiguous(), num_heads=padded, num_key_value_heads=1,
            input_layout="BSND", scale=softmax_scale, block_table=table, block_size=_MLA_BLOCK,
            actual_seq_lengths_kv=[max(n, 1) for n in lens],  # an empty sequence is zeroed below
            **self._masking(causal and sq > 1, q.device))
        self.served(op, "npu_fused_infer_attention_score")
        # The MLA form returns no lse: computed here, one extra q.k pass in fp32 (pads hold zeros, masked)
        allowed = attended_keys(seq_lens, sq, pages.shape[0] // batch * _MLA_BLOCK, causal, None, None)
        logits = torch.einsum("bshd,bld->bshl", q.float(), pages.view(batch, -1, d).float()) * softmax_scale
        lse = logits.masked_fill(~allowed[:, :, None], float("-inf")).logsumexp(-1)
        out = out[:, :, :heads].masked_fill((seq_lens == 0)[:, None, None, None], 0)
        return out, lse

