"""The routing suites have teeth: deliberately wrong backends, registered through the public plugin API,
fail them; the CPU reference passes."""

from __future__ import annotations

import torch
from helpers import register_backend

from hal.backends.cpu.backend import CpuBackend
from hal.conformance.core import run_cell
from hal.ops.routing import MoePermutation, group_scores, hash_routing, selection_scores, topk_routing

GATE = dict(scoring="sigmoid", dtype="bfloat16", bias="true", group_limited="true", renormalize="true")


def reference(op, *args, **kwargs):
    return op.reference_impl(*args, **kwargs)


class WrongTieRule(CpuBackend):
    """Breaks exact ties towards the *higher* expert id (a top-k over the reversed expert axis)."""

    def __init__(self):
        super().__init__()
        self.add_implementation("topk_routing", self.wrong)

    def wrong(
        self, logits, top_k, *, scoring="softmax", bias=None, n_group=1, topk_group=1, renormalize=False, scale=1.0
    ):
        flipped = bias.flip(0) if bias is not None else None
        w, ids = reference(
            topk_routing,
            logits.flip(1),
            top_k,
            scoring=scoring,
            bias=flipped,
            n_group=n_group,
            topk_group=topk_group,
            renormalize=renormalize,
            scale=scale,
        )
        return w, (logits.shape[1] - 1 - ids).to(torch.int32)


class ZeroMasking(CpuBackend):
    """Fills dropped groups with 0.0 instead of -inf (transformers' choice)."""

    def __init__(self):
        super().__init__()
        self.add_implementation("topk_routing", self.wrong)

    def wrong(
        self, logits, top_k, *, scoring="softmax", bias=None, n_group=1, topk_group=1, renormalize=False, scale=1.0
    ):
        s, choice = selection_scores(logits, scoring=scoring, bias=bias)
        if n_group > 1:
            kept = group_scores(choice, n_group, bias is not None).topk(topk_group, -1).indices
            keep = torch.zeros(logits.shape[0], n_group, dtype=torch.bool).scatter_(1, kept, True)
            choice = choice * keep.repeat_interleave(logits.shape[1] // n_group, 1)  # 0.0, not -inf
        ids = torch.sort(choice, dim=-1, descending=True, stable=True).indices[:, :top_k]
        w = s.gather(1, ids)
        if renormalize:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return w * scale, ids.to(torch.int32)


class BiasInWeights(CpuBackend):
    """Takes the weights from the biased choice scores (the bias must steer selection only)."""

    def __init__(self):
        super().__init__()
        self.add_implementation("topk_routing", self.wrong)

    def wrong(
        self, logits, top_k, *, scoring="softmax", bias=None, n_group=1, topk_group=1, renormalize=False, scale=1.0
    ):
        w, ids = reference(
            topk_routing, logits, top_k, scoring=scoring, bias=bias, n_group=n_group, topk_group=topk_group
        )
        if bias is not None:
            w = w + bias[ids.long()]
        if renormalize:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return w * scale, ids


class HashIgnoresRenormalize(CpuBackend):
    """Always renormalises hash-routed weights."""

    def __init__(self):
        super().__init__()
        self.add_implementation("hash_routing", self.wrong)

    def wrong(self, token_ids, table, logits, *, scoring="sqrtsoftplus", renormalize=True, scale=1.0):
        return reference(hash_routing, token_ids, table, logits, scoring=scoring, renormalize=True, scale=scale)


class UnstablePermute(CpuBackend):
    """Sorts slots by expert but not stably (descending slot order inside an expert)."""

    def __init__(self):
        super().__init__()
        self.add_implementation("moe_permute", self.wrong)

    def wrong(self, x, ids, num_experts):
        k = ids.shape[1]
        flat = ids.reshape(-1).long()
        key = flat * flat.numel() + (flat.numel() - 1 - torch.arange(flat.numel()))
        order = key.argsort()
        slot_rows = torch.empty_like(order)
        slot_rows[order] = torch.arange(order.numel())
        perm = MoePermutation(
            torch.bincount(flat, minlength=num_experts).int(), order.int(), slot_rows.view(-1, k).int()
        )
        return x[order // k], perm


class CombinesInBf16(CpuBackend):
    """Accumulates the weighted combine in the activation dtype."""

    def __init__(self):
        super().__init__()
        self.add_implementation("moe_unpermute", self.wrong)

    def wrong(self, y_sorted, weights, permutation):
        out = torch.zeros(weights.shape[0], y_sorted.shape[1], dtype=y_sorted.dtype)
        for j in range(weights.shape[1]):
            out = out + (y_sorted[permutation.slot_rows[:, j].long()] * weights[:, j : j + 1]).to(y_sorted.dtype)
        return out


def test_reference_backend_passes():
    for op, cell in [
        ("topk_routing", GATE),
        ("topk_routing", dict(GATE, scoring="softmax", bias="false")),
        ("hash_routing", dict(scoring="sqrtsoftplus", dtype="float32", renormalize="true")),
        ("moe_permute", {"dtype": "bfloat16"}),
        ("moe_unpermute", {"dtype": "bfloat16"}),
    ]:
        result = run_cell("cpu", op, cell, profile="ci", seed=1)
        assert result.status == "pass", result.message


def test_wrong_tie_rule_fails():
    cell = dict(GATE, bias="false", group_limited="false")
    result = run_cell(register_backend("wrong-ties", WrongTieRule), "topk_routing", cell, profile="ci", seed=1)
    assert result.status == "fail", result
    assert "tie rule" in result.message or "ids" in result.message
    assert "top_k" in result.minimal_example


def test_zero_masking_of_dropped_groups_fails():
    result = run_cell(register_backend("zero-mask", ZeroMasking), "topk_routing", GATE, profile="ci", seed=1)
    assert result.status == "fail", result


def test_bias_in_weights_fails():
    result = run_cell(register_backend("bias-weights", BiasInWeights), "topk_routing", GATE, profile="ci", seed=1)
    assert result.status == "fail" and "weights" in result.message, result


def test_hash_routing_that_ignores_renormalize_fails():
    cell = dict(scoring="sigmoid", dtype="bfloat16", renormalize="false")
    assert (
        run_cell(
            register_backend("hash-renorm", HashIgnoresRenormalize), "hash_routing", cell, profile="ci", seed=1
        ).status
        == "fail"
    )


def test_unstable_permutation_fails():
    result = run_cell(
        register_backend("unstable", UnstablePermute), "moe_permute", {"dtype": "float32"}, profile="ci", seed=1
    )
    assert result.status == "fail" and "sorted_slots" in result.message, result


def test_bf16_combine_fails():
    assert (
        run_cell(
            register_backend("bf16-combine", CombinesInBf16),
            "moe_unpermute",
            {"dtype": "bfloat16"},
            profile="ci",
            seed=1,
        ).status
        == "fail"
    )


def test_groups_tied_in_float64_only_are_near_ties():
    """Two groups whose top-2 sums are equal in float64 but not in fp32 (a bias of repeated values makes such
    pairs): a correct fp32 kernel may keep either, so the suite must not hold it to the oracle's choice."""
    from hal.conformance.core import Case, Recorder, suites

    logits, bias = torch.tensor([[0.5, 4.5, 0.5, 4.5]], dtype=torch.float16), torch.tensor([0.1, -0.1, -0.1, 0.1])
    kwargs = dict(scoring="sqrtsoftplus", bias=bias, n_group=2, topk_group=1, renormalize=False, scale=1.0)
    exact = [
        group_scores(selection_scores(logits, scoring="sqrtsoftplus", bias=bias, compute_dtype=d)[1], 2, True)
        for d in (torch.float64, torch.float32)
    ]
    assert exact[0][0, 0] == exact[0][0, 1] and exact[1][0, 0] != exact[1][0, 1]  # the premise
    oracle = reference(topk_routing, logits, 1, **kwargs, compute_dtype=torch.float64)
    assert oracle[1].tolist() == [[1]]  # the tie rule: the lower group
    s = selection_scores(logits, scoring="sqrtsoftplus", compute_dtype=torch.float32)[0]
    other_group = (s[:, 3:4], torch.tensor([[3]], dtype=torch.int32))  # group 1's best expert, as fp32 may pick
    suites()["topk_routing"].check(Recorder(), Case((logits, 1), kwargs), other_group, oracle, None)
