"""``hal.model.load``: a checkpoint directory -> a ready :class:`~hal.model.deepseek_v3.Transformer`."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional, Union

import torch

import hal
from hal.contract import FLOAT_DTYPES, Request, dtype_name, get_op
from hal.dispatch import route
from hal.formats import FP8_DTYPE
from hal.model.checkpoint import Checkpoint
from hal.model.config import read_config
from hal.model.deepseek_v3 import Transformer, Weights

FP8_MODES = ("auto", "keep", "dequantize")


def _backend_keeps_fp8(dtype: torch.dtype) -> bool:
    """Whether the selected backend serves the FP8 requests a quantised model makes (else: dequantise)."""
    cpu = torch.device("cpu")
    fp8 = dtype_name(FP8_DTYPE)
    requests = {
        "quantize_fp8": (("dtype", dtype_name(dtype)), ("scale_fmt", "fp32")),
        "fp8_gemm": (("out_dtype", dtype_name(dtype)),),
        "grouped_gemm": (("layout", "contiguous"), ("x_dtype", fp8), ("w_dtype", fp8),
                         ("out_dtype", dtype_name(dtype))),
    }
    return all(route(get_op(op)).refusal(Request(cpu, features)) is None for op, features in requests.items())


def load(path: Union[str, Path], backend: Optional[str] = None, dtype: torch.dtype = torch.bfloat16,
         fp8: str = "auto") -> Transformer:
    """Load a Hugging Face style DeepSeek checkpoint directory (``config.json`` + safetensors, sharded with
    ``model.safetensors.index.json`` or not).

    * ``backend``: the HAL backend every forward runs on (None: the settings in force, see
      docs/selecting-a-backend.md).
    * ``dtype``: compute / weight dtype (bfloat16, float16 or float32); router weights stay float32.
    * ``fp8``: for FP8 block-quantised checkpoints: ``"keep"`` the weights quantised (FP8 GEMMs through
      :func:`hal.ops.fp8_gemm` / :func:`hal.ops.grouped_gemm`), ``"dequantize"`` them on load, or
      ``"auto"``: keep them when the backend serves those FP8 requests.

    Every tensor is checked against the shape the config implies before the model exists: a missing,
    misshapen, unreadable or unexpected tensor raises :class:`hal.model.CheckpointError` naming it.
    """
    if dtype not in FLOAT_DTYPES:
        raise hal.InvalidArgumentError("hal.model.load", "dtype", "torch.bfloat16, torch.float16 or torch.float32",
                                       repr(dtype))
    if fp8 not in FP8_MODES:
        raise hal.InvalidArgumentError("hal.model.load", "fp8", "'auto', 'keep' or 'dequantize'", repr(fp8))
    args = read_config(Path(path))
    with hal.use_backend(backend) if backend else contextlib.nullcontext():
        keep = args.fp8_block is not None and (fp8 == "keep" or (fp8 == "auto" and _backend_keeps_fp8(dtype)))
        ckpt = Checkpoint(Path(path))
        try:
            model = Transformer(args, Weights(ckpt, args, dtype, keep), backend)
        except BaseException:
            ckpt.close()
            raise
    ckpt.finish(ignored=lambda name: _mtp_layer(name, args.num_hidden_layers))
    return model


def _mtp_layer(name: str, num_layers: int) -> bool:
    """``model.layers.<n>.*`` with ``n >= num_hidden_layers``: the multi-token-prediction module, not run here."""
    parts = name.split(".")
    return len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and int(parts[2]) >= num_layers
