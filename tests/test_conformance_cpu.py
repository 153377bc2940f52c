"""The CPU reference backend conforms to every contract: every cell of every suite passes (quick profile,
in this process; ``hal conformance --backend cpu`` runs the ci profile in worker processes)."""
from __future__ import annotations

import pytest

from hal.conformance.core import cells, run_cell, suites
from hal.contract import all_ops


def test_every_operator_has_a_suite():
    assert sorted(suites()) == sorted(all_ops())


@pytest.mark.parametrize("op", sorted(all_ops()))
def test_cpu_backend_conforms(op):
    results = [run_cell("cpu", op, features, profile="quick", seed=0) for features in cells(op)]
    assert results, f"{op} has no cells"
    bad = [f"{r.id}: {r.status}: {r.message}\n{r.minimal_example}" for r in results if r.status != "pass"]
    assert not bad, "\n\n".join(bad)
