"""``config.json`` of a Hugging Face style DeepSeek checkpoint -> :class:`ModelArgs`."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

from hal.contract import is_number
from hal.errors import HalError

V3_TYPES = ("deepseek_v3",)  # V3, R1, V3.1 configs all say deepseek_v3
V4_TYPES = ("deepseek_v4",)


class CheckpointError(HalError, ValueError):
    """A checkpoint directory the loader cannot use; the message names the file, field or tensor."""


class ModelNotSupportedError(HalError, NotImplementedError):
    """A valid checkpoint of an architecture this package does not implement (yet)."""


@dataclass(frozen=True)
class CommonArgs:
    """What every DeepSeek architecture has: ``model_type``, ``vocab_size``, ``hidden_size``,
    ``num_hidden_layers``, ``rms_norm_eps``, ``num_attention_heads``, ``tie_word_embeddings``;
    ``num_nextn_predict_layers``: the multi-token-prediction modules the checkpoint holds after the model's
    layers (recognised, never run; 0 when the config does not say); ``fp8_block``: the ``weight_block_size``
    of an FP8 checkpoint, None for a plain one; ``scale_fmt``: 'ue8m0' when the checkpoint's activations are
    quantised with power-of-two scales."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    rms_norm_eps: float
    num_attention_heads: int
    tie_word_embeddings: bool
    num_nextn_predict_layers: int
    fp8_block: Optional[tuple]
    scale_fmt: Optional[str]


@dataclass(frozen=True)
class RopeArgs:
    """One rotary embedding: ``qk_rope_head_dim`` rotated dims, base ``rope_theta``, YaRN when
    ``rope_factor > 1`` (``original_max_position_embeddings``, ``beta_fast``, ``beta_slow``, ``mscale``,
    ``mscale_all_dim``, ``rope_truncate``), ``rope_interleave`` (DeepSeek's interleaved pairs, else
    rotate-half)."""

    qk_rope_head_dim: int
    rope_theta: float
    rope_factor: float
    original_max_position_embeddings: int
    beta_fast: float
    beta_slow: float
    mscale: float
    mscale_all_dim: float
    rope_truncate: bool
    rope_interleave: bool


@dataclass(frozen=True)
class ModelArgs(CommonArgs, RopeArgs):
    """The hyper-parameters a DeepSeek V3 forward needs (Hugging Face names).

    * the :class:`CommonArgs` fields;
    * MLA: ``num_attention_heads``, ``q_lora_rank`` (None: a plain ``q_proj``), ``kv_lora_rank`` (latent
      width), ``qk_nope_head_dim`` / ``qk_rope_head_dim`` (per-head query/key split), ``v_head_dim``;
    * RoPE / YaRN: the :class:`RopeArgs` fields;
    * MLP / MoE: ``intermediate_size`` (dense layers), ``first_k_dense_replace`` (how many dense layers come
      first), ``moe_intermediate_size``, ``n_routed_experts``, ``n_shared_experts``, ``num_experts_per_tok``,
      ``n_group`` / ``topk_group`` (group-limited routing), ``routed_scaling_factor``, ``norm_topk_prob``,
      ``scoring_func`` ('sigmoid' or 'softmax');
    """

    q_lora_rank: Optional[int]
    kv_lora_rank: int
    qk_nope_head_dim: int
    v_head_dim: int
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

    # error sources for logits_rtol (hal.model.bisect): per layer, two residual branches of about four
    # rounding points each (norm, projections, attention / expert GEMMs, combine)
    rounding_points_per_layer = 4

    @property
    def widest_reduction(self) -> int:
        return max(
            self.hidden_size,
            self.intermediate_size,
            self.moe_intermediate_size,
            self.kv_lora_rank,
            self.num_attention_heads * self.v_head_dim,
            self.q_lora_rank or 0,
        )

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """DeepSeek's ``qk_head_dim**-0.5 * mscale**2`` (the YaRN mscale of ``mscale_all_dim``)."""
        scale = self.qk_head_dim**-0.5
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
    ok = is_number(value) if kind is float else isinstance(value, kind)
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
        raise CheckpointError(
            f"config.json: field 'quantization_config.quant_method' must be 'fp8', got {q.get('quant_method')!r}"
        )
    block = tuple(q.get("weight_block_size") or (128, 128))
    if block != (128, 128):
        raise CheckpointError(
            f"config.json: field 'quantization_config.weight_block_size' must be [128, 128] "
            f"(the HAL's FP8 weight blocks), got {list(block)}"
        )
    fmt = q.get("scale_fmt", cfg.get("scale_fmt"))
    if fmt not in (None, "ue8m0"):
        raise CheckpointError(f"config.json: field 'scale_fmt' must be 'ue8m0' or absent, got {fmt!r}")
    return block, fmt


V4_ATTENTION = {"sliding_attention": 0, "compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
V4_MLP = ("hash_moe", "moe")


@dataclass(frozen=True)
class V4Args(CommonArgs):
    """The hyper-parameters a DeepSeek V4 forward needs (transformers' ``DeepseekV4Config`` names).

    * the :class:`CommonArgs` fields;
    * attention (shared-KV MQA, one ``head_dim`` key that is also the value): ``num_attention_heads``,
      ``head_dim``, ``q_lora_rank``, ``o_groups`` / ``o_lora_rank`` (grouped output projection),
      ``sliding_window``; ``layer_types[i]`` (a key of :data:`V4_ATTENTION`) and ``compress_rates[i]``, the
      tokens pooled into one compressed entry (0 for ``sliding_attention``; CSA overlaps its windows and
      keeps the ``index_topk`` entries its lightning indexer, ``index_n_heads`` x ``index_head_dim``, scores
      best; HCA attends every entry);
    * RoPE on the last ``main_rope.qk_rope_head_dim`` dims: ``main_rope`` for sliding layers, ``compress_rope``
      for compressed layers, their compressors and the indexer;
    * mHC: ``hc_mult`` residual streams, ``hc_sinkhorn_iters``, ``hc_eps``;
    * MoE (every layer): ``hash_layers[i]`` (routing by ``tid2eid[token]``), ``moe_intermediate_size``,
      ``n_routed_experts``, ``n_shared_experts``, ``num_experts_per_tok``, ``routed_scaling_factor``,
      ``scoring_func``, ``swiglu_limit`` (clamp of the SwiGLU gate / up); ``fp4_experts``: the routed
      experts' weights are packed FP4 e2m1 with a UE8M0 scale per 32 along K (``expert_dtype: fp4``).
    """

    head_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    sliding_window: int
    layer_types: Tuple[str, ...]
    compress_rates: Tuple[int, ...]
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    main_rope: RopeArgs
    compress_rope: RopeArgs
    hc_mult: int
    hc_sinkhorn_iters: int
    hc_eps: float
    hash_layers: Tuple[bool, ...]
    moe_intermediate_size: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    routed_scaling_factor: float
    scoring_func: str
    swiglu_limit: float
    fp4_experts: bool

    # error sources for logits_rtol (hal.model.bisect): per layer, two sub-layers of about four rounding
    # points each (mHC collapse, the projections, the attention or expert GEMMs, the mHC expansion)
    rounding_points_per_layer = 8

    @property
    def widest_reduction(self) -> int:
        """The mHC projection over ``hc_mult * hidden_size``, the attention output over ``heads * head_dim``,
        the grouped output projection, the experts."""
        return max(
            self.hc_mult * self.hidden_size,
            self.num_attention_heads * self.head_dim,
            self.q_lora_rank,
            self.o_groups * self.o_lora_rank,
            self.moe_intermediate_size,
        )


def _rope_fields(rope: Dict[str, Any], rope_dim: int, interleave: bool) -> Dict[str, Any]:
    """:class:`RopeArgs`' fields from a rotary table as :func:`_rope` returns it."""
    return dict(
        qk_rope_head_dim=rope_dim,
        rope_theta=float(rope["rope_theta"]),
        rope_factor=float(rope["factor"]),
        original_max_position_embeddings=int(rope.get("original_max_position_embeddings", 0)),
        beta_fast=float(rope.get("beta_fast") or 32),
        beta_slow=float(rope.get("beta_slow") or 1),
        mscale=float(rope.get("mscale") or 0),
        mscale_all_dim=float(rope.get("mscale_all_dim") or 0),
        rope_truncate=bool(rope.get("truncate", True)),
        rope_interleave=interleave,
    )


def _rope_args(rope: Dict[str, Any], rope_dim: int) -> RopeArgs:
    return RopeArgs(**_rope_fields(_rope({"rope_parameters": rope}), rope_dim, interleave=True))


def _v4_schedule(cfg: Dict[str, Any], layers: int) -> Tuple[Tuple[str, ...], Tuple[int, ...], Tuple[bool, ...]]:
    """Per-layer attention types, compress rates and hash-routing flags, from transformers' ``layer_types`` /
    ``compress_rates`` / ``mlp_layer_types`` or the released configs' ``compress_ratios`` / ``num_hash_layers``."""
    if cfg.get("layer_types") is not None:
        kinds = cfg["layer_types"]
    elif cfg.get("compress_ratios") is not None:
        by_rate = {rate: kind for kind, rate in V4_ATTENTION.items()}
        kinds = [by_rate.get(r, r) for r in cfg["compress_ratios"]]
    else:
        raise CheckpointError("config.json: missing field 'layer_types' (or 'compress_ratios')")
    if len(kinds) < layers or any(k not in V4_ATTENTION for k in kinds):
        raise CheckpointError(
            f"config.json: field 'layer_types' must list {layers} of {list(V4_ATTENTION)} "
            f"(or 'compress_ratios' {layers} of {list(V4_ATTENTION.values())}), got {kinds!r}"
        )
    kinds = tuple(kinds[:layers])
    rates = dict(V4_ATTENTION, **(cfg.get("compress_rates") or {}))
    compress = tuple(int(rates[k]) for k in kinds)
    if any(r < 2 for k, r in zip(kinds, compress) if k != "sliding_attention"):
        raise CheckpointError(f"config.json: field 'compress_rates' must be >= 2 for compressed layers, got {rates}")
    if cfg.get("mlp_layer_types") is not None:
        mlp_kinds = cfg["mlp_layer_types"]
        if len(mlp_kinds) < layers or any(k not in V4_MLP for k in mlp_kinds):
            raise CheckpointError(
                f"config.json: field 'mlp_layer_types' must list {layers} of {list(V4_MLP)}, got {mlp_kinds!r}"
            )
        hashed = tuple(k == "hash_moe" for k in mlp_kinds[:layers])
    else:
        n_hash = _field(cfg, "num_hash_layers", int, 0, required=False)
        hashed = tuple(i < n_hash for i in range(layers))
    return kinds, compress, hashed


def _v4_args(cfg: Dict[str, Any]) -> V4Args:
    layers = _field(cfg, "num_hidden_layers", int)
    head_dim = _field(cfg, "head_dim", int)
    rope_dim = cfg.get("qk_rope_head_dim")
    if rope_dim is None:
        rope_dim = int(head_dim * _field(cfg, "partial_rotary_factor", float, 64 / 512, required=False))
    if not isinstance(rope_dim, int) or rope_dim % 2 or not 0 < rope_dim <= head_dim:
        raise CheckpointError(
            f"config.json: field 'qk_rope_head_dim' must be an even int in (0, head_dim], got {rope_dim!r}"
        )
    rope = cfg.get("rope_parameters") or {}
    if isinstance(rope.get("main"), dict) and isinstance(rope.get("compress"), dict):
        main, compress = rope["main"], rope["compress"]
    else:  # released configs: rope_theta for sliding layers; compress_rope_theta + rope_scaling (YaRN) for the rest
        main = {"rope_theta": cfg.get("rope_theta", 10000.0)}
        compress = dict(cfg.get("rope_scaling") or {}, rope_theta=cfg.get("compress_rope_theta", 160000.0))
    block, fmt = _quantization(cfg)
    expert_dtype = (cfg.get("quantization_config") or {}).get("expert_dtype", cfg.get("expert_dtype"))
    if expert_dtype not in (None, "fp8", "bf16", "fp4"):
        raise CheckpointError(f"config.json: field 'expert_dtype' must be 'fp4', 'fp8' or 'bf16', got {expert_dtype!r}")
    if _field(cfg, "num_key_value_heads", int, 1, required=False) != 1:
        raise CheckpointError(
            f"config.json: field 'num_key_value_heads' must be 1 (V4's shared-KV MQA), "
            f"got {cfg['num_key_value_heads']!r}"
        )
    scoring = cfg.get("scoring_func", "sqrtsoftplus")
    if scoring not in ("sqrtsoftplus", "sigmoid", "softmax"):
        raise CheckpointError(
            f"config.json: field 'scoring_func' must be 'sqrtsoftplus', 'sigmoid' or 'softmax', got {scoring!r}"
        )
    heads, groups = _field(cfg, "num_attention_heads", int), _field(cfg, "o_groups", int)
    if groups < 1 or heads % groups:
        raise CheckpointError(f"config.json: field 'o_groups' must divide num_attention_heads = {heads}, got {groups}")
    layer_types, compress_rates, hash_layers = _v4_schedule(cfg, layers)
    return V4Args(
        model_type=cfg["model_type"],
        vocab_size=_field(cfg, "vocab_size", int),
        hidden_size=_field(cfg, "hidden_size", int),
        num_hidden_layers=layers,
        rms_norm_eps=_field(cfg, "rms_norm_eps", float, 1e-6),
        num_attention_heads=heads,
        head_dim=head_dim,
        q_lora_rank=_field(cfg, "q_lora_rank", int),
        o_groups=groups,
        o_lora_rank=_field(cfg, "o_lora_rank", int),
        sliding_window=_field(cfg, "sliding_window", int),
        layer_types=layer_types,
        compress_rates=compress_rates,
        index_n_heads=_field(cfg, "index_n_heads", int, 0, required=False),
        index_head_dim=_field(cfg, "index_head_dim", int, 0, required=False),
        index_topk=_field(cfg, "index_topk", int, 0, required=False),
        main_rope=_rope_args(main, rope_dim),
        compress_rope=_rope_args(compress, rope_dim),
        hc_mult=_field(cfg, "hc_mult", int),
        hc_sinkhorn_iters=_field(cfg, "hc_sinkhorn_iters", int),
        hc_eps=_field(cfg, "hc_eps", float, 1e-6),
        hash_layers=hash_layers,
        moe_intermediate_size=_field(cfg, "moe_intermediate_size", int),
        n_routed_experts=_field(cfg, "n_routed_experts", int),
        n_shared_experts=_field(cfg, "n_shared_experts", int, 0, required=False),
        num_experts_per_tok=_field(cfg, "num_experts_per_tok", int),
        routed_scaling_factor=_field(cfg, "routed_scaling_factor", float, 1.0, required=False),
        scoring_func=scoring,
        swiglu_limit=_field(cfg, "swiglu_limit", float, 10.0, required=False),
        fp4_experts=expert_dtype == "fp4",
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        num_nextn_predict_layers=_field(cfg, "num_nextn_predict_layers", int, 0, required=False),
        fp8_block=block,
        scale_fmt=fmt,
    )


def read_config(path: Path) -> Union[ModelArgs, V4Args]:
    """Parse ``path/config.json`` (:class:`V4Args` for ``deepseek_v4``); a missing, malformed or unsupported
    config raises :class:`CheckpointError`, naming the field."""
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
        return _v4_args(cfg)
    if model_type not in V3_TYPES:
        raise CheckpointError(
            f"config.json: field 'model_type' must be one of {list(V3_TYPES + V4_TYPES)}, got {model_type!r}"
        )
    rope = _rope(cfg)
    block, fmt = _quantization(cfg)
    heads = _field(cfg, "num_attention_heads", int)
    kv_heads = cfg.get("num_key_value_heads", heads)
    if kv_heads != heads:
        raise CheckpointError(
            f"config.json: field 'num_key_value_heads' must equal num_attention_heads = {heads} (MLA), got {kv_heads!r}"
        )
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
        v_head_dim=_field(cfg, "v_head_dim", int),
        **_rope_fields(rope, _field(cfg, "qk_rope_head_dim", int), bool(cfg.get("rope_interleave", True))),
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
        num_nextn_predict_layers=_field(cfg, "num_nextn_predict_layers", int, 0, required=False),
        fp8_block=block,
        scale_fmt=fmt,
    )
    if args.qk_rope_head_dim % 2:
        raise CheckpointError(f"config.json: field 'qk_rope_head_dim' must be even, got {args.qk_rope_head_dim}")
    return args
