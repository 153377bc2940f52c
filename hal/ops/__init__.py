"""The HAL's operators, one module per family. Each operator is a contract (:mod:`hal.contract`):
call it and the selected backend computes it.

* :mod:`hal.ops.grouped_gemm` — MoE expert GEMMs (contiguous and masked layouts, FP8/FP4 operands)
* :mod:`hal.ops.routing` — MoE top-k and hash routing, token permutation and weighted combine
* :mod:`hal.ops.mla` — MLA / latent attention: ragged prefill, paged absorbed decode, sparse top-k
* :mod:`hal.ops.quant` — FP8 / FP4 block quantisation, dequantisation, block-scaled GEMM
"""
from hal.ops.grouped_gemm import grouped_gemm
from hal.ops.mla import *  # noqa: F401,F403  (explicit list at integration)
from hal.ops.quant import *  # noqa: F401,F403
from hal.ops.routing import *  # noqa: F401,F403
