"""The CPU reference backend's plugin: registered through the ``hal.backends`` entry point."""

from typing import List

from hal.hookspecs import hookimpl
from hal.registry import BackendSpec


@hookimpl
def hal_backends() -> List[BackendSpec]:
    return [
        BackendSpec(
            name="cpu",
            factory="hal.backends.cpu.backend:CpuBackend",
            vendor="xpu-hal (PyTorch)",
            device_type="cpu",
            priority=0,
            description="reference semantics in PyTorch; bf16/fp16 computed in fp32; "
            "native MLA decode and FP8 quantisation on AMX CPUs",
        )
    ]
