"""Routing contracts: DeepSeek's gate semantics (group-limited selection, -inf masking, bias for selection
only, renormalisation, scaling), the tie rule, V4 hash routing, permutation and weighted combine,
validation errors."""

from __future__ import annotations

import pytest
import torch

import hal
from hal.contract import Tolerance
from hal.errors import InvalidArgumentError, InvalidDtypeError
from hal.numerics import assert_within
from hal.ops import hash_routing, moe_permute, moe_unpermute, topk_routing
from hal.ops.routing import ROUTING_TOLERANCE, MoePermutation


def deepseek_gate(logits, top_k, *, scoring, bias=None, n_group=1, topk_group=1, renormalize=False, scale=1.0):
    """An independent statement of the semantics, in float64, written as DeepSeek's ``Gate.forward`` reads
    (with transformers' renormalisation epsilon and sqrtsoftplus scoring added)."""
    x = logits.double()
    s = {
        "softmax": lambda: x.softmax(-1),
        "sigmoid": x.sigmoid,
        "sqrtsoftplus": lambda: torch.nn.functional.softplus(x).sqrt(),
    }[scoring]()
    choice = s if bias is None else s + bias.double()
    if n_group > 1:
        grouped = choice.view(x.shape[0], n_group, -1)
        gs = grouped.amax(-1) if bias is None else grouped.topk(2, -1)[0].sum(-1)
        keep = gs.topk(topk_group, -1)[1]
        mask = torch.ones_like(gs, dtype=torch.bool).scatter_(1, keep, False)
        choice = grouped.masked_fill(mask[..., None], float("-inf")).flatten(1)
    ids = choice.topk(top_k, -1)[1]
    w = s.gather(1, ids)
    if renormalize:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * scale, ids


def as_sets(weights, ids):
    """Rows sorted by id, so that results are compared as sets of (id, weight) pairs."""
    order = ids.long().argsort(-1)
    return weights.gather(1, order), ids.long().gather(1, order)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid", "sqrtsoftplus"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_topk_routing_matches_deepseek_gate(scoring, dtype, grouped, with_bias):
    g = torch.Generator().manual_seed(1)
    # distinct values, exact in every dtype: no ties, so torch.topk's unspecified tie order cannot matter
    logits = torch.stack([torch.randperm(64, generator=g) for _ in range(37)]).sub(32).mul(0.125).to(dtype)
    bias = torch.randn(64, generator=g) * 0.3 if with_bias else None
    kw = dict(scoring=scoring, bias=bias, renormalize=scoring != "softmax", scale=2.5)
    if grouped:
        kw.update(n_group=8, topk_group=3)
    weights, ids = topk_routing(logits, 6, **kw)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32 and ids.shape == (37, 6)
    exact_w, exact_ids = deepseek_gate(logits, 6, **kw)
    assert torch.equal(ids.long(), exact_ids)  # no near ties in this draw: same experts, same order
    assert_within(weights, exact_w, ROUTING_TOLERANCE[scoring])


def test_v3_configuration_sigmoid_8_groups_top4_renormalised_weights_sum_to_scale():
    g = torch.Generator().manual_seed(2)
    logits, bias = torch.randn(16, 256, generator=g), torch.randn(256, generator=g) * 0.05
    weights, ids = topk_routing(
        logits, top_k=8, scoring="sigmoid", bias=bias, n_group=8, topk_group=4, renormalize=True, scale=2.5
    )
    torch.testing.assert_close(weights.sum(-1), torch.full((16,), 2.5))
    groups = ids // 32
    assert all(len(set(row.tolist())) <= 4 for row in groups)
    assert all(len(set(row.tolist())) == 8 for row in ids)


def test_bias_steers_selection_but_not_weights():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    bias = torch.tensor([10.0, 0.0, 0.0, 0.0])
    weights, ids = topk_routing(logits, 1, scoring="sigmoid", bias=bias)
    assert ids.tolist() == [[0]]
    assert weights.item() == pytest.approx(0.5)  # sigmoid(0): the unbiased score


def test_group_score_is_top2_sum_with_bias_and_max_without():
    # scores: group 0 = [0.38, 0.001], group 1 = [0.31, 0.31]: max prefers group 0, top-2 sum group 1
    logits = torch.tensor([[1.0, -5.0, 0.8, 0.8]])
    kw = dict(scoring="softmax", n_group=2, topk_group=1)
    _, ids = topk_routing(logits, 1, **kw)
    assert ids.item() == 0
    _, ids = topk_routing(logits, 1, bias=torch.zeros(4), **kw)
    assert ids.item() == 2  # group 1; experts 2 and 3 tie: the lower id


def test_dropped_groups_are_minus_inf_not_zero():
    # transformers fills dropped groups with 0.0; with negative choice scores (sigmoid + a bias of -1)
    # that would pick expert 2 of the dropped group. DeepSeek's -inf keeps selection inside group 0.
    logits = torch.tensor([[5.0, 4.0, -9.0, -9.0]])
    bias = torch.tensor([-1.0, -1.0, -1.0, -1.0])
    _, ids = topk_routing(logits, 2, scoring="sigmoid", bias=bias, n_group=2, topk_group=1)
    assert ids[0].tolist() == [0, 1]  # in descending choice order


def test_tie_rule_prefers_lower_expert_and_group_index():
    logits = torch.zeros(1, 8)
    _, ids = topk_routing(logits, 3, scoring="sigmoid")
    assert ids.tolist() == [[0, 1, 2]]
    _, ids = topk_routing(logits, 2, scoring="sigmoid", n_group=4, topk_group=2)
    assert ids.tolist() == [[0, 1]]  # groups 0 and 1 win the tie; then experts 0 and 1
    logits = torch.tensor([[1.0, 2.0, 2.0, 0.0, 2.0]])
    _, ids = topk_routing(logits, 2)
    assert ids.tolist() == [[1, 2]]


def test_fp32_selection_ranks_as_a_stable_descending_sort():
    # fp32 choice scores are ranked by one top-k over integer keys; its definition is the stable sort. Rows
    # full of ties, +-0, -inf (dropped groups), subnormals, extremes and negatives (a score plus a negative bias)
    from hal.ops.routing import _descending

    g = torch.Generator().manual_seed(0)
    specials = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 0.5, -0.5, 3e38, -3e38, float("inf"), float("-inf")])
    for rows, experts, k in ((64, 8, 3), (32, 256, 8), (16, 33, 33), (8, 1, 1)):
        for values in (
            specials[torch.randint(0, len(specials), (rows, experts), generator=g)],
            torch.randint(-3, 4, (rows, experts), generator=g) * 0.25,
            torch.randn(rows, experts, generator=g),
        ):
            expected = torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :k]
            assert torch.equal(_descending(values, k), expected), values


def test_renormalisation_epsilon_and_underflow():
    logits = torch.tensor([[0.0, -200.0, -200.0]])  # softmax: weights of experts 1, 2 underflow to 0
    weights, ids = topk_routing(logits, 2, scoring="softmax", renormalize=True)
    assert ids.tolist() == [[0, 1]] and torch.isfinite(weights).all()
    weights, _ = topk_routing(logits[:, 1:], 1, scoring="softmax", renormalize=True, scale=3.0)
    assert weights.item() == pytest.approx(3.0)


def test_no_tokens():
    weights, ids = topk_routing(torch.randn(0, 16), 4, scoring="sigmoid", n_group=4, topk_group=2)
    assert weights.shape == ids.shape == (0, 4)


def test_oracle_is_unrounded_float64():
    logits = torch.randn(5, 16)
    w64, _ = topk_routing.reference_impl(logits, 4, scoring="sigmoid", compute_dtype=torch.float64)
    assert w64.dtype == torch.float64


# --------------------------------------------------------------------------- hash routing


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid", "sqrtsoftplus"])
def test_hash_routing_takes_experts_from_the_table_and_weights_from_the_gate(scoring):
    g = torch.Generator().manual_seed(3)
    table = torch.randint(0, 32, (100, 6), generator=g, dtype=torch.int32)
    token_ids = torch.tensor([5, 99, 0, 5])
    logits = torch.randn(4, 32, generator=g).bfloat16()
    weights, ids = hash_routing(token_ids, table, logits, scoring=scoring, scale=1.5)
    assert torch.equal(ids, table[token_ids]) and ids.dtype == torch.int32
    s = {
        "softmax": lambda x: x.softmax(-1),
        "sigmoid": torch.sigmoid,
        "sqrtsoftplus": lambda x: torch.nn.functional.softplus(x).sqrt(),
    }[scoring](logits.double())
    w = s.gather(1, ids.long())
    assert_within(weights, w / (w.sum(-1, keepdim=True) + 1e-20) * 1.5, ROUTING_TOLERANCE[scoring])
    unnormalised, _ = hash_routing(token_ids, table, logits, scoring=scoring, renormalize=False)
    assert_within(unnormalised, w, ROUTING_TOLERANCE[scoring])


@pytest.mark.usefixtures("checked")  # value checks run in checked mode
def test_hash_routing_rejects_out_of_range_ids():
    table = torch.tensor([[0, 1], [2, 9]])
    with pytest.raises(InvalidArgumentError, match="'token_ids'.*in \\[0, 2\\)"):
        hash_routing(torch.tensor([2]), table, torch.randn(1, 10))
    with pytest.raises(InvalidArgumentError, match="'table'.*in \\[0, 4\\).*\\[2, 9\\]"):
        hash_routing(torch.tensor([1]), table, torch.randn(1, 4))


# --------------------------------------------------------------------------- permutation and combine


def routed(t=7, e=5, k=3, h=4, dtype=torch.float32, seed=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).int()
    return x, ids


def test_permute_sorts_slots_by_expert_then_slot_with_sizes_and_inverse():
    x, ids = routed()
    x_sorted, perm = moe_permute(x, ids, 5)
    flat = ids.flatten().tolist()
    expected = sorted(range(len(flat)), key=lambda s: (flat[s], s))
    assert perm.sorted_slots.tolist() == expected
    assert perm.group_sizes.tolist() == [flat.count(e) for e in range(5)]
    assert perm.offsets.tolist() == [0] + torch.tensor([flat.count(e) for e in range(5)]).cumsum(0).tolist()
    assert torch.equal(x_sorted, x[torch.tensor(expected) // 3])
    for t in range(7):
        for j in range(3):
            assert perm.sorted_slots[perm.slot_rows[t, j]] == t * 3 + j
    assert all(v.dtype == torch.int32 for v in perm)


def test_permute_with_experts_that_get_no_tokens_and_one_expert_for_all():
    x = torch.randn(4, 2)
    ids = torch.full((4, 1), 2)
    x_sorted, perm = moe_permute(x, ids, 6)
    assert perm.group_sizes.tolist() == [0, 0, 4, 0, 0, 0] and torch.equal(x_sorted, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_moe_layer_round_trip_matches_a_per_expert_loop(dtype):
    """permute -> grouped GEMM -> unpermute equals DeepSeek's per-expert loop, within the tolerances."""
    x, ids = routed(t=9, e=4, k=2, h=16, dtype=dtype)
    weights = torch.rand(9, 2)
    w = torch.randn(4, 8, 16).to(dtype)
    x_sorted, perm = moe_permute(x, ids, 4)
    y = moe_unpermute(hal.ops.grouped_gemm(x_sorted, w, perm.group_sizes), weights, perm)
    assert y.dtype == dtype and y.shape == (9, 8)
    expected = torch.zeros(9, 8, dtype=torch.float64)
    for e in range(4):
        tok, top = torch.where(ids == e)
        expected[tok] += (x[tok].double() @ w[e].double().T) * weights[tok, top, None].double()
    # the combine's tolerance, plus the GEMM's rounding of each term to dtype before the combine
    # (rtol of that term's magnitude |w| * (|x| @ |W|^T)); the fp32 sums add (K + k) * 2**-24 of it
    tol = moe_unpermute.tolerance[str(dtype)[6:]]
    magnitude = torch.zeros(9, 8, dtype=torch.float64)
    for e in range(4):
        tok, top = torch.where(ids == e)
        magnitude[tok] += (x[tok].double().abs() @ w[e].double().abs().T) * weights[tok, top, None].double()
    composed = Tolerance(rtol=tol.rtol, atol=tol.atol, acc_eps=tol.rtol + tol.acc_eps * (16 + 2))
    assert_within(y, expected, composed, n=1, magnitude=magnitude)


def test_unpermute_combines_in_fp32():
    # 1 + 3/8 ulp + 3/8 ulp: a bf16 accumulator stays at 1, fp32 accumulation rounds once to 1 + ulp
    y_sorted = torch.tensor([[1.0], [3 * 2.0**-10], [3 * 2.0**-10]]).bfloat16()
    _, perm = moe_permute(torch.zeros(1, 1), torch.tensor([[0, 1, 2]]), 3)
    out = moe_unpermute(y_sorted, torch.ones(1, 3), perm)
    assert out.item() == 1.0 + 2.0**-7


def test_unpermute_of_many_tokens_is_the_reference_bit_for_bit():
    # enough tokens that the CPU backend combines them in chunks (each chunk's fp32 rows fit in L2)
    g = torch.Generator().manual_seed(0)
    ids = torch.rand(1500, 64, generator=g).topk(8, dim=-1).indices
    _, perm = moe_permute(torch.zeros(1500, 1), ids, 64)
    y_sorted, weights = torch.randn(ids.numel(), 96, generator=g).bfloat16(), torch.rand(ids.shape, generator=g)
    expected = moe_unpermute.reference_impl(y_sorted, weights, perm, compute_dtype=torch.float32)
    assert torch.equal(moe_unpermute(y_sorted, weights, perm), expected)


# --------------------------------------------------------------------------- validation


@pytest.mark.usefixtures("checked")  # value checks run in checked mode
@pytest.mark.parametrize(
    "call, argument",
    [
        (lambda: topk_routing(torch.randn(4), 2), "logits"),
        (lambda: topk_routing(torch.randn(4, 8).int(), 2), "logits"),
        (lambda: topk_routing(torch.randn(4, 8), 9), "top_k"),
        (lambda: topk_routing(torch.randn(4, 8), 0), "top_k"),
        (lambda: topk_routing(torch.randn(4, 8), 2, scoring="relu"), "scoring"),
        (lambda: topk_routing(torch.randn(4, 8), 2, n_group=3), "n_group"),
        (lambda: topk_routing(torch.randn(4, 8), 2, n_group=4, topk_group=5), "topk_group"),
        (lambda: topk_routing(torch.randn(4, 8), 5, n_group=4, topk_group=2), "top_k"),
        (lambda: topk_routing(torch.randn(4, 8), 2, n_group=8, bias=torch.zeros(8)), "n_group"),
        (lambda: topk_routing(torch.randn(4, 8), 2, bias=torch.zeros(7)), "bias"),
        (lambda: topk_routing(torch.randn(4, 8), 2, scale=float("nan")), "scale"),
        (lambda: topk_routing(torch.randn(4, 8), 2, renormalize=1), "renormalize"),
        (lambda: hash_routing(torch.tensor([0]), torch.tensor([[0]]), torch.randn(2, 4)), "logits"),
        (lambda: hash_routing(torch.tensor([0.0]), torch.tensor([[0]]), torch.randn(1, 4)), "token_ids"),
        (lambda: moe_permute(torch.randn(3, 4), torch.zeros(2, 1, dtype=torch.int32), 4), "ids"),
        (lambda: moe_permute(torch.randn(3, 4), torch.tensor([[0], [1], [4]]), 4), "ids"),
        (lambda: moe_permute(torch.randn(3, 4), torch.tensor([[0], [1], [-1]]), 4), "ids"),
        (lambda: moe_permute(torch.randn(3, 4), torch.zeros(3, 1, dtype=torch.int32), 0), "num_experts"),
        (
            lambda: moe_unpermute(torch.randn(4, 2), torch.rand(2, 2), _permutation([[0, 1], [2, 4]])),
            "permutation.slot_rows",
        ),
        (
            lambda: moe_unpermute(torch.randn(4, 2), torch.rand(2, 2), _permutation([[0, 1], [-1, 3]])),
            "permutation.slot_rows",
        ),
    ],
)
def test_bad_input_names_the_argument(call, argument):
    with pytest.raises(InvalidArgumentError) as info:
        call()
    assert info.value.argument == argument


def _permutation(slot_rows) -> MoePermutation:
    """A hand-made permutation of 4 slots whose ``slot_rows`` are given (its other fields consistent-looking)."""
    return MoePermutation(
        torch.tensor([2, 2], dtype=torch.int32),
        torch.arange(4, dtype=torch.int32),
        torch.tensor(slot_rows, dtype=torch.int32),
    )


def test_unpermute_validation():
    x, ids = routed()
    x_sorted, perm = moe_permute(x, ids, 5)
    with pytest.raises(InvalidArgumentError, match="'weights'.*shape \\(7, 3\\)"):
        moe_unpermute(x_sorted, torch.rand(7, 2), perm)
    with pytest.raises(InvalidArgumentError, match="'y_sorted'.*21 rows"):
        moe_unpermute(x_sorted[1:], torch.rand(7, 3), perm)
    with pytest.raises(InvalidArgumentError, match="'permutation'"):
        moe_unpermute(x_sorted, torch.rand(7, 3), tuple(perm))
    with pytest.raises(InvalidDtypeError):
        moe_unpermute(x_sorted.int(), torch.rand(7, 3), perm)
