"""The Ascend backend: availability reasons, SoC detection, the norm_type constant, the torch_npu TEST
DOUBLE's documented refusals, and which torch_npu operator (or the reference path) serves each request,
with results checked against the contract's reference under its tolerance."""

from __future__ import annotations

import json

import pytest
import torch

import hal
from hal.backends.ascend.backend import FP8_OPS, NORM_TYPE_SIGMOID, AscendBackend, soc_generation
from hal.backends.ascend.torch_npu_double import TorchNpuTestDouble, emulated_950, emulated_a2
from hal.cli import main
from hal.numerics import compare
from hal.ops.mla import MLA_TOLERANCE, attention_error_n
from hal.vendor import EmulatorRefusal

GMM, GATING, INIT_ROUTING, UNPERMUTE, FIA = (
    "npu_grouped_matmul",
    "npu_moe_gating_top_k",
    "npu_moe_init_routing_v2",
    "npu_moe_token_unpermute",
    "npu_fused_infer_attention_score",
)


def fake_torch_npu(site, source: str) -> None:
    site.install("torch-npu", {}, {"torch_npu": source})


# ------------------------------------------------------------------ availability and detection


def test_unavailable_when_torch_npu_is_not_installed():
    a = AscendBackend().probe()
    assert not a.available and a.reason.startswith("torch_npu is not installed (")
    assert "xpu-hal[ascend]" in a.reason


def test_unavailable_when_cann_libraries_are_missing(site):
    fake_torch_npu(site, "raise ImportError('libhccl.so: cannot open shared object file: No such file or directory')")
    a = AscendBackend().probe()
    assert not a.available and "libhccl.so" in a.reason
    assert "source /usr/local/Ascend/ascend-toolkit/set_env.sh" in a.reason


def test_unavailable_when_no_npu_is_visible(site):
    fake_torch_npu(
        site,
        "from types import SimpleNamespace\n"
        "npu = SimpleNamespace(device_count=lambda: 0, get_soc_version=lambda: 223)\n",
    )
    a = AscendBackend().probe()
    assert not a.available and a.reason == "torch_npu imported but no NPU is visible"


def test_soc_generation_table():
    assert [soc_generation(v) for v in (220, 225, 250, 255, 260, 202)] == [
        "Atlas A2",
        "Atlas A2",
        "Atlas A3",
        "Atlas A3",
        "Ascend 950",
        "Atlas 310P",
    ]
    assert soc_generation(999) == "unknown SoC 999"


def test_detected_soc_decides_availability_and_fp8_capabilities(site):
    fake_torch_npu(
        site,
        "from types import SimpleNamespace\n__version__ = '2.10.0.post4'\n"
        "npu = SimpleNamespace(device_count=lambda: 8, get_soc_version=lambda: 253)\n",
    )
    a3 = AscendBackend()
    assert a3.probe().available and a3.versions()["SoC"] == "Atlas A3 (get_soc_version 253)"
    caps = a3.capabilities()
    assert not set(FP8_OPS) & set(caps)
    assert "float8_e4m3fn" not in caps["grouped_gemm"].axes["x_dtype"]
    assert set(FP8_OPS) <= set(emulated_950().capabilities())
    assert "fp4_e2m1" not in emulated_a2().capabilities()["grouped_gemm"].axes["w_dtype"]


def test_unsupported_soc_is_unavailable_with_its_name():
    backend = AscendBackend(TorchNpuTestDouble("310p"))
    backend.emulated = False  # judge it as the real backend would be on that SoC
    a = backend.probe()
    assert not a.available and "Atlas 310P (get_soc_version 202)" in a.reason


def test_info_lists_the_backend_and_its_emulated_twins(capsys):
    main(["info", "--all", "--json"])
    backends = {b["name"]: b for b in json.loads(capsys.readouterr().out)["backends"]}
    assert backends["ascend"]["reason"].startswith("torch_npu is not installed")
    assert backends["ascend-emulated"]["available"] and backends["ascend-emulated"]["emulated"]
    assert backends["ascend-emulated"]["reason"].startswith("EMULATED")
    assert "fp8_gemm" in backends["ascend-950-emulated"]["operators"]
    assert "fp8_gemm" in backends["ascend-emulated"]["missing"]
    gmm = backends["ascend-emulated"]["mappings"]["grouped_gemm"]
    assert (
        gmm["maps_to"] == [GMM]
        and {"condition": "groups", "reason": "> 1024 groups: GMM's group_list limit"} in gmm["reference_when"]
    )
    assert "fp8_gemm" not in backends["ascend-emulated"]["mappings"]
    assert backends["ascend-950-emulated"]["mappings"]["fp8_gemm"]["maps_to"] == []


# ------------------------------------------------------------------ norm_type and the double's refusals


def test_norm_type_for_sigmoid_is_1_and_the_double_scores_it_with_sigmoid():
    assert NORM_TYPE_SIGMOID == 1
    x = torch.randn(4, 16)
    w, ids, norm = TorchNpuTestDouble().npu_moe_gating_top_k(x, 16, norm_type=NORM_TYPE_SIGMOID, out_flag=True)
    assert torch.allclose(norm, x.sigmoid())
    assert torch.allclose(w, x.sigmoid().gather(1, ids.long()) / x.sigmoid().sum(-1, keepdim=True))
    assert ids.dtype == torch.int32


@pytest.mark.parametrize(
    "call, why",
    [
        (
            lambda d: d.npu_grouped_matmul(
                [torch.ones(2, 4)],
                [torch.ones(1, 4, 3, dtype=torch.bfloat16)],
                group_list=torch.tensor([2]),
                group_type=0,
                split_item=2,
            ),
            "dtypes",
        ),
        (
            lambda d: d.npu_grouped_matmul(
                [torch.ones(2, 4)],
                [torch.ones(1, 4, 3)],
                group_list=torch.tensor([2]),
                group_list_type=1,
                group_type=0,
                split_item=2,
                output_dtype=torch.float16,
            ),
            "output_dtype",
        ),
        (lambda d: d.npu_moe_gating_top_k(torch.randn(2, 16), 2, renorm=1, norm_type=1), "renorm"),
        (
            lambda d: d.npu_moe_gating_top_k(torch.randn(2, 16), 2, bias=torch.zeros(16, dtype=torch.bfloat16)),
            "bias must be",
        ),
        (lambda d: d.npu_moe_gating_top_k(torch.randn(2, 16), 2, group_count=8, k_group=2), "groups of more than 2"),
        (lambda d: d.npu_moe_gating_top_k(torch.randn(2, 4096), 2), "<= 2048"),
        (lambda d: _fia_decode(d, heads=3), "num_heads 3"),
        (lambda d: _fia_decode(d, block=64), "block_size 128"),
        (lambda d: _fia_decode(d, softmax_lse_flag=True), "no softmax_lse"),
        (lambda d: _fia_decode(d, sparse_mode=3, atten_mask=torch.ones(16, 16, dtype=torch.bool).triu(1)), "2048"),
        (
            lambda d: d.npu_fused_infer_attention_score(
                torch.ones(2, 1, 128, dtype=torch.float16),
                torch.ones(2, 1, 128, dtype=torch.float16),
                torch.ones(2, 1, 128, dtype=torch.float16),
                query_rope=torch.ones(2, 1, 64, dtype=torch.float16),
                key_rope=torch.ones(2, 1, 64, dtype=torch.float16),
                num_heads=1,
                input_layout="TND",
                actual_seq_lengths=[2],
                actual_seq_lengths_kv=[2],
            ),
            "bfloat16 only",
        ),
    ],
)
def test_the_double_refuses_what_the_documentation_rules_out(call, why):
    with pytest.raises(EmulatorRefusal, match=why):
        call(TorchNpuTestDouble())


def _fia_decode(double, heads=4, block=128, **kw):
    bf = dict(dtype=torch.bfloat16)
    latent = torch.ones(2, block, 512, **bf)
    return double.npu_fused_infer_attention_score(
        torch.ones(1, 1, heads, 512, **bf),
        latent,
        latent,
        query_rope=torch.ones(1, 1, heads, 64, **bf),
        key_rope=torch.ones(2, block, 64, **bf),
        num_heads=heads,
        num_key_value_heads=1,
        input_layout="BSND",
        block_table=torch.zeros(1, 1, dtype=torch.int32),
        block_size=block,
        actual_seq_lengths_kv=[3],
        **kw,
    )


# ------------------------------------------------------------------ which path serves which request


def served(backend, op):
    return {path: n for (o, path), n in backend.paths.items() if o == op}


def assert_matches_reference(op, output, args, kwargs, tolerance_key, **compare_kw):
    exact = hal.ops.__dict__[op].reference_impl(*args, **kwargs, compute_dtype=torch.float64)
    outputs = output if isinstance(output, tuple) else (output,)
    exacts = exact if isinstance(exact, tuple) else (exact,)
    tol = hal.ops.__dict__[op].tolerance[tolerance_key]
    for got, want in zip(outputs, exacts):
        if got.is_floating_point():
            c = compare(got.double(), want.double(), tol, **compare_kw)
            assert c.ok, str(c)
        else:
            assert torch.equal(got, want)


def test_grouped_gemm_maps_to_gmm_with_the_transposed_weight_view():
    b = emulated_a2()
    x, w = torch.randn(7, 32, dtype=torch.bfloat16), torch.randn(3, 5, 32, dtype=torch.bfloat16)
    sizes = torch.tensor([2, 0, 5], dtype=torch.int32)
    assert_matches_reference(
        "grouped_gemm",
        b.grouped_gemm(x, w, sizes),
        (x, w, sizes),
        {},
        "bfloat16",
        n=32,
        magnitude=hal.ops.grouped_gemm.reference_impl(x.abs(), w.abs(), sizes, compute_dtype=torch.float64),
    )
    xm = torch.randn(3, 4, 32, dtype=torch.bfloat16)
    assert b.grouped_gemm(xm, w, sizes.clamp(max=4), layout="masked").shape == (3, 4, 5)
    b.grouped_gemm(x, w, sizes, out_dtype=torch.float32)  # GMM's output dtype is x's: reference path
    assert served(b, "grouped_gemm") == {GMM: 2, "reference": 1} and b.fallbacks == {("grouped_gemm", "out_dtype"): 1}
    assert b.lib.calls == [GMM, GMM]


def test_topk_routing_uses_the_kernel_only_where_its_semantics_equal_the_contract():
    b = emulated_a2()
    logits, bias = torch.randn(5, 64, dtype=torch.bfloat16), torch.randn(64) - 1.0  # negative choices: -inf masking
    kw = dict(scoring="sigmoid", bias=bias, n_group=8, topk_group=3, renormalize=True, scale=2.5)
    assert_matches_reference(
        "topk_routing",
        b.topk_routing(logits, 6, **kw),
        (logits, 6),
        kw,
        "sigmoid",
        n=7,
        magnitude=torch.full((5, 6), 2.5),
    )
    assert served(b, "topk_routing") == {GATING: 1}
    for other in (
        dict(kw, renormalize=False),
        dict(kw, scoring="softmax", bias=None),
        dict(kw, scoring="sqrtsoftplus"),
        dict(kw, n_group=32, topk_group=8),
    ):  # 32 groups of 2
        b.topk_routing(logits, 6, **other)
    assert served(b, "topk_routing") == {GATING: 1, "reference": 4}
    assert set(b.fallbacks) == {
        ("topk_routing", why) for why in ("no renormalisation", "softmax", "sqrtsoftplus", "small groups")
    }


def test_permute_and_combine_map_to_init_routing_v2_and_token_unpermute():
    b = emulated_a2()
    x, ids = torch.randn(6, 8, dtype=torch.float16), torch.tensor([[3, 0], [0, 1], [3, 2], [1, 0], [2, 3], [0, 3]])
    x_sorted, perm = b.moe_permute(x, ids, 4)
    want_x, want_perm = hal.ops.moe_permute.reference_impl(x, ids, 4)
    assert torch.equal(x_sorted, want_x) and all(torch.equal(g, w) for g, w in zip(perm, want_perm))
    y, weights = torch.randn(12, 5, dtype=torch.bfloat16), torch.rand(6, 2)
    out = b.moe_unpermute(y, weights, perm)
    assert_matches_reference(
        "moe_unpermute",
        out,
        (y, weights, perm),
        {},
        "bfloat16",
        n=2,
        magnitude=hal.ops.moe_unpermute.reference_impl(y.abs(), weights, perm, compute_dtype=torch.float64),
    )
    b.moe_permute(x[:0], ids[:0], 4)  # no tokens: undocumented for the kernel, reference path
    assert served(b, "moe_permute") == {INIT_ROUTING: 1, "reference": 1}
    assert served(b, "moe_unpermute") == {UNPERMUTE: 1}


def _paged(batch_lens, block_size, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    blocks = sum(-(-n // block_size) for n in batch_lens) + 2
    cache = torch.randn(blocks, block_size, d, generator=g).to(dtype)
    cache[-1] = float("nan")  # garbage in a block no sequence uses
    per = max(-(-n // block_size) for n in batch_lens) or 1
    table = torch.full((len(batch_lens), per), -1, dtype=torch.int32)
    order = torch.randperm(blocks - 1, generator=g).tolist()
    for b, n in enumerate(batch_lens):
        for j in range(-(-n // block_size)):
            table[b, j] = order.pop()
    return cache, table, torch.tensor(batch_lens, dtype=torch.int32)


def _check_attention(op, output, args, kwargs, keys, values, num_keys):
    q = args[0]
    n = attention_error_n(q, keys, softmax_scale=kwargs["softmax_scale"], num_keys=num_keys)
    exact_out, exact_lse = hal.ops.__dict__[op].reference_impl(*args, **kwargs, compute_dtype=torch.float64)
    out, lse = output
    assert out.dtype == q.dtype and out.shape == exact_out.shape
    # a loose magnitude (max |value|): enough to catch a wrong mask, head or scale
    mag = torch.full_like(exact_out, float(values.double().abs().max()))
    assert compare(out.double(), exact_out, MLA_TOLERANCE[str(q.dtype)[6:]], n=n, magnitude=mag).ok
    assert torch.equal(lse.isinf(), exact_lse.isinf())
    finite = ~exact_lse.isinf()
    assert compare(
        lse[finite].double(), exact_lse[finite], MLA_TOLERANCE["lse"], n=n, magnitude=torch.ones_like(exact_lse[finite])
    ).ok


def test_mla_decode_pads_heads_and_repages_the_cache_for_fia():
    b = emulated_a2()
    cache, table, lens = _paged([37, 0, 130], block_size=16, d=576, dtype=torch.bfloat16)
    q = torch.randn(3, 2, 3, 576, dtype=torch.bfloat16) * 0.05  # 3 heads -> padded to 4, Sq 2 -> causal mask
    kw = dict(softmax_scale=0.1, causal=True)
    _check_attention(
        "mla_decode",
        b.mla_decode(q, cache, table, lens, **kw),
        (q, cache, table, lens),
        kw,
        cache[:-1],
        cache[:-1, :, :512],
        130,
    )
    assert served(b, "mla_decode") == {FIA: 1}
    b.mla_decode(q.float(), cache.float(), table, lens, **kw)  # fp32: FIA takes fp16/bf16 only
    b.mla_decode(q[..., :64], cache[..., :64], table, lens, head_dim_v=32, **kw)  # not DeepSeek's 512 + 64
    b.mla_decode(q, cache, table, lens, window=4, **kw)
    assert served(b, "mla_decode") == {FIA: 1, "reference": 3}


def test_mla_prefill_maps_to_fia_tnd_and_fixes_rows_attending_nothing():
    b = emulated_a2()
    g = torch.Generator().manual_seed(1)
    cu_q, cu_k = torch.tensor([0, 3, 3, 7], dtype=torch.int32), torch.tensor([0, 0, 4, 6], dtype=torch.int32)
    q = (torch.randn(7, 2, 192, generator=g) * 0.1).bfloat16()
    k, v = torch.randn(6, 2, 192, generator=g).bfloat16(), torch.randn(6, 2, 128, generator=g).bfloat16()
    kw = dict(softmax_scale=0.2, causal=True)  # sequence 0 has no keys; sequence 2's first 2 queries see none
    out = b.mla_prefill(q, k, v, cu_q, cu_k, **kw)
    _check_attention("mla_prefill", out, (q, k, v, cu_q, cu_k), kw, k, v, 2)
    assert int(out[1].isinf().sum()) == 2 * 3 + 2 * 2 and not out[0].isnan().any()
    b.mla_prefill(q.half(), k.half(), v.half(), cu_q, cu_k, **kw)  # TND takes bf16 only
    assert served(b, "mla_prefill") == {FIA: 1, "reference": 1}


def test_reference_only_operators_are_recorded():
    b = emulated_950()
    kv, slots = torch.zeros(2, 4, 8), torch.tensor([5, -1])
    b.implementation("paged_cache_write")(kv, torch.ones(2, 8), slots)
    assert kv.view(-1, 8)[5].eq(1).all() and served(b, "paged_cache_write") == {"reference": 1}


def test_conformance_cells_through_the_emulated_twin(tmp_path):
    rc = main(
        [
            "conformance",
            "--backend",
            "ascend",
            "--emulate",
            "--profile",
            "quick",
            "--in-process",
            "--seed",
            "3",
            "--ops",
            "topk_routing[scoring=sigmoid,dtype=bfloat16",
            "moe_permute",
            "moe_unpermute",
            "grouped_gemm[layout=masked,x_dtype=bfloat16",
            "mla_decode[dtype=bfloat16,causal=true,sinks=false",
            "--report",
            str(tmp_path / "r"),
        ]
    )
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert rc == 0 and report["meta"]["emulated"] and "EMULATED" in (tmp_path / "r" / "report.md").read_text()
    assert report["summary"]["pass"] >= 15
    assert report["meta"]["backend"] == "ascend-emulated"


# ------------------------------------------------------------------ W8A8 int8 (Atlas A2/A3: no FP8)


def test_a2_serves_w8a8_int8_on_torch_npu_kernels():
    b = emulated_a2()
    caps = b.capabilities()
    assert {"quantize_int8", "int8_gemm", "quantize_int8_weight"} <= set(caps)
    assert "int8" in caps["grouped_gemm"].axes["x_dtype"] and "int8" in caps["grouped_gemm"].axes["w_dtype"]
    torch.manual_seed(4)
    x = torch.randn(2, 3, 96, dtype=torch.bfloat16)
    x[0, 1] = 0  # npu_dynamic_quant has no amax floor: the backend applies the contract's
    w_q, w_s = hal.ops.quantize_int8_weight(torch.randn(2, 40, 96))
    q, s = b.quantize_int8(x)
    ref_q, ref_s = hal.ops.quantize_int8.reference_impl(x)
    assert q.shape == x.shape and s.shape == (2, 3)
    assert (q.int() - ref_q.int()).abs().max() <= 1 and torch.equal(s, ref_s)
    assert float(s[0, 1]) > 0 and not q[0, 1].any()
    y = b.int8_gemm(q, s, w_q[0], w_s[0])
    exact = hal.ops.int8_gemm.reference_impl(q, s, w_q[0], w_s[0], compute_dtype=torch.float64)
    assert y.shape == (2, 3, 40) and compare(y, exact, hal.ops.int8_gemm.tolerance["bfloat16"]).ok
    rows, sizes = q.view(6, 96), torch.tensor([4, 2])
    y = b.grouped_gemm(rows, w_q, sizes, x_scale=s.view(6), w_scale=w_s)
    exact = hal.ops.grouped_gemm.reference_impl(
        rows, w_q, sizes, x_scale=s.view(6), w_scale=w_s, compute_dtype=torch.float64
    )
    assert compare(y, exact, hal.ops.grouped_gemm.tolerance["bfloat16"], n=96 + 3, magnitude=exact.abs()).ok
    assert b.paths == {
        ("quantize_int8", "npu_dynamic_quant"): 1,
        ("int8_gemm", "npu_quant_matmul"): 1,
        ("grouped_gemm", "npu_grouped_matmul"): 1,
    }
    assert b.lib.calls == ["npu_dynamic_quant", "npu_quant_matmul", "npu_grouped_matmul"]


def test_int8_requests_outside_the_documented_forms_take_the_reference_path():
    b = emulated_a2()
    q, s = hal.ops.quantize_int8.reference_impl(torch.randn(3, 64))
    w_q, w_s = hal.ops.quantize_int8_weight.reference_impl(torch.randn(8, 64))
    b.quantize_int8(torch.randn(3, 64))  # fp32 x: npu_dynamic_quant takes fp16/bf16
    b.int8_gemm(q, s, w_q, w_s, out_dtype=torch.float32)  # fp32 output: not in the A2/A3 table
    assert b.paths == {("quantize_int8", "reference"): 1, ("int8_gemm", "reference"): 1}
    assert b.lib.calls == []


def test_double_refuses_undocumented_w8a8_forms():
    lib = TorchNpuTestDouble("a2")
    a = torch.zeros(2, 8, dtype=torch.int8)
    with pytest.raises(EmulatorRefusal, match="output_dtype"):
        lib.npu_quant_matmul(a, a.t(), torch.ones(2), pertoken_scale=torch.ones(2))  # None: int8 output
    with pytest.raises(EmulatorRefusal, match="float16/bfloat16"):
        lib.npu_dynamic_quant(torch.zeros(2, 8))
    with pytest.raises(EmulatorRefusal, match="int8 x int8 -> int32"):
        lib.npu_grouped_matmul(
            [a],
            [a.view(1, 8, 2)],
            group_list=torch.tensor([2]),
            group_list_type=1,
            group_type=0,
            split_item=2,
            output_dtype=torch.bfloat16,
        )
