"""Family 2: MoE routing (top-k with DeepSeek's group-limited selection, V4's hash routing), and the token
permutation a MoE layer runs around the expert GEMMs (sort by expert, weighted combine).

The routing contract is DeepSeek's ``Gate`` (V3 / V3.2 ``inference/model.py``) with transformers' options:

1. ``s = score(logits)`` in fp32 (softmax over experts, sigmoid, or V4's ``sqrt(softplus)``);
2. ``choice = s + bias`` (the ``e_score_correction_bias``: it steers *selection only*);
3. group-limited selection (``n_group > 1``): the experts form ``n_group`` equal consecutive groups; a
   group's score is the sum of its two largest ``choice`` values when ``bias`` is given, else its largest
   (DeepSeek's rule); the ``topk_group`` best groups are kept and every other expert's choice becomes
   **-inf** (DeepSeek's; not transformers' 0.0);
4. the ``top_k`` largest ``choice`` values are selected;
5. ``weights = s`` at the selected experts (no bias), divided by ``sum + 1e-20`` when ``renormalize``
   (transformers' ``norm_topk_prob``; DeepSeek's sigmoid path), times ``scale``
   (``routed_scaling_factor``).

**Tie rule.** Where choice (or group) scores are exactly equal, the lower expert (group) index is
preferred; rows come out in descending choice order. A row's ``k`` (id, weight) pairs are a *set*: a
backend may return them in any order (transformers' ``topk(sorted=False)``, vendor kernels), since
only the per-token sum over experts depends on them.

Why: docs/contracts.md#moe-routing.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from hal.contract import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    Request,
    Tolerance,
    check,
    check_same_device,
    check_tensor,
    contract,
    dtype_name,
    is_int,
    is_number,
    result,
)
from hal.ops.grouped_gemm import GEMM_TOLERANCE

__all__ = [
    "topk_routing",
    "hash_routing",
    "moe_permute",
    "moe_unpermute",
    "MoePermutation",
    "invert_permutation",
    "ROUTING_TOLERANCE",
    "SCORING",
]

SCORING = ("softmax", "sigmoid", "sqrtsoftplus")
_DTYPES = ("bfloat16", "float16", "float32")
_BOOL = ("true", "false")
RENORM_EPS = 1e-20

# Weights are fp32 functions of exact inputs. Keys: the scoring function.
# * rtol: exp / log1p / sqrt / division each cost about one fp32 rounding, and softmax's shift
#   ``x - max`` an absolute error of ``|x - max| * 2**-24`` in the exponent: below 2**-18 relative for
#   logits within 64 of their maximum (everything whose weight is a normal fp32 number); renormalising
#   over k <= 32 terms adds k + 2 roundings. rtol = 2**-17 (64 fp32 ulps) bounds it.
# * acc_eps: the absolute error a score may have below fp32's normal range (subnormal rounding, or a
#   kernel flushing subnormals to zero): 2**-126 for softmax and sigmoid, 2**-63 = sqrt(2**-126) for
#   sqrtsoftplus. Through ``w_i = scale * s_i / (sum_j s_j + 1e-20)`` it becomes
#   ``acc_eps * n * magnitude`` with ``n = k + 1``, ``magnitude = scale / (sum_j s_j + 1e-20)``
#   (``n = 1``, ``magnitude = scale`` without renormalisation), see :func:`hal.numerics.compare`.
# The same tolerance on the choice scores (rtol, plus 2 * acc_eps absolute) defines a *near tie*: two
# experts within it may be selected either way by a correct fp32 kernel.
ROUTING_TOLERANCE = {
    "softmax": Tolerance(rtol=2**-17, acc_eps=2**-126),
    "sigmoid": Tolerance(rtol=2**-17, acc_eps=2**-126),
    "sqrtsoftplus": Tolerance(rtol=2**-17, acc_eps=2**-63),
}
# The permutation moves values: exact.
_EXACT = {d: Tolerance(rtol=0.0) for d in _DTYPES}


def _scores(logits: torch.Tensor, scoring: str, compute_dtype: torch.dtype) -> torch.Tensor:
    x = logits.to(compute_dtype)
    if scoring == "softmax":
        return x.softmax(dim=-1)
    if scoring == "sigmoid":
        return x.sigmoid()
    return F.softplus(x).sqrt()


def _weights(
    s: torch.Tensor, ids: torch.Tensor, renormalize: bool, scale: float, compute_dtype: torch.dtype
) -> torch.Tensor:
    w = s.gather(-1, ids.long())
    if renormalize:
        w = w / (w.sum(dim=-1, keepdim=True) + RENORM_EPS)
    return result(w * scale, torch.float32, compute_dtype)


def _check_scoring(op: str, scoring: object) -> None:
    check(scoring in SCORING, op, "scoring", "'softmax', 'sigmoid' or 'sqrtsoftplus'", repr(scoring))


def _check_int(op: str, name: str, value: object, lo: int, hi: int, why: str = "") -> int:
    check(is_int(value) and lo <= value <= hi, op, name, f"an int in [{lo}, {hi}]{why}", repr(value))
    return value


def _check_scale(op: str, scale: object) -> None:
    check(is_number(scale) and math.isfinite(scale), op, "scale", "a finite number", repr(scale))


def _check_in_range(op: str, name: str, ids: torch.Tensor, upper: int, what: str) -> None:
    """Index values in ``[0, upper)`` (reads values)."""
    if ids.numel():
        lo, hi = (int(v) for v in torch.aminmax(ids))
        check(lo >= 0 and hi < upper, op, name, f"{what} in [0, {upper})", f"values in [{lo}, {hi}]")


# --------------------------------------------------------------------------- topk_routing


@contract(
    family="routing",
    axes={"scoring": SCORING, "dtype": _DTYPES, "bias": _BOOL, "group_limited": _BOOL, "renormalize": _BOOL},
    tolerance=ROUTING_TOLERANCE,
)
def topk_routing(
    logits: torch.Tensor,
    top_k: int,
    *,
    scoring: str = "softmax",
    bias: Optional[torch.Tensor] = None,
    n_group: int = 1,
    topk_group: int = 1,
    renormalize: bool = False,
    scale: float = 1.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pick ``top_k`` experts per token and their weights (DeepSeek's gate; see the module docstring).

    * ``logits``: ``[T, E]`` router logits, bf16/fp16/fp32 (scored in fp32); finite (a NaN logit gives
      unspecified results).
    * ``bias``: optional ``[E]`` score-correction bias (any float dtype, used in fp32), selection only.
    * ``n_group``, ``topk_group``: group-limited selection when ``n_group > 1``: ``E % n_group == 0``,
      ``1 <= topk_group <= n_group``, at least 2 experts a group when ``bias`` is given (top-2 sum), and
      ``top_k <= topk_group * E / n_group``. With ``n_group == 1``, ``topk_group`` is ignored.
    * ``renormalize``: divide the selected scores by their sum (``+ 1e-20``); ``scale`` multiplies last.

    Returns ``(weights, ids)``: float32 ``[T, top_k]`` and int32 ``[T, top_k]``, distinct ids per row.
    Ties: lower index first (module docstring); rows are in descending choice order, but a backend may
    order a row's pairs differently.
    Tolerance: :data:`ROUTING_TOLERANCE` ``[scoring]`` on the weights, and as the near-tie margin of the
    selection.
    """
    op = "topk_routing"
    check_tensor(op, "logits", logits, ndim=2, dtypes=FLOAT_DTYPES)
    num_experts = logits.shape[1]
    check(num_experts >= 1, op, "logits", "at least one expert (shape [T, E >= 1])", tuple(logits.shape))
    _check_scoring(op, scoring)
    _check_scale(op, scale)
    check(isinstance(renormalize, bool), op, "renormalize", "a bool", repr(renormalize))
    _check_int(op, "n_group", n_group, 1, num_experts)
    check(num_experts % n_group == 0, op, "n_group", f"a divisor of the number of experts E = {num_experts}", n_group)
    per_group = num_experts // n_group
    if bias is not None:
        check_tensor(op, "bias", bias, ndim=1, dtypes=FLOAT_DTYPES)
        check(bias.shape[0] == num_experts, op, "bias", f"shape [{num_experts}] (one per expert)", tuple(bias.shape))
    selectable = num_experts
    if n_group > 1:
        _check_int(op, "topk_group", topk_group, 1, n_group)
        check(
            bias is None or per_group >= 2,
            op,
            "n_group",
            "groups of at least 2 experts when bias is given (group score = top-2 sum)",
            f"{n_group} groups of {per_group}",
        )
        selectable = topk_group * per_group
    _check_int(op, "top_k", top_k, 1, selectable, " (experts in the selected groups)" if n_group > 1 else "")
    device = check_same_device(op, logits=logits, bias=bias)
    return Request(
        device,
        (
            ("scoring", scoring),
            ("dtype", dtype_name(logits.dtype)),
            ("bias", "true" if bias is not None else "false"),
            ("group_limited", "true" if n_group > 1 else "false"),
            ("renormalize", "true" if renormalize else "false"),
        ),
    )


def _descending(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest values along the last dim, ties to the lower index: the first ``k`` of a
    stable descending sort. float32 values (what backends compute in) take one top-k over distinct int64 keys
    instead, several times faster than sorting every row: the value's bits, mapped to integers of the same
    order (``-0`` as ``+0``), above the index reversed, so that of equal values the lower index ranks first."""
    if values.dtype != torch.float32:
        return torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :k]
    bits = (values + 0.0).view(torch.int32)  # + 0.0 turns -0 into +0
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)  # negatives: larger magnitude lower
    reversed_index = torch.arange(values.shape[-1] - 1, -1, -1, device=values.device)
    return ((ordered << 32) | reversed_index).topk(k, dim=-1).indices


def group_scores(choice: torch.Tensor, n_group: int, with_bias: bool) -> torch.Tensor:
    """``[T, E]`` choice scores -> ``[T, n_group]`` group scores: top-2 sum with a bias, else the max."""
    grouped = choice.unflatten(-1, (n_group, -1))
    if with_bias:  # the largest plus the largest of the rest (one occurrence of the largest removed)
        largest, where = grouped.max(dim=-1, keepdim=True)
        return (largest + grouped.scatter(-1, where, float("-inf")).amax(dim=-1, keepdim=True)).squeeze(-1)
    return grouped.amax(dim=-1)


def selection_scores(
    logits, *, scoring="softmax", bias=None, n_group=1, topk_group=1, compute_dtype=torch.float32
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(s, choice)``: the scores weights are taken from, and the choice scores selection ranks, with
    the experts of dropped groups at -inf (steps 1-3 of the module docstring)."""
    s = _scores(logits, scoring, compute_dtype)
    choice = s if bias is None else s + bias.to(compute_dtype)
    if n_group > 1:
        kept = _descending(group_scores(choice, n_group, bias is not None), topk_group)
        dropped = torch.ones(choice.shape[0], n_group, dtype=torch.bool, device=choice.device)
        dropped.scatter_(1, kept, False)
        choice = choice.masked_fill(dropped.repeat_interleave(choice.shape[1] // n_group, dim=1), float("-inf"))
    return s, choice


@topk_routing.reference
def _topk_routing_reference(
    logits,
    top_k,
    *,
    scoring="softmax",
    bias=None,
    n_group=1,
    topk_group=1,
    renormalize=False,
    scale=1.0,
    compute_dtype=torch.float32,
):
    s, choice = selection_scores(
        logits, scoring=scoring, bias=bias, n_group=n_group, topk_group=topk_group, compute_dtype=compute_dtype
    )
    ids = _descending(choice, top_k)
    return _weights(s, ids, renormalize, scale, compute_dtype), ids.to(torch.int32)


# --------------------------------------------------------------------------- hash_routing (V4)


@contract(
    family="routing",
    axes={"scoring": SCORING, "dtype": _DTYPES, "renormalize": _BOOL},
    tolerance=ROUTING_TOLERANCE,
)
def hash_routing(
    token_ids: torch.Tensor,
    table: torch.Tensor,
    logits: torch.Tensor,
    *,
    scoring: str = "sqrtsoftplus",
    renormalize: bool = True,
    scale: float = 1.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """V4's hash routing (its first MoE layers): the experts are fixed by the token id, the weights still
    come from the gate.

    * ``token_ids``: int32/int64 ``[T]``, each in ``[0, V)``;
    * ``table``: int32/int64 ``[V, k]`` (``tid2eid``), expert ids in ``[0, E)``;
    * ``logits``: ``[T, E]`` router logits, bf16/fp16/fp32.

    Returns ``(weights, ids)``: ``ids = table[token_ids]`` as int32 ``[T, k]`` and ``weights = s[ids]``
    (``s = score(logits)`` in fp32, as :func:`topk_routing`, no bias), divided by ``sum + 1e-20`` when
    ``renormalize``, times ``scale``; float32 ``[T, k]``. Row order is the table's.
    Tolerance: :data:`ROUTING_TOLERANCE` ``[scoring]``.
    """
    op = "hash_routing"
    check_tensor(op, "token_ids", token_ids, ndim=1, dtypes=INDEX_DTYPES)
    check_tensor(op, "table", table, ndim=2, dtypes=INDEX_DTYPES)
    check_tensor(op, "logits", logits, ndim=2, dtypes=FLOAT_DTYPES)
    check(
        logits.shape[0] == token_ids.shape[0],
        op,
        "logits",
        f"{token_ids.shape[0]} rows (one per token id)",
        f"shape {tuple(logits.shape)}",
    )
    check(table.shape[1] >= 1, op, "table", "at least one expert per token (shape [V, k >= 1])", tuple(table.shape))
    _check_scoring(op, scoring)
    _check_scale(op, scale)
    check(isinstance(renormalize, bool), op, "renormalize", "a bool", repr(renormalize))
    device = check_same_device(op, token_ids=token_ids, table=table, logits=logits)
    return Request(
        device,
        (
            ("scoring", scoring),
            ("dtype", dtype_name(logits.dtype)),
            ("renormalize", "true" if renormalize else "false"),
        ),
    )


@hash_routing.value_checks
def _hash_routing_values(token_ids, table, logits, **_):
    _check_in_range("hash_routing", "token_ids", token_ids, table.shape[0], "token ids (rows of table)")
    _check_in_range("hash_routing", "table", table[token_ids], logits.shape[1], "expert ids (columns of logits)")


@hash_routing.reference
def _hash_routing_reference(
    token_ids, table, logits, *, scoring="sqrtsoftplus", renormalize=True, scale=1.0, compute_dtype=torch.float32
):
    ids = table[token_ids.long()]
    return _weights(_scores(logits, scoring, compute_dtype), ids, renormalize, scale, compute_dtype), ids.to(
        torch.int32
    )


# --------------------------------------------------------------------------- permutation and combine


class MoePermutation(NamedTuple):
    """How :func:`moe_permute` sorted the ``T * k`` (token, expert) *slots*; slot ``t * k + j`` is token
    ``t``'s ``j``-th expert. All int32, on the device of the inputs.

    * ``group_sizes`` ``[E]``: rows per expert — the ``group_sizes`` of :func:`hal.ops.grouped_gemm`;
    * ``sorted_slots`` ``[T * k]``: row ``r`` of the sorted activations is slot ``sorted_slots[r]`` (its
      token is ``sorted_slots[r] // k``);
    * ``slot_rows`` ``[T, k]``: the inverse map, the row slot ``(t, j)`` went to.
    """

    group_sizes: torch.Tensor
    sorted_slots: torch.Tensor
    slot_rows: torch.Tensor

    @property
    def offsets(self) -> torch.Tensor:
        """int32 ``[E + 1]``: expert ``e``'s rows are ``offsets[e]:offsets[e + 1]``."""
        zero = self.group_sizes.new_zeros(1)
        return torch.cat([zero, self.group_sizes.cumsum(0).to(self.group_sizes.dtype)])


@contract(family="routing", axes={"dtype": _DTYPES}, tolerance=_EXACT)
def moe_permute(x: torch.Tensor, ids: torch.Tensor, num_experts: int) -> Tuple[torch.Tensor, MoePermutation]:
    """Sort tokens by expert for the grouped GEMM: one row per (token, expert) slot.

    * ``x``: ``[T, H]`` bf16/fp16/fp32; ``ids``: int32/int64 ``[T, k]``, each in ``[0, num_experts)``
      (as :func:`topk_routing` returns).

    Returns ``(x_sorted, permutation)``: ``x_sorted[r] = x[permutation.sorted_slots[r] // k]``, ``[T * k, H]``
    in ``x``'s dtype, rows ordered by expert and, within an expert, by slot (a stable sort: deterministic,
    so the layout is the same on every backend); see :class:`MoePermutation`.
    Tolerance: exact (values are moved, not computed).
    """
    op = "moe_permute"
    check_tensor(op, "x", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor(op, "ids", ids, ndim=2, dtypes=INDEX_DTYPES)
    check(ids.shape[0] == x.shape[0], op, "ids", f"{x.shape[0]} rows (one per token of x)", f"shape {tuple(ids.shape)}")
    _check_int(op, "num_experts", num_experts, 1, 2**31 - 1)
    device = check_same_device(op, x=x, ids=ids)
    return Request(device, (("dtype", dtype_name(x.dtype)),))


@moe_permute.value_checks
def _moe_permute_values(x, ids, num_experts):
    _check_in_range("moe_permute", "ids", ids, num_experts, "expert ids")


def invert_permutation(permutation: torch.Tensor) -> torch.Tensor:
    """int32 inverse of a 1-D permutation: ``inverse[permutation[i]] = i`` (``slot_rows`` from
    ``sorted_slots`` and back)."""
    inverse = torch.empty(permutation.shape, dtype=torch.int32, device=permutation.device)
    inverse[permutation.long()] = torch.arange(permutation.numel(), dtype=torch.int32, device=permutation.device)
    return inverse


@moe_permute.reference
def _moe_permute_reference(x, ids, num_experts, *, compute_dtype=torch.float32):
    k = ids.shape[1]
    flat = ids.reshape(-1).long()
    order = torch.sort(flat, stable=True).indices
    perm = MoePermutation(
        torch.bincount(flat, minlength=num_experts).to(torch.int32),
        order.to(torch.int32),
        invert_permutation(order).view(-1, k),
    )
    return x.index_select(0, order // k), perm  # (index_select: a parallel row copy; x[rows] is not)


# fp32 accumulation of k weighted terms, one rounding: the grouped GEMM's tolerance with n = k.
@contract(family="routing", axes={"dtype": _DTYPES}, tolerance=GEMM_TOLERANCE)
def moe_unpermute(y_sorted: torch.Tensor, weights: torch.Tensor, permutation: MoePermutation) -> torch.Tensor:
    """The weighted combine: ``out[t] = sum_j weights[t, j] * y_sorted[permutation.slot_rows[t, j]]``.

    * ``y_sorted``: ``[T * k, N]`` bf16/fp16/fp32, rows in :func:`moe_permute`'s order (the expert GEMM
      outputs); ``weights``: ``[T, k]`` float (as :func:`topk_routing` returns);
      ``permutation``: the :class:`MoePermutation` of the same call.

    Returns ``[T, N]`` in ``y_sorted``'s dtype, accumulated in at least fp32 and rounded once.
    Tolerance: :data:`hal.ops.grouped_gemm.GEMM_TOLERANCE` with ``n = k``.
    """
    op = "moe_unpermute"
    check_tensor(op, "y_sorted", y_sorted, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor(op, "weights", weights, ndim=2, dtypes=FLOAT_DTYPES)
    check(
        isinstance(permutation, MoePermutation),
        op,
        "permutation",
        "the MoePermutation moe_permute returned",
        type(permutation).__name__,
    )
    slot_rows = check_tensor(op, "permutation.slot_rows", permutation.slot_rows, ndim=2, dtypes=INDEX_DTYPES)
    check(
        tuple(slot_rows.shape) == tuple(weights.shape),
        op,
        "weights",
        f"shape {tuple(slot_rows.shape)} (that of permutation.slot_rows)",
        f"shape {tuple(weights.shape)}",
    )
    check(
        y_sorted.shape[0] == weights.numel(),
        op,
        "y_sorted",
        f"{weights.numel()} rows (T * k)",
        f"shape {tuple(y_sorted.shape)}",
    )
    device = check_same_device(op, y_sorted=y_sorted, weights=weights, slot_rows=slot_rows)
    return Request(device, (("dtype", dtype_name(y_sorted.dtype)),))


@moe_unpermute.value_checks
def _moe_unpermute_values(y_sorted, weights, permutation):
    _check_in_range(
        "moe_unpermute", "permutation.slot_rows", permutation.slot_rows, y_sorted.shape[0], "rows of y_sorted"
    )


@moe_unpermute.reference
def _moe_unpermute_reference(y_sorted, weights, permutation, *, compute_dtype=torch.float32):
    slot_rows = permutation.slot_rows
    rows = y_sorted.index_select(0, slot_rows.reshape(-1).long()).to(compute_dtype)  # only the rows used
    rows = rows.view(*slot_rows.shape, y_sorted.shape[1])  # [T, k, N]
    out = torch.einsum("tk,tkn->tn", weights.to(compute_dtype), rows)
    return result(out, y_sorted.dtype, compute_dtype)
