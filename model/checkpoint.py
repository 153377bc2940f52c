"""Reading a Hugging Face style checkpoint: safetensors shards (with or without an index), every tensor
checked against the shape the config implies before it is used. Never pickle."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Callable, Dict, KeysView, Optional, Sequence, Set, Tuple

import torch
from safetensors import safe_open

from hal.formats import FP4_GROUP, FP8_DTYPE, fp4_dtypes, scale_dtypes
from hal.model.config import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SCALE_SUFFIX = "_scale_inv"  # FP8 weights: "<name>.weight" + "<name>.weight_scale_inv" (the dequant multiplier)
FP4_STORAGE_DTYPES = (torch.int8,) + fp4_dtypes()


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except Exception as exc:  # safetensors raises its own error types for truncated or corrupt files
        raise CheckpointError(f"{file.name}: cannot read safetensors file ({exc})") from None


class Checkpoint:
    """The tensors of a checkpoint directory, read on demand and checked; :meth:`finish` then refuses
    tensors nobody asked for. Callers ask by the model's tensor names; :meth:`read_as` maps them to a
    checkpoint that names its tensors otherwise. Errors name tensors as the files do."""

    def __init__(self, path: Path):
        self.path = Path(path)
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

    def __contains__(self, name: str) -> bool:
        return self._file_name(name) in self._where

    def _raw(self, name: str) -> torch.Tensor:
        file = self._where.get(name)
        if file is None:
            raise CheckpointError(f"missing tensor '{name}'")
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = _open(file).__enter__()
        try:
            t = handle.get_tensor(name)
        except Exception as exc:
            raise CheckpointError(f"tensor '{name}' in {file.name}: cannot read ({exc})") from None
        self._used.add(name)
        return t

    def _shaped(self, name: str, shape: Sequence[int], what: str = "shape") -> torch.Tensor:
        t = self._raw(name)
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"tensor '{name}': expected {what} {list(shape)}, got {list(t.shape)}")
        return t

    def tensor(self, name: str, shape: Sequence[int], dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The tensor ``name``, checked to have ``shape``, converted to ``dtype`` (a float dtype)."""
        return self._float(self._file_name(name), shape, dtype)

    def _float(self, name: str, shape: Sequence[int], dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        t = self._shaped(name, shape)
        if not t.is_floating_point():
            raise CheckpointError(f"tensor '{name}': expected a float tensor, got {t.dtype}")
        return t if dtype is None else t.to(dtype)

    def ids(self, name: str, shape: Sequence[int], upper: int) -> torch.Tensor:
        """The integer tensor ``name`` (e.g. V4's ``tid2eid``), checked to have ``shape`` and values in
        ``[0, upper)``, as int64."""
        name = self._file_name(name)
        t = self._shaped(name, shape)
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise CheckpointError(f"tensor '{name}': expected an integer tensor, got {t.dtype}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= upper):
            raise CheckpointError(f"tensor '{name}': expected values in [0, {upper}), "
                                  f"got [{int(t.min())}, {int(t.max())}]")
        return t.long()

    def weight(self, prefix: str, out_features: int, in_features: int,
               dtype: torch.dtype) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``prefix.weight`` ``[out, in]``: ``(weight in dtype, None)``, or ``(e4m3 weight, float32 scales)``
        when the checkpoint stores it FP8 block-quantised with ``prefix.weight_scale_inv``."""
        name, scale_name = self._weight_names(prefix)
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
            raise CheckpointError(f"tensor '{name}': packed FP4 needs in_features divisible by {FP4_GROUP}, "
                                  f"got {in_features}")
        q = self._shaped(name, (out_features, in_features // 2), "packed FP4 shape [out, in / 2] =")
        if q.dtype not in FP4_STORAGE_DTYPES:
            raise CheckpointError(f"tensor '{name}': expected packed FP4 (int8, uint8 or float4_e2m1fn_x2), "
                                  f"got {q.dtype}")
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

    def finish(self, ignored: Callable[[str], bool]) -> None:
        """Close the files; raise if the checkpoint holds tensors the model did not use (and ``ignored``
        does not excuse)."""
        self.close()
        extra = sorted(n for n in self._where if n not in self._used and not ignored(n))
        if extra:
            more = f" (and {len(extra) - 5} more)" if len(extra) > 5 else ""
            raise CheckpointError(f"unexpected tensor(s) {extra[:5]}{more}: not part of this config's model")
