"""``config.json`` of a Hugging Face style DeepSeek checkpoint -> :class:`ModelArgs`."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

from hal.errors import HalError

V3_TYPES = ("deepseek_v3",)  # V3, R1, V3.1 configs all say deepseek_v3
V4_TYPES = ("deepseek_v4",)


class CheckpointError(HalError, ValueError):
    """A checkpoint directory the loader cannot use; the message names the file, field or tensor."""


class ModelNotSupportedError(HalError, NotImplementedError):
    """A valid checkpoint of an architecture this package does not implement (yet)."""


@dataclass(frozen=True)
class ModelArgs:
    """The hyper-parameters a DeepSeek V3 forward needs (Hugging Face names).

    * ``vocab_size``, ``hidden_size``, ``num_hidden_layers``, ``rms_norm_eps``;
    * MLA: ``num_attention_heads``, ``q_lora_rank`` (None: a plain ``q_proj``), ``kv_lora_rank`` (latent
      width), ``qk_nope_head_dim`` / ``qk_rope_head_dim`` (per-head query/key split), ``v_head_dim``,
      ``rope_interleave`` (DeepSeek's interleaved pairs, else rotate-half);
    * RoPE / YaRN: ``rope_theta``, ``rope_factor`` (1: no YaRN), ``original_max_position_embeddings``,
      ``beta_fast``, ``beta_slow``, ``mscale``, ``mscale_all_dim``, ``rope_truncate``;
    * MLP / MoE: ``intermediate_size`` (dense layers), ``first_k_dense_replace`` (how many dense layers come
      first), ``moe_intermediate_size``, ``n_routed_experts``, ``n_shared_experts``, ``num_experts_per_tok``,
      ``n_group`` / ``topk_group`` (group-limited routing), ``routed_scaling_factor``, ``norm_topk_prob``,
      ``scoring_func`` ('sigmoid' or 'softmax');
    * ``fp8_block``: the ``weight_block_size`` of an FP8 checkpoint, None for a plain one;
      ``scale_fmt``: 'ue8m0' when the checkpoint's activations are quantised with power-of-two scales.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    rms_norm_eps: float
    num_attention_heads: int
    q_lora_rank: Optional[int]
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_interleave: bool
    rope_theta: float
    rope_factor: float
    original_max_position_embeddings: int
    beta_fast: float
    beta_slow: float
    mscale: float
    mscale_all_dim: float
    rope_truncate: bool
    intermediate_size: int
    first_k_dense_replace: int
    moe_intermediate_size: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    norm_topk_prob: bool
    scoring_func: str
    tie_word_embeddings: bool
    fp8_block: Optional[tuple]
    scale_fmt: Optional[str]

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """DeepSeek's ``qk_head_dim**-0.5 * mscale**2`` (the YaRN mscale of ``mscale_all_dim``)."""
        scale = self.qk_head_dim ** -0.5
        if self.rope_factor > 1 and self.mscale_all_dim:
            m = 0.1 * self.mscale_all_dim * math.log(self.rope_factor) + 1.0
            scale *= m * m
        return scale

    def is_moe_layer(self, layer: int) -> bool:
        return self.n_routed_experts > 0 and layer >= self.first_k_dense_replace


def _field(cfg: Dict[str, Any], name: str, kind: type, default: Any = None, required: bool = True) -> Any:
    if name not in cfg or cfg[name] is None:
        if required and default is None:
            raise CheckpointError(f"config.json: missing field '{name}'")
        return default
    value = cfg[name]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else isinstance(value, kind)
    if not ok:
        raise CheckpointError(f"config.json: field '{name}' must be {kind.__name__}, got {value!r}")
    if kind is int and value < 0:
        raise CheckpointError(f"config.json: field '{name}' must be >= 0, got {value!r}")
    return float(value) if kind is float else value


def _rope(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """``rope_parameters`` (transformers 5) or ``rope_scaling`` + ``rope_theta`` (official configs)."""
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rope.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "yarn"):
        raise CheckpointError(f"config.json: field 'rope_scaling.type' must be 'yarn' or absent, got {kind!r}")
    if kind == "default":
        return {"rope_theta": rope["rope_theta"], "factor": 1.0}
    for name in ("factor", "original_max_position_embeddings"):
        if name not in rope:
            raise CheckpointError(f"config.json: missing field 'rope_scaling.{name}' (YaRN)")
    return rope


def _quantization(cfg: Dict[str, Any]) -> tuple:
    q = cfg.get("quantization_config")
    if not q:
        return None, None
    if q.get("quant_method") != "fp8":
        raise CheckpointError(f"config.json: field 'quantization_config.quant_method' must be 'fp8', "
                              f"got {q.get('quant_method')!r}")
    block = tuple(q.get("weight_block_size") or (128, 128))
    if block != (128, 128):
        raise CheckpointError(f"config.json: field 'quantization_config.weight_block_size' must be [128, 128] "
                              f"(the HAL's FP8 weight blocks), got {list(block)}")
    fmt = q.get("scale_fmt", cfg.get("scale_fmt"))
    if fmt not in (None, "ue8m0"):
        raise CheckpointError(f"config.json: field 'scale_fmt' must be 'ue8m0' or absent, got {fmt!r}")
    return block, fmt


def read_config(path: Path) -> ModelArgs:
    """Parse ``path/config.json``; a missing, malformed or unsupported config raises :class:`CheckpointError`
    (:class:`ModelNotSupportedError` for ``deepseek_v4``), naming the field."""
    file = Path(path) / "config.json"
    try:
        cfg = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no config.json (not a Hugging Face checkpoint directory)") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    model_type = cfg.get("model_type")
    if model_type in V4_TYPES:
        raise ModelNotSupportedError("config.json: model_type 'deepseek_v4' is not implemented yet (missing: "
                                     "sliding-window + compressed CSA/HCA attention with the lightning indexer and "
                                     "sinks, grouped output projection, mHC hyper-connections, hash routing, "
                                     "clamped SwiGLU, FP4 expert weights)")
    if model_type not in V3_TYPES:
        raise CheckpointError(f"config.json: field 'model_type' must be one of {list(V3_TYPES + V4_TYPES)}, "
                              f"got {model_type!r}")
    rope = _rope(cfg)
    block, fmt = _quantization(cfg)
    heads = _field(cfg, "num_attention_heads", int)
    kv_heads = cfg.get("num_key_value_heads", heads)
    if kv_heads != heads:
        raise CheckpointError(f"config.json: field 'num_key_value_heads' must equal num_attention_heads = {heads} "
                              f"(MLA), got {kv_heads!r}")
    scoring = cfg.get("scoring_func", "sigmoid")
    if scoring not in ("sigmoid", "softmax"):
        raise CheckpointError(f"config.json: field 'scoring_func' must be 'sigmoid' or 'softmax', got {scoring!r}")
    n_routed = _field(cfg, "n_routed_experts", int, 0, required=False)
    args = ModelArgs(
        model_type=model_type,
        vocab_size=_field(cfg, "vocab_size", int),
        hidden_size=_field(cfg, "hidden_size", int),
        num_hidden_layers=_field(cfg, "num_hidden_layers", int),
        rms_norm_eps=_field(cfg, "rms_norm_eps", float, 1e-6),
        num_attention_heads=heads,
        q_lora_rank=_field(cfg, "q_lora_rank", int, required=False),
        kv_lora_rank=_field(cfg, "kv_lora_rank", int),
        qk_nope_head_dim=_field(cfg, "qk_nope_head_dim", int),
        qk_rope_head_dim=_field(cfg, "qk_rope_head_dim", int),
        v_head_dim=_field(cfg, "v_head_dim", int),
        rope_interleave=bool(cfg.get("rope_interleave", True)),
        rope_theta=float(rope["rope_theta"]),
        rope_factor=float(rope["factor"]),
        original_max_position_embeddings=int(rope.get("original_max_position_embeddings", 0)),
        beta_fast=float(rope.get("beta_fast") or 32),
        beta_slow=float(rope.get("beta_slow") or 1),
        mscale=float(rope.get("mscale") or 0),
        mscale_all_dim=float(rope.get("mscale_all_dim") or 0),
        rope_truncate=bool(rope.get("truncate", True)),
        intermediate_size=_field(cfg, "intermediate_size", int),
        first_k_dense_replace=_field(cfg, "first_k_dense_replace", int, 0, required=False),
        moe_intermediate_size=_field(cfg, "moe_intermediate_size", int, 0, required=n_routed > 0),
        n_routed_experts=n_routed,
        n_shared_experts=_field(cfg, "n_shared_experts", int, 0, required=False),
        num_experts_per_tok=_field(cfg, "num_experts_per_tok", int, 1, required=False),
        n_group=_field(cfg, "n_group", int, 1, required=False),
        topk_group=_field(cfg, "topk_group", int, 1, required=False),
        routed_scaling_factor=_field(cfg, "routed_scaling_factor", float, 1.0, required=False),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
        scoring_func=scoring,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        fp8_block=block,
        scale_fmt=fmt,
    )
    if args.qk_rope_head_dim % 2:
        raise CheckpointError(f"config.json: field 'qk_rope_head_dim' must be even, got {args.qk_rope_head_dim}")
    return args
