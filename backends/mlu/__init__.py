"""The Cambricon MLU backend's plugin (torch_mlu / torch_mlu_ops): the real backend ``mlu`` and its
emulated twin ``mlu-emulated`` (the same backend over a test double of torch_mlu_ops; see
``docs/backends/mlu.md``). Importing this module imports no vendor library."""

from typing import List

from hal.hookspecs import hookimpl
from hal.registry import BackendSpec
from hal.vendor import emulated_twin


@hookimpl
def hal_backends() -> List[BackendSpec]:
    return emulated_twin(
        BackendSpec(
            name="mlu",
            factory="hal.backends.mlu.backend:MluBackend",
            vendor="Cambricon",
            device_type="mlu",
            priority=10,
            description="Cambricon MLU via torch_mlu_ops (the operators vLLM-MLU uses)",
        ),
        emulator_factory="hal.backends.mlu.tmo_double:emulated_mlu_backend",
        description="EMULATED test double of 'mlu': MluBackend over a CPU stand-in for torch_mlu_ops "
        "(HAL_MLU_EMULATE='tmo=1.6.0|1.12.1,capability=5.0|6.0')",
    )
