"""Hypothesis strategies shared by the suites.

Tensors are not drawn element by element (slow, and shrinking a million floats says little). A
tensor is drawn as a small :class:`TensorSpec` — a value *kind*, a scale and a seed — and made with a
seeded torch generator. Hypothesis shrinks shapes, kinds and scales, so a minimal failing example
reads like "2 tokens, 1 expert, kind=ties" rather than a wall of numbers.

Sizes are drawn by *cost*: most examples are small (cheap, and where shrinking ends), one in about four is
``large`` — production shapes, bounded per suite so that one example costs a fraction of a second on the CPU
reference — and a dimension lands on a tiling boundary (just below, at or above a power of two or a multiple
of the tile) about a third of the time. Empty inputs are one example in about eight (:func:`empty`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Set

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
    return st.builds(
        TensorSpec,
        kind=st.sampled_from(tuple(kinds)),
        scale=st.sampled_from(tuple(scales)),
        seed=st.integers(0, 2**31 - 1),
    )


def sizes_adding_to(total: int, groups: int) -> st.SearchStrategy:
    """``groups`` non-negative ints adding up to ``total`` (zero-size groups, all-in-one included)."""
    if groups == 1:
        return st.just([total])
    return st.lists(st.integers(0, total), min_size=groups - 1, max_size=groups - 1).map(
        lambda cuts: [b - a for a, b in zip([0] + sorted(cuts), sorted(cuts) + [total])]
    )


# Weighted choices as a wide integer's residue: hypothesis draws small options of sampled_from / booleans far
# more often than uniformly, which would all but starve the rare classes; it still shrinks towards 0.
_WIDE = st.integers(0, 2**16 - 1)
_REGIMES = _WIDE.map(lambda i: "large" if i % 4 == 3 else "small")
_EMPTY = _WIDE.map(lambda i: i % 8 == 7)
_HOW = st.sampled_from(("any", "any", "boundary"))


def large(data: st.DataObject) -> bool:
    """Whether this example is one of the few deliberately large (production-shaped) ones."""
    return data.draw(_REGIMES, label="size regime") == "large"


def empty(data: st.DataObject, label: str) -> bool:
    """An empty input (0 tokens, rows ...) in about one example of eight: a bounded minority."""
    return data.draw(_EMPTY, label=label)


def boundaries(lo: int, hi: int, tile: int = 128) -> List[int]:
    """The sizes in ``[lo, hi]`` where tiling bugs live: a power of two or a multiple of ``tile`` and +-1."""
    marks = {2**i for i in range(hi.bit_length() + 1)} | set(range(tile, hi + tile, tile))
    return sorted({m + d for m in marks for d in (-1, 0, 1) if lo <= m + d <= hi})


def dim(data: st.DataObject, label: str, lo: int, hi: int, tile: int = 128) -> int:
    """A size in ``[lo, hi]``: uniform, or (a third of the time) on a tiling boundary."""
    if data.draw(_HOW, label=f"{label}: how") == "boundary":
        return data.draw(st.sampled_from(boundaries(lo, hi, tile)), label=label)
    return data.draw(st.integers(lo, hi), label=label)


def tiling(name: str, n: int, tile: int = 128) -> Set[str]:
    """The boundary classes of one size, for :func:`hal.conformance.core.note`: ``N=0``, ``N=1``,
    ``N=2^k``, ``N=2^k-1``, ``N=2^k+1``, ``N=tile-multiple``, ``N>tile`` (more than one tile) and
    ``N:tail`` (more than one tile, the last partial)."""
    if n <= 1:
        return {f"{name}={n}"}
    out = set()
    for d, tag in ((0, "2^k"), (1, "2^k-1"), (-1, "2^k+1")):
        m = n + d
        if m > 2 and m & (m - 1) == 0:
            out.add(f"{name}={tag}")
    if n % tile == 0:
        out.add(f"{name}={tile}k")
    if n > tile:
        out.add(f"{name}>{tile}")
        if n % tile:
            out.add(f"{name}:tail")
    return out
