"""Grouped GEMM: oracle agreement, equality with per-group GEMMs, invariance to group order (plain, FP8/FP4
block-scaled and W8A8 int8 operands).

Drawn: small shapes mostly; about one example in four is large — up to 12 groups (empty ones among them),
M up to 200 rows, N of 129 to 300 and K up to 384, so that the 128 x 128 FP8 weight-scale blocks span several
blocks along both N and K (an N-major / K-major misread of ``w_scale`` shows) and tiles have tails. M = 0
is about one example in eight; M = 1 with several groups is drawn on purpose."""

from __future__ import annotations

from typing import Mapping

import torch
from hypothesis import strategies as st

from hal.conformance.core import Case, Recorder, Suite, note, suite
from hal.conformance.strategies import dim, empty, large, sizes_adding_to, tensor_specs, tiling
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
    boundary = ("M=0", "groups>1 with an empty one", "M=1 with several groups", "N:tail", "K>128")

    def declared(self, f: Mapping[str, str]):
        d = super().declared(f)
        if f["w_dtype"] in ("float8_e4m3fn", "fp4_e2m1"):
            d["boundary"].add("w_scale spans several blocks along N and K")
        if f["layout"] == "masked":  # M is groups x max_m there: max_m is the drawn row count
            d["boundary"] -= {"M=0", "M=1 with several groups"}
        return d

    def meaningful(self, f: Mapping[str, str]) -> bool:
        if f["x_dtype"] in FLOATS:  # plain activations: weights of the same dtype or block-scaled
            return f["out_dtype"] == f["x_dtype"] and f["w_dtype"] in (f["x_dtype"], "float8_e4m3fn", "fp4_e2m1")
        if f["x_dtype"] == "int8":  # W8A8: int8 operands go together
            return f["w_dtype"] == "int8" and f["out_dtype"] == "bfloat16"
        return f["w_dtype"] in ("float8_e4m3fn", "fp4_e2m1") and f["out_dtype"] == "bfloat16"

    def draw(self, data: st.DataObject, f: Mapping[str, str]) -> Case:
        x_fp8, w_dtype = f["x_dtype"] == "float8_e4m3fn", f["w_dtype"]
        big = large(data)  # a large example spans several scale blocks along N and K (a certain class, not a hope)
        if x_fp8:
            k = 128 * data.draw(st.integers(2, 3) if big else st.integers(1, 2), label="K / 128")
        elif w_dtype == "fp4_e2m1":
            k = 32 * data.draw(st.integers(5, 12) if big else st.integers(1, 5), label="K / 32")
        else:
            k = dim(data, "K", 129, 384) if big else dim(data, "K", 1, 72)
        groups = dim(data, "groups (experts)", 1, 12 if big else 8, tile=8)
        n = dim(data, "N", 129, 300) if big else dim(data, "N", 1, 40)
        if f["layout"] == "contiguous":
            m = 0 if empty(data, "M = 0") else dim(data, "M (tokens x top-k)", 1, 200 if big else 48, tile=64)
            if groups > 1 and data.draw(st.sampled_from((False,) * 7 + (True,)), label="M = 1"):
                m = 1
            sizes = data.draw(sizes_adding_to(m, groups), label="group sizes")
            x_shape = (m, k)
        else:
            m = data.draw(st.integers(1, 8), label="max_m")
            sizes = data.draw(st.lists(st.integers(0, m), min_size=groups, max_size=groups), label="valid counts")
            x_shape = (groups, m, k)
        classes = tiling("M", m, 64) | tiling("N", n) | tiling("K", k)
        if groups > 1 and 0 in sizes:
            classes.add("groups>1 with an empty one")
        if groups > 1 and m == 1:
            classes.add("M=1 with several groups")
        if n > 128 and k > 128 and w_dtype in ("float8_e4m3fn", "fp4_e2m1"):
            classes.add("w_scale spans several blocks along N and K")
        note(tokens=m, groups=groups, K=k, N=n, boundary=classes)
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
        group_sizes = torch.tensor(
            sizes, dtype=data.draw(st.sampled_from([torch.int32, torch.int64]), label="group_sizes dtype")
        )
        return Case((x, w, group_sizes), kwargs)

    def check(self, rec: Recorder, case: Case, output, oracle, run) -> None:
        x, w, sizes = case.args
        kw = case.kwargs
        f = self.contract.validate(*case.args, **kw).features
        out_dtype = dict(f)["out_dtype"]
        rec.holds(str(output.dtype) == f"torch.{out_dtype}", f"the result has dtype {out_dtype}")
        xd, wd = dequantized_operands(x, w, kw.get("x_scale"), kw.get("w_scale"), torch.float64)
        magnitude = self.contract.reference_impl(
            xd.abs(), wd.abs(), sizes, layout=kw["layout"], compute_dtype=torch.float64
        )
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
