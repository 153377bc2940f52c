"""The CPU backend: every contract's reference semantics, computed in float32, with faster kernels where
the reference is slow.

bf16/fp16 inputs are computed in fp32 and results rounded once to the contract's output dtype, except
where the CPU multiplies bf16 in hardware (AMX / AVX512-BF16): there bf16 GEMMs and attention run on
those instructions, accumulating in fp32 (:mod:`hal.backends.cpu.kernels`; CPUs without them run bf16
GEMMs far slower than fp32). The kernels are PyTorch, so the backend is *portable*: it computes on
whatever device the arguments live on, which makes it the fallback for accelerator backends too; the
exceptions, bf16 MLA decode and bf16 FP8 quantisation on CPUs with AMX, run native kernels compiled on first
use (:mod:`hal.backends.cpu.native`) and keep their PyTorch paths wherever those cannot run. Values
its kernels index with (sizes, offsets, ids, slots) are checked in every mode, not only in checked mode.
"""

from __future__ import annotations

import platform
from typing import Dict

import torch

from hal.backend import Backend
from hal.backends.cpu import kernels
from hal.contract import all_ops

# each checks the values it reads with the contract's own helpers
_FAST_KERNELS = {
    "grouped_gemm": kernels.grouped_gemm,
    "mla_prefill": kernels.mla_prefill,
    "mla_decode": kernels.mla_decode,
    "moe_unpermute": kernels.moe_unpermute,
    "quantize_fp8": kernels.quantize_fp8,
    "quantize_int8": kernels.quantize_int8,
    "quantize_int8_weight": kernels.quantize_int8_weight,
}


class CpuBackend(Backend):
    vendor = "xpu-hal (PyTorch)"
    device_type = "cpu"
    portable = True

    def __init__(self) -> None:
        super().__init__()
        for op in all_ops().values():
            # the reference after the contract's value checks: the values index memory (slots, ids), and on the
            # CPU checking them costs no device-to-host sync
            self.add_implementation(op.name, _FAST_KERNELS.get(op.name) or op.fp32_reference(check_values=True))

    def versions(self) -> Dict[str, str]:
        return {
            "torch": torch.__version__,
            "cpu": platform.machine() or "unknown",
            "threads": str(torch.get_num_threads()),
            "bf16-matmul": "native" if kernels.native_bf16_gemm() else "none (bf16 computed in fp32)",
            "native-kernels": kernels.native.status(),
        }
