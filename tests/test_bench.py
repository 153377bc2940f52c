"""``hal bench`` runs end to end on the tiny sizes and writes the figures it prints as JSON. A benchmark,
not a test of speed: no time is asserted, only that every measurement is there and well-formed."""

from __future__ import annotations

import json
import math

import pytest

from hal.cli import main
from hal.contract import all_ops
from hal.registry import registry

OPERATOR_FIGURES = (
    "grouped_gemm",
    "mla_decode absorbed,",
    "mla_decode absorbed vs naive",
    "mla_decode top-k sparse",
    "quantize_fp8",
    "dispatch overhead, quantize_fp8",
    "dispatch overhead, mla_decode",
)


def test_bench_tiny_writes_every_figure(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--size", "tiny", "--no-model", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert (data["backend"], data["size"]) == ("cpu", "tiny")
    assert data["machine"]["cores"] >= 1
    names = [f["name"] for f in data["figures"]]
    for prefix in OPERATOR_FIGURES:
        assert any(n.startswith(prefix) for n in names), (prefix, names)
    assert set(all_ops()) <= {n.split()[0] for n in names}  # every operator of the contracts has a figure
    for f in data["figures"] + [f for axis in data["scaling"].values() for f in axis]:
        assert f["ratio_min"] <= f["ratio"] <= f["ratio_max"], f
        assert math.isfinite(f["ratio"]) and f["op_ms"] > 0 and f["limit"], f
    assert any(n.startswith("mla_decode absorbed") and n.endswith("batch of 4") for n in names)
    assert sorted(data["scaling"]) == ["context", "experts", "tokens"]
    assert all(len(figures) == 2 for figures in data["scaling"].values())
    dispatch = [f for f in data["figures"] if f["name"].startswith("dispatch overhead")]
    assert all({"validation_us", "checked_mode_us"} <= set(f["extra"]) for f in dispatch)
    assert "bench-null" not in registry().entries  # its no-op backend is gone when the bench is done
    printed = capsys.readouterr().out
    assert all(name in printed for name in names)  # the report prints what the JSON holds


def test_bench_skips_what_the_backend_does_not_serve_and_says_why(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "--size", "tiny", "--no-model", "--backend", "ascend-emulated", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    names = [f["name"] for f in data["figures"]]
    assert not any(n.startswith("quantize_fp8") for n in names)  # no FP8 on an Atlas A2
    assert any("quantize_fp8" in note and "does not" in note for note in data["notes"]), data["notes"]
    assert any(n.startswith("grouped_gemm") for n in names) and any(n.startswith("mla_decode") for n in names)


def test_bench_model_compares_tiny_v3_and_v4_with_transformers():
    pytest.importorskip("transformers")
    from hal.bench import SIZES, bench_model

    for arch, name, targets in (
        ("deepseek_v3", "tiny V3", [">= 3", ">= 10"]),
        ("deepseek_v4", "tiny V4", [None, None]),
    ):
        notes = []
        figures = bench_model(SIZES["tiny"], "cpu", notes, arch)
        assert [f.name for f in figures] == [f"{name} prefill at 32 context", f"{name} decode at 32 context"]
        assert [f.target for f in figures] == targets  # V3 has stated targets; V4 is reported beside
        for f in figures:
            assert (
                f.limit.startswith("transformers")
                and arch.replace("_v", "V").replace("deepseek", "Deepseek") in f.limit
            ), f.limit
            assert f.ratio_min <= f.ratio <= f.ratio_max and f.ratio > 0
            assert isinstance(f.extra["identical_greedy_tokens"], bool)
            assert f.extra["identical_greedy_tokens"] or len(f.extra["first_difference"]) == 4
            assert f.extra["tokens_per_s"] > 0 and f.extra["peer_tokens_per_s"] > 0
        assert not notes


def test_bench_model_without_the_architecture_in_transformers_says_so(monkeypatch):
    transformers = pytest.importorskip("transformers")
    from hal.bench import SIZES, bench_model

    def unknown(*args, **kwargs):
        raise ValueError("model type `deepseek_v4` is not recognised")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", unknown)
    notes = []
    figures = bench_model(SIZES["tiny"], "cpu", notes, "deepseek_v4")
    assert [f.name for f in figures] == [f"tiny V4 {phase} tokens/s at 32 context" for phase in ("prefill", "decode")]
    assert all(f.ratio > 0 and f.limit == "(no peer measured)" for f in figures)
    assert len(notes) == 1 and "cannot load the tiny V4 checkpoint" in notes[0] and "not recognised" in notes[0]
