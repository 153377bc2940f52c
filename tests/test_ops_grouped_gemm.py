"""Grouped GEMM contract: semantics, tolerance against the float64 oracle, validation errors."""

from __future__ import annotations

import pytest
import torch

import hal
from hal.numerics import assert_within

GG = hal.ops.grouped_gemm


def inputs(dtype, sizes=(5, 0, 3, 9), n=24, k=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    group_sizes = torch.tensor(sizes, dtype=torch.int32)
    x = torch.randn(int(group_sizes.sum()), k, generator=g).to(dtype)
    w = torch.randn(len(sizes), n, k, generator=g).to(dtype)
    return x, w, group_sizes


def per_group(x, w, sizes):
    """Independent statement of the semantics: one GEMM per group, in float64."""
    out, start = [], 0
    for g, size in enumerate(sizes.tolist()):
        out.append(x[start : start + size].double() @ w[g].double().T)
        start += size
    return torch.cat(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_contiguous_matches_per_group_gemm_within_tolerance(dtype):
    x, w, sizes = inputs(dtype)
    y = GG(x, w, sizes)
    assert y.dtype == dtype and y.shape == (x.shape[0], w.shape[1])
    exact = per_group(x, w, sizes)
    magnitude = per_group(x.abs(), w.abs(), sizes)
    assert_within(y, exact, GG.tolerance[str(dtype)[6:]], n=x.shape[1], magnitude=magnitude)


def test_oracle_is_the_reference_in_float64():
    x, w, sizes = inputs(torch.bfloat16)
    oracle = GG.reference_impl(x, w, sizes, compute_dtype=torch.float64)
    assert oracle.dtype == torch.float64
    torch.testing.assert_close(oracle, per_group(x, w, sizes), rtol=1e-12, atol=1e-12)


def test_bf16_is_computed_in_fp32_and_rounded_once():
    x, w, sizes = inputs(torch.bfloat16)
    y = GG(x, w, sizes)
    expected = per_group(x.float(), w.float(), sizes).float().bfloat16()
    # fp32 accumulation then a single rounding: at most one bf16 ulp from rounding the fp64 result
    assert (y.float() - expected.float()).abs().max() <= expected.float().abs().max() * 2**-8


def test_zero_size_groups_and_all_rows_in_one_group():
    x, w, _ = inputs(torch.float32, sizes=(6,))
    w = torch.cat([torch.randn(2, *w.shape[1:]), w])
    y = GG(x, w, torch.tensor([0, 0, 6]))
    torch.testing.assert_close(y, x @ w[2].T)
    empty = GG(x[:0], w, torch.tensor([0, 0, 0]))
    assert empty.shape == (0, w.shape[1])


def test_group_order_does_not_matter():
    x, w, sizes = inputs(torch.float32, sizes=(2, 3, 4))
    y = GG(x, w, sizes)
    order = [2, 0, 1]
    starts = torch.cumsum(sizes, 0) - sizes
    rows = torch.cat([torch.arange(starts[g], starts[g] + sizes[g]) for g in order])
    y_perm = GG(x[rows], w[order], sizes[order])
    torch.testing.assert_close(y_perm, y[rows])


def test_masked_layout_computes_valid_rows_only():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 16, generator=g)
    w = torch.randn(3, 8, 16, generator=g)
    counts = torch.tensor([5, 0, 2], dtype=torch.int32)
    y = GG(x, w, counts, layout="masked")
    assert y.shape == (3, 5, 8)
    for e, c in enumerate(counts.tolist()):
        torch.testing.assert_close(y[e, :c], x[e, :c] @ w[e].T)
        assert torch.all(y[e, c:] == 0), "the reference writes zeros past the valid count"


def test_inputs_are_not_mutated():
    x, w, sizes = inputs(torch.bfloat16)
    copies = [t.clone() for t in (x, w, sizes)]
    GG(x, w, sizes)
    for before, after in zip(copies, (x, w, sizes)):
        assert torch.equal(before, after)


def _bad(**change):
    x, w, sizes = inputs(torch.float32, sizes=(2, 3))
    args = dict(x=x, w=w, group_sizes=sizes)
    args.update(change)
    return args


@pytest.mark.usefixtures("checked")  # value checks run in checked mode
@pytest.mark.parametrize(
    "change, argument, exc",
    [
        (dict(x=torch.randn(5, 40, 1)), "x", hal.InvalidArgumentError),
        (dict(x=torch.randn(5, 40).to(torch.int32)), "x", hal.InvalidDtypeError),
        (dict(w=torch.randn(2, 24, 39)), "w", hal.InvalidArgumentError),
        (dict(w=torch.randn(24, 40)), "w", hal.InvalidArgumentError),
        (dict(group_sizes=torch.tensor([2, 3, 0])), "group_sizes", hal.InvalidArgumentError),
        (dict(group_sizes=torch.tensor([2.0, 3.0])), "group_sizes", hal.InvalidDtypeError),
        (dict(group_sizes=torch.tensor([2, 2])), "group_sizes", hal.InvalidArgumentError),
        (dict(group_sizes=torch.tensor([6, -1])), "group_sizes", hal.InvalidArgumentError),
        (dict(layout="ragged"), "layout", hal.InvalidArgumentError),
        (dict(out_dtype=torch.int8), "out_dtype", hal.InvalidArgumentError),
        (dict(x_scale=torch.ones(5, 1)), "x_scale", hal.InvalidArgumentError),
        (dict(w=torch.randn(2, 24, 40).to(torch.float8_e4m3fn)), "w_scale", hal.InvalidArgumentError),
        (
            dict(w=torch.randn(2, 24, 40).to(torch.float8_e4m3fn), w_scale=torch.ones(2, 1, 2)),
            "w_scale",
            hal.InvalidArgumentError,
        ),
        (dict(x=torch.randn(5, 40).to(torch.float8_e4m3fn), x_scale=torch.ones(5, 1)), "x", hal.InvalidArgumentError),
    ],
)
def test_bad_input_names_the_argument(change, argument, exc):
    with pytest.raises(exc, match=f"argument '{argument}'"):
        GG(**_bad(**change))


@pytest.mark.usefixtures("checked")  # value checks run in checked mode
def test_masked_counts_above_max_m_are_rejected():
    with pytest.raises(hal.InvalidArgumentError, match="group_sizes.*max_m = 4"):
        GG(torch.randn(2, 4, 8), torch.randn(2, 3, 8), torch.tensor([1, 5]), layout="masked")


@pytest.mark.usefixtures("checked")  # value checks run in checked mode
def test_error_message_says_expected_and_got():
    with pytest.raises(hal.InvalidArgumentError) as info:
        GG(**_bad(group_sizes=torch.tensor([2, 2])))
    err = info.value
    assert (err.op, err.argument) == ("grouped_gemm", "group_sizes")
    assert "adding up to x.shape[0] = 5" in err.expected and "adding up to 4" in err.got
