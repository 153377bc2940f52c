"""The HAL's operators, one module per family. Each operator is a contract (:mod:`hal.contract`):
call it and the selected backend computes it.

* :mod:`hal.ops.grouped_gemm` — MoE expert GEMMs (contiguous and masked layouts, FP8/FP4 operands)
* :mod:`hal.ops.routing` — MoE top-k and hash routing, token permutation and weighted combine
* :mod:`hal.ops.mla` — MLA / latent attention: ragged prefill, paged absorbed decode, sparse top-k
* :mod:`hal.ops.quant` — FP8 / FP4 block quantisation, dequantisation, block-scaled GEMM; W8A8 int8
"""

from hal.ops.grouped_gemm import grouped_gemm
from hal.ops.mla import mla_decode, mla_prefill, paged_cache_write
from hal.ops.quant import (
    dequantize_fp4,
    dequantize_fp8,
    fp8_gemm,
    int8_gemm,
    quantize_fp4,
    quantize_fp8,
    quantize_fp8_weight,
    quantize_int8,
    quantize_int8_weight,
)
from hal.ops.routing import MoePermutation, hash_routing, moe_permute, moe_unpermute, topk_routing

__all__ = [
    "grouped_gemm",
    "topk_routing",
    "hash_routing",
    "moe_permute",
    "moe_unpermute",
    "MoePermutation",
    "mla_prefill",
    "mla_decode",
    "paged_cache_write",
    "quantize_fp8",
    "quantize_fp8_weight",
    "dequantize_fp8",
    "fp8_gemm",
    "quantize_fp4",
    "dequantize_fp4",
    "quantize_int8",
    "quantize_int8_weight",
    "int8_gemm",
]
