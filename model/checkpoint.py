"""Reading a Hugging Face style checkpoint: safetensors shards (with or without an index), every tensor
checked against the shape the config implies before it is used. Never pickle."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, KeysView, List, Optional, Sequence, Set, Tuple

import torch
from safetensors import safe_open

from hal.formats import FP4_GROUP, FP8_DTYPE, fp4_dtypes, scale_dtypes
from hal.model.config import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SCALE_SUFFIX = "_scale_inv"  # FP8 weights: "<name>.weight" + "<name>.weight_scale_inv" (the dequant multiplier)
FP4_STORAGE_DTYPES = (torch.int8,) + fp4_dtypes()


def named(what: str, names: Sequence[str], shown: int = 5) -> str:
    """``"missing tensor 'a'"`` or ``"3 missing tensors: 'a', 'b', 'c'"``, the first ``shown`` and a count."""
    if len(names) == 1:
        return f"{what} '{names[0]}'"
    listed = ", ".join(f"'{n}'" for n in names[:shown])
    return f"{len(names)} {what}s: {listed}" + (f" and {len(names) - shown} more" if len(names) > shown else "")


@dataclass(frozen=True)
class LoadReport:
    """What a non-strict load (``hal.model.load(..., strict=False)``) let through, as the files name the tensors:
    ``skipped``, tensors of the files the model does not use (a strict load refuses them; MTP layers are
    expected and not listed); ``defaulted``, missing tensors filled with their neutral default (a routing bias
    of zeros, as transformers does)."""

    skipped: Tuple[str, ...] = ()
    defaulted: Tuple[str, ...] = ()

    def __str__(self) -> str:
        parts = [
            named("unexpected tensor", self.skipped) + " skipped" if self.skipped else "",
            named("missing tensor", self.defaulted) + " defaulted" if self.defaulted else "",
        ]
        return "; ".join(p for p in parts if p) or "every tensor accounted for"


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except Exception as exc:  # safetensors raises its own error types for truncated or corrupt files
        raise CheckpointError(f"{file.name}: cannot read safetensors file ({exc})") from None


class Checkpoint:
    """The tensors of a checkpoint directory, read on demand and checked; :meth:`finish` then names every
    missing tensor and refuses tensors nobody asked for (``strict``), or skips those and reports them (not
    ``strict``, which also fills a missing tensor that has a neutral default with it). A missing tensor is
    recorded and stood in for by zeros, so that the load goes on and one error names all of them. Callers ask
    by the model's tensor names; :meth:`read_as` maps them to a checkpoint that names its tensors otherwise.
    Errors name tensors as the files do."""

    def __init__(self, path: Path, strict: bool = True):
        self.path, self.strict = Path(path), strict
        index = self.path / INDEX_FILE
        self._where: Dict[str, Path] = {}
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{INDEX_FILE}: no valid 'weight_map' ({exc})") from None
            files = {f: self.path / f for f in set(weight_map.values())}
            for name, file in files.items():
                if not file.exists():
                    raise CheckpointError(f"{INDEX_FILE}: names shard '{name}', which does not exist")
            self._where = {t: files[f] for t, f in weight_map.items()}
        else:
            shards = sorted(self.path.glob("*.safetensors"))
            if not shards:
                raise CheckpointError(f"{self.path}: no *.safetensors files (pickle checkpoints are not read)")
            for file in shards:
                with _open(file) as f:
                    self._where.update({name: file for name in f.keys()})
        self._handles: Dict[Path, object] = {}
        self._used: Set[str] = set()
        self._missing: List[str] = []
        self._defaulted: List[str] = []
        self._renames: Tuple[Tuple[re.Pattern, str], ...] = ()

    def file_names(self) -> KeysView[str]:
        """The names of the tensors the files hold."""
        return self._where.keys()

    def read_as(self, renames: Sequence[Tuple[str, str]]) -> None:
        """Look every tensor name asked for up as rewritten by ``renames``: ``(regex, replacement)`` pairs of
        :func:`re.sub`, applied in order."""
        self._renames = tuple((re.compile(pattern), replacement) for pattern, replacement in renames)

    def _file_name(self, name: str) -> str:
        for pattern, replacement in self._renames:
            name = pattern.sub(replacement, name)
        return name

    def _weight_names(self, prefix: str) -> Tuple[str, str]:
        """The file names of ``prefix.weight`` and of its block scales."""
        return self._file_name(f"{prefix}.weight"), self._file_name(f"{prefix}.weight{SCALE_SUFFIX}")

    def _absent(self, name: str, default: Optional[float] = None) -> Optional[float]:
        """None when the files hold ``name``; else the value to fill its stand-in with: its ``default`` when not
        strict (reported as defaulted), else 0 (reported as missing by :meth:`finish`)."""
        if name in self._where:
            return None
        if default is not None and not self.strict:
            self._defaulted.append(name)
            return default
        self._missing.append(name)
        return 0.0

    def _raw(self, name: str) -> torch.Tensor:
        file = self._where[name]  # callers have ruled out a missing tensor (_absent)
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = _open(file).__enter__()
        try:
            t = handle.get_tensor(name)
            # the file's view starts wherever the tensor lies in the file, and kernels may sum in another order on
            # unaligned data (same weights, other logits): such a tensor is copied into torch's aligned memory
            if t.data_ptr() % 64:
                t = t.clone()
        except Exception as exc:
            raise CheckpointError(f"tensor '{name}' in {file.name}: cannot read ({exc})") from None
        self._used.add(name)
        return t

    def _shaped(self, name: str, shape: Sequence[int], what: str = "shape") -> torch.Tensor:
        t = self._raw(name)
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"tensor '{name}': expected {what} {list(shape)}, got {list(t.shape)}")
        return t

    def tensor(
        self, name: str, shape: Sequence[int], dtype: Optional[torch.dtype] = None, default: Optional[float] = None
    ) -> torch.Tensor:
        """The tensor ``name``, checked to have ``shape``, converted to ``dtype`` (a float dtype). ``default``: the
        neutral value of a tensor a non-strict load may fill in when the files lack it."""
        name = self._file_name(name)
        fill = self._absent(name, default)
        if fill is not None:
            return torch.full(tuple(shape), fill, dtype=dtype or torch.float32)
        return self._float(name, shape, dtype)

    def _float(self, name: str, shape: Sequence[int], dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        t = self._shaped(name, shape)
        if not t.is_floating_point():
            raise CheckpointError(f"tensor '{name}': expected a float tensor, got {t.dtype}")
        return t if dtype is None else t.to(dtype)

    def ids(self, name: str, shape: Sequence[int], upper: int) -> torch.Tensor:
        """The integer tensor ``name`` (e.g. V4's ``tid2eid``), checked to have ``shape`` and values in
        ``[0, upper)``, as int64."""
        name = self._file_name(name)
        if self._absent(name) is not None:
            return torch.zeros(tuple(shape), dtype=torch.long)
        t = self._shaped(name, shape)
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise CheckpointError(f"tensor '{name}': expected an integer tensor, got {t.dtype}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= upper):
            raise CheckpointError(
                f"tensor '{name}': expected values in [0, {upper}), got [{int(t.min())}, {int(t.max())}]"
            )
        return t.long()

    def weight(
        self, prefix: str, out_features: int, in_features: int, dtype: torch.dtype
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``prefix.weight`` ``[out, in]``: ``(weight in dtype, None)``, or ``(e4m3 weight, float32 scales)``
        when the checkpoint stores it FP8 block-quantised with ``prefix.weight_scale_inv``."""
        name, scale_name = self._weight_names(prefix)
        if self._absent(name) is not None:
            self._used.add(scale_name)  # its scale, if any, is no unexpected tensor: the error names the weight
            return torch.zeros(out_features, in_features, dtype=dtype), None
        if scale_name not in self._where:
            w = self._float(name, (out_features, in_features))
            if w.dtype == FP8_DTYPE:
                raise CheckpointError(f"tensor '{name}' is FP8 but '{scale_name}' is missing")
            return w.to(dtype), None
        q = self._float(name, (out_features, in_features))
        if q.dtype != FP8_DTYPE:
            raise CheckpointError(f"tensor '{name}': expected float8_e4m3fn (it has '{scale_name}'), got {q.dtype}")
        s = self._float(scale_name, (math.ceil(out_features / 128), math.ceil(in_features / 128)))
        if s.dtype not in scale_dtypes():
            raise CheckpointError(f"tensor '{scale_name}': expected float32 or UE8M0 scales, got {s.dtype}")
        return q, s.float()

    def fp4_weight(self, prefix: str, out_features: int, in_features: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``prefix.weight`` stored packed FP4 (V4's ``expert_dtype: fp4`` experts, DeepGEMM's operand): two
        e2m1 values a byte, the lower index in the low nibble, ``[out, in / 2]`` int8 (as transformers stores
        it), uint8 or float4_e2m1fn_x2, with ``prefix.weight_scale_inv`` ``[out, in / 32]`` (UE8M0 or float32).
        Returns ``(uint8 packed weight, float32 scales)``."""
        name, scale_name = self._weight_names(prefix)
        if in_features % FP4_GROUP:
            raise CheckpointError(
                f"tensor '{name}': packed FP4 needs in_features divisible by {FP4_GROUP}, got {in_features}"
            )
        if self._absent(name) is not None:
            self._used.add(scale_name)
            return (
                torch.zeros(out_features, in_features // 2, dtype=torch.uint8),
                torch.zeros(out_features, in_features // FP4_GROUP),
            )
        q = self._shaped(name, (out_features, in_features // 2), "packed FP4 shape [out, in / 2] =")
        if q.dtype not in FP4_STORAGE_DTYPES:
            raise CheckpointError(
                f"tensor '{name}': expected packed FP4 (int8, uint8 or float4_e2m1fn_x2), got {q.dtype}"
            )
        if scale_name not in self._where:
            raise CheckpointError(f"tensor '{name}' is packed FP4 but '{scale_name}' is missing")
        s = self._shaped(scale_name, (out_features, in_features // FP4_GROUP), "one scale per 32 along K, shape")
        if s.dtype not in scale_dtypes():
            raise CheckpointError(f"tensor '{scale_name}': expected UE8M0 or float32 scales, got {s.dtype}")
        return q.view(torch.uint8), s.float()

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()

    def check_missing(self) -> None:
        """Raise naming the tensors asked for so far that the files lack."""
        if self._missing:
            raise CheckpointError(named("missing tensor", self._missing))

    def finish(self, expected: Callable[[str], bool]) -> LoadReport:
        """Close the files; raise naming every missing tensor, and (``strict``) every tensor of the files the model
        did not use that is not an ``expected`` extra (MTP layers). Returns what a non-strict load let through."""
        self.close()
        self.check_missing()
        extra = sorted(n for n in self._where if n not in self._used and not expected(n))
        if extra and self.strict:
            raise CheckpointError(
                f"{named('unexpected tensor', extra)}: not part of this config's model (strict=False skips them)"
            )
        return LoadReport(tuple(extra), tuple(self._defaulted))
