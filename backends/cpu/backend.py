"""The CPU reference backend: every contract's reference semantics, computed in float32.

bf16/fp16 inputs are computed in fp32 (CPUs without native bf16 run bf16 GEMMs ~100x slower than
fp32), and results are rounded once to the contract's output dtype. The kernels are plain PyTorch,
so the backend is *portable*: it computes on whatever device the arguments live on, which makes it
the fallback for accelerator backends too. Most operators run their contract's reference
implementation; those where it is slow run a faster kernel of the same semantics
(:mod:`hal.backends.cpu.kernels`).
"""
from __future__ import annotations

import functools
import platform
from typing import Dict

import torch

from hal.backend import Backend
from hal.backends.cpu import kernels
from hal.contract import all_ops

_FAST_KERNELS = {"grouped_gemm": kernels.grouped_gemm, "mla_decode": kernels.mla_decode,
                 "quantize_fp8": kernels.quantize_fp8}


class CpuBackend(Backend):
    vendor = "xpu-hal (PyTorch)"
    device_type = "cpu"
    portable = True

    def __init__(self) -> None:
        super().__init__()
        for op in all_ops().values():
            fast = _FAST_KERNELS.get(op.name)
            self.add_implementation(
                op.name, fast or functools.partial(op.reference_impl, compute_dtype=torch.float32))

    def versions(self) -> Dict[str, str]:
        return {"torch": torch.__version__, "cpu": platform.machine() or "unknown",
                "threads": str(torch.get_num_threads())}
