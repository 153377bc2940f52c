"""The grouped GEMM suite has teeth: deliberately wrong backends, registered through the public plugin
API, fail it; the CPU reference passes."""

from __future__ import annotations

import torch
from helpers import register_backend

from hal.backends.cpu.backend import CpuBackend
from hal.conformance.core import run_cell
from hal.ops.grouped_gemm import grouped_gemm as GG

CELL = {"layout": "contiguous", "x_dtype": "bfloat16", "w_dtype": "bfloat16", "out_dtype": "bfloat16"}
MASKED = dict(CELL, layout="masked")


class OffByOneGroupOffset(CpuBackend):
    """Each group starts one row late (the classic exclusive/inclusive prefix-sum slip)."""

    def __init__(self):
        super().__init__()
        self.add_implementation("grouped_gemm", self.wrong)

    def wrong(self, x, w, group_sizes, *, layout="contiguous", x_scale=None, w_scale=None, out_dtype=None):
        if layout != "contiguous":
            return GG.reference_impl(x, w, group_sizes, layout=layout, out_dtype=out_dtype)
        y = x.new_zeros(x.shape[0], w.shape[1])
        start = 0
        for g, size in enumerate(group_sizes.tolist()):
            lo = min(start + (1 if g else 0), x.shape[0])
            y[lo : start + size] = (x[lo : start + size].float() @ w[g].float().T).to(x.dtype)
            start += size
        return y


class AccumulatesInBf16(CpuBackend):
    """Accumulates the K-sum in bf16 instead of fp32 (masked layout)."""

    def __init__(self):
        super().__init__()
        self.add_implementation("grouped_gemm", self.wrong)

    def wrong(self, x, w, group_sizes, *, layout="contiguous", x_scale=None, w_scale=None, out_dtype=None):
        if layout != "masked" or x.dtype != torch.bfloat16:
            return GG.reference_impl(x, w, group_sizes, layout=layout, out_dtype=out_dtype)
        acc = torch.zeros(x.shape[0], x.shape[1], w.shape[1], dtype=torch.bfloat16)
        for k in range(x.shape[-1]):
            acc = acc + x[..., k : k + 1] * w[:, None, :, k]
        return acc


class WScaleReadKMajor(CpuBackend):
    """FP8 weights whose ``w_scale [G, N/128, K/128]`` is read as if stored K-major (``[G, K/128, N/128]``):
    the same as the right one while N or K spans a single block."""

    def __init__(self):
        super().__init__()
        self.add_implementation("grouped_gemm", self.wrong)

    def wrong(self, x, w, group_sizes, *, layout="contiguous", x_scale=None, w_scale=None, out_dtype=None):
        if w_scale is not None and w.dtype == torch.float8_e4m3fn:
            g, nb, kb = w_scale.shape
            w_scale = w_scale.reshape(g, kb, nb).transpose(1, 2)
        return GG.reference_impl(
            x, w, group_sizes, layout=layout, x_scale=x_scale, w_scale=w_scale, out_dtype=out_dtype
        )


def test_reference_backend_passes():
    for cell in (CELL, MASKED):
        result = run_cell("cpu", "grouped_gemm", cell, profile="ci", seed=1)
        assert result.status == "pass", result.message


def test_off_by_one_group_offset_fails_with_a_minimal_example():
    register_backend("wrong-offset", OffByOneGroupOffset)
    result = run_cell("wrong-offset", "grouped_gemm", CELL, profile="ci", seed=1)
    assert result.status == "fail", result
    assert "y" in result.message and "mismatched elements" in result.message
    assert "group sizes" in result.minimal_example  # the labelled draws of the shrunk example
    assert result.reproduce.startswith("hal conformance --backend wrong-offset --ops 'grouped_gemm[layout=contiguous,")
    assert " --seed 1 " in result.reproduce and f"cell seed {result.seed}" in result.reproduce


def test_bf16_accumulation_fails():
    register_backend("wrong-acc", AccumulatesInBf16)
    assert run_cell("wrong-acc", "grouped_gemm", MASKED, profile="ci", seed=1).status == "fail"


def test_w_scale_read_k_major_fails():
    register_backend("w-scale-k-major", WScaleReadKMajor)
    cell = dict(CELL, w_dtype="float8_e4m3fn")
    assert run_cell("w-scale-k-major", "grouped_gemm", cell, profile="ci", seed=0).status == "fail"
