"""Huawei Ascend backend (torch_npu), and its emulated twins for CI: ``ascend-emulated`` (an Atlas A2)
and ``ascend-950-emulated`` (an Ascend 950), the same backend class over a TEST DOUBLE of torch_npu
(:mod:`hal.backends.ascend.torch_npu_double`). See docs/backends/ascend.md."""

from dataclasses import replace
from typing import List

from hal.hookspecs import hookimpl
from hal.registry import BackendSpec
from hal.vendor import emulated_twin

_DOUBLE = "hal.backends.ascend.torch_npu_double"


@hookimpl
def hal_backends() -> List[BackendSpec]:
    spec = BackendSpec(
        name="ascend",
        factory="hal.backends.ascend.backend:AscendBackend",
        vendor="Huawei Ascend (torch_npu)",
        device_type="npu",
        priority=10,
        description="torch_npu operators (GMM, gating top-k, MoE routing, fused infer attention) "
        "on Atlas A2/A3 and Ascend 950",
    )
    real, twin = emulated_twin(
        spec,
        emulator_factory=f"{_DOUBLE}:emulated_a2",
        description="EMULATED test double of 'ascend' as an Atlas A2: torch_npu operators "
        "emulated on the CPU from the vendor's documentation",
    )
    twin_950 = replace(
        twin,
        name="ascend-950-emulated",
        factory=f"{_DOUBLE}:emulated_950",
        description=twin.description.replace("an Atlas A2", "an Ascend 950"),
    )
    return [real, twin, twin_950]
