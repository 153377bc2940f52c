"""The Cambricon MLU backend: the HAL contracts mapped to torch_mlu_ops (tmo), as vLLM-MLU calls it.

A tmo operator serves a request only where its documented semantics equal the contract's; the index
conventions are converted at the boundary; every other request takes the correct path
(:meth:`~hal.vendor.VendorBackend.reference_path`, or dequantise-then-GEMM for FP8 on devices without
FP8). When the reference path serves, and why, is data (:data:`MAPPINGS`, one
:class:`~hal.vendor.OpMapping` per contract), which the kernels obey and from which the table of
``docs/backends/mlu.md`` and ``hal info`` are rendered; :attr:`paths` records which path served each call.
The kernels are device-agnostic torch around the tmo calls: ``mlu`` tensors on hardware, CPU tensors
over the test double (:mod:`hal.backends.mlu.tmo_double`).
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Any, Dict, Optional, Tuple

import torch

from hal.backend import Availability, Support
from hal.backends.mlu.tmo_api import TmoApi, TmoVersionError, detect
from hal.errors import ConfigError
from hal.ops.grouped_gemm import dequantized_operands, grouped_gemm_out_dtype
from hal.ops.quant import apply_int8_amax_floor
from hal.ops.routing import RENORM_EPS, MoePermutation, invert_permutation
from hal.vendor import Fallback, OpMapping, VendorBackend, always, by_operator, given, mapped, row_count

__all__ = ["MluBackend", "MAPPINGS", "QUANT_SETTINGS"]

#: HAL_MLU_QUANT: how FP8 operands are computed
QUANT_SETTINGS = {
    "auto": "FP8 kernels where the device has FP8 compute, else dequantise to fp32 and run the float GEMM",
    "fp8": "FP8 kernels only (FP8 operators are not offered on a device without FP8 compute)",
    "dequant": "always dequantise FP8/FP4 operands to fp32 and run the float GEMM",
}

_FP8 = torch.float8_e4m3fn
_DECODE_BLOCK_SIZES = (1, 2, 4, 8, 16, 32, 64)  # single_query_cached_kv_attn's documented block sizes
_HALF_TYPES = (torch.float16, torch.bfloat16)  # tmo's FP8 GEMM outputs
_FP8_CAPABILITY = 6  # the only public evidence: FlagGems' "_cambricon_supports_fp8: major >= 6"
_TMO_SOURCE = "torch_mlu_ops 1.12.1 `_ops.py` docstrings"
_V4_ATTENTION = "DeepSeek V4's attention sinks, windows and sparse top-k have no documented tmo equivalent"
_NO_SCALED_QUANT = Fallback(
    "tmo 1.6",
    "tmo 1.6: no `scaled_quantize` / `scaled_matmul` (its `per_token_smooth_quantize` is not wired)",
    lambda b, c: not b.api.int8_scaled,
)

#: How each contract maps to torch_mlu_ops (as vLLM-MLU calls it), and when the reference path (torch on the
#: MLU) serves it. Index conventions are converted at the boundary; FP8 without FP8 compute is dequantised.
MAPPINGS = by_operator(
    OpMapping(
        "moe_permute",
        ("moe_gen_idx", "moe_expand_input"),
        call="`moe_gen_idx` + `moe_expand_input`",
        translation="`combine_idx` is the contract's `slot_rows`, `sorted_slots` is its inverse (tmo's `expand_idx` "
        "holds tokens, not slots); `token_count` = `group_sizes`",
        source=_TMO_SOURCE,
    ),
    OpMapping(
        "grouped_gemm",
        ("group_gemm", "smooth_quant_group_gemm"),
        call="float: `group_gemm`; FP8 x and w, out bf16/fp16, FP8 device: `smooth_quant_group_gemm` "
        '"a_groupwise-b_per_block"; int8 x and w, out bf16/fp16: `smooth_quant_group_gemm(x, w, counts, ..., '
        "a_scale (M), b_scale (E, N), out, max_m)` on any capability (1.6 and 1.12.1)",
        translation="per-expert **counts**, weights `[E, N, K]`, `max_m` = rows (a bound read without a sync); "
        "masked layout = `G` groups of `max_m` rows; FP8 `a_scale` transposed to `(k_block, M)`; "
        "FP8 without FP8 compute, FP8/FP4 weights with other operands, int8 with an fp32 output: "
        "operands dequantised to fp32, `group_gemm` (dequantise-on-load)",
        source=_TMO_SOURCE,
    ),
    OpMapping(
        "moe_unpermute",
        ("moe_combine_result",),
        call="`moe_combine_result`",
        translation="`gather_ids` = `slot_rows`, `cusum` = `offsets`, weights as fp32",
        source=_TMO_SOURCE,
    ),
    OpMapping(
        "topk_routing",
        ("moe_sigmoid_topk", "moe_softmax_topk"),
        call="with `HAL_MLU_TMO_TOPK=1`: `moe_sigmoid_topk` (any grouping; bias only with `n_group > 1`), "
        "`moe_softmax_topk` (no bias, no groups); `normalize=False`",
        translation="renormalisation (`sum + 1e-20`: tmo divides by the bare sum) and `scale` applied after",
        source=_TMO_SOURCE,
        fallbacks=(
            Fallback(
                "tie rule",
                "**by default** (`HAL_MLU_TMO_TOPK` unset): tmo documents no tie rule (its reference "
                "uses `torch.topk`), the contract prefers the lower index",
                lambda b, c: not b.tmo_topk,
            ),
            Fallback("sqrtsoftplus", "`sqrtsoftplus`: undocumented", lambda b, c: c.scoring == "sqrtsoftplus"),
            Fallback(
                "softmax groups",
                "softmax with groups: dropped groups filled with 0.0, not -inf",
                lambda b, c: c.scoring == "softmax" and c.n_group > 1,
            ),
            Fallback(
                "softmax bias",
                "softmax with a bias: group max even with a bias",
                lambda b, c: c.scoring == "softmax" and c.bias is not None,
            ),
            Fallback(
                "bias one group",
                'a bias with one group: "does not support expert_group=1 with score_bias"',
                lambda b, c: c.bias is not None and c.n_group == 1,
            ),
        ),
    ),
    OpMapping(
        "hash_routing",
        fallbacks=(
            always(
                "`moe_softplus_topk(tid2eid=)` documents neither its score (softplus or its square root) nor its "
                "renormalisation"
            ),
        ),
    ),
    OpMapping(
        "mla_prefill",
        ("flash_attention",),
        call="`flash_attention` packed varlen, `compute_dtype=float`, `out_dtype=q.dtype`",
        translation="max lengths bounded by the token counts (no device-to-host read); lse `(H, T)` transposed",
        source=_TMO_SOURCE,
        fallbacks=(
            Fallback(
                "cu_seqlens_k",
                "separate `cu_seqlens_k`: the causal alignment of unequal q / kv lengths is "
                "undocumented (chunked prefill, which vLLM-MLU does not run)",
                lambda b, c: c.cu_seqlens_k is not None,
            ),
            given("v4 attention", _V4_ATTENTION, "sinks", "window", "topk_indices"),
        ),
    ),
    OpMapping(
        "mla_decode",
        ("single_query_cached_kv_attn",),
        call="`single_query_cached_kv_attn`, shared latent cache: `v_cache=None`, `head_size_v=head_dim_v` (512)",
        translation="cache viewed as `(blocks, 1, block_size, D)`; empty sequences set to out 0 / lse -inf "
        "(tmo does not document them)",
        source=_TMO_SOURCE,
        fallbacks=(
            Fallback(
                "seq_q",
                "`Sq > 1`: causal alignment inside the new tokens is undocumented",
                lambda b, c: c.q.shape[1] != 1,
            ),
            Fallback(
                "block size",
                "block sizes outside {1, 2, 4, 8, 16, 32, 64}: the documented block sizes",
                lambda b, c: c.kv_cache.shape[1] not in _DECODE_BLOCK_SIZES,
            ),
            given("v4 attention", _V4_ATTENTION, "sinks", "window", "topk_indices"),
        ),
    ),
    OpMapping(
        "paged_cache_write",
        ("reshape_paged_cache",),
        call="`reshape_paged_cache`",
        translation="into the `(blocks, 1, block_size, D)` view (one latent head), slots int32",
        source=_TMO_SOURCE,
    ),
    OpMapping(
        "fp8_gemm",
        ("scaled_matmul", "matmul"),
        call="FP8 device: `scaled_matmul` per-block (out bf16/fp16); else `matmul`",
        translation="without FP8 compute (or another output dtype): operands dequantised to fp32, `matmul` "
        "(dequantise-on-load)",
        source=_TMO_SOURCE,
    ),
    OpMapping(
        "quantize_int8",
        ("scaled_quantize",),
        call='tmo 1.12.1: `scaled_quantize(rows, quant_type=int8, quant_mode="dynamic_per_token")`',
        translation="rows below the contract's `1e-4 / 127` scale (tmo documents no floor) set to the contract's "
        "values; the scale is the dequantisation multiplier rowmax / 127",
        source=_TMO_SOURCE,
        fallbacks=(
            _NO_SCALED_QUANT,
            Fallback("no rows", "no rows: an empty input is not documented", lambda b, c: row_count(c.x) == 0),
        ),
    ),
    OpMapping(
        "int8_gemm",
        ("scaled_matmul",),
        call="tmo 1.12.1: `scaled_matmul(a, b, a_scale (M), b_scale (N), out)` (out bf16/fp16)",
        translation="per-token / per-channel scales are multipliers, as the contract's: passed unchanged",
        source=_TMO_SOURCE,
        fallbacks=(
            _NO_SCALED_QUANT,
            Fallback(
                "out_dtype",
                "fp32 output: tmo's scaled GEMMs output bf16/fp16",
                lambda b, c: c.out_dtype not in _HALF_TYPES,
            ),
            Fallback("no rows", "no rows: an empty input is not documented", lambda b, c: row_count(c.a) == 0),
        ),
    ),
    OpMapping(
        "quantize_int8_weight",
        fallbacks=(
            always(
                "runs once at load; `scaled_quantize`'s `static_per_channel` mode takes the scale as an input "
                "instead of computing it"
            ),
        ),
    ),
    OpMapping(
        "quantize_fp8",
        fallbacks=(
            always(
                "`scaled_quantize` does not document the 1e-4 amax floor, the `amax / 448` division and the UE8M0 "
                "rounding the contract fixes bit for bit"
            ),
        ),
    ),
    OpMapping("quantize_fp8_weight", fallbacks=(always("no tmo operator quantises 128x128 weight blocks"),)),
    OpMapping(
        "quantize_fp4",
        fallbacks=(
            always("tmo's FP4 (`float4_e2m1fn_x2` with MX scales) does not document this packing and rounding"),
        ),
    ),
    OpMapping("dequantize_fp8", fallbacks=(always("an elementwise product: torch on the MLU"),)),
    OpMapping("dequantize_fp4", fallbacks=(always("an elementwise product: torch on the MLU"),)),
)


class MluBackend(VendorBackend):
    vendor = "Cambricon"
    device_type = "mlu"
    device_name = "MLU"
    library = "torch_mlu_ops"
    install_hint = "Cambricon ships torch_mlu and torch_mlu_ops as wheels, not on PyPI; see docs/backends/mlu.md"
    native_hint = "set NEUWARE_HOME=/usr/local/neuware and add $NEUWARE_HOME/lib64 to LD_LIBRARY_PATH"
    mappings = MAPPINGS

    def __init__(self, lib: Optional[Any] = None, quant: Optional[str] = None, tmo_topk: Optional[bool] = None) -> None:
        super().__init__(lib)
        #: route top-k through moe_*_topk (HAL_MLU_TMO_TOPK=1): off until a hardware conformance run
        #: confirms its tie rule, which tmo does not document (its reference uses torch.topk)
        self.tmo_topk = os.environ.get("HAL_MLU_TMO_TOPK") == "1" if tmo_topk is None else tmo_topk
        self.quant = quant or os.environ.get("HAL_MLU_QUANT", "auto")
        if self.quant not in QUANT_SETTINGS:
            raise ConfigError(f"HAL_MLU_QUANT={self.quant!r}: expected one of {', '.join(QUANT_SETTINGS)}")

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
        return torch.mlu

    @functools.cached_property
    def capability(self) -> Tuple[int, int]:
        return tuple(self.runtime.get_device_capability())

    @functools.cached_property
    def fp8_native(self) -> bool:
        """FP8 GEMMs run on tmo's FP8 kernels (else operands are dequantised to fp32)."""
        return self.quant != "dequant" and self.capability[0] >= _FP8_CAPABILITY and self.api.fp8_block_gemm

    def quantization(self) -> str:
        """The FP8 scheme in force, in words (``hal info`` shows it)."""
        why = (
            f"capability {self.capability[0]}.{self.capability[1]} < {_FP8_CAPABILITY}"
            if self.capability[0] < _FP8_CAPABILITY
            else f"torch_mlu_ops {self.api.version} has no FP8 block GEMM"
            if not self.api.fp8_block_gemm
            else "HAL_MLU_QUANT=dequant"
        )
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
            _ = self.api  # resolving the API checks torch_mlu_ops' version
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
        found["top-k routing"] = (
            "moe_*_topk (HAL_MLU_TMO_TOPK=1)"
            if self.tmo_topk
            else "reference path (tmo's tie rule is undocumented; HAL_MLU_TMO_TOPK=1 to use moe_*_topk)"
        )
        return found

    def capabilities(self) -> Dict[str, Support]:
        caps = super().capabilities()
        if self.quant == "fp8" and not self.fp8_native:
            unscaled = frozenset(("bfloat16", "float16", "float32", "int8"))  # int8 needs no FP8 compute
            caps.pop("fp8_gemm", None)
            caps["grouped_gemm"] = Support(dict(caps["grouped_gemm"].axes, x_dtype=unscaled, w_dtype=unscaled))
        return caps

    # -- MoE: routing, permutation, expert GEMM, combine ------------------------------------------
    @mapped("topk_routing")
    def topk_routing(
        self, logits, top_k, *, scoring="softmax", bias=None, n_group=1, topk_group=1, renormalize=False, scale=1.0
    ):
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

    @mapped("moe_permute")
    def moe_permute(self, x, ids, num_experts):
        tokens, top_k = ids.shape
        expand_idx, combine_idx, token_count, cusum = self.lib.moe_gen_idx(
            ids.to(torch.int32).contiguous(), num_experts
        )
        x_sorted = self.lib.moe_expand_input(x, expand_idx, cusum, 0, num_experts)
        self.served("moe_permute", "moe_gen_idx+moe_expand_input")
        # tmo's combine_idx maps a (token, k) slot to its sorted row: the contract's slot_rows; the
        # contract's sorted_slots is its inverse (tmo's expand_idx holds tokens, not slots)
        return x_sorted, MoePermutation(
            token_count, invert_permutation(combine_idx.view(-1)), combine_idx.view(tokens, top_k)
        )

    @mapped("moe_unpermute")
    def moe_unpermute(self, y_sorted, weights, permutation):
        num_experts = permutation.group_sizes.shape[0]
        out = self.lib.moe_combine_result(
            y_sorted,
            weights.float(),
            permutation.slot_rows.reshape(-1).to(torch.int32),
            None,
            permutation.offsets.to(torch.int32),
            0,
            num_experts,
        )
        self.served("moe_unpermute", "moe_combine_result")
        return out

    @mapped("grouped_gemm")
    def grouped_gemm(self, x, w, group_sizes, *, layout="contiguous", x_scale=None, w_scale=None, out_dtype=None):
        out = grouped_gemm_out_dtype(x, out_dtype)
        counts = group_sizes.to(torch.int32)
        if layout == "masked":  # every row of a group is computed; the contract leaves rows past its count open
            groups, max_m = x.shape[0], x.shape[1]
            y = self._contiguous_gemm(
                x.flatten(0, 1),
                w,
                counts.new_full((groups,), max_m),
                None if x_scale is None else x_scale.flatten(0, 1),
                w_scale,
                out,
            )
            return y.view(groups, max_m, -1)
        return self._contiguous_gemm(x, w, counts, x_scale, w_scale, out)

    def _contiguous_gemm(self, x, w, counts, x_scale, w_scale, out):
        max_m = x.shape[0]  # an upper bound of every count, known without reading them (as vLLM-MLU passes)
        if x.dtype == _FP8 and w.dtype == _FP8 and self.fp8_native and out in _HALF_TYPES:
            self.served("grouped_gemm", "smooth_quant_group_gemm")
            # tmo wants the activation scales K-block-major: (k_block, total_m)
            return self.lib.smooth_quant_group_gemm(
                x, w, counts, None, None, None, None, x_scale.t().contiguous(), w_scale.float(), out, max_m
            )
        if x.dtype == torch.int8 and out in _HALF_TYPES:
            # the per-token / per-channel form: a_scale (total_m), b_scale (experts, n), both multipliers
            self.served("grouped_gemm", "smooth_quant_group_gemm(int8)")
            return self.lib.smooth_quant_group_gemm(x, w, counts, None, None, None, None, x_scale, w_scale, out, max_m)
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
    @mapped("mla_prefill")
    def mla_prefill(
        self,
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
    ):
        out = q.new_empty(q.shape[0], q.shape[1], v.shape[2])
        # max lengths: the token counts bound them without a device-to-host read
        out, lse = self.lib.flash_attention(
            q,
            k,
            v,
            out,
            cu_seqlens_q,
            cu_seqlens_q,
            None,
            None,
            q.shape[0],
            k.shape[0],
            softmax_scale,
            causal,
            compute_dtype=torch.float,
            return_lse=True,
            out_dtype=q.dtype,
        )
        self.served("mla_prefill", "flash_attention")
        return out, lse.t().contiguous()  # tmo's packed lse is (H, total_q)

    @mapped("mla_decode")
    def mla_decode(
        self,
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
    ):
        batch, seq_q, heads, _ = q.shape
        block_size = kv_cache.shape[1]
        out = q.new_empty(batch, seq_q, heads, head_dim_v)
        # MLA mode: v_cache=None, the value is the first head_size_v dims of the (blocks, 1, block_size, D) cache
        out, lse = self.lib.single_query_cached_kv_attn(
            q,
            kv_cache.unsqueeze(1),
            None,
            out,
            block_table,
            seq_lens,
            None,
            None,
            None,
            block_table.shape[1] * block_size,
            -1,
            -1,
            softmax_scale,
            return_lse=True,
            out_dtype=q.dtype,
            compute_dtype=torch.float,
            head_size_v=head_dim_v,
        )
        self.served("mla_decode", "single_query_cached_kv_attn")
        # an empty sequence: out 0 and lse -inf by the contract; tmo does not document it
        empty = (seq_lens == 0)[:, None, None]
        return out.masked_fill(empty[..., None], 0), lse.transpose(1, 2).masked_fill(empty, float("-inf"))

    @mapped("paged_cache_write")
    def paged_cache_write(self, kv_cache, kv, slot_mapping):
        # tmo's cache is (blocks, kv_heads, block_size, D): one latent head, written through a view
        self.lib.reshape_paged_cache(kv.unsqueeze(1), None, kv_cache.unsqueeze(1), None, slot_mapping.to(torch.int32))
        self.served("paged_cache_write", "reshape_paged_cache")

    # -- W8A8 int8 ---------------------------------------------------------------------------------
    @mapped("quantize_int8")
    def quantize_int8(self, x):
        rows = x.reshape(-1, x.shape[-1])
        # dynamic per token, no smoothing vector: (q, s) with s the dequantisation multiplier rowmax / 127
        # (the reciprocal convention, dtype_max / input_max, is matmul's for scalar int8 scales only)
        q, s = self.lib.scaled_quantize(rows, quant_type=torch.int8, quant_mode="dynamic_per_token")
        self.served("quantize_int8", "scaled_quantize")
        q, s = apply_int8_amax_floor(rows, q, s)  # tmo documents no amax floor
        return q.view(x.shape), s.view(x.shape[:-1])

    @mapped("int8_gemm")
    def int8_gemm(self, a, a_scale, b, b_scale, *, out_dtype=torch.bfloat16):
        rows = a.reshape(-1, a.shape[-1])
        y = self.lib.scaled_matmul(rows, b, a_scale.reshape(-1), b_scale, out_dtype)
        self.served("int8_gemm", "scaled_matmul")
        return y.view(*a.shape[:-1], b.shape[0])

    # -- FP8 GEMM ---------------------------------------------------------------------------------
    @mapped("fp8_gemm")
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
