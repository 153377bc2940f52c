"""Plugin discovery through real entry points, error boundaries, allow-list, declared capabilities."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import ACME_BACKEND, ACME_PLUGIN, plugin_source, portable_backend_source, x_w_sizes

import hal
from hal.dispatch import HalFallbackWarning, route
from hal.registry import registry


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
    site.install(
        "bad-hal",
        {"bad": "bad_plugin"},
        {
            "bad_plugin": """
        import hal
        @hal.hookimpl
        def hal_backends():
            raise RuntimeError("vendor probe exploded")
    """
        },
    )
    reg = registry()
    assert "cpu" in reg.entries
    assert "vendor probe exploded" in reg.broken[0].error


def test_backend_class_that_fails_to_construct_is_reported(site):
    site.install(
        "ctor-hal",
        {"ctor": "ctor_plugin"},
        {
            "ctor_plugin": plugin_source("ctor", "ctor_backend:Ctor"),
            "ctor_backend": (
                "import hal\nclass Ctor(hal.Backend):\n    def __init__(self):\n        raise OSError('no driver')\n"
            ),
        },
    )
    with pytest.raises(hal.PluginError, match="no driver"):
        registry().backend("ctor")
    assert "no driver" in registry().entry("ctor").availability().reason


def test_two_backends_with_one_name_are_an_error(site):
    site.install(
        "one-hal",
        {"one": "one_plugin"},
        {"one_plugin": plugin_source("dup", "dup_backend:Dup"), "dup_backend": portable_backend_source("Dup")},
    )
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
    site.install(
        "gone-hal",
        {"gone": "gone_plugin"},
        {
            "gone_plugin": plugin_source("gone", "gone_backend:Gone", priority=100),
            "gone_backend": portable_backend_source("Gone", probe_reason="gonelib is not installed"),
        },
    )
    with pytest.raises(hal.BackendUnavailableError, match="gonelib is not installed"):
        registry().backend("gone")
    assert registry().auto_select() == "cpu"


def test_emulated_backend_is_never_auto_selected(site):
    site.install(
        "emu-hal",
        {"emu": "emu_plugin"},
        {
            "emu_plugin": plugin_source("emu", "emu_backend:Emu", priority=100, emulated=True),
            "emu_backend": portable_backend_source("Emu"),
        },
    )
    assert registry().entry("emu").availability().available
    assert registry().auto_select() == "cpu"


@pytest.mark.parametrize(
    "decl, message",
    [
        ('@hal.implements("grouped_gemm", dtype=["float32"])', "no feature axis 'dtype'"),
        ('@hal.implements("grouped_gemm", x_dtype=["int4"])', "not defined by the contract"),
        ('@hal.implements("no_such_op")', "unknown operator"),
    ],
)
def test_bad_capability_declarations_are_plugin_errors(site, decl, message):
    site.install(
        "decl-hal",
        {"decl": "decl_plugin"},
        {
            "decl_plugin": plugin_source("decl", "decl_backend:Decl"),
            "decl_backend": f"""
import hal
class Decl(hal.Backend):
    {decl}
    def grouped_gemm(self, x, w, group_sizes, *, layout="contiguous", x_scale=None, w_scale=None, out_dtype=None):
        return None
""",
        },
    )
    with pytest.raises(hal.PluginError, match=message):
        registry().backend("decl")


def test_implementation_signature_must_match_the_contract(site):
    site.install(
        "sig-hal",
        {"sig": "sig_plugin"},
        {
            "sig_plugin": plugin_source("sig", "sig_backend:Sig"),
            "sig_backend": """
import hal
class Sig(hal.Backend):
    @hal.implements("grouped_gemm")
    def grouped_gemm(self, x, w, group_sizes, *, layout="masked", x_scale=None, w_scale=None, out_dtype=None):
        return None
""",
        },
    )
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
    return subprocess.run(
        [sys.executable, "-m", "hal.cli", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120
    )


def test_hal_info_lists_backends_broken_plugins_and_reasons(site, tmp_path):
    site.install("acme-hal", {"acme": "acme_plugin"}, {"acme_plugin": ACME_PLUGIN, "acme_backend": ACME_BACKEND})
    site.install("broken-hal", {"broken": "broken_plugin"}, {"broken_plugin": "raise ImportError('libfoo.so missing')"})
    site.install(
        "gone-hal",
        {"gone": "gone_plugin"},
        {
            "gone_plugin": plugin_source("gone", "gone_backend:Gone"),
            "gone_backend": portable_backend_source("Gone", probe_reason="gonelib is not installed"),
        },
    )
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


# -- probes that crash or hang (hal.probe) ---------------------------------------------------------------------


def _probing_backend(calls, action: str) -> str:
    """A backend whose probe records the process it ran in (one line per probe in ``calls``), then runs
    ``action``."""
    return f"""
import ctypes, os, time
import hal
class Probed(hal.Backend):
    device_type = "test"
    def probe(self):
        with open({str(calls)!r}, "a") as f:
            f.write(f"{{os.getpid()}}\\n")
        {action}
"""


_ACTIONS = {
    "segv": "ctypes.string_at(0)  # a driver library's segfault",
    "hang": "time.sleep(600)",
    "quits": "os._exit(3)",
    "pid": "return hal.Availability(False, f'probed in process {os.getpid()}')",
}


def _install_probing(site, calls_dir, *names):
    for name in names:
        site.install(
            f"{name}-hal",
            {name: f"{name}_plugin"},
            {
                f"{name}_plugin": plugin_source(name, f"{name}_backend:Probed", priority=100),
                f"{name}_backend": _probing_backend(calls_dir / name, _ACTIONS[name]),
            },
        )


def _probes(calls_dir, name):
    """The processes that ran the probe of ``name``, one per probe."""
    path = calls_dir / name
    return [int(pid) for pid in path.read_text().split()] if path.exists() else []


@pytest.fixture
def probe_cache(tmp_path, monkeypatch):
    """A fresh probe cache; probes isolated and cached as by default."""
    for var in ("HAL_PROBE_ISOLATION", "HAL_PROBE_CACHE", "HAL_PROBE_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def calls_dir(tmp_path, probe_cache):
    (tmp_path / "calls").mkdir()
    return tmp_path / "calls"


_ROUTED = "import hal; from hal.dispatch import route; print(route(hal.ops.grouped_gemm).backend.name)"


def test_probes_that_crash_or_hang_are_unavailable_and_cached(site, tmp_path, calls_dir, probe_cache):
    _install_probing(site, calls_dir, "segv", "hang", "quits")
    env = {
        "PYTHONPATH": os.pathsep.join([str(site.root), os.environ.get("PYTHONPATH", "")]),
        "XDG_CACHE_HOME": str(probe_cache),
        "HAL_PROBE_TIMEOUT": "2",
    }

    def python(code, **extra):
        done = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env={**os.environ, **env, **extra},
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    # the CPU chosen explicitly: no other backend is probed
    assert python(_ROUTED, HAL_BACKEND="cpu") == "cpu"
    assert [_probes(calls_dir, n) for n in ("segv", "hang", "quits")] == [[], [], []]

    text = _run_hal("info", env_extra=env, cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    assert "status:   unavailable: the probe of backend 'segv' crashed with SIGSEGV" in text.stdout
    assert (
        "status:   unavailable: the probe of backend 'hang' hung for more than 2 s (HAL_PROBE_TIMEOUT)" in text.stdout
    )
    assert (
        "status:   unavailable: the probe of backend 'quits' failed in its child process (exit code 3)" in text.stdout
    )
    assert [len(_probes(calls_dir, n)) for n in ("segv", "hang", "quits")] == [1, 1, 1]

    # later processes: served from the cache, the vendor code is never run in-process
    data = json.loads(_run_hal("info", "--json", env_extra=env, cwd=tmp_path).stdout)
    by_name = {b["name"]: b for b in data["backends"]}
    assert by_name["segv"]["available"] is False and "crashed with SIGSEGV" in by_name["segv"]["reason"]
    assert by_name["segv"]["operators"] == {} and by_name["segv"]["versions"] == {}
    assert python(_ROUTED) == "cpu"  # auto-detection falls back to the CPU
    assert [len(_probes(calls_dir, n)) for n in ("segv", "hang", "quits")] == [1, 1, 1]


def test_a_probe_runs_in_a_child_process_unless_it_need_not(site, calls_dir, monkeypatch):
    _install_probing(site, calls_dir, "pid")
    site.install(
        "emu-hal",
        {"emu": "emu_plugin"},
        {
            "emu_plugin": plugin_source("emu", "emu_backend:Probed", emulated=True),
            "emu_backend": _probing_backend(calls_dir / "emu", _ACTIONS["pid"]),
        },
    )
    site.install(
        "safe-hal",
        {"safe": "safe_plugin"},
        {
            "safe_plugin": plugin_source("safe", "safe_backend:Safe"),
            "safe_backend": _probing_backend(calls_dir / "safe", _ACTIONS["pid"])
            + "class Safe(Probed):\n    isolate_probe = False\n",
        },
    )

    class Plugin:  # registered in-process: a child process could not find it
        @hal.hookimpl
        def hal_backends(self):
            return [hal.BackendSpec(name="inproc", factory="safe_backend:Probed")]

    hal.register_plugin(Plugin(), "inproc-plugin")
    here = f"probed in process {os.getpid()}"
    assert registry().entry("pid").availability().reason != here
    assert _probes(calls_dir, "pid")[0] != os.getpid()
    with pytest.raises(hal.BackendUnavailableError, match="probed in process"):
        registry().backend("pid")
    # an emulated test double, a backend that declares its probe safe, a plugin registered in-process: here
    assert [registry().entry(n).availability().reason for n in ("emu", "safe", "inproc")] == [here] * 3
    monkeypatch.setenv("HAL_PROBE_ISOLATION", "0")  # for debugging: every probe here
    hal.registry.reset()
    assert registry().entry("pid").availability().reason == here


def test_shipped_backends_probe_in_isolation_their_twins_in_process(probe_cache):
    ascend, twin = registry().entry("ascend"), registry().entry("ascend-emulated")
    assert ascend.availability().reason.startswith("torch_npu is not installed") and not ascend.contained
    cached = probe_cache / "xpu-hal" / "probes.json"
    assert len(json.loads(cached.read_text())) == 1  # isolated probes' verdicts are cached
    assert twin.availability().available
    assert len(json.loads(cached.read_text())) == 1  # the twin's probe ran in this process


def test_probe_cache_is_keyed_by_the_environment_and_can_be_bypassed(site, calls_dir, monkeypatch):
    _install_probing(site, calls_dir, "pid")

    def probe():
        hal.registry.reset()
        registry().entry("pid").availability()
        return len(_probes(calls_dir, "pid"))

    assert probe() == 1
    assert probe() == 1  # a new registry (a new process): the cached verdict
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "1")
    assert probe() == 2  # other devices visible: probed again
    assert probe() == 2
    site.install("other-hal", {}, {})
    assert probe() == 3  # another distribution installed: probed again
    monkeypatch.setenv("HAL_PROBE_CACHE", "0")
    assert probe() == 4  # the cache bypassed


def test_bad_probe_timeout_is_a_config_error(site, calls_dir, monkeypatch):
    _install_probing(site, calls_dir, "pid")
    monkeypatch.setenv("HAL_PROBE_TIMEOUT", "soon")
    with pytest.raises(hal.ConfigError, match="HAL_PROBE_TIMEOUT: expected a positive number of seconds"):
        registry().backend("pid")
