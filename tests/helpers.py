"""Helpers shared by the tests: plugin sources for fake installed distributions, input builders."""

from __future__ import annotations

import textwrap
from typing import Optional

import torch


def x_w_sizes(dtype: torch.dtype, sizes=(3, 0, 5), n: int = 16, k: int = 32):
    """Inputs of a small contiguous grouped GEMM."""
    torch.manual_seed(0)
    group_sizes = torch.tensor(sizes, dtype=torch.int32)
    x = torch.randn(int(group_sizes.sum()), k).to(dtype)
    w = torch.randn(len(sizes), n, k).to(dtype)
    return x, w, group_sizes


# A small third-party backend: float32-only grouped GEMM that records its calls.
ACME_PLUGIN = """
    import hal
    @hal.hookimpl
    def hal_backends():
        return [hal.BackendSpec(name="acme", factory="acme_backend:AcmeBackend", vendor="Acme",
                                device_type="acme", priority=10)]
"""

ACME_BACKEND = """
    import torch
    import hal
    from hal.ops.grouped_gemm import grouped_gemm as _op
    CALLS = []
    class AcmeBackend(hal.Backend):
        vendor = "Acme"
        device_type = "acme"
        portable = True          # plain torch kernels: takes CPU tensors in these tests
        @hal.implements("grouped_gemm", x_dtype=["float32"], w_dtype=["float32"], out_dtype=["float32"])
        def grouped_gemm(self, x, w, group_sizes, *, layout="contiguous", x_scale=None, w_scale=None,
                         out_dtype=None):
            CALLS.append("grouped_gemm")
            return _op.reference_impl(x, w, group_sizes, layout=layout, out_dtype=out_dtype)
        def versions(self):
            return {"acmelib": "9.9"}
"""


def plugin_source(
    name: str, factory: str, *, device_type: str = "test", priority: int = 0, emulated: bool = False
) -> str:
    return f"""
    import hal
    @hal.hookimpl
    def hal_backends():
        return [hal.BackendSpec(name={name!r}, factory={factory!r}, device_type={device_type!r},
                                priority={priority}, emulated={emulated})]
    """


def portable_backend_source(cls: str, probe_reason: Optional[str] = None) -> str:
    """A backend that serves every operator with the reference (so it is selectable for any op)."""
    probe = f"    def probe(self):\n        return hal.Availability(False, {probe_reason!r})\n" if probe_reason else ""
    return (
        textwrap.dedent(f"""
    import functools, torch, hal
    from hal.contract import all_ops
    class {cls}(hal.Backend):
        device_type = "test"
        portable = True
        def __init__(self):
            super().__init__()
            for op in all_ops().values():
                self.add_implementation(op.name, functools.partial(op.reference_impl, compute_dtype=torch.float32))
    """)
        + probe
    )


def register_backend(name: str, cls: type) -> str:
    """Register the backend class ``cls`` under ``name`` through the public plugin API; return ``name``."""
    import hal

    class Plugin:
        @hal.hookimpl
        def hal_backends(self):
            return [hal.BackendSpec(name=name, factory=f"{cls.__module__}:{cls.__qualname__}")]

    hal.register_plugin(Plugin(), name)
    return name


def model_tensors(obj, path: str = "model", seen: Optional[set] = None) -> dict:
    """``{attribute path: tensor}`` of every tensor a loaded ``hal.model`` holds (layers, weights, scales, tables)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        return {path: obj}
    if id(obj) in seen or isinstance(obj, (type, str, int, float, bool)) or obj is None:
        return {}
    seen.add(id(obj))
    if isinstance(obj, (list, tuple)):
        items = [(f"{path}[{i}]", v) for i, v in enumerate(obj)]
    elif isinstance(obj, dict):
        items = [(f"{path}[{k!r}]", v) for k, v in obj.items()]
    elif hasattr(obj, "__dict__"):
        items = [(f"{path}.{k}", v) for k, v in vars(obj).items()]
    else:
        return {}
    found = {}
    for name, value in items:
        found.update(model_tensors(value, name, seen))
    return found
