"""``hal bisect``: find the operator (and layer) whose backend makes a model's logits diverge.

The model runs on the CPU reference; then each operator in turn runs on the chosen backend (all
layers, then layer by layer for a diverging one) while everything else stays on the reference, and
the logits of a prefill plus a few teacher-forced decode steps are compared with the reference's."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

import hal
from hal.model.config import CommonArgs

# The operators a forward calls, in the order a layer calls them (quantised linears first).
FORWARD_OPS = (
    "quantize_fp8",
    "fp8_gemm",
    "quantize_int8",
    "int8_gemm",
    "paged_cache_write",
    "mla_prefill",
    "mla_decode",
    "hash_routing",
    "topk_routing",
    "moe_permute",
    "grouped_gemm",
    "moe_unpermute",
)

_UNIT_ROUNDOFF = {torch.float32: 2**-24, torch.bfloat16: 2**-8, torch.float16: 2**-11}


def logits_rtol(args: CommonArgs, dtype: torch.dtype) -> float:
    """Tolerance on ``max|logits - reference|`` relative to ``max|reference|`` between two correct
    implementations (different summation orders, absorbed vs expanded attention, kernels within their
    contracts' tolerances).

    Each layer passes ``args.rounding_points_per_layer`` rounding points in series (V3: two residual
    branches of about four: norm, projections, attention / expert GEMMs, combine; V4: eight, with the mHC
    collapse and expansion), plus the embedding and head: ``points * layers + 4`` error sources. In
    bf16/fp16 each contributes up to a rounding of the activations (``u`` = 2**-8 / 2**-11); in fp32 the
    dominant term is a ``K``-term fp32 dot product, ``K * 2**-24`` with ``K = args.widest_reduction``."""
    unit = args.widest_reduction * 2**-24 if dtype == torch.float32 else _UNIT_ROUNDOFF[dtype]
    return (args.rounding_points_per_layer * args.num_hidden_layers + 4) * unit


def teacher_forced_logits(
    model,
    prompt: torch.Tensor,
    steps: int,
    layer_context: Optional[Callable[[int], contextlib.AbstractContextManager]] = None,
    forced: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Logits ``[B, S + steps, V]`` of a prefill over ``prompt`` ``[B, S]`` then ``steps`` decode steps that
    feed ``forced[:, i]`` (default: the greedy choice), so that runs to compare take the same path."""
    cache = model.new_cache(prompt.shape[0], prompt.shape[1] + steps)
    logits = [model(prompt, cache, layer_context)]
    for i in range(steps):
        nxt = logits[-1][:, -1:].argmax(-1) if forced is None else forced[:, i : i + 1]
        logits.append(model(nxt, cache, layer_context))
    return torch.cat(logits, dim=1).float()


@dataclass
class Finding:
    op: str
    status: str  # "ok", "diverges", "unsupported"
    error: float = 0.0  # max |diff| / max |reference|
    layer: Optional[int] = None
    detail: str = ""


def bisect(
    model,
    backend: str,
    prompt: Sequence[Sequence[int]] = ((1, 2, 3, 4, 5),),
    steps: int = 3,
    ops: Optional[Sequence[str]] = None,
) -> List[Finding]:
    """One :class:`Finding` per operator: run with that operator on ``backend`` and the rest on the CPU
    reference. ``model`` must have been loaded with ``backend='cpu'``."""
    tokens = torch.tensor([list(p) for p in prompt], dtype=torch.int64)
    reference = teacher_forced_logits(model, tokens, steps)
    forced = reference[:, tokens.shape[1] - 1 : -1].argmax(-1)
    tol = logits_rtol(model.args, model.dtype)
    scale = float(reference.abs().max()) or 1.0

    def error(op: str, only_layer: Optional[int]) -> float:
        def ctx(layer: int):
            on = only_layer is None or layer == only_layer
            return hal.use_backend(ops={op: backend}) if on else contextlib.nullcontext()

        got = teacher_forced_logits(model, tokens, steps, ctx, forced)
        return float((got - reference).abs().max()) / scale

    findings = []
    for op in ops or FORWARD_OPS:
        try:
            err = error(op, None)
        except hal.UnsupportedError as exc:
            findings.append(Finding(op, "unsupported", detail=exc.reason))
            continue
        if not err <= tol:  # NaN diverges too
            layer = next((i for i in range(model.args.num_hidden_layers) if not error(op, i) <= tol), None)
            findings.append(Finding(op, "diverges", err, layer))
        else:
            findings.append(Finding(op, "ok", err))
    return findings


def render(findings: List[Finding], backend: str, tol: float) -> str:
    label = hal.registry.registry().emulated_label(backend)
    lines = [f"bisect against backend '{backend}'{label} (tolerance {tol:.3g} of max |logit|):"]
    for f in findings:
        where = f" first at layer {f.layer}" if f.layer is not None else ""
        text = {
            "ok": f"ok (error {f.error:.3g})",
            "unsupported": f"unsupported here: {f.detail}",
            "diverges": f"DIVERGES (error {f.error:.3g}){where}",
        }[f.status]
        lines.append(f"  {f.op:<20} {text}")
    bad = sorted((f for f in findings if f.status == "diverges"), key=lambda f: -1 if f.layer is None else f.layer)
    lines.append(
        f"first diverging operator: {bad[0].op}" + (f" (layer {bad[0].layer})" if bad[0].layer is not None else "")
        if bad
        else "no operator diverges"
    )
    return "\n".join(lines) + "\n"
