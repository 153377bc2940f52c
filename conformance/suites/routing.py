"""MoE routing: top-k and hash routing, token permutation, weighted combine.

Properties checked beyond the oracle (``s``, ``c`` = the float64 scores and choice scores, ``m`` = the
near-tie margin of :data:`hal.ops.routing.ROUTING_TOLERANCE`):

* topk_routing: a row's ids are distinct, in ``[0, E)``, from at most ``topk_group`` groups, each of
  which is a valid top-``topk_group`` group (score within ``m`` of the cut); they are a valid top-k:
  every unselected expert of those groups has ``c_j <= min_selected c_i + m``; exact ties go to the lower
  id; where no near tie exists the set of ids is the oracle's; the weights equal ``s[ids]`` (renormalised,
  scaled) at the backend's *own* ids, and sum to ``scale`` when renormalised. Row order is free.
* hash_routing: ``ids = table[token_ids]`` exactly; weights as above.
* moe_permute: bit-exact rows, sizes and maps (the stable order is part of the contract);
  ``sorted_slots[slot_rows[t, j]] = t * k + j``; the experts of the sorted rows never decrease.
* moe_unpermute: oracle agreement, and invariance to the order of a token's ``k`` slots.
"""

from __future__ import annotations

from typing import Mapping

import torch
from hypothesis import strategies as st

from hal.conformance.core import Case, Recorder, Suite, note, suite
from hal.conformance.strategies import dim, empty, large, tensor_specs, tiling
from hal.ops.routing import MoePermutation, group_scores, selection_scores

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# (experts, groups) shaped like DeepSeek's gates, scaled down: V3's 256 / 8, V4's 256 ungrouped, small
# odd ones to reach every corner cheaply.
GATES = ((256, 8), (64, 8), (16, 4), (12, 3), (8, 2), (6, 1), (1, 1))


def _logits(data: st.DataObject, tokens: int, experts: int, dtype: torch.dtype) -> torch.Tensor:
    spec = data.draw(tensor_specs(scales=(1.0, 0.01, 10.0)), label="logit values")
    return spec.make((tokens, experts)).clamp(-6e4, 6e4).to(dtype)  # finite in fp16 too


def _tokens(data: st.DataObject, small: int, big: int) -> int:
    """T: 0 in about one example of eight, 1..``small`` mostly, 129..``big`` (several tiles of 128 tokens,
    most with a tail) in the large examples."""
    if empty(data, "T = 0"):
        return 0
    return dim(data, "tokens", 129, big) if large(data) else dim(data, "tokens", 1, small)


TOKEN_CLASSES = ("T=0", "T=1", "T:tail")


def _scale(data: st.DataObject) -> float:
    return data.draw(st.sampled_from([1.0, 2.5, 16.0]), label="scale")


def _check_weights(
    rec: Recorder, tol, s: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, renormalize: bool, scale: float
) -> None:
    """Weights against the float64 scores at the backend's own ids; renormalised rows sum to scale."""
    picked = s.gather(1, ids.long())
    total = picked.sum(-1, keepdim=True)
    exact = (picked / (total + 1e-20) if renormalize else picked) * scale
    k = ids.shape[1]  # see ROUTING_TOLERANCE: an absolute error acc_eps per score, propagated
    magnitude = (scale / (total + 1e-20) if renormalize else torch.full_like(total, scale)).expand_as(exact)
    rec.close("weights", weights, exact, tol, n=k + 1 if renormalize else 1, magnitude=magnitude)
    if renormalize and weights.numel():
        rows = total[:, 0] > 1e-6  # not a sum the 1e-20 epsilon distorts
        rec.close(
            "sum of weights",
            weights.double().sum(-1)[rows],
            torch.full_like(total[rows, 0], scale),
            tol,
            n=k + 1,
            magnitude=magnitude[rows, 0] * k,
        )


@suite
class TopkRoutingSuite(Suite):
    op = "topk_routing"
    example_seconds = 1.0  # slowest example measured: 0.08 s
    boundary = TOKEN_CLASSES

    def draw(self, data: st.DataObject, f: Mapping[str, str]) -> Case:
        bias, grouped = f["bias"] == "true", f["group_limited"] == "true"
        gates = [g for g in GATES if (g[1] > 1) == grouped and not (bias and g[0] // g[1] < 2)]
        experts, n_group = data.draw(st.sampled_from(gates), label="experts, groups")
        per_group = experts // n_group
        topk_group = data.draw(st.integers(1, n_group), label="topk_group") if grouped else 1
        top_k = data.draw(st.integers(1, min(8, topk_group * per_group)), label="top_k")
        tokens = _tokens(data, 16, 600)
        note(tokens=tokens, experts=experts, k=top_k, boundary=tiling("T", tokens))
        kwargs = dict(scoring=f["scoring"], renormalize=f["renormalize"] == "true", scale=_scale(data))
        if grouped:
            kwargs.update(n_group=n_group, topk_group=topk_group)
        if bias:
            spec = data.draw(tensor_specs(kinds=("normal", "ties", "uniform"), scales=(0.1, 1.0)), label="bias")
            # an offset of -1 makes most choice scores negative: where -inf and 0.0 masking differ
            offset = data.draw(st.sampled_from([0.0, -1.0]), label="bias offset")
            kwargs["bias"] = spec.make((experts,)) + offset
        return Case((_logits(data, tokens, experts, DTYPES[f["dtype"]]), top_k), kwargs)

    def check(self, rec: Recorder, case: Case, output, oracle, run) -> None:
        (logits, top_k), kw = case.args, case.kwargs
        weights, ids = output
        tokens, experts = logits.shape
        rec.holds(weights.dtype == torch.float32 and ids.dtype == torch.int32, "weights are float32, ids int32")
        rec.holds(
            tuple(ids.shape) == (tokens, top_k) == tuple(weights.shape), f"outputs are [T, k] = [{tokens}, {top_k}]"
        )
        ids64 = ids.long()
        rec.holds(bool(((ids64 >= 0) & (ids64 < experts)).all()), f"ids lie in [0, E = {experts})")
        rec.holds(all(len(set(row)) == top_k for row in ids64.tolist()), "a row's ids are distinct")
        tol = self.contract.tolerance[kw["scoring"]]
        n_group, topk_group = kw.get("n_group", 1), kw.get("topk_group", 1)
        s, choice = selection_scores(
            logits, scoring=kw["scoring"], bias=kw.get("bias"), compute_dtype=torch.float64
        )  # not group-masked
        _, masked = selection_scores(
            logits,
            scoring=kw["scoring"],
            bias=kw.get("bias"),
            n_group=n_group,
            topk_group=topk_group,
            compute_dtype=torch.float64,
        )
        margin = lambda a, b: 2 * tol.acc_eps + tol.rtol * (a.abs() + b.abs())  # noqa: E731
        # a near tie: a value within the margin of a cut without being equal to it (fp32 may merge or
        # swap them); rows with one are checked by the properties, not against the oracle's ids
        near = lambda v, cut: ((v != cut) & ((v - cut).abs() <= margin(v, cut))).any(-1)  # noqa: E731
        near_tie = torch.zeros(tokens, dtype=torch.bool)
        allowed = torch.ones_like(choice, dtype=torch.bool)
        if n_group > 1:
            g = group_scores(choice, n_group, kw.get("bias") is not None)
            ranked = g.sort(-1, descending=True)
            cut = ranked.values[:, topk_group - 1 : topk_group]
            used = torch.zeros_like(g, dtype=torch.bool).scatter_(1, ids64 // (experts // n_group), True)
            rec.holds(
                bool((used.sum(-1) <= topk_group).all()), f"ids come from at most topk_group = {topk_group} groups"
            )
            rec.holds(
                bool((g[used] >= (cut - margin(g, cut))[used]).all()),
                "every group used is a valid top-topk_group group (group score >= the cut - margin)",
            )
            near_tie |= near(g, cut)
            # an exact tie at the cut between groups whose top-2 differ: the sums agree in float64 only (a bias
            # of repeated values makes such pairs), so fp32 may break it either way; groups of identical scores
            # tie in every precision and the tie rule decides them
            top = choice.unflatten(-1, (n_group, -1)).topk(min(2, experts // n_group), dim=-1).values
            cut_top = top.gather(1, ranked.indices[:, topk_group - 1, None, None].expand(-1, 1, top.shape[-1]))
            near_tie |= ((g == cut) & (top != cut_top).any(-1)).any(-1)
            allowed = (used | (g > cut + margin(g, cut))).repeat_interleave(experts // n_group, dim=1)
        chosen = torch.zeros_like(choice, dtype=torch.bool).scatter_(1, ids64, True)
        lowest = choice.gather(1, ids64).amin(-1, keepdim=True)
        rival = allowed & ~chosen
        rec.holds(
            bool((choice[rival] <= (lowest + margin(choice, lowest))[rival]).all()),
            "ids are a valid top-k: no unselected expert of a kept group has c_j > min_selected c_i + margin",
        )
        # the tie rule, where the inputs are identical (so every correct kernel computes equal scores)
        bias = kw.get("bias")
        for t, i in (rival & (choice == lowest)).nonzero().tolist():
            twins = [
                j for j in ids64[t].tolist() if logits[t, j] == logits[t, i] and (bias is None or bias[j] == bias[i])
            ]
            rec.holds(
                all(j < i for j in twins),
                f"tie rule: token {t} leaves expert {i} out for a higher id with identical inputs",
            )
        _, exact_ids = oracle
        boundary = masked.gather(1, exact_ids.long()).amin(-1, keepdim=True)
        near_tie |= near(masked.masked_fill(masked.isinf(), float("nan")), boundary)
        clear = ~near_tie
        rec.equal(
            "ids (as sets, rows without near ties)",
            ids64.sort(-1).values[clear],
            exact_ids.long().sort(-1).values[clear],
        )
        _check_weights(rec, tol, s, weights, ids, kw["renormalize"], kw["scale"])


@suite
class HashRoutingSuite(Suite):
    op = "hash_routing"
    boundary = TOKEN_CLASSES

    def draw(self, data: st.DataObject, f: Mapping[str, str]) -> Case:
        experts = data.draw(st.sampled_from([256, 16, 6, 1]), label="experts")
        k = data.draw(st.integers(1, min(experts, 6)), label="k")
        vocab = data.draw(st.integers(1, 50), label="vocab")
        tokens = _tokens(data, 16, 1100)
        note(tokens=tokens, experts=experts, k=k, boundary=tiling("T", tokens))
        gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="table seed"))
        table = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(vocab)])
        index = data.draw(st.sampled_from([torch.int32, torch.int64]), label="index dtype")
        token_ids = torch.randint(0, vocab, (tokens,), generator=gen)
        kwargs = dict(scoring=f["scoring"], renormalize=f["renormalize"] == "true", scale=_scale(data))
        return Case((token_ids.to(index), table.to(index), _logits(data, tokens, experts, DTYPES[f["dtype"]])), kwargs)

    def check(self, rec: Recorder, case: Case, output, oracle, run) -> None:
        token_ids, table, logits = case.args
        weights, ids = output
        rec.equal("ids", ids, table[token_ids.long()].to(torch.int32))
        s, _ = selection_scores(logits, scoring=case.kwargs["scoring"], compute_dtype=torch.float64)
        _check_weights(
            rec,
            self.contract.tolerance[case.kwargs["scoring"]],
            s,
            weights,
            ids,
            case.kwargs["renormalize"],
            case.kwargs["scale"],
        )


def _routed_ids(data: st.DataObject, tokens: int) -> tuple:
    """``([T, k] ids, E)``: uniform, skewed (most slots to one expert), or all slots to one expert."""
    experts = data.draw(st.sampled_from([1, 2, 5, 16, 64]), label="experts")
    k = data.draw(st.integers(1, min(experts, 4)), label="k")
    how = data.draw(st.sampled_from(["uniform", "one expert", "skewed"]), label="routing")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="ids seed"))
    rows = [torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)]
    ids = torch.stack(rows) if rows else torch.zeros(0, k, dtype=torch.int64)
    if how == "one expert":
        ids[:, 0] = experts - 1
        ids[:, 1:] = torch.arange(k - 1)
    elif how == "skewed":  # every token goes to expert 0 (among others)
        ids[~(ids == 0).any(-1), 0] = 0
    index = data.draw(st.sampled_from([torch.int32, torch.int64]), label="ids dtype")
    return ids.to(index), experts


@suite
class MoePermuteSuite(Suite):
    op = "moe_permute"
    boundary = TOKEN_CLASSES

    def draw(self, data: st.DataObject, f: Mapping[str, str]) -> Case:
        tokens = _tokens(data, 16, 600)
        ids, experts = _routed_ids(data, tokens)
        note(tokens=tokens, experts=experts, k=ids.shape[1], boundary=tiling("T", tokens))
        hidden = data.draw(st.integers(1, 24), label="hidden")
        x = data.draw(tensor_specs(), label="x values").make((tokens, hidden), DTYPES[f["dtype"]])
        return Case((x, ids, experts), {})

    def check(self, rec: Recorder, case: Case, output, oracle, run) -> None:
        x, ids, experts = case.args
        x_sorted, perm = output
        rec.holds(isinstance(perm, MoePermutation), "the permutation is a MoePermutation")
        for name, got, want in zip(("group_sizes", "sorted_slots", "slot_rows"), perm, oracle[1]):
            rec.equal(name, got, want)
        rec.equal("x_sorted", x_sorted, oracle[0])
        slots = torch.arange(ids.numel()).view(ids.shape)
        rec.holds(
            torch.equal(perm.sorted_slots.long()[perm.slot_rows.long()], slots),
            "sorted_slots[slot_rows[t, j]] = t * k + j",
        )
        experts_in_order = ids.flatten().long()[perm.sorted_slots.long()]
        rec.holds(bool((experts_in_order[1:] >= experts_in_order[:-1]).all()), "rows are sorted by expert")


@suite
class MoeUnpermuteSuite(Suite):
    op = "moe_unpermute"
    boundary = TOKEN_CLASSES

    def draw(self, data: st.DataObject, f: Mapping[str, str]) -> Case:
        from hal.ops import moe_permute

        tokens = _tokens(data, 16, 600)
        ids, experts = _routed_ids(data, tokens)
        note(tokens=tokens, experts=experts, k=ids.shape[1], boundary=tiling("T", tokens))
        n = data.draw(st.integers(1, 24), label="N")
        y = data.draw(tensor_specs(), label="y values").make((ids.numel(), n), DTYPES[f["dtype"]])
        weights = data.draw(tensor_specs(kinds=("uniform", "ones", "normal"), scales=(1.0, 2.5)), label="weights").make(
            tuple(ids.shape)
        )
        _, perm = moe_permute.reference_impl(torch.zeros(tokens, 1), ids, experts)
        return Case((y, weights, perm), {})

    def check(self, rec: Recorder, case: Case, output, oracle, run) -> None:
        y, weights, perm = case.args
        dtype = str(y.dtype).replace("torch.", "")
        tol = self.contract.tolerance[dtype]
        k = weights.shape[1]
        magnitude = self.contract.reference_impl(y.abs(), weights.abs(), perm, compute_dtype=torch.float64)
        rec.holds(output.dtype == y.dtype, f"the result has dtype {dtype}")
        rec.close("out", output, oracle, tol, n=k, magnitude=magnitude)
        if k > 1:  # a token's slots are a set: reversing them changes nothing
            swapped = MoePermutation(perm.group_sizes, perm.sorted_slots, perm.slot_rows.flip(1))
            again = run(Case((y, weights.flip(1), swapped), {}))
            rec.close("out (slots reversed)", again, oracle, tol, n=k, magnitude=magnitude)
