"""Grouped GEMM: oracle agreement, equality with per-group GEMMs, invariance to group order (plain, FP8/FP4
block-scaled and W8A8 int8 operands)."""
from __future__ import annotations

from typing import Mapping

import torch
from hypothesis import strategies as st

from hal.conformance.core import Case, Recorder, Suite, suite
from hal.conformance.strategies import sizes_adding_to, tensor_specs
from hal.formats import FP8_MAX
from hal.ops.grouped_gemm import dequantized_operands

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
FLOATS = tuple(DTYPES)


def _quantised_weights(w: torch.Tensor, w_dtype: str):
    from hal.ops import quantize_fp4, quantize_fp8_weight, quantize_int8_weight
    if w_dtype == "int8":
        return quantize_int8_weight.reference_impl(w)
    if w_dtype == "float8_e4m3fn":
        pairs = [quantize_fp8_weight.reference_impl(e) for e in w]
    else:
        pairs = [quantize_fp4.reference_impl(e) for e in w]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


@suite
class GroupedGemmSuite(Suite):
    op = "grouped_gemm"
    example_seconds = 1.0  # slowest example measured: 0.05 s

    def meaningful(self, f: Mapping[str, str]) -> bool:
        if f["x_dtype"] in FLOATS:  # plain activations: weights of the same dtype or block-scaled
            return f["out_dtype"] == f["x_dtype"] and f["w_dtype"] in (f["x_dtype"], "float8_e4m3fn", "fp4_e2m1")
        if f["x_dtype"] == "int8":  # W8A8: int8 operands go together
            return f["w_dtype"] == "int8" and f["out_dtype"] == "bfloat16"
        return f["w_dtype"] in ("float8_e4m3fn", "fp4_e2m1") and f["out_dtype"] == "bfloat16"

    def draw(self, data: st.DataObject, f: Mapping[str, str]) -> Case:
        x_fp8, w_dtype = f["x_dtype"] == "float8_e4m3fn", f["w_dtype"]
        if x_fp8:
            k = data.draw(st.sampled_from([128, 256]), label="K")
        elif w_dtype == "fp4_e2m1":
            k = data.draw(st.sampled_from([32, 64, 160]), label="K")
        else:
            k = data.draw(st.integers(1, 72), label="K")
        groups = data.draw(st.integers(1, 8), label="groups (experts)")
        n = data.draw(st.integers(1, 40), label="N")
        if f["layout"] == "contiguous":
            m = data.draw(st.integers(0, 48), label="M (tokens x top-k)")
            sizes = data.draw(sizes_adding_to(m, groups), label="group sizes")
            x_shape = (m, k)
        else:
            max_m = data.draw(st.integers(1, 8), label="max_m")
            sizes = data.draw(st.lists(st.integers(0, max_m), min_size=groups, max_size=groups), label="valid counts")
            x_shape = (groups, max_m, k)
        x_spec = data.draw(tensor_specs(), label="x values")
        w_spec = data.draw(tensor_specs(), label="w values")
        act = DTYPES.get(f["x_dtype"], torch.bfloat16)
        x = x_spec.make(x_shape, act, max_value=FP8_MAX)
        w = w_spec.make((groups, n, k), DTYPES.get(w_dtype, torch.bfloat16), max_value=FP8_MAX)
        kwargs = {"layout": f["layout"]}
        if x_fp8:
            from hal.ops import quantize_fp8
            x, kwargs["x_scale"] = quantize_fp8.reference_impl(x)
        elif f["x_dtype"] == "int8":
            from hal.ops import quantize_int8
            x, kwargs["x_scale"] = quantize_int8.reference_impl(x)
        if w_dtype not in FLOATS:
            w, kwargs["w_scale"] = _quantised_weights(w, w_dtype)
        group_sizes = torch.tensor(sizes, dtype=data.draw(st.sampled_from([torch.int32, torch.int64]),
                                                          label="group_sizes dtype"))
        return Case((x, w, group_sizes), kwargs)

    def check(self, rec: Recorder, case: Case, output, oracle, run) -> None:
        x, w, sizes = case.args
        kw = case.kwargs
        f = self.contract.validate(*case.args, **kw).features
        out_dtype = dict(f)["out_dtype"]
        rec.holds(str(output.dtype) == f"torch.{out_dtype}", f"the result has dtype {out_dtype}")
        xd, wd = dequantized_operands(x, w, kw.get("x_scale"), kw.get("w_scale"), torch.float64)
        magnitude = self.contract.reference_impl(xd.abs(), wd.abs(), sizes, layout=kw["layout"],
                                                 compute_dtype=torch.float64)
        mask = None
        if kw["layout"] == "masked":  # rows past a group's count are unspecified
            mask = torch.arange(x.shape[1])[None, :] < sizes[:, None]
            mask = mask[..., None].expand_as(oracle)
        tol = self.contract.tolerance[out_dtype]
        n = x.shape[-1] + (3 if kw.get("x_scale") is not None or kw.get("w_scale") is not None else 0)
        rec.close("y", output, oracle, tol, n=n, magnitude=magnitude, mask=mask)
        if kw["layout"] == "contiguous" and len(sizes) > 1:
            # y is invariant to the order of the groups: permute groups (and their rows), permute back
            order = torch.arange(len(sizes) - 1, -1, -1)
            starts = torch.cumsum(sizes, 0) - sizes
            rows = torch.cat([torch.arange(int(starts[g]), int(starts[g] + sizes[g])) for g in order.tolist()])
            perm_kw = dict(kw)
            if kw.get("x_scale") is not None:
                perm_kw["x_scale"] = kw["x_scale"][rows]
            if kw.get("w_scale") is not None:
                perm_kw["w_scale"] = kw["w_scale"][order]
            y_perm = run(Case((x[rows], w[order], sizes[order]), perm_kw))
            rec.close("y (groups reversed)", y_perm, oracle[rows], tol, n=n, magnitude=magnitude[rows])
