"""The shared vendor-backend machinery: plain availability reasons, the reference path and its record,
emulated twins (hidden from ``hal info`` by default, certified with ``--emulate``)."""

from __future__ import annotations

import json

import pytest
import torch

import hal
from hal.cli import main
from hal.errors import PluginError
from hal.registry import BackendSpec
from hal.vendor import (
    EmulatedLibrary,
    EmulatorRefusal,
    Fallback,
    OpMapping,
    VendorBackend,
    always,
    by_operator,
    emulated_twin,
    given,
    mapped,
)


class Npuish(VendorBackend):
    device_type = "npu"
    device_name = "NPU"
    install_hint = "pip install fake-npu"
    native_hint = "source /opt/fake/set_env.sh"

    def visible_devices(self):
        return self.lib.device_count()


def backend_for(library):
    b = type("B", (Npuish,), {"library": library})()
    return b.probe()


def test_reason_when_the_vendor_package_is_not_installed():
    a = backend_for("hal_no_such_vendor_package")
    assert not a.available
    assert a.reason == "hal_no_such_vendor_package is not installed (pip install fake-npu)"


def test_reason_when_native_libraries_are_missing(site):
    site.install("fake-npu", {}, {"fake_npu_broken": "raise ImportError('libhccl.so: cannot open shared object file')"})
    a = backend_for("fake_npu_broken")
    assert not a.available
    assert "installed but failed to load: libhccl.so" in a.reason and "source /opt/fake/set_env.sh" in a.reason


def test_reason_when_no_device_is_visible(site):
    site.install("fake-npu", {}, {"fake_npu_none": "def device_count():\n    return 0\n"})
    a = backend_for("fake_npu_none")
    assert not a.available and a.reason == "fake_npu_none imported but no NPU is visible"


def test_available_with_a_device(site):
    site.install("fake-npu", {}, {"fake_npu_one": "def device_count():\n    return 1\n"})
    assert backend_for("fake_npu_one").available


class Lib(EmulatedLibrary):
    emulates = "fake_npu 1.0"

    def npu_double(self, x):
        self.record("npu_double")
        if x.dtype == torch.float16:
            self.refuse("npu_double", "float16 is not supported")
        return x * 2


def test_emulated_backend_is_labelled_and_records_paths():
    b = Npuish(Lib())
    assert b.emulated and b.probe().available and b.probe().reason.startswith("EMULATED: fake_npu 1.0")
    assert b.lib.npu_double(torch.ones(2)).tolist() == [2.0, 2.0] and b.lib.calls == ["npu_double"]
    with pytest.raises(EmulatorRefusal, match="float16 is not supported"):
        b.lib.npu_double(torch.ones(2, dtype=torch.float16))
    logits = torch.randn(3, 8)
    w, ids = b.reference_path("topk_routing", logits, 2, scoring="sigmoid")
    expected = hal.ops.topk_routing.reference_impl(logits, 2, scoring="sigmoid")
    assert torch.equal(w, expected[0]) and torch.equal(ids, expected[1])
    assert b.paths[("topk_routing", "reference")] == 1


class Mapped(Npuish):
    mappings = by_operator(
        OpMapping(
            "moe_unpermute",
            ("npu_combine",),
            fallbacks=(
                Fallback("no rows", "no rows", lambda b, c: c.y_sorted.shape[0] == 0),
                Fallback("fp16", "float16 is not supported", lambda b, c: c.y_sorted.dtype == torch.float16),
                Fallback("wide", "over 1000 columns", lambda b, c: c.y_sorted.shape[1] > 1000),
            ),
        ),
        OpMapping("hash_routing", fallbacks=(always("no vendor operator"),)),
        OpMapping("mla_decode", ("npu_attention",), fallbacks=(given("v4", "undocumented", "sinks", "window"),)),
    )

    @mapped("moe_unpermute")
    def moe_unpermute(self, y_sorted, weights, permutation):
        self.served("moe_unpermute", "npu_combine")
        return "kernel"

    @mapped("mla_decode")
    def mla_decode(
        self,
        q,
        kv_cache,
        block_table,
        seq_lens,
        *,
        softmax_scale,
        head_dim_v=512,
        causal=True,
        sinks=None,
        window=None,
        topk_indices=None,
    ):
        return "kernel"


def test_fallback_conditions_decide_the_path_and_the_first_that_holds_is_recorded():
    b = Mapped(Lib())
    ids = torch.tensor([[0], [1]])
    y, perm = hal.ops.moe_permute.reference_impl(torch.randn(2, 4), ids, 2)
    assert b.moe_unpermute(y, torch.ones(2, 1), perm) == "kernel"
    b.implementation("moe_unpermute")(y.half(), torch.ones(2, 1), perm)  # as dispatch calls it
    b.moe_unpermute(y[:0].half(), torch.ones(0, 1), hal.ops.moe_permute.reference_impl(y[:0], ids[:0], 2)[1])
    assert b.paths == {("moe_unpermute", "npu_combine"): 1, ("moe_unpermute", "reference"): 2}
    assert b.fallbacks == {("moe_unpermute", "fp16"): 1, ("moe_unpermute", "no rows"): 1}
    b.implementation("hash_routing")(torch.tensor([0]), torch.tensor([[1]]), torch.randn(1, 2))
    assert b.fallbacks[("hash_routing", "always")] == 1 and b.paths[("hash_routing", "reference")] == 1
    q, cache = torch.zeros(1, 1, 1, 8), torch.zeros(1, 4, 8)
    args = (q, cache, torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32))
    assert b.fallback("mla_decode", args, {"softmax_scale": 1.0, "head_dim_v": 8}) is None
    assert (
        b.fallback("mla_decode", args, {"softmax_scale": 1.0, "window": 2}).reason
        == "`sinks` or `window` given: undocumented"
    )
    assert b.mapping_info()["moe_unpermute"] == {
        "maps_to": ["npu_combine"],
        "source": "",
        "offered": "everywhere",
        "reference_when": [
            {"condition": "no rows", "reason": "no rows"},
            {"condition": "fp16", "reason": "float16 is not supported"},
            {"condition": "wide", "reason": "over 1000 columns"},
        ],
    }


def test_every_implemented_operator_needs_one_mapping_record():
    with pytest.raises(PluginError, match="moe_unpermute: implemented without an OpMapping record"):
        type("Unmapped", (Mapped,), {"mappings": {}})(Lib())
    with pytest.raises(ValueError, match="needs an unconditional fallback"):
        OpMapping("hash_routing")


def test_emulated_twin_spec():
    real, twin = emulated_twin(
        BackendSpec(name="fake", factory="m:Real", device_type="npu", priority=5), emulator_factory="m:Emulated"
    )
    assert real.name == "fake" and not real.emulated
    assert (twin.name, twin.factory, twin.emulated, twin.device_type) == ("fake-emulated", "m:Emulated", True, "npu")
    assert "EMULATED" in twin.description


def test_info_hides_emulated_twins_unless_asked(site, capsys):
    site.install(
        "emu-hal",
        {"emu": "emu_plugin"},
        {
            "emu_plugin": """
        import hal
        from hal.vendor import emulated_twin
        @hal.hookimpl
        def hal_backends():
            return emulated_twin(hal.BackendSpec(name="emu", factory="hal.backends.cpu.backend:CpuBackend",
                                                 device_type="npu"),
                                 emulator_factory="hal.backends.cpu.backend:CpuBackend")
        """
        },
    )
    main(["info", "--json"])
    names = [b["name"] for b in json.loads(capsys.readouterr().out)["backends"]]
    assert "emu" in names and "emu-emulated" not in names
    main(["info"])
    hidden = [
        ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("emulated test doubles (hal info --all): ")
    ]
    assert len(hidden) == 1 and "emu-emulated" in hidden[0].split(": ")[1].split(", ")
    main(["info", "--all", "--json"])
    assert "emu-emulated" in [b["name"] for b in json.loads(capsys.readouterr().out)["backends"]]


def test_conformance_emulate_certifies_the_twin(site, tmp_path, capsys):
    site.install(
        "emu-hal",
        {"emu": "emu_plugin2"},
        {
            "emu_plugin2": """
        import hal
        @hal.hookimpl
        def hal_backends():
            return [hal.BackendSpec(name="emu-emulated", factory="hal.backends.cpu.backend:CpuBackend",
                                    emulated=True)]
        """
        },
    )
    rc = main(
        [
            "conformance",
            "--backend",
            "emu",
            "--emulate",
            "--ops",
            "moe_permute",
            "--profile",
            "quick",
            "--in-process",
            "--report",
            str(tmp_path / "r"),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "emu-emulated" in out and "EMULATED" in out
    assert json.loads((tmp_path / "r" / "report.json").read_text())["meta"]["backend"] == "emu-emulated"
