"""Shared fixtures: isolated HAL settings and registry, and fake installed distributions that expose
plugins through real ``hal.backends`` entry points (a ``*.dist-info`` folder on ``sys.path`` is exactly
what pip leaves behind)."""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path
from typing import Dict

import pytest

import hal.config
import hal.registry

HAL_ENV = ("HAL_BACKEND", "HAL_OPS", "HAL_FALLBACK", "HAL_CHECKED", "HAL_CONFIG", "HAL_PLUGINS")


@pytest.fixture(autouse=True)
def isolated_hal(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Every test starts with no HAL environment, no config file, and a fresh registry."""
    for var in HAL_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    hal.registry.reset()
    hal.config.reload()
    yield
    hal.registry.reset()
    hal.config.reload()


@pytest.fixture
def checked():
    """Checked mode for the test: every call validated, tensor values included."""
    with hal.config.use_backend(checked=True):
        yield


class FakeSite:
    """A folder on sys.path where tests 'install' distributions with entry points."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch):
        self.root = root
        self.root.mkdir(exist_ok=True)
        self._monkeypatch = monkeypatch
        monkeypatch.syspath_prepend(str(root))
        self._modules: list = []

    def install(self, dist: str, entry_points: Dict[str, str], modules: Dict[str, str], version: str = "1.0") -> None:
        for name, source in modules.items():
            (self.root / f"{name}.py").write_text(textwrap.dedent(source))
            self._modules.append(name)
        info = self.root / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        lines = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
        (info / "entry_points.txt").write_text(f"[hal.backends]\n{lines}\n")
        importlib.invalidate_caches()

    def cleanup(self) -> None:
        for name in self._modules:
            sys.modules.pop(name, None)


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    s = FakeSite(tmp_path / "site", monkeypatch)
    yield s
    s.cleanup()


def _native_variants():
    from hal.backends.cpu import native

    return list(native.VARIANTS)


@pytest.fixture(params=_native_variants())
def native_variant(request, monkeypatch):
    """Each variant of the CPU backend's native kernels in turn (``HAL_CPU_NATIVE=<name>``), skipped with the
    reason where this machine cannot run it."""
    from hal.backends.cpu import native

    monkeypatch.setenv("HAL_CPU_NATIVE", request.param)
    if not native.status().startswith("native "):
        pytest.skip(f"the {request.param} kernels do not run here: {native.status()}")
    return request.param
