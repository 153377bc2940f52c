"""The Huawei Ascend backend: HAL contracts mapped onto torch_npu operators.

Each kernel translates the contract's arguments into the vendor operator's conventions (weight layout,
group lists, int32 ids, cumulative lengths, the 128-slot latent cache, power-of-two head counts). A
request the operator cannot serve, or whose documented semantics differ from the contract's, takes
:meth:`~hal.vendor.VendorBackend.reference_path` instead: when, and why, is data (:data:`MAPPINGS`, one
:class:`~hal.vendor.OpMapping` per contract), which the kernels obey and from which the table of
``docs/backends/ascend.md`` and ``hal info`` are rendered; ``self.paths`` records which path ran.

The code is device-agnostic PyTorch around the vendor calls: on an NPU the tensors live on ``npu``, in
the emulated twin (:mod:`hal.backends.ascend.torch_npu_double`) on the CPU.
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from hal.backend import Availability, Support
from hal.ops.grouped_gemm import grouped_gemm_out_dtype
from hal.ops.mla import attended_keys, gather_paged_keys
from hal.ops.quant import apply_int8_amax_floor
from hal.ops.routing import RENORM_EPS, MoePermutation, invert_permutation
from hal.vendor import Fallback, OpMapping, VendorBackend, always, by_operator, given, mapped, row_count

__all__ = ["AscendBackend", "NORM_TYPE_SIGMOID", "soc_generation", "FP8_OPS", "MAPPINGS"]

#: ``npu_moe_gating_top_k(norm_type=...)`` for sigmoid scoring. The English 26.1.0 page says "1 enables
#: Softmax, 0 Sigmoid"; its own equivalent-computation code (``if norm_type == 0: softmax else
#: sigmoid``), the Chinese master page ("1 表示使用 Sigmoid") and every caller (vllm-ascend, sglang) say
#: 1 = sigmoid. The code and the callers win; tests/test_backend_ascend.py pins it.
NORM_TYPE_SIGMOID = 1
_GROUP_SELECT_MAX, _GROUP_SELECT_TOP2_SUM = 0, 1  # npu_moe_gating_top_k group_select_mode
_GROUP_LIST_COUNTS = 1  # npu_grouped_matmul group_list_type: per-group counts
_EXPERT_TOKENS_COUNT = 1  # npu_moe_init_routing_v2 expert_tokens_num_type
_SPARSE_NONE, _SPARSE_RIGHT_DOWN_CAUSAL = 0, 3  # npu_fused_infer_attention_score sparse_mode
_FIA_MASK_SIZE = 2048  # sparse_mode 3 takes this "optimised" mask
_MLA_BLOCK = 128  # latent cache block size of the MLA decode kernel
_MLA_LATENT, _MLA_ROPE = 512, 64  # absorbed MLA key = [c_kv 512 | k_rope 64]
_PREFILL_NOPE, _PREFILL_V = 128, 128  # non-absorbed prefill: qk 128 + 64 rope, v 128
_MAX_MLA_HEADS = 128
_QUANT_MATMUL_MAX_DIM = 65535  # npu_quant_matmul: last dims of x1 / x2 at most this
_QUANT_MATMUL_OUT = (torch.bfloat16, torch.float16)  # int8 x int8, fp32 scale + fp32 pertoken_scale -> these

_FLOATS = (torch.bfloat16, torch.float16, torch.float32)
_MLA_FEATURES = "DeepSeek V4's attention sinks, sliding window and sparse top-k are not a documented FIA MLA form"


def _gating_groups_fit(c: SimpleNamespace) -> bool:
    """npu_moe_gating_top_k's group limit: align32(E / n_group) * n_group <= 2048."""
    return -(-(c.logits.shape[1] // c.n_group) // 32) * 32 * c.n_group <= 2048


#: The quantisation contracts. Atlas A2/A3 have no FP8 (no fp8 dtype in any documented table): they are not
#: offered there (``capabilities()``). On Ascend 950 the reference path serves them.
FP8_OPS = ("quantize_fp8", "quantize_fp8_weight", "dequantize_fp8", "fp8_gemm", "quantize_fp4", "dequantize_fp4")
_FP8_REASON = (
    "DeepSeek's 1x128 / 128x128 block scales are not a documented torch_npu mode (npu_dynamic_quant, "
    "npu_quant_matmul and GMM document per-token, per-channel and MX 1x32 scales), so the conservative "
    "path is taken"
)
_FP8_OFFERED = "Ascend 950 only (Atlas A2/A3 have no fp8 dtype in any documented table)"
_GMM_SOURCE = "op-plugin torch_npu-npu_grouped_matmul.md; vllm-ascend's call (int8 -> int32 output)"
_FIA_SOURCE = "op-plugin torch_npu-npu_fused_infer_attention_score.md (the MLA forms)"

#: How each contract maps to torch_npu, and when the reference path (plain PyTorch on the NPU) serves it.
MAPPINGS = by_operator(
    OpMapping(
        "grouped_gemm",
        ("npu_grouped_matmul",),
        call="`npu_grouped_matmul([x], [w.transpose(1, 2)], group_list=counts, group_list_type=1, group_type=0, "
        "split_item=2)[0]`; int8 x and w (W8A8): `..., output_dtype=torch.int32`, then "
        "`y = acc * x_scale[m] * w_scale[g, n]` in fp32",
        translation="`w [G,N,K]` passed as a transposed view (the op accepts it: no copy); `masked` layout = every "
        "group owns `max_m` rows; int8: the int32 sums (vllm-ascend's int32-output form) are scaled "
        "here: the documented per-token form (`scale=`, `per_token_scale=`) wants **bf16** weight "
        "scales for a bf16 output, and rounding the contract's fp32 scales to bf16 moves results by "
        "up to 2^-9, beyond the tolerance",
        source=_GMM_SOURCE,
        fallbacks=(
            Fallback(
                "fp8",
                f"FP8/FP4 operands (Ascend 950): {_FP8_REASON}",
                lambda b, c: c.x.dtype not in _FLOATS + (torch.int8,),
            ),
            Fallback(
                "mixed dtypes",
                "x and w dtypes differ: GMM's dtype table pairs equal float dtypes",
                lambda b, c: c.x.dtype != torch.int8 and c.x.dtype != c.w.dtype,
            ),
            Fallback(
                "out_dtype",
                "`out_dtype` != x's dtype: GMM's float output is x's dtype",
                lambda b, c: c.x.dtype != torch.int8 and c.out_dtype not in (None, c.x.dtype),
            ),
            Fallback("no rows", "no rows: an empty x is not documented", lambda b, c: row_count(c.x) == 0),
            Fallback("groups", "> 1024 groups: GMM's group_list limit", lambda b, c: c.w.shape[0] > 1024),
            Fallback("dims", "K or N >= 65536: GMM's dimension limit", lambda b, c: max(c.w.shape[1:]) >= 65536),
        ),
    ),
    OpMapping(
        "topk_routing",
        ("npu_moe_gating_top_k",),
        call="`npu_moe_gating_top_k(logits.float(), k, bias=bias.float(), k_group, group_count, "
        "group_select_mode=1 if bias else 0, renorm=0, norm_type=NORM_TYPE_SIGMOID, routed_scaling_factor=scale, "
        "eps=1e-20)`",
        translation="fp32 in (the contract scores in fp32; the kernel wants bias in x's dtype)",
        source="op-plugin torch_npu-npu_moe_gating_top_k.md (its equivalent-computation code; English 26.1.0 and "
        "Chinese master pages); vllm-ascend and sglang callers",
        fallbacks=(
            Fallback(
                "softmax",
                'softmax: "not yet supported" on the Chinese master page',
                lambda b, c: c.scoring == "softmax",
            ),
            Fallback("sqrtsoftplus", "sqrtsoftplus: not documented", lambda b, c: c.scoring == "sqrtsoftplus"),
            Fallback(
                "no renormalisation",
                "sigmoid **without** renormalisation: the kernel's sigmoid path always renormalises",
                lambda b, c: not c.renormalize,
            ),
            Fallback("no tokens", "no tokens: an empty x is not documented", lambda b, c: c.logits.shape[0] == 0),
            Fallback("experts", "E > 2048: the kernel's expert limit", lambda b, c: c.logits.shape[1] > 2048),
            Fallback(
                "small groups",
                "groups of <= 2 experts: the kernel takes groups of more than 2",
                lambda b, c: c.logits.shape[1] // c.n_group <= 2,
            ),
            Fallback(
                "group limit",
                "align32(E / groups) * groups > 2048: the kernel's group limit",
                lambda b, c: not _gating_groups_fit(c),
            ),
        ),
    ),
    OpMapping(
        "moe_permute",
        ("npu_moe_init_routing_v2",),
        call="`npu_moe_init_routing_v2(x, ids.int(), active_num=T*k, expert_num=E, expert_tokens_num_type=1, "
        "expert_tokens_num_flag=True, active_expert_range=[0, E])`",
        translation="`expanded_row_idx` (row -> slot) is `sorted_slots`; `slot_rows` is its inverse",
        source="op-plugin torch_npu-npu_moe_init_routing_v2.md",
        fallbacks=(
            Fallback("no tokens", "no tokens: an empty x is not documented", lambda b, c: c.ids.numel() == 0),
            Fallback("experts", "E > 10240: the kernel's expert_num limit", lambda b, c: c.num_experts > 10240),
        ),
    ),
    OpMapping(
        "moe_unpermute",
        ("npu_moe_token_unpermute",),
        call="`npu_moe_token_unpermute(y.float(), sorted_indices, probs=weights.float())`",
        translation="`sorted_indices` = inverse of `slot_rows` (the contract defines the combine by `slot_rows`); "
        "fp32 operands because the documentation promises no fp32 accumulation for bf16 tokens",
        source="op-plugin torch_npu-npu_moe_token_unpermute.md",
        fallbacks=(
            Fallback(
                "no rows", "no rows: empty permuted_tokens are not documented", lambda b, c: c.y_sorted.shape[0] == 0
            ),
        ),
    ),
    OpMapping(
        "mla_prefill",
        ("npu_fused_infer_attention_score",),
        call='`npu_fused_infer_attention_score(q_nope, k_nope, v, query_rope=, key_rope=, input_layout="TND", '
        "num_key_value_heads=H, sparse_mode=3 + 2048² mask (causal) or 0, actual_seq_lengths(_kv)=cu_seqlens[1:], "
        "softmax_lse_flag=True)`",
        translation="qk 192 split into 128 + 64 rope; rows attending no key set to out 0, lse -inf (kernel output "
        "there undocumented)",
        source=_FIA_SOURCE,
        fallbacks=(
            Fallback("dtype", "not bf16: TND is bf16-only", lambda b, c: c.q.dtype != torch.bfloat16),
            Fallback(
                "qk dim",
                "qk != 128 + 64: FIA's MLA prefill form",
                lambda b, c: c.q.shape[2] != _PREFILL_NOPE + _MLA_ROPE,
            ),
            Fallback("v dim", "v != 128: FIA's MLA prefill form", lambda b, c: c.v.shape[2] != _PREFILL_V),
            Fallback(
                "kv heads",
                "GQA/MQA (kv heads != q heads): FIA's MLA prefill form",
                lambda b, c: c.k.shape[1] != c.q.shape[1],
            ),
            Fallback("no tokens", "no tokens: an empty query is not documented", lambda b, c: c.q.shape[0] == 0),
            Fallback(
                "sequences", "> 4096 sequences: FIA's TND batch limit", lambda b, c: c.cu_seqlens_q.shape[0] - 1 > 4096
            ),
            given("v4 attention", _MLA_FEATURES, "sinks", "window", "topk_indices"),
        ),
    ),
    OpMapping(
        "mla_decode",
        ("npu_fused_infer_attention_score",),
        call="`npu_fused_infer_attention_score(q[..., :512], latent, latent, query_rope=q[..., 512:], key_rope=rope, "
        'num_heads=pow2(H), num_key_value_heads=1, input_layout="BSND", block_table=, block_size=128, '
        "actual_seq_lengths_kv=, sparse_mode=3 if causal and Sq > 1)`",
        translation="heads padded to a power of two and sliced; the HAL cache `[blocks, block_size, 576]` is "
        "re-paged at the boundary into 128-slot latent `[.., 128, 512]` and rope `[.., 128, 64]` caches "
        "holding the used keys only; lse computed in fp32 PyTorch (the MLA form returns none); empty "
        "sequences zeroed",
        source=_FIA_SOURCE,
        fallbacks=(
            Fallback(
                "dtype",
                "fp32: FIA's absorbed-MLA decode takes fp16/bf16",
                lambda b, c: c.q.dtype not in (torch.bfloat16, torch.float16),
            ),
            Fallback(
                "qk dim",
                "D != 512 + 64: the absorbed-MLA key is [latent 512 | rope 64]",
                lambda b, c: c.q.shape[3] != _MLA_LATENT + _MLA_ROPE,
            ),
            Fallback(
                "v dim", "`head_dim_v` != 512: the value is the 512 latent", lambda b, c: c.head_dim_v != _MLA_LATENT
            ),
            Fallback(
                "heads",
                "> 128 heads: the kernel takes 1, 2, 4, ..., 128 query heads",
                lambda b, c: c.q.shape[2] > _MAX_MLA_HEADS,
            ),
            Fallback("no sequences", "no sequences: an empty batch is not documented", lambda b, c: c.q.shape[0] == 0),
            given("v4 attention", _MLA_FEATURES, "sinks", "window", "topk_indices"),
        ),
    ),
    OpMapping(
        "quantize_int8",
        ("npu_dynamic_quant",),
        call="`npu_dynamic_quant(rows)` (per token, `dst_type` int8)",
        translation="rows whose scale is below the contract's `1e-4 / 127` (all-zero rows: the kernel documents no "
        "floor) are set to the contract's values (`apply_int8_amax_floor`, elementwise)",
        source="op-plugin torch_npu-npu_dynamic_quant.md",
        fallbacks=(
            Fallback(
                "dtype",
                "fp32 x: the kernel takes fp16/bf16",
                lambda b, c: c.x.dtype not in (torch.bfloat16, torch.float16),
            ),
            Fallback("no rows", "no rows: an empty input is not documented", lambda b, c: row_count(c.x) == 0),
        ),
    ),
    OpMapping(
        "int8_gemm",
        ("npu_quant_matmul",),
        call="`npu_quant_matmul(a, b.t(), b_scale, pertoken_scale=a_scale, output_dtype=out)`",
        translation="the `[N, K]` weight as a transposed view (as vllm-ascend passes it)",
        source="op-plugin torch_npu-npu_quant_matmul.md (the A2/A3 dtype table); vllm-ascend's W8A8 call",
        fallbacks=(
            Fallback(
                "out_dtype",
                "fp32 output: the A2/A3 table gives bf16/fp16 for fp32 scales",
                lambda b, c: c.out_dtype not in _QUANT_MATMUL_OUT,
            ),
            Fallback("no rows", "no rows: an empty x1 is not documented", lambda b, c: row_count(c.a) == 0),
            Fallback(
                "dims",
                "K or N > 65535: the last dims of x1 / x2 are at most 65535",
                lambda b, c: max(c.a.shape[-1], c.b.shape[0]) > _QUANT_MATMUL_MAX_DIM,
            ),
        ),
    ),
    OpMapping(
        "quantize_int8_weight",
        fallbacks=(
            always(
                "runs once at load; `npu_dynamic_quant`'s per-channel mode is tested on Ascend 950 only "
                "(aclnnDynamicQuantV3) and quantises over the other axis"
            ),
        ),
    ),
    OpMapping(
        "hash_routing",
        fallbacks=(always("`npu_moe_gating_top_k`'s `tid2eid` hash form is absent from the 26.1.0 documentation"),),
    ),
    OpMapping(
        "paged_cache_write",
        fallbacks=(
            always(
                "a scatter into the HAL's cache layout; `npu_kv_rmsnorm_rope_cache` also fuses RMSNorm and RoPE, "
                "which the contract does not"
            ),
        ),
    ),
    *(OpMapping(op, fallbacks=(always(_FP8_REASON),), offered=_FP8_OFFERED) for op in FP8_OPS),
)

_GENERATIONS = (
    (range(220, 226), "Atlas A2"),
    (range(250, 256), "Atlas A3"),
    (range(260, 261), "Ascend 950"),
    (range(200, 206), "Atlas 310P"),
)
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
    native_hint = (
        "CANN libraries missing from the library path: source /usr/local/Ascend/ascend-toolkit/set_env.sh "
        "(and /usr/local/Ascend/nnal/atb/set_env.sh)"
    )

    mappings = MAPPINGS

    def __init__(self, lib=None) -> None:
        super().__init__(lib)
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
            return Availability(
                False, f"torch_npu runs on a {self.soc}; this backend serves {', '.join(_SERVED_GENERATIONS)}"
            )
        return found

    def versions(self) -> Dict[str, str]:
        found: Dict[str, str] = {}
        try:
            found["torch_npu"] = str(self.lib.__version__)
            found["SoC"] = self.soc
        except Exception as exc:
            found["torch_npu"] = f"not loaded ({type(exc).__name__})"
        found["CANN"] = "emulated" if self.emulated else _cann_version()
        found["reference path"] = (
            ", ".join(op for op, m in MAPPINGS.items() if not m.vendor_ops and op in self.capabilities())
            + "; and requests outside the kernels' documented limits (docs/backends/ascend.md)"
        )
        return found

    def capabilities(self) -> Dict[str, Support]:
        """What the detected SoC serves: without FP8 (Atlas A2/A3, or undetected) no FP8/FP4 operand."""
        caps = super().capabilities()
        if self._generation() in _FP8_GENERATIONS:
            return caps
        for op in FP8_OPS:
            caps.pop(op, None)
        # W8A8 int8 is what Atlas A2/A3 offer for quantised checkpoints (npu_dynamic_quant + GMM)
        caps["grouped_gemm"] = Support(
            {
                **caps["grouped_gemm"].axes,
                "x_dtype": frozenset(_FLOAT_AXIS + ("int8",)),
                "w_dtype": frozenset(_FLOAT_AXIS + ("int8",)),
            }
        )
        return caps

    # -- grouped GEMM ------------------------------------------------------------------------------
    @mapped("grouped_gemm")
    def grouped_gemm(self, x, w, group_sizes, *, layout="contiguous", x_scale=None, w_scale=None, out_dtype=None):
        groups, n, k = w.shape
        rows = x.reshape(-1, k)
        int8 = x.dtype == torch.int8
        if layout == "contiguous":
            counts = group_sizes.to(torch.int64)
        else:  # masked [G, max_m, K]: every group owns max_m rows; rows past its count are unspecified
            counts = torch.full((groups,), x.shape[1], dtype=torch.int64, device=x.device)
        # GMM computes x[M, K] @ w[e] with w [E, K, N]; a transposed view of [E, N, K] is accepted: no copy.
        # int8: the exact int32 products (output_dtype=int32, vllm-ascend's form), scaled here in fp32: the
        # documented per-token form wants bf16 weight scales for a bf16 output, and rounding the contract's
        # fp32 scales to bf16 moves the result by up to 2**-9, beyond the tolerance.
        y = self.lib.npu_grouped_matmul(
            [rows],
            [w.transpose(1, 2)],
            group_list=counts,
            group_list_type=_GROUP_LIST_COUNTS,
            group_type=0,
            split_item=2,
            output_dtype=torch.int32 if int8 else None,
        )[0]
        self.served("grouped_gemm", "npu_grouped_matmul")
        if int8:
            channel_scales = torch.repeat_interleave(w_scale, counts, dim=0, output_size=rows.shape[0])
            y = (y.float() * x_scale.reshape(-1, 1) * channel_scales).to(grouped_gemm_out_dtype(x, out_dtype))
        return y if layout == "contiguous" else y.view(groups, x.shape[1], n)

    # -- W8A8 int8 ---------------------------------------------------------------------------------
    @mapped("quantize_int8")
    def quantize_int8(self, x):
        rows = x.reshape(-1, x.shape[-1])
        q, s = self.lib.npu_dynamic_quant(rows)  # dst_type None: int8, per token, scale = rowmax / 127
        self.served("quantize_int8", "npu_dynamic_quant")
        q, s = apply_int8_amax_floor(rows, q, s)  # the kernel has no amax floor
        return q.view(x.shape), s.view(x.shape[:-1])

    @mapped("int8_gemm")
    def int8_gemm(self, a, a_scale, b, b_scale, *, out_dtype=torch.bfloat16):
        n = b.shape[0]
        rows = a.reshape(-1, a.shape[-1])
        # x2 is [K, N]: the transposed view of the [N, K] weight, as vllm-ascend passes it
        y = self.lib.npu_quant_matmul(rows, b.t(), b_scale, pertoken_scale=a_scale.reshape(-1), output_dtype=out_dtype)
        self.served("int8_gemm", "npu_quant_matmul")
        return y.view(*a.shape[:-1], n)

    # -- routing ---------------------------------------------------------------------------------
    @mapped("topk_routing")
    def topk_routing(
        self, logits, top_k, *, scoring="softmax", bias=None, n_group=1, topk_group=1, renormalize=False, scale=1.0
    ):
        # fp32 in (the contract scores in fp32; the kernel wants bias in x's dtype): exact conversions
        weights, ids, _ = self.lib.npu_moe_gating_top_k(
            logits.float(),
            top_k,
            bias=None if bias is None else bias.float(),
            k_group=topk_group if n_group > 1 else 1,
            group_count=n_group,
            group_select_mode=_GROUP_SELECT_TOP2_SUM if bias is not None else _GROUP_SELECT_MAX,
            renorm=0,
            norm_type=NORM_TYPE_SIGMOID,
            routed_scaling_factor=float(scale),
            eps=RENORM_EPS,
        )
        self.served("topk_routing", "npu_moe_gating_top_k")
        return weights, ids

    @mapped("moe_permute")
    def moe_permute(self, x, ids, num_experts):
        x_sorted, sorted_slots, counts, _ = self.lib.npu_moe_init_routing_v2(
            x,
            ids.to(torch.int32),
            active_num=ids.numel(),
            expert_num=num_experts,
            expert_tokens_num_type=_EXPERT_TOKENS_COUNT,
            expert_tokens_num_flag=True,
            active_expert_range=[0, num_experts],
        )
        self.served("moe_permute", "npu_moe_init_routing_v2")
        return x_sorted, MoePermutation(
            counts.to(torch.int32), sorted_slots, invert_permutation(sorted_slots).view(ids.shape)
        )

    @mapped("moe_unpermute")
    def moe_unpermute(self, y_sorted, weights, permutation):
        # The contract defines the combine by slot_rows; the kernel takes its inverse (row -> slot).
        # fp32 operands: the documentation promises no wider accumulation for bf16/fp16 tokens.
        out = self.lib.npu_moe_token_unpermute(
            y_sorted.float(), invert_permutation(permutation.slot_rows.reshape(-1)), probs=weights.float()
        )
        self.served("moe_unpermute", "npu_moe_token_unpermute")
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
        tokens, heads, _ = q.shape
        batch = cu_seqlens_q.shape[0] - 1
        cu_k = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k
        out, lse = self.lib.npu_fused_infer_attention_score(
            q[..., :_PREFILL_NOPE].contiguous(),
            k[..., :_PREFILL_NOPE].contiguous(),
            v.contiguous(),
            query_rope=q[..., _PREFILL_NOPE:].contiguous(),
            key_rope=k[..., _PREFILL_NOPE:].contiguous(),
            num_heads=heads,
            num_key_value_heads=heads,
            input_layout="TND",
            scale=softmax_scale,
            actual_seq_lengths=cu_seqlens_q[1:].tolist(),
            actual_seq_lengths_kv=cu_k[1:].tolist(),
            softmax_lse_flag=True,
            **self._masking(causal, q.device),
        )
        self.served("mla_prefill", "npu_fused_infer_attention_score")
        # rows attending no key (empty key sets, or causal queries before the first key): the kernel's
        # output there is undocumented; the contract's is out = 0, lse = -inf
        lens_q, lens_k = cu_seqlens_q.diff().long(), cu_k.diff().long()
        seq = torch.repeat_interleave(torch.arange(batch, device=q.device), lens_q, output_size=tokens)
        newest = (
            lens_k[seq]
            - 1
            - (
                (lens_q[seq] - 1 - (torch.arange(tokens, device=q.device) - cu_seqlens_q[:-1].long()[seq]))
                if causal
                else 0
            )
        )
        empty = newest < 0
        return out.masked_fill(empty[:, None, None], 0), lse[..., 0].masked_fill(empty[:, None], float("-inf"))

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
        batch, sq, heads, d = q.shape
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
            qp[..., :_MLA_LATENT].contiguous(),
            latent,
            latent,
            query_rope=qp[..., _MLA_LATENT:].contiguous(),
            key_rope=pages[..., _MLA_LATENT:].contiguous(),
            num_heads=padded,
            num_key_value_heads=1,
            input_layout="BSND",
            scale=softmax_scale,
            block_table=table,
            block_size=_MLA_BLOCK,
            actual_seq_lengths_kv=[max(n, 1) for n in lens],  # an empty sequence is zeroed below
            **self._masking(causal and sq > 1, q.device),
        )
        self.served("mla_decode", "npu_fused_infer_attention_score")
        # The MLA form returns no lse: computed here, one extra q.k pass in fp32 (pads hold zeros, masked)
        allowed = attended_keys(seq_lens, sq, pages.shape[0] // batch * _MLA_BLOCK, causal, None, None)
        logits = torch.einsum("bshd,bld->bshl", q.float(), pages.view(batch, -1, d).float()) * softmax_scale
        lse = logits.masked_fill(~allowed[:, :, None], float("-inf")).logsumexp(-1)
        out = out[:, :, :heads].masked_fill((seq_lens == 0)[:, None, None, None], 0)
        return out, lse
