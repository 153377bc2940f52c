"""The CPU backend's native MLA decode kernel (``hal.backends.cpu.native``): where it cannot run, the backend
says why and keeps PyTorch's flash path. Its numerics: tests/test_ops_mla.py
(``test_native_amx_decode_within_tolerance_of_oracle``, and the ``cpu_paths`` tests with and without it)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

STATUS = "from hal.backends.cpu import native; print(native.status())"


def status_with(tmp_path, **env) -> str:
    """native.status() in a fresh process with ``env`` and an empty kernel cache."""
    environment = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), **env}
    done = subprocess.run([sys.executable, "-c", STATUS], env=environment, capture_output=True, text=True,
                          timeout=120, check=True)
    return done.stdout.strip()


@pytest.mark.parametrize("env, why", [
    ({"HAL_CPU_NATIVE": "0"}, "HAL_CPU_NATIVE=0"),
    ({"CC": "no-such-compiler"}, "no C compiler (no-such-compiler)"),
    ({"CC": "false"}, "did not build"),
])
def test_without_the_native_kernel_the_backend_says_why(tmp_path, env, why):
    from hal.backends.cpu import native
    if native.status() != "native AMX" and "HAL_CPU_NATIVE" not in env:
        pytest.skip(f"the native kernel does not run here anyway: {native.status()}")
    got = status_with(tmp_path, **env)
    assert got.startswith("PyTorch flash (") and why in got, got


def test_the_kernel_is_built_once_into_the_cache_directory(tmp_path):
    from hal.backends.cpu import native
    if native.status() != "native AMX":
        pytest.skip(f"the native kernel does not run here: {native.status()}")
    assert status_with(tmp_path) == "native AMX"
    built = list((tmp_path / "xpu-hal").glob("native-*.so"))
    assert len(built) == 1 and not [p for p in (tmp_path / "xpu-hal").iterdir() if p not in built]
    assert status_with(tmp_path, CC="no-such-compiler") == "native AMX"  # loaded from the cache, not rebuilt
