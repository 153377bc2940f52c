"""The Cambricon MLU backend over its test double (TmoTestDouble, a CPU stand-in for torch_mlu_ops; the
results are EMULATED, not hardware): availability reasons, device capability, tmo version drift, the
double's refusals, the index conversions and which path served each call."""

from __future__ import annotations

import inspect

import pytest
import torch

import hal
from hal.backends.mlu.backend import MluBackend
from hal.backends.mlu.tmo_api import TmoVersionError, detect
from hal.backends.mlu.tmo_double import TMO_VERSIONS, Tmo1_12TestDouble, _parse_emulation, tmo_test_double
from hal.conformance.core import cells, run_cell
from hal.errors import ConfigError
from hal.ops.quant import quantize_fp8, quantize_fp8_weight
from hal.vendor import EmulatorRefusal

OLD, NEW = TMO_VERSIONS


def mlu(version=NEW, capability=(5, 0), quant=None, tmo_topk=True) -> MluBackend:
    return MluBackend(lib=tmo_test_double(version, capability), quant=quant, tmo_topk=tmo_topk)


def reference(op, *args, **kwargs):
    return hal.ops.__dict__[op].reference_impl(*args, **kwargs)


# -- availability -------------------------------------------------------------------------------


def test_unavailable_without_torch_mlu_ops():
    a = MluBackend().probe()
    assert not a.available
    assert a.reason.startswith(
        "torch_mlu_ops is not installed (Cambricon ships torch_mlu and torch_mlu_ops as wheels, not on PyPI"
    )


def test_unavailable_when_neuware_libraries_are_missing(site):
    site.install("tmo", {}, {"torch_mlu_ops": "raise ImportError('libcnnl.so: cannot open shared object file')"})
    a = MluBackend().probe()
    assert not a.available and "libcnnl.so" in a.reason and "NEUWARE_HOME" in a.reason


def test_unavailable_without_a_visible_mlu(site, monkeypatch):
    site.install("tmo", {}, {"torch_mlu_ops": "", "torch_mlu": ""})
    monkeypatch.setattr(torch, "mlu", type("Mlu", (), {"device_count": staticmethod(lambda: 0)}), raising=False)
    a = MluBackend().probe()
    assert not a.available and a.reason == "torch_mlu_ops imported but no MLU is visible"


def test_emulated_twin_is_labelled_and_reports_versions_and_capability(monkeypatch):
    monkeypatch.setenv("HAL_MLU_EMULATE", "tmo=1.6.0,capability=6.0")
    backend = hal.registry.registry().backend("mlu-emulated")
    assert backend.emulated and backend.probe().reason.startswith("EMULATED: torch_mlu_ops 1.6.0")
    v = backend.versions()
    assert v["torch_mlu_ops"].startswith("1.6.0") and v["device"] == "MLU 6xx (capability 6.0)"
    assert v["quantization"].startswith("dequantise-on-load") and "1.6.0" in v["quantization"]


def test_emulation_setting_is_checked():
    assert _parse_emulation("capability=6.1") == (NEW, (6, 1))
    with pytest.raises(ConfigError, match="tmo=1.9.0 is not emulated"):
        _parse_emulation("tmo=1.9.0")


# -- capability and quantisation --------------------------------------------------------------------


def fp8_operands(m=3, n=130, k=256):
    torch.manual_seed(0)
    a, a_scale = quantize_fp8.reference_impl(torch.randn(m, k))
    b, b_scale = quantize_fp8_weight.reference_impl(torch.randn(n, k))
    return a, a_scale, b, b_scale


@pytest.mark.parametrize(
    "capability, version, path",
    [
        ((5, 0), NEW, "matmul(dequantized)"),  # MLU590: no FP8 compute
        ((6, 0), NEW, "scaled_matmul"),  # FP8-capable device, 1.12.1 API
        ((6, 0), OLD, "matmul(dequantized)"),  # FP8-capable device, but 1.6 has no scaled_matmul
    ],
)
def test_fp8_gemm_path_follows_capability_and_version(capability, version, path):
    b = mlu(version, capability)
    args = fp8_operands()
    y = b.fp8_gemm(*args)
    expected = reference("fp8_gemm", *args, compute_dtype=torch.float64)
    assert b.paths == {("fp8_gemm", path): 1}
    assert torch.allclose(y.double(), expected, rtol=2**-7, atol=1e-3)


def test_quant_setting_fp8_on_a_device_without_fp8_offers_no_fp8_operators():
    b = mlu(capability=(5, 0), quant="fp8")
    caps = b.capabilities()
    assert "fp8_gemm" not in caps and "float8_e4m3fn" not in caps["grouped_gemm"].axes["x_dtype"]
    assert "FP8 operators not offered (capability 5.0 < 6" in b.quantization()
    assert "fp8_gemm" in mlu(capability=(6, 0), quant="fp8").capabilities()
    with pytest.raises(ConfigError, match="HAL_MLU_QUANT='int4'"):
        mlu(quant="int4")


def test_fp8_grouped_gemm_converts_activation_scales_for_tmo():
    b = mlu(capability=(6, 0))
    a, a_scale, _, _ = fp8_operands(m=5)
    w_pairs = [quantize_fp8_weight.reference_impl(torch.randn(40, 256)) for _ in range(2)]
    w, w_scale = torch.stack([p[0] for p in w_pairs]), torch.stack([p[1] for p in w_pairs])
    sizes = torch.tensor([2, 3], dtype=torch.int32)
    y = b.grouped_gemm(a, w, sizes, x_scale=a_scale, w_scale=w_scale)
    expected = reference("grouped_gemm", a, w, sizes, x_scale=a_scale, w_scale=w_scale, compute_dtype=torch.float64)
    assert b.paths == {("grouped_gemm", "smooth_quant_group_gemm"): 1}
    assert torch.allclose(y.double(), expected, rtol=2**-7, atol=1e-2)


# -- tmo version drift --------------------------------------------------------------------------


@pytest.mark.parametrize("version", TMO_VERSIONS)
def test_grouped_gemm_with_a_wider_output_adapts_to_each_release(version):
    b = mlu(version)
    torch.manual_seed(0)
    x, w = torch.randn(5, 16).bfloat16(), torch.randn(2, 8, 16).bfloat16()
    sizes = torch.tensor([1, 4], dtype=torch.int64)
    y = b.grouped_gemm(x, w, sizes, out_dtype=torch.float32)
    expected = reference("grouped_gemm", x, w, sizes, out_dtype=torch.float32)
    assert y.dtype == torch.float32 and torch.allclose(y, expected, rtol=1e-6, atol=1e-6)
    assert b.paths == {("grouped_gemm", "group_gemm"): 1}
    assert ("output_dtype" in inspect.signature(b.lib.group_gemm).parameters) == (version == NEW)


def test_release_older_than_vllm_mlu_minimum_is_refused_by_name():
    lib = tmo_test_double()
    lib.__version__ = "1.5.2+torch2.4.0"
    a = MluBackend(lib=lib).probe()
    assert not a.available and a.reason.startswith("torch_mlu_ops 1.5.2+torch2.4.0 is too old")


def test_changed_signature_is_refused_naming_version_and_parameter():
    class Drifted(Tmo1_12TestDouble):
        def single_query_cached_kv_attn(
            self,
            q,
            k_cache,
            v_cache,
            out,
            block_tables,
            context_lens,
            k_scale,
            v_scale,
            alibi,
            max_len,
            left,
            right,
            softmax_scale,
            return_lse=False,
            out_dtype=torch.half,
            compute_dtype=torch.float,
        ):
            raise AssertionError("never called")

    lib = Drifted((5, 0))
    lib.__version__ = "1.13.0"
    with pytest.raises(
        TmoVersionError, match=r"torch_mlu_ops 1.13.0: single_query_cached_kv_attn.*lacks 'head_size_v'"
    ):
        detect(lib)
    assert "lacks 'head_size_v'" in MluBackend(lib=lib).probe().reason


# -- the double's refusals, and the backend routing around them -----------------------------------


def test_double_refuses_sigmoid_topk_with_bias_and_one_group_and_backend_takes_reference():
    b = mlu()
    logits, bias = torch.randn(4, 16), torch.randn(16)
    with pytest.raises(EmulatorRefusal, match="expert_group=1 with score_bias"):
        b.lib.moe_sigmoid_topk(logits, 2, score_bias=bias)
    w, ids = b.topk_routing(logits, 2, scoring="sigmoid", bias=bias)
    ew, eids = reference("topk_routing", logits, 2, scoring="sigmoid", bias=bias)
    assert torch.equal(ids, eids) and torch.equal(w, ew)
    assert b.paths == {("topk_routing", "reference"): 1}


def test_double_refuses_decode_block_sizes_and_fp8_without_fp8_device():
    lib = tmo_test_double()
    q, cache = torch.randn(1, 1, 2, 8), torch.randn(2, 1, 3, 8)
    table, lens = torch.zeros(1, 1, dtype=torch.int32), torch.tensor([2], dtype=torch.int32)
    with pytest.raises(EmulatorRefusal, match="block_size must be one of"):
        lib.single_query_cached_kv_attn(
            q, cache, None, None, table, lens, None, None, None, 3, -1, -1, 0.5, head_size_v=4
        )
    with pytest.raises(EmulatorRefusal, match="capability >= 6, this one is 5.x"):
        lib.scaled_matmul(*fp8_operands(), torch.bfloat16)
    with pytest.raises(EmulatorRefusal, match="not in torch_mlu_ops 1.6"):
        tmo_test_double(OLD, (6, 0)).smooth_quant_group_gemm(*[None] * 11)


@pytest.mark.parametrize("version", TMO_VERSIONS)
def test_routing_paths(version):
    b = mlu(version)
    torch.manual_seed(1)
    logits, bias = torch.randn(6, 32), torch.randn(32)
    cases = [  # (kwargs, path)
        (dict(scoring="sigmoid", bias=bias, n_group=4, topk_group=2, renormalize=True, scale=2.5), "moe_sigmoid_topk"),
        (dict(scoring="softmax", renormalize=True), "moe_softmax_topk"),
        (dict(scoring="softmax", n_group=4, topk_group=2), "reference"),  # dropped groups filled with 0.0
        (dict(scoring="sqrtsoftplus"), "reference"),
    ]
    for kwargs, path in cases:
        b.paths.clear()
        w, ids = b.topk_routing(logits, 4, **kwargs)
        ew, eids = reference("topk_routing", logits, 4, **kwargs)
        order, eorder = ids.sort(-1), eids.sort(-1)  # a row's pairs are a set
        assert torch.equal(order.values, eorder.values)
        assert torch.allclose(w.gather(-1, order.indices), ew.gather(-1, eorder.indices), rtol=2**-17)
        assert b.paths == {("topk_routing", path): 1}, kwargs
    assert b.fallbacks == {("topk_routing", "softmax groups"): 1, ("topk_routing", "sqrtsoftplus"): 1}


def test_topk_takes_the_reference_path_unless_enabled_and_the_double_breaks_ties_like_torch_topk():
    logits = torch.ones(1, 6)  # an exact tie: the contract picks expert 0
    b = mlu(tmo_topk=False)
    assert b.topk_routing(logits, 1, scoring="sigmoid")[1].tolist() == [[0]]
    assert b.paths == {("topk_routing", "reference"): 1} and "reference path" in b.versions()["top-k routing"]
    _, ids = mlu().topk_routing(logits, 1, scoring="sigmoid")
    assert ids.tolist() != [[0]]  # why it is off by default: tmo documents no tie rule


def test_renormalisation_keeps_the_contract_epsilon():
    b = mlu()
    logits = torch.full((1, 8), -80.0)  # sigmoid scores ~1.8e-35: the 1e-20 of the contract dominates the sum
    w, _ = b.topk_routing(logits, 2, scoring="sigmoid", renormalize=True)
    assert torch.equal(w, reference("topk_routing", logits, 2, scoring="sigmoid", renormalize=True)[0])
    assert float(w.sum()) < 1e-10


# -- index conventions and cache layout ---------------------------------------------------------------


def test_permute_and_combine_convert_tmo_indices_to_the_contract():
    b = mlu()
    torch.manual_seed(2)
    x, ids = torch.randn(5, 8), torch.randint(0, 4, (5, 3), dtype=torch.int64)
    x_sorted, perm = b.moe_permute(x, ids, 4)
    ex, eperm = reference("moe_permute", x, ids, 4)
    assert torch.equal(x_sorted, ex)
    for got, want in zip(perm, eperm):
        assert torch.equal(got, want)
    weights = torch.rand(5, 3)
    out = b.moe_unpermute(x_sorted, weights, perm)
    assert torch.allclose(out, reference("moe_unpermute", ex, weights, eperm), rtol=1e-6, atol=1e-6)
    assert set(b.paths) == {("moe_permute", "moe_gen_idx+moe_expand_input"), ("moe_unpermute", "moe_combine_result")}
    assert b.lib.calls == ["moe_gen_idx", "moe_expand_input", "moe_combine_result"]


def test_decode_uses_the_shared_latent_cache_and_fixes_empty_sequences():
    b = mlu()
    torch.manual_seed(3)
    cache = torch.randn(4, 16, 40)
    kv = torch.randn(3, 40)
    b.paged_cache_write(cache, kv, torch.tensor([17, -1, 2], dtype=torch.int64))
    assert torch.equal(cache[1, 1], kv[0]) and torch.equal(cache[0, 2], kv[2])
    q = torch.randn(3, 1, 2, 40)
    table = torch.tensor([[1, 0], [3, -1], [2, -1]], dtype=torch.int32)
    lens = torch.tensor([20, 0, 5], dtype=torch.int32)
    out, lse = b.mla_decode(q, cache, table, lens, softmax_scale=0.1, head_dim_v=32)
    eout, e_lse = reference("mla_decode", q, cache, table, lens, softmax_scale=0.1, head_dim_v=32)
    assert torch.allclose(out, eout, atol=1e-5) and torch.allclose(lse, e_lse, atol=1e-5)
    assert bool((out[1] == 0).all()) and bool((lse[1] == float("-inf")).all())
    assert b.paths == {
        ("paged_cache_write", "reshape_paged_cache"): 1,
        ("mla_decode", "single_query_cached_kv_attn"): 1,
    }
    b.mla_decode(q.expand(3, 2, 2, 40), cache, table, lens.clamp_min(2), softmax_scale=0.1)  # Sq = 2
    assert b.paths[("mla_decode", "reference")] == 1


def test_prefill_maps_to_flash_attention_and_chunked_prefill_to_reference():
    b = mlu()
    torch.manual_seed(4)
    q, k, v = torch.randn(7, 4, 24), torch.randn(7, 2, 24), torch.randn(7, 2, 16)
    cu = torch.tensor([0, 3, 3, 7], dtype=torch.int32)
    out, lse = b.mla_prefill(q, k, v, cu, softmax_scale=0.3)
    eout, e_lse = reference("mla_prefill", q, k, v, cu, softmax_scale=0.3)
    assert torch.allclose(out, eout, atol=1e-5) and torch.allclose(lse, e_lse, atol=1e-5)
    b.mla_prefill(q, k, v, cu, cu, softmax_scale=0.3)
    assert b.paths == {("mla_prefill", "flash_attention"): 1, ("mla_prefill", "reference"): 1}


# -- conformance through the emulated twin -----------------------------------------------------------


@pytest.mark.parametrize(
    "emulate, ops",
    [
        (
            "tmo=1.12.1,capability=6.0",
            ("fp8_gemm", "grouped_gemm", "moe_permute", "moe_unpermute", "paged_cache_write"),
        ),
        ("tmo=1.6.0,capability=5.0", ("topk_routing", "fp8_gemm", "grouped_gemm", "mla_decode")),
    ],
)
def test_conformance_cells_pass_through_the_emulated_twin(monkeypatch, emulate, ops):
    monkeypatch.setenv("HAL_MLU_EMULATE", emulate)
    for op in ops:
        for features in cells(op)[::3]:  # a third of the cells, spread over the feature axes
            r = run_cell("mlu-emulated", op, features, profile="quick", seed=0)
            assert r.status == "pass", (r.id, r.message, r.minimal_example)


# -- W8A8 int8 ---------------------------------------------------------------------------------------


def int8_operands(m=6, n=40, k=96, groups=2):
    torch.manual_seed(3)
    x = torch.randn(m, k, dtype=torch.bfloat16)
    x[0] = 0  # tmo documents no amax floor: the backend applies the contract's
    w_q, w_s = hal.ops.quantize_int8_weight(torch.randn(groups, n, k))
    return x, w_q, w_s


@pytest.mark.parametrize("capability", [(5, 0), (3, 0)])
def test_int8_runs_on_tmo_kernels_on_devices_without_fp8(capability):
    b = mlu(NEW, capability, quant="fp8")
    axes = b.capabilities()["grouped_gemm"].axes
    assert "int8" in axes["x_dtype"] and "int8" in axes["w_dtype"] and "float8_e4m3fn" not in axes["x_dtype"]
    x, w_q, w_s = int8_operands()
    q, s = b.quantize_int8(x)
    ref_q, ref_s = reference("quantize_int8", x)
    assert (q.int() - ref_q.int()).abs().max() <= 1 and torch.allclose(s, ref_s, rtol=2**-23, atol=0)
    assert float(s[0]) > 0 and not q[0].any()  # the all-zero row: the contract's floored scale
    y = b.int8_gemm(q, s, w_q[0], w_s[0])
    assert torch.allclose(
        y.double(), reference("int8_gemm", q, s, w_q[0], w_s[0], compute_dtype=torch.float64), rtol=2**-7, atol=0
    )
    sizes = torch.tensor([2, 4], dtype=torch.int32)
    y = b.grouped_gemm(q, w_q, sizes, x_scale=s, w_scale=w_s)
    expected = reference("grouped_gemm", q, w_q, sizes, x_scale=s, w_scale=w_s, compute_dtype=torch.float64)
    assert torch.allclose(y.double(), expected, rtol=2**-7, atol=1e-6)
    assert b.paths == {
        ("quantize_int8", "scaled_quantize"): 1,
        ("int8_gemm", "scaled_matmul"): 1,
        ("grouped_gemm", "smooth_quant_group_gemm(int8)"): 1,
    }


def test_int8_on_tmo_1_6_quantises_and_multiplies_on_the_reference_path_but_groups_on_tmo():
    b = mlu(OLD)
    x, w_q, w_s = int8_operands()
    q, s = b.quantize_int8(x)
    b.int8_gemm(q, s, w_q[0], w_s[0])
    b.grouped_gemm(q, w_q, torch.tensor([6, 0], dtype=torch.int32), x_scale=s, w_scale=w_s)
    assert b.paths == {
        ("quantize_int8", "reference"): 1,
        ("int8_gemm", "reference"): 1,
        ("grouped_gemm", "smooth_quant_group_gemm(int8)"): 1,
    }
    assert b.fallbacks == {("quantize_int8", "tmo 1.6"): 1, ("int8_gemm", "tmo 1.6"): 1}
