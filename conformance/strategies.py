"""Hypothesis strategies shared by the suites.

Tensors are not drawn element by element (slow, and shrinking a million floats says little). A
tensor is drawn as a small :class:`TensorSpec` — a value *kind*, a scale and a seed — and made with a
seeded torch generator. Hypothesis shrinks shapes, kinds and scales, so a minimal failing example
reads like "2 tokens, 1 expert, kind=ties" rather than a wall of numbers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from hypothesis import strategies as st

# Ordered simplest first: hypothesis shrinks towards the start of a sampled_from list.
KINDS = ("normal", "ones", "ties", "uniform", "outliers", "wide_range", "tiny", "near_max")


@dataclass(frozen=True)
class TensorSpec:
    """How to make one tensor's values: ``kind`` of distribution, ``scale``, and a ``seed``."""

    kind: str
    scale: float
    seed: int

    def make(self, shape: Sequence[int], dtype: torch.dtype = torch.float32, *, max_value: float = 0.0) -> torch.Tensor:
        """The tensor, made on the CPU in float32 then cast to ``dtype``.

        ``max_value`` (e.g. a format's largest finite value) is what ``near_max`` approaches.
        """
        g = torch.Generator().manual_seed(self.seed)
        shape = tuple(shape)
        kind, s = self.kind, self.scale
        if kind == "normal":
            v = torch.randn(shape, generator=g) * s
        elif kind == "ones":
            v = torch.full(shape, s)
        elif kind == "ties":  # few distinct values: exact ties everywhere
            v = torch.randint(-2, 3, shape, generator=g).float() * s
        elif kind == "uniform":
            v = (torch.rand(shape, generator=g) * 2 - 1) * s
        elif kind == "outliers":  # mostly small, a few large: stresses per-block scaling
            v = torch.randn(shape, generator=g) * s
            mask = torch.rand(shape, generator=g) < 0.02
            v = torch.where(mask, v * 1000, v)
        elif kind == "wide_range":  # magnitudes spread over ~2**-20 .. 2**20
            v = torch.randn(shape, generator=g).sign() * torch.exp2(torch.rand(shape, generator=g) * 40 - 20) * s
        elif kind == "tiny":  # near and below the smallest normal of low-precision formats
            v = torch.randn(shape, generator=g) * 1e-6 * s
        elif kind == "near_max":
            top = max_value or 1.0
            v = torch.randn(shape, generator=g).sign() * top * (1 - torch.rand(shape, generator=g) * 2**-4)
        else:  # pragma: no cover - KINDS lists every kind
            raise ValueError(kind)
        return v.to(dtype)


def tensor_specs(kinds: Sequence[str] = KINDS, scales: Sequence[float] = (1.0, 0.01, 100.0)) -> st.SearchStrategy:
    return st.builds(TensorSpec, kind=st.sampled_from(tuple(kinds)), scale=st.sampled_from(tuple(scales)),
                     seed=st.integers(0, 2**31 - 1))


def sizes_adding_to(total: int, groups: int) -> st.SearchStrategy:
    """``groups`` non-negative ints adding up to ``total`` (zero-size groups, all-in-one included)."""
    if groups == 1:
        return st.just([total])
    return st.lists(st.integers(0, total), min_size=groups - 1, max_size=groups - 1).map(
        lambda cuts: [b - a for a, b in zip([0] + sorted(cuts), sorted(cuts) + [total])])
