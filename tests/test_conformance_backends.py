"""The shipped backends conform to every contract: every cell of every suite passes or is declared
unsupported (quick profile, in this process; ``hal conformance --backend NAME [--emulate]`` runs the ci
profile in worker processes). The vendor backends run as their emulated twins (test doubles of the vendor
libraries): this certifies their translation and fallback code, not hardware."""

from __future__ import annotations

import pytest

from hal.conformance.core import cells, run_cell, suites
from hal.contract import all_ops

BACKENDS = ("cpu", "ascend-emulated", "ascend-950-emulated", "mlu-emulated")


def test_every_operator_has_a_suite():
    assert sorted(suites()) == sorted(all_ops())


@pytest.mark.parametrize("op", sorted(all_ops()))
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_conforms(backend, op):
    results = [run_cell(backend, op, features, profile="quick", seed=0) for features in cells(op)]
    assert results, f"{op} has no cells"
    bad = [
        f"{r.id}: {r.status}: {r.message}\n{r.minimal_example}"
        for r in results
        if r.status not in ("pass", "unsupported") or (r.status == "unsupported" and not r.message)
    ]
    assert not bad, "\n\n".join(bad)
    if backend == "cpu":  # the reference backend serves every cell
        assert all(r.status == "pass" for r in results)


@pytest.mark.parametrize("native", (True, False), ids=("bf16-matrix-instructions", "fp32-only"))
@pytest.mark.parametrize("op", ("grouped_gemm", "mla_prefill", "mla_decode"))
def test_cpu_kernels_conform_on_cpus_with_and_without_bf16_matrix_instructions(monkeypatch, op, native):
    from hal.backends.cpu import kernels

    monkeypatch.setattr(kernels, "native_bf16_gemm", lambda: native)  # both paths, whatever this CPU has
    results = [run_cell("cpu", op, features, profile="quick", seed=1) for features in cells(op)]
    bad = [f"{r.id}: {r.status}: {r.message}\n{r.minimal_example}" for r in results if r.status != "pass"]
    assert not bad, "\n\n".join(bad)


def test_cpu_decode_conforms_without_its_native_kernel(monkeypatch):
    from hal.backends.cpu import kernels

    monkeypatch.setattr(kernels.native, "serves_mla_decode", lambda *args: False)  # PyTorch's flash path
    results = [run_cell("cpu", "mla_decode", features, profile="quick", seed=1) for features in cells("mla_decode")]
    bad = [f"{r.id}: {r.status}: {r.message}\n{r.minimal_example}" for r in results if r.status != "pass"]
    assert not bad, "\n\n".join(bad)
