"""Run the conformance suite under pytest: ``pytest -p hal.conformance.plugin --pyargs hal.conformance
--hal-backend NAME`` (or ``PYTEST_PLUGINS=hal.conformance.plugin``, pytest's own switch).

Loaded only when asked for (``-p``: early enough that its options exist before pytest resolves
``--pyargs``), so pytest sessions of an environment that merely has xpu-hal installed never see it. Each
cell is one test item. A cell the backend declares unsupported is skipped with that reason (shown by
``-rs``), a waived cell is an expected failure with its reason, anything else must pass.
"""

from __future__ import annotations

import random

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("hal", "xpu-hal conformance")
    group.addoption("--hal-backend", default="cpu", help="backend to certify (default: cpu)")
    group.addoption("--hal-profile", default="ci", choices=["quick", "ci", "thorough"], help="examples per cell")
    group.addoption("--hal-seed", type=int, default=None, help="hypothesis seed (default: random, printed)")
    group.addoption("--hal-ops", default="", help="comma-separated operators to certify (default: all)")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--hal-seed", None) is None:
        config.option.hal_seed = random.randrange(2**31)


def pytest_report_header(config: pytest.Config):
    from hal.registry import registry

    entry = registry().entry(config.getoption("--hal-backend"))
    label = registry().emulated_label(entry.name)
    return (
        f"hal conformance: backend {entry.name}{label} ({entry.distribution}), profile "
        f"{config.getoption('--hal-profile')}, seed {config.getoption('--hal-seed')}"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "hal_cell" not in metafunc.fixturenames:
        return
    from hal.conformance.core import cell_id, cells, suites

    wanted = [o for o in metafunc.config.getoption("--hal-ops").split(",") if o] or sorted(suites())
    params = [(op, features) for op in wanted for features in cells(op)]
    metafunc.parametrize("hal_cell", params, ids=[cell_id(op, f) for op, f in params])
