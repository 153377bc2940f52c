"""Plugin discovery through real entry points, error boundaries, allow-list, declared capabilities."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import hal
from hal.dispatch import HalFallbackWarning, route
from hal.registry import registry
from helpers import ACME_BACKEND, ACME_PLUGIN, plugin_source, portable_backend_source, x_w_sizes


def test_cpu_backend_registers_through_its_entry_point():
    entry = registry().entry("cpu")
    assert entry.plugin == "cpu"
    assert entry.distribution.startswith("xpu-hal ")
    assert entry.availability().available


def test_third_party_plugin_is_discovered_lazily(site):
    site.install("acme-hal", {"acme": "acme_plugin"}, {"acme_plugin": ACME_PLUGIN, "acme_backend": ACME_BACKEND})
    reg = registry()
    entry = reg.entry("acme")
    assert entry.distribution == "acme-hal 1.0"
    assert entry.spec.vendor == "Acme"
    assert "acme_backend" not in sys.modules, "discovery must not import the backend module"
    assert reg.backend("acme").versions() == {"acmelib": "9.9"}
    assert "acme_backend" in sys.modules


def test_auto_detection_prefers_an_available_accelerator(site):
    site.install("acme-hal", {"acme": "acme_plugin"}, {"acme_plugin": ACME_PLUGIN, "acme_backend": ACME_BACKEND})
    x, w, sizes = x_w_sizes(torch.float32)
    hal.ops.grouped_gemm(x, w, sizes)
    r = route(hal.ops.grouped_gemm)
    assert (r.backend.name, r.source) == ("acme", "auto-detected")
    assert sys.modules["acme_backend"].CALLS == ["grouped_gemm"]


def test_declared_unsupported_request_raises_by_default(site):
    site.install("acme-hal", {"acme": "acme_plugin"}, {"acme_plugin": ACME_PLUGIN, "acme_backend": ACME_BACKEND})
    x, w, sizes = x_w_sizes(torch.bfloat16)
    with hal.use_backend("acme"), pytest.raises(hal.UnsupportedError, match="x_dtype=bfloat16"):
        hal.ops.grouped_gemm(x, w, sizes)
    assert sys.modules["acme_backend"].CALLS == []


def test_fallback_policy_warn_runs_the_request_on_cpu(site):
    site.install("acme-hal", {"acme": "acme_plugin"}, {"acme_plugin": ACME_PLUGIN, "acme_backend": ACME_BACKEND})
    x, w, sizes = x_w_sizes(torch.bfloat16)
    with hal.use_backend("acme", fallback="warn"), pytest.warns(HalFallbackWarning, match="running it on 'cpu'"):
        y = hal.ops.grouped_gemm(x, w, sizes)
    assert sys.modules["acme_backend"].CALLS == []
    with hal.use_backend("cpu"):
        torch.testing.assert_close(y, hal.ops.grouped_gemm(x, w, sizes), rtol=0, atol=0)


def test_per_operator_fallback_policy(site):
    site.install("acme-hal", {"acme": "acme_plugin"}, {"acme_plugin": ACME_PLUGIN, "acme_backend": ACME_BACKEND})
    x, w, sizes = x_w_sizes(torch.bfloat16)
    with hal.use_backend("acme", fallback="warn", op_fallback={"grouped_gemm": "error"}):
        with pytest.raises(hal.UnsupportedError):
            hal.ops.grouped_gemm(x, w, sizes)


def test_broken_plugin_is_isolated_and_reported(site):
    site.install("broken-hal", {"broken": "broken_plugin"}, {"broken_plugin": "raise ImportError('libfoo.so missing')"})
    site.install("acme-hal", {"acme": "acme_plugin"}, {"acme_plugin": ACME_PLUGIN, "acme_backend": ACME_BACKEND})
    reg = registry()
    assert set(reg.entries) >= {"cpu", "acme"}
    [broken] = reg.broken
    assert broken.plugin == "broken" and broken.distribution == "broken-hal 1.0"
    assert "libfoo.so missing" in broken.error
    with pytest.raises(hal.BackendNotFoundError, match="failed to load"):
        reg.entry("broken")


def test_plugin_whose_hook_raises_is_isolated(site):
    site.install("bad-hal", {"bad": "bad_plugin"}, {"bad_plugin": """
        import hal
        @hal.hookimpl
        def hal_backends():
            raise RuntimeError("vendor probe exploded")
    """})
    reg = registry()
    assert "cpu" in reg.entries
    assert "vendor probe exploded" in reg.broken[0].error


def test_backend_class_that_fails_to_construct_is_reported(site):
    site.install("ctor-hal", {"ctor": "ctor_plugin"}, {
        "ctor_plugin": plugin_source("ctor", "ctor_backend:Ctor"),
        "ctor_backend": "import hal\nclass Ctor(hal.Backend):\n    def __init__(self):\n        raise OSError('no driver')\n"})
    with pytest.raises(hal.PluginError, match="no driver"):
        registry().backend("ctor")
    assert "no driver" in registry().entry("ctor").availability().reason


def test_two_backends_with_one_name_are_an_error(site):
    site.install("one-hal", {"one": "one_plugin"}, {"one_plugin": plugin_source("dup", "dup_backend:Dup"),
                                                     "dup_backend": portable_backend_source("Dup")})
    site.install("two-hal", {"two": "two_plugin"}, {"two_plugin": plugin_source("dup", "dup_backend:Dup")})
    with pytest.raises(hal.PluginError, match="two backends are named 'dup'.*one-hal.*two-hal"):
        registry().backend("dup")
    assert registry().backend("cpu") is not None


def test_allow_list_limits_which_plugins_load(site, monkeypatch):
    site.install("acme-hal", {"acme": "acme_plugin"}, {"acme_plugin": ACME_PLUGIN, "acme_backend": ACME_BACKEND})
    monkeypatch.setenv("HAL_PLUGINS", "cpu")
    reg = registry()
    assert set(reg.entries) == {"cpu"}
    assert "acme_plugin" not in sys.modules
    with pytest.raises(hal.BackendNotFoundError, match="not in HAL_PLUGINS"):
        reg.entry("acme")


def test_unavailable_backend_says_why_and_is_not_auto_selected(site):
    site.install("gone-hal", {"gone": "gone_plugin"}, {
        "gone_plugin": plugin_source("gone", "gone_backend:Gone", priority=100),
        "gone_backend": portable_backend_source("Gone", probe_reason="gonelib is not installed")})
    with pytest.raises(hal.BackendUnavailableError, match="gonelib is not installed"):
        registry().backend("gone")
    assert registry().auto_select() == "cpu"


def test_emulated_backend_is_never_auto_selected(site):
    site.install("emu-hal", {"emu": "emu_plugin"}, {
        "emu_plugin": plugin_source("emu", "emu_backend:Emu", priority=100, emulated=True),
        "emu_backend": portable_backend_source("Emu")})
    assert registry().entry("emu").availability().available
    assert registry().auto_select() == "cpu"


@pytest.mark.parametrize("decl, message", [
    ('@hal.implements("grouped_gemm", dtype=["float32"])', "no feature axis 'dtype'"),
    ('@hal.implements("grouped_gemm", x_dtype=["int4"])', "not defined by the contract"),
    ('@hal.implements("no_such_op")', "unknown operator"),
])
def test_bad_capability_declarations_are_plugin_errors(site, decl, message):
    site.install("decl-hal", {"decl": "decl_plugin"}, {
        "decl_plugin": plugin_source("decl", "decl_backend:Decl"),
        "decl_backend": f"""
import hal
class Decl(hal.Backend):
    {decl}
    def grouped_gemm(self, x, w, group_sizes, *, layout="contiguous", x_scale=None, w_scale=None, out_dtype=None):
        return None
"""})
    with pytest.raises(hal.PluginError, match=message):
        registry().backend("decl")


def test_implementation_signature_must_match_the_contract(site):
    site.install("sig-hal", {"sig": "sig_plugin"}, {
        "sig_plugin": plugin_source("sig", "sig_backend:Sig"),
        "sig_backend": """
import hal
class Sig(hal.Backend):
    @hal.implements("grouped_gemm")
    def grouped_gemm(self, x, w, group_sizes, *, layout="masked", x_scale=None, w_scale=None, out_dtype=None):
        return None
"""})
    with pytest.raises(hal.PluginError, match="parameter 'layout' does not match"):
        registry().backend("sig")


def test_in_process_plugin_registration():
    class Plugin:
        @hal.hookimpl
        def hal_backends(self):
            return [hal.BackendSpec(name="inproc", factory="hal.backends.cpu.backend:CpuBackend")]

    hal.register_plugin(Plugin(), "inproc-plugin")
    assert registry().entry("inproc").distribution == "(in-process)"
    assert registry().backend("inproc").name == "inproc"


def test_unregistering_an_in_process_plugin_undoes_it():
    class Clash:
        @hal.hookimpl
        def hal_backends(self):
            return [hal.BackendSpec(name="cpu", factory="hal.backends.cpu.backend:CpuBackend")]

    assert hal.register_plugin(Clash(), "clash")
    with pytest.raises(hal.PluginError, match="two backends are named 'cpu'"):
        registry().backend("cpu")
    hal.unregister_plugin("clash")  # its backend and the clash it made are gone
    assert registry().backend("cpu").name == "cpu" and "clash" not in {e.plugin for e in registry().entries.values()}
    assert not hal.register_plugin(Clash(), "cpu")  # a plugin name already taken: refused, and said so
    assert registry().backend("cpu").name == "cpu"


def _run_hal(*args, env_extra=None, cwd=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAL_")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "hal.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)


def test_hal_info_lists_backends_broken_plugins_and_reasons(site, tmp_path):
    site.install("acme-hal", {"acme": "acme_plugin"}, {"acme_plugin": ACME_PLUGIN, "acme_backend": ACME_BACKEND})
    site.install("broken-hal", {"broken": "broken_plugin"}, {"broken_plugin": "raise ImportError('libfoo.so missing')"})
    site.install("gone-hal", {"gone": "gone_plugin"}, {
        "gone_plugin": plugin_source("gone", "gone_backend:Gone"),
        "gone_backend": portable_backend_source("Gone", probe_reason="gonelib is not installed")})
    env = {"PYTHONPATH": os.pathsep.join([str(site.root), os.environ.get("PYTHONPATH", "")])}
    text = _run_hal("info", env_extra=env, cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    out = text.stdout
    assert "backend cpu" in out and "backend acme" in out
    assert "unavailable: gonelib is not installed" in out
    assert "broken plugin broken (broken-hal 1.0)" in out and "libfoo.so missing" in out

    data = json.loads(_run_hal("info", "--json", env_extra=env, cwd=tmp_path).stdout)
    by_name = {b["name"]: b for b in data["backends"]}
    assert by_name["acme"]["operators"]["grouped_gemm"]["x_dtype"] == ["float32"]
    assert "grouped_gemm" in by_name["cpu"]["operators"]
    assert by_name["acme"]["versions"] == {"acmelib": "9.9"}
    assert by_name["gone"]["available"] is False and by_name["gone"]["reason"] == "gonelib is not installed"
    assert data["broken_plugins"][0]["plugin"] == "broken"
