"""The conformance suite as pytest items: one ``test_cell`` per operator cell, parametrised by the pytest plugin
:mod:`hal.conformance.plugin` (``pytest -p hal.conformance.plugin --pyargs hal.conformance``)."""

from __future__ import annotations

import pytest

from hal.conformance.core import cell_id, run_cell
from hal.registry import registry


def test_cell(hal_cell, request: pytest.FixtureRequest) -> None:
    op, features = hal_cell
    config = request.config
    backend = config.getoption("--hal-backend")
    waivers = getattr(registry().backend(backend), "conformance_waivers", {}) or {}
    cid = cell_id(op, features)
    waiver = next((reason for prefix, reason in waivers.items() if cid.startswith(prefix)), None)
    result = run_cell(
        backend,
        op,
        features,
        profile=config.getoption("--hal-profile"),
        seed=config.getoption("--hal-seed"),
        waiver=waiver,
    )
    if result.status == "unsupported":
        pytest.skip(f"declared unsupported by '{backend}': {result.message}")
    if result.status == "waived-fail":
        pytest.xfail(result.message)
    if result.status not in ("pass", "waived-pass"):
        pytest.fail(
            f"{result.status}: {result.message}\n\nminimal failing example:\n{result.minimal_example}\n"
            f"reproduce: {result.reproduce}",
            pytrace=False,
        )
