"""The Cambricon MLU backend: the HAL contracts mapped to torch_mlu_ops (tmo), as vLLM-MLU calls it.

A tmo operator serves a request only where its documented semantics equal the contract's; the index
conventions are converted at the boundary; every other request takes the correct path
(:meth:`~hal.vendor.VendorBackend.reference_path`, or dequantise-then-GEMM for FP8 on devices without
FP8). :attr:`paths` records which served each call; ``docs/backends/mlu.md`` lists the mapping and why.
The kernels are device-agnostic torch around the tmo calls: ``mlu`` tensors on hardware, CPU tensors
over the test double (:mod:`hal.backends.mlu.tmo_double`).
"""
from __future__ import annotations

import functools
import importlib
import os
from typing import Any, Dict, Optional, Tuple

import torch

from hal.backend import Availability, Support, implements
from hal.contract import FLOAT_DTYPES
from hal.errors import ConfigError
from hal.ops.grouped_gemm import dequantized_operands
from hal.ops.quant import apply_int8_amax_floor
from hal.ops.routing import RENORM_EPS, MoePermutation, invert_permutation
from hal.vendor import VendorBackend

from hal.backends.mlu.tmo_api import TmoApi, TmoVersionError, detect

__all__ = ["MluBackend", "REFERENCE_SERVED", "QUANT_SETTINGS"]

#: operators no tmo operator serves at the contract's semantics, and why (see docs/backends/mlu.md)
REFERENCE_SERVED: Dict[str, str] = {
    "hash_routing": "moe_softplus_topk(tid2eid=) does not document its score (softplus or its square root) "
                    "nor its renormalisation",
    "quantize_fp8": "scaled_quantize does not document the 1e-4 amax floor, the amax / 448 division and the "
                    "UE8M0 rounding the contract fixes bit for bit",
    "quantize_fp8_weight": "no tmo operator quantises 128x128 weight blocks",
    "dequantize_fp8": "an elementwise product: torch on the MLU",
    "quantize_fp4": "tmo's FP4 (float4_e2m1fn_x2 with MX scales) does not document this packing and rounding",
    "dequantize_fp4": "an elementwise product: torch on the MLU",
    "quantize_int8_weight": "run once at load; scaled_quantize's static_per_channel mode takes the scale as an "
                            "input instead of computing it",
}

#: HAL_MLU_QUANT: how FP8 operands are computed
QUANT_SETTINGS = {
    "auto": "FP8 kernels where the device has FP8 compute, else dequantise to fp32 and run the float GEMM",
    "fp8": "FP8 kernels only (FP8 operators are not offered on a device without FP8 compute)",
    "dequant": "always dequantise FP8/FP4 operands to fp32 and run the float GEMM",
}

_FP8 = torch.float8_e4m3fn
_DECODE_BLOCK_SIZES = (1, 2, 4, 8, 16, 32, 64)  # single_query_cached_kv_attn's documented block sizes
_HALF_TYPES = (torch.float16, torch.bfloat16)   # tmo's FP8 GEMM outputs
_FP8_CAPABILITY = 6  # the only public evidence: FlagGems' "_cambricon_supports_fp8: major >= 6"


class MluBackend(VendorBackend):
    vendor = "Cambricon"
    device_type = "mlu"
    device_name = "MLU"
    library = "torch_mlu_ops"
    install_hint = ("Cambricon ships torch_mlu and torch_mlu_ops as wheels, not on PyPI; see "
                    "docs/backends/mlu.md")
    native_hint = "set NEUWARE_HOME=/usr/local/neuware and add $NEUWARE_HOME/lib64 to LD_LIBRARY_PATH"

    def __init__(self, lib: Optional[Any] = None, quant: Optional[str] = None,
                 tmo_topk: Optional[bool] = None) -> None:
        super().__init__(lib)
        #: route top-k through moe_*_topk (HAL_MLU_TMO_TOPK=1): off until a hardware conformance run
        #: confirms its tie rule, which tmo does not document (its reference uses torch.topk)
        self.tmo_topk = os.environ.get("HAL_MLU_TMO_TOPK") == "1" if tmo_topk is None else tmo_topk
        self.quant = quant or os.environ.get("HAL_MLU_QUANT", "auto")
        if self.quant not in QUANT_SETTINGS:
            raise ConfigError(f"HAL_MLU_QUANT={self.quant!r}: expected one of {', '.join(QUANT_SETTINGS)}")
        self.add_reference_implementations(REFERENCE_SERVED)

    # -- what is installed -----------------------------------------------------------------------
    @functools.cached_property
    def api(self) -> TmoApi:
        return detect(self.lib)

    @property
    def runtime(self) -> Any:
        """``torch.mlu`` (device queries), or the test double's stand-in for it."""
        if self.emulated:
            return self.lib.mlu
        importlib.import_module("torch_mlu")  # registers torch.mlu
        return torch.mlu  # type: ignore[attr-defined]

    @functools.cached_property
    def capability(self) -> Tuple[int, int]:
        return tuple(self.runtime.get_device_capability())  # type: ignore[return-value]

    @functools.cached_property
    def fp8_native(self) -> bool:
        """FP8 GEMMs run on tmo's FP8 kernels (else operands are dequantised to fp32)."""
        return self.quant != "dequant" and self.capability[0] >= _FP8_CAPABILITY and self.api.fp8_block_gemm

    def quantization(self) -> str:
        """The FP8 scheme in force, in words (``hal info`` shows it)."""
        why = (f"capability {self.capability[0]}.{self.capability[1]} < {_FP8_CAPABILITY}"
               if self.capability[0] < _FP8_CAPABILITY else
               f"torch_mlu_ops {self.api.version} has no FP8 block GEMM" if not self.api.fp8_block_gemm else
               "HAL_MLU_QUANT=dequant")
        if self.fp8_native:
            return "native FP8 (scaled_matmul / smooth_quant_group_gemm, 128x128 blocks)"
        if self.quant == "fp8":
            return f"FP8 operators not offered ({why}; HAL_MLU_QUANT=fp8)"
        return f"dequantise-on-load: FP8/FP4 operands to fp32, float GEMM ({why})"

    def visible_devices(self) -> int:
        return self.runtime.device_count()

    def probe(self) -> Availability:
        found = super().probe()
        if not found.available:
            return found
        try:
            self.api
        except TmoVersionError as exc:
            return Availability(False, str(exc))
        return found

    def versions(self) -> Dict[str, str]:
        try:
            found = {"torch_mlu_ops": self.api.version}
        except (ImportError, OSError, TmoVersionError) as exc:
            return {"torch_mlu_ops": f"not usable ({type(exc).__name__}; see status)"}
        if self.emulated:
            found["emulated"] = "TEST DOUBLE (not hardware)"
        else:
            torch_mlu = importlib.import_module("torch_mlu")
            found["torch_mlu"] = str(getattr(torch_mlu, "__version__", "unknown"))
            found["neuware"] = os.environ.get("NEUWARE_HOME", "NEUWARE_HOME not set")
        found["device"] = f"{self.runtime.get_device_name()} (capability {self.capability[0]}.{self.capability[1]})"
        found["quantization"] = self.quantization()
        found["top-k routing"] = "moe_*_topk (HAL_MLU_TMO_TOPK=1)" if self.tmo_topk else \
            "reference path (tmo's tie rule is undocumented; HAL_MLU_TMO_TOPK=1 to use moe_*_topk)"
        return found

    def capabilities(self) -> Dict[str, Support]:
        caps = super().capabilities()
        if self.quant == "fp8" and not self.fp8_native:
            unscaled = frozenset(("bfloat16", "float16", "float32", "int8"))  # int8 needs no FP8 compute
            caps.pop("fp8_gemm", None)
            caps["grouped_gemm"] = Support(dict(caps["grouped_gemm"].axes, x_dtype=unscaled, w_dtype=unscaled))
        return caps

    # -- MoE: routing, permutation, expert GEMM, combine ------------------------------------------
    @implements("topk_routing")
    def topk_routing(self, logits, top_k, *, scoring="softmax", bias=None, n_group=1, topk_group=1,
                     renormalize=False, scale=1.0):
        if not self.tmo_topk or scoring == "sqrtsoftplus" or \
                (scoring == "softmax" and (bias is not None or n_group > 1)) or (bias is not None and n_group == 1):
            # tie rule undocumented (above); softplus: undocumented; softmax: dropped groups filled with 0.0,
            # group max even with a bias; sigmoid: "does not support expert_group=1 with score_bias"
            return self.reference_path("topk_routing", logits, top_k, scoring=scoring, bias=bias, n_group=n_group,
                                       topk_group=topk_group, renormalize=renormalize, scale=scale)
        name = f"moe_{scoring}_topk"
        grouping = {"num_expert_group": n_group, "topk_group": topk_group} if n_group > 1 else {}
        if bias is not None:
            grouping["score_bias"] = bias.float()
        weights, ids = getattr(self.lib, name)(logits.contiguous(), top_k, normalize=False, **grouping)
        self.served("topk_routing", name)
        # renormalise and scale here: the contract divides by sum + 1e-20, tmo by the bare sum
        if renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + RENORM_EPS)
        return weights * scale, ids

    @implements("moe_permute")
    def moe_permute(self, x, ids, num_experts):
        tokens, top_k = ids.shape
        expand_idx, combine_idx, token_count, cusum = self.lib.moe_gen_idx(ids.to(torch.int32).contiguous(),
                                                                             num_experts)
        x_sorted = self.lib.moe_expand_input(x, expand_idx, cusum, 0, num_experts)
        self.served("moe_permute", "moe_gen_idx+moe_expand_input")
        # tmo's combine_idx maps a (token, k) slot to its sorted row: the contract's slot_rows; the
        # contract's sorted_slots is its inverse (tmo's expand_idx holds tokens, not slots)
        return x_sorted, MoePermutation(token_count, invert_permutation(combine_idx.view(-1)),
                                        combine_idx.view(tokens, top_k))

    @implements("moe_unpermute")
    def moe_unpermute(self, y_sorted, weights, permutation):
        num_experts = permutation.group_sizes.shape[0]
        out = self.lib.moe_combine_result(y_sorted, weights.float(), permutation.slot_rows.reshape(-1).to(torch.int32),
                                          None, permutation.offsets.to(torch.int32), 0, num_experts)
        self.served("moe_unpermute", "moe_combine_result")
        return out

    @implements("grouped_gemm")
    def grouped_gemm(self, x, w, group_sizes, *, layout="contiguous", x_scale=None, w_scale=None, out_dtype=None):
        out = out_dtype or (x.dtype if x.dtype in FLOAT_DTYPES else torch.bfloat16)
        counts = group_sizes.to(torch.int32)
        if layout == "masked":  # every row of a group is computed; the contract leaves rows past its count open
            groups, max_m = x.shape[0], x.shape[1]
            y = self._contiguous_gemm(x.flatten(0, 1), w, counts.new_full((groups,), max_m),
                                      None if x_scale is None else x_scale.flatten(0, 1), w_scale, out)
            return y.view(groups, max_m, -1)
        return self._contiguous_gemm(x, w, counts, x_scale, w_scale, out)

    def _contiguous_gemm(self, x, w, counts, x_scale, w_scale, out):
        max_m = x.shape[0]  # an upper bound of every count, known without reading them (as vLLM-MLU passes)
        if x.dtype == _FP8 and w.dtype == _FP8 and self.fp8_native and out in _HALF_TYPES:
            self.served("grouped_gemm", "smooth_quant_group_gemm")
            # tmo wants the activation scales K-block-major: (k_block, total_m)
            return self.lib.smooth_quant_group_gemm(x, w, counts, None, None, None, None, x_scale.t().contiguous(),
                                                    w_scale.float(), out, max_m)
        if x.dtype == torch.int8 and out in _HALF_TYPES:
            # the per-token / per-channel form: a_scale (total_m), b_scale (experts, n), both multipliers
            self.served("grouped_gemm", "smooth_quant_group_gemm(int8)")
            return self.lib.smooth_quant_group_gemm(x, w, counts, None, None, None, None, x_scale, w_scale, out,
                                                    max_m)
        if x_scale is not None or w_scale is not None:  # dequantise-on-load
            x, w = dequantized_operands(x, w, x_scale, w_scale, torch.float32)
            self.served("grouped_gemm", "group_gemm(dequantized)")
        else:
            self.served("grouped_gemm", "group_gemm")
        if x.dtype == out:
            return self.lib.group_gemm(x, w, counts, None, None, None, None, max_m)
        if self.api.group_gemm_output_dtype:
            return self.lib.group_gemm(x, w, counts, None, None, None, None, max_m, output_dtype=out)
        # older tmo returns a's dtype: accumulate in fp32 and round once to out
        return self.lib.group_gemm(x.float(), w.float(), counts, None, None, None, None, max_m).to(out)

    # -- MLA --------------------------------------------------------------------------------------
    @implements("mla_prefill")
    def mla_prefill(self, q, k, v, cu_seqlens_q, cu_seqlens_k=None, *, softmax_scale, causal=True, sinks=None,
                    window=None, topk_indices=None):
        if cu_seqlens_k is not None or sinks is not None or window is not None or topk_indices is not None:
            # flash_attention documents neither the causal alignment of unequal q / kv lengths (chunked
            # prefill, which vLLM-MLU does not run), nor its window and sink semantics
            return self.reference_path("mla_prefill", q, k, v, cu_seqlens_q, cu_seqlens_k,
                                       softmax_scale=softmax_scale, causal=causal, sinks=sinks, window=window,
                                       topk_indices=topk_indices)
        out = q.new_empty(q.shape[0], q.shape[1], v.shape[2])
        # max lengths: the token counts bound them without a device-to-host read
        out, lse = self.lib.flash_attention(q, k, v, out, cu_seqlens_q, cu_seqlens_q, None, None, q.shape[0],
                                            k.shape[0], softmax_scale, causal, compute_dtype=torch.float,
                                            return_lse=True, out_dtype=q.dtype)
        self.served("mla_prefill", "flash_attention")
        return out, lse.t().contiguous()  # tmo's packed lse is (H, total_q)

    @implements("mla_decode")
    def mla_decode(self, q, kv_cache, block_table, seq_lens, *, softmax_scale, head_dim_v=512, causal=True,
                   sinks=None, window=None, topk_indices=None):
        batch, seq_q, heads, _ = q.shape
        block_size = kv_cache.shape[1]
        if seq_q != 1 or block_size not in _DECODE_BLOCK_SIZES or sinks is not None or window is not None or \
                topk_indices is not None:
            # seq_q > 1: causal alignment inside the new tokens is undocumented; windows, sinks and the
            # sparse top-k have no documented tmo equivalent here
            return self.reference_path("mla_decode", q, kv_cache, block_table, seq_lens, softmax_scale=softmax_scale,
                                       head_dim_v=head_dim_v, causal=causal, sinks=sinks, window=window,
                                       topk_indices=topk_indices)
        out = q.new_empty(batch, seq_q, heads, head_dim_v)
        # MLA mode: v_cache=None, the value is the first head_size_v dims of the (blocks, 1, block_size, D) cache
        out, lse = self.lib.single_query_cached_kv_attn(
            q, kv_cache.unsqueeze(1), None, out, block_table, seq_lens, None, None, None,
            block_table.shape[1] * block_size, -1, -1, softmax_scale, return_lse=True, out_dtype=q.dtype,
            compute_dtype=torch.float, head_size_v=head_dim_v)
        self.served("mla_decode", "single_query_cached_kv_attn")
        # an empty sequence: out 0 and lse -inf by the contract; tmo does not document it
        empty = (seq_lens == 0)[:, None, None]
        return out.masked_fill(empty[..., None], 0), lse.transpose(1, 2).masked_fill(empty, float("-inf"))

    @implements("paged_cache_write")
    def paged_cache_write(self, kv_cache, kv, slot_mapping):
        # tmo's cache is (blocks, kv_heads, block_size, D): one latent head, written through a view
        self.lib.reshape_paged_cache(kv.unsqueeze(1), None, kv_cache.unsqueeze(1), None, slot_mapping.to(torch.int32))
        self.served("paged_cache_write", "reshape_paged_cache")

    # -- W8A8 int8 ---------------------------------------------------------------------------------
    @implements("quantize_int8")
    def quantize_int8(self, x):
        rows = x.reshape(-1, x.shape[-1])
        if not self.api.int8_scaled or rows.shape[0] == 0:
            return self.reference_path("quantize_int8", x)
        # dynamic per token, no smoothing vector: (q, s) with s the dequantisation multiplier rowmax / 127
        # (the reciprocal convention, dtype_max / input_max, is matmul's for scalar int8 scales only)
        q, s = self.lib.scaled_quantize(rows, quant_type=torch.int8, quant_mode="dynamic_per_token")
        self.served("quantize_int8", "scaled_quantize")
        q, s = apply_int8_amax_floor(rows, q, s)  # tmo documents no amax floor
        return q.view(x.shape), s.view(x.shape[:-1])

    @implements("int8_gemm")
    def int8_gemm(self, a, a_scale, b, b_scale, *, out_dtype=torch.bfloat16):
        k = a.shape[-1]
        rows = a.reshape(-1, k)
        if not self.api.int8_scaled or out_dtype not in _HALF_TYPES or rows.shape[0] == 0:
            return self.reference_path("int8_gemm", a, a_scale, b, b_scale, out_dtype=out_dtype)
        y = self.lib.scaled_matmul(rows, b, a_scale.reshape(-1), b_scale, out_dtype)
        self.served("int8_gemm", "scaled_matmul")
        return y.view(*a.shape[:-1], b.shape[0])

    # -- FP8 GEMM ---------------------------------------------------------------------------------
    @implements("fp8_gemm")
    def fp8_gemm(self, a, a_scale, b, b_scale, *, out_dtype=torch.bfloat16):
        k = a.shape[-1]
        a2, a_scale2 = a.reshape(-1, k), a_scale.reshape(-1, k // 128)
        if self.fp8_native and out_dtype in _HALF_TYPES:
            y = self.lib.scaled_matmul(a2, b, a_scale2.float(), b_scale.float(), out_dtype)
            self.served("fp8_gemm", "scaled_matmul")
        else:  # dequantise-on-load
            ad, bd = dequantized_operands(a2, b, a_scale2, b_scale, torch.float32)
            y = self.lib.matmul(ad, bd, trans_b=True, dtype=torch.float32).to(out_dtype)
            self.served("fp8_gemm", "matmul(dequantized)")
        return y.reshape(*a.shape[:-1], b.shape[0])
