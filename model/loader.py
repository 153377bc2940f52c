"""``hal.model.load``: a checkpoint directory -> a ready :class:`~hal.model.deepseek_v3.Transformer`."""

from __future__ import annotations

import contextlib
import re
import warnings
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch

import hal
from hal.contract import FLOAT_DTYPES, Request, dtype_name, get_op
from hal.dispatch import route
from hal.formats import FP8_DTYPE
from hal.model import deepseek_v4
from hal.model.checkpoint import Checkpoint
from hal.model.config import CommonArgs, V4Args, read_config
from hal.model.deepseek_v3 import FP8_WEIGHT_MODES, Transformer, Weights
from hal.registry import registry

FP8_MODES = ("auto",) + FP8_WEIGHT_MODES
FP4_MODES = ("auto",) + deepseek_v4.FP4_WEIGHT_MODES


def _serves(requests: Dict[str, Tuple[Tuple[str, str], ...]]) -> bool:
    """Whether the selected backend serves every ``{op: features}`` request (CPU tensors: where the model's
    arguments are)."""
    cpu = torch.device("cpu")
    return all(route(get_op(op)).refusal(Request(cpu, features)) is None for op, features in requests.items())


def _backend_serves(dtype: torch.dtype, weights: str) -> bool:
    """Whether the selected backend serves the requests a model whose linears hold ``weights`` (``"fp8"``
    or ``"int8"``) makes: the activation quantiser, the dense GEMM and the experts' grouped GEMM."""
    out = dtype_name(dtype)
    fp8 = dtype_name(FP8_DTYPE)
    if weights == "fp8":
        requests = {"quantize_fp8": (("dtype", out), ("scale_fmt", "fp32")), "fp8_gemm": (("out_dtype", out),)}
    else:
        requests = {"quantize_int8": (("dtype", out),), "int8_gemm": (("out_dtype", out),)}
    operand = fp8 if weights == "fp8" else "int8"
    requests["grouped_gemm"] = (
        ("layout", "contiguous"),
        ("x_dtype", operand),
        ("w_dtype", operand),
        ("out_dtype", out),
    )
    return _serves(requests)


def choose_fp8(fp8: str, dtype: torch.dtype) -> Tuple[str, str]:
    """``(mode, why)``: what becomes of an FP8 checkpoint's weights under ``fp8`` on the selected backend.
    ``"auto"`` prefers keeping FP8 (the backend serves FP8 GEMMs) over W8A8 int8 (it serves int8 GEMMs,
    e.g. Ascend Atlas A2/A3) over dequantising."""
    if fp8 != "auto":
        return fp8, "requested"
    if _backend_serves(dtype, "fp8"):
        return "keep", "auto: the backend serves the FP8 GEMMs"
    if _backend_serves(dtype, "int8"):
        return "int8", "auto: the backend serves W8A8 int8 GEMMs but not FP8 ones"
    return "dequantize", "auto: the backend serves neither FP8 nor int8 GEMMs"


def choose_fp4(fp4: str, activations: torch.dtype, dtype: torch.dtype) -> Tuple[str, str]:
    """``(mode, why)``: what becomes of FP4 expert weights under ``fp4`` on the selected backend, the experts
    multiplying ``activations`` (:func:`hal.model.deepseek_v4.fp4_activation_dtype`). ``"auto"`` keeps them
    packed when the backend serves that grouped GEMM with FP4 weights, else dequantises them."""
    if fp4 != "auto":
        return fp4, "requested"
    x = dtype_name(activations)
    if _serves(
        {
            "grouped_gemm": (
                ("layout", "contiguous"),
                ("x_dtype", x),
                ("w_dtype", "fp4_e2m1"),
                ("out_dtype", dtype_name(dtype)),
            )
        }
    ):
        return "keep", f"auto: the backend serves grouped GEMMs of {x} activations and FP4 weights"
    return "dequantize", f"auto: the backend serves no grouped GEMM of {x} activations and FP4 weights"


def load(
    path: Union[str, Path],
    backend: Optional[str] = None,
    dtype: torch.dtype = torch.bfloat16,
    fp8: str = "auto",
    fp4: str = "auto",
    strict: bool = True,
) -> Transformer:
    """Load a Hugging Face style DeepSeek checkpoint directory (``config.json`` + safetensors, sharded with
    ``model.safetensors.index.json`` or not). DeepSeek V4 tensors may be named as the released checkpoints
    name them (``layers.<i>.attn.wq_a.weight``, ``embed.weight``, scales ``<module>.scale``) or as transformers'
    ``save_pretrained`` writes them (``model.layers.<i>...``, ``weight_scale_inv``): told apart by the names.

    * ``backend``: the HAL backend every forward runs on (None: the settings in force, see
      docs/selecting-a-backend.md); an unknown or unavailable one is refused here, naming the registered ones.
    * ``dtype``: compute / weight dtype (bfloat16, float16 or float32); router weights stay float32.
    * ``fp8``: for FP8 block-quantised checkpoints: ``"keep"`` the weights quantised (FP8 GEMMs through
      :func:`hal.ops.fp8_gemm` / :func:`hal.ops.grouped_gemm`), convert them once to W8A8 ``"int8"``
      (per-channel int8 weights, per-token int8 activations: :func:`hal.ops.int8_gemm` and int8
      :func:`hal.ops.grouped_gemm`; for accelerators without FP8), ``"dequantize"`` them on load, or
      ``"auto"``: keep > int8 > dequantize, the first the backend serves (:func:`choose_fp8`).
      The model's ``fp8`` attribute says what was chosen (None for a checkpoint without FP8 weights)
      and ``fp8_reason`` why.
    * ``fp4``: for DeepSeek V4 checkpoints with FP4 experts (``expert_dtype: fp4``): ``"keep"`` them packed
      (FP4 operands of :func:`hal.ops.grouped_gemm`; activations FP8 when the model keeps FP8 linears, else
      ``dtype``), ``"dequantize"`` them on load (:func:`hal.ops.dequantize_fp4`), or ``"auto"``: keep when
      the backend serves it (:func:`choose_fp4`). Reported as ``model.fp4`` / ``model.fp4_reason``.

    * ``strict``: every tensor of the files is one the config's model uses, or one of its
      ``num_nextn_predict_layers`` multi-token-prediction layers (skipped); every tensor the model needs is in
      the files. ``strict=False`` skips unexpected tensors and fills a missing routing bias with zeros (as
      transformers does), with a warning; ``model.load_report`` (:class:`~hal.model.checkpoint.LoadReport`)
      lists them. Any other missing tensor is an error either way: no weights are made up.

    Every tensor is checked against the shape the config implies before the model exists: missing, misshapen,
    unreadable or unexpected tensors raise :class:`hal.model.CheckpointError` naming them.
    """
    if dtype not in FLOAT_DTYPES:
        raise hal.InvalidArgumentError(
            "hal.model.load", "dtype", "torch.bfloat16, torch.float16 or torch.float32", repr(dtype)
        )
    for name, value, modes in (("fp8", fp8, FP8_MODES), ("fp4", fp4, FP4_MODES)):
        if value not in modes:
            raise hal.InvalidArgumentError("hal.model.load", name, " or ".join(repr(m) for m in modes), repr(value))
    if backend:
        registry().backend(backend)  # an unknown or unavailable backend fails here, not at the first forward
    args = read_config(Path(path))
    fp4_experts = isinstance(args, V4Args) and args.fp4_experts
    with hal.use_backend(backend) if backend else contextlib.nullcontext():
        mode, why = choose_fp8(fp8, dtype) if args.fp8_block is not None else ("dequantize", "")
        fp4_mode, fp4_why = (
            choose_fp4(fp4, deepseek_v4.fp4_activation_dtype(args, mode, dtype), dtype) if fp4_experts else (None, "")
        )
        ckpt = Checkpoint(Path(path), strict)
        try:
            if isinstance(args, V4Args):
                model = deepseek_v4.Transformer(args, deepseek_v4.Weights(ckpt, args, dtype, mode, fp4_mode), backend)
                model.fp4, model.fp4_reason = fp4_mode, fp4_why
            else:
                model = Transformer(args, Weights(ckpt, args, dtype, mode), backend)
        except BaseException as exc:
            ckpt.close()
            if isinstance(exc, Exception):  # zeros standing in for a missing tensor may be what broke: name it
                ckpt.check_missing()
            raise
    if args.fp8_block is not None:
        model.fp8, model.fp8_reason = mode, why
    model.load_report = ckpt.finish(expected=lambda name: _mtp_layer(name, args))
    if model.load_report.skipped or model.load_report.defaulted:
        warnings.warn(f"{path}: {model.load_report} (strict=False)", stacklevel=2)
    return model


def _mtp_layer(name: str, args: CommonArgs) -> bool:
    """Whether ``name`` (as the files name it) is in one of the ``num_nextn_predict_layers`` multi-token-prediction
    modules, which are not run here: V3's ``model.layers.<n>.*`` right after the model's layers, V4's
    ``mtp.<k>.*``."""
    v4 = isinstance(args, V4Args)
    match = re.match(r"(?:model\.)?mtp\.(\d+)\." if v4 else r"model\.layers\.(\d+)\.", name)
    return (
        match is not None
        and 0 <= int(match.group(1)) - (0 if v4 else args.num_hidden_layers) < args.num_nextn_predict_layers
    )
