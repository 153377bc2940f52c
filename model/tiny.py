"""``hal model make-tiny``: a tiny random checkpoint in the official Hugging Face layout (config.json,
two safetensors shards and their index; optionally FP8 block-quantised like the released weights). V4's
layout is the one transformers' ``DeepseekV4ForCausalLM.save_pretrained`` writes and reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Union

import torch
from safetensors.torch import save_file

import hal
from hal.model.checkpoint import INDEX_FILE, SCALE_SUFFIX

ARCHES = ("deepseek_v3", "deepseek_v4")

# Every GEMM's K is a multiple of 128, so an FP8 checkpoint keeps all its linears quantised.
TINY_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 256,
    "hidden_size": 128,
    "intermediate_size": 256,
    "moe_intermediate_size": 128,
    "num_hidden_layers": 2,
    "first_k_dense_replace": 1,
    "num_nextn_predict_layers": 0,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "q_lora_rank": 128,
    "kv_lora_rank": 128,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "v_head_dim": 64,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "n_group": 4,
    "topk_group": 2,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "norm_topk_prob": True,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 4096,
    "rope_theta": 10000,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 64,
        "type": "yarn",
    },
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "torch_dtype": "bfloat16",
}
# Every layer type (sliding, CSA with an indexer keeping fewer entries than a 64-token context closes, HCA),
# a hash-routed layer; GEMM widths multiples of 128 as for V3.
TINY_V4 = {
    "architectures": ["DeepseekV4ForCausalLM"],
    "model_type": "deepseek_v4",
    "vocab_size": 256,
    "hidden_size": 128,
    "moe_intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 128,
    "qk_rope_head_dim": 32,
    "q_lora_rank": 128,
    "o_groups": 2,
    "o_lora_rank": 128,
    "sliding_window": 8,
    "layer_types": ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
    "compress_rates": {"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
    "mlp_layer_types": ["hash_moe", "moe", "moe"],
    "index_n_heads": 2,
    "index_head_dim": 64,
    "index_topk": 4,
    "hc_mult": 2,
    "hc_sinkhorn_iters": 20,
    "hc_eps": 1e-6,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "routed_scaling_factor": 1.5,
    "scoring_func": "sqrtsoftplus",
    "swiglu_limit": 10.0,
    "norm_topk_prob": True,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "compress_rope_theta": 160000.0,
    "num_nextn_predict_layers": 0,
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "torch_dtype": "bfloat16",
}
# V4's FP8 linears (the compressors' and the indexer's pooling projections stay bf16, as released)
V4_FP8_LINEARS = ("wq_a", "wq_b", "wkv", "wo_a", "wo_b", "w1", "w2", "w3")
# V4's FP4 expert scales are UE8M0 bytes where torch has the dtype (exact: quantize_fp4's scales are powers of two)
FP4_SCALE_DTYPE = getattr(torch, "float8_e8m0fnu", torch.float32)
FP8_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}


def _v3_shapes(c: Dict) -> Dict[str, tuple]:
    """name -> shape of every tensor of a V3 checkpoint with config ``c`` (linear weights end in '_proj.weight')."""
    h, heads = c["hidden_size"], c["num_attention_heads"]
    qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    shapes = {
        "model.embed_tokens.weight": (c["vocab_size"], h),
        "model.norm.weight": (h,),
        "lm_head.weight": (c["vocab_size"], h),
    }
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes.update(
            {
                f"{p}.input_layernorm.weight": (h,),
                f"{p}.post_attention_layernorm.weight": (h,),
                f"{p}.self_attn.q_a_proj.weight": (c["q_lora_rank"], h),
                f"{p}.self_attn.q_a_layernorm.weight": (c["q_lora_rank"],),
                f"{p}.self_attn.q_b_proj.weight": (heads * qk, c["q_lora_rank"]),
                f"{p}.self_attn.kv_a_proj_with_mqa.weight": (c["kv_lora_rank"] + c["qk_rope_head_dim"], h),
                f"{p}.self_attn.kv_a_layernorm.weight": (c["kv_lora_rank"],),
                f"{p}.self_attn.kv_b_proj.weight": (
                    heads * (c["qk_nope_head_dim"] + c["v_head_dim"]),
                    c["kv_lora_rank"],
                ),
                f"{p}.self_attn.o_proj.weight": (h, heads * c["v_head_dim"]),
            }
        )
        mlps = {f"{p}.mlp": c["intermediate_size"]}
        if i >= c["first_k_dense_replace"]:
            e = c["n_routed_experts"]
            shapes.update({f"{p}.mlp.gate.weight": (e, h), f"{p}.mlp.gate.e_score_correction_bias": (e,)})
            mlps = {f"{p}.mlp.experts.{j}": c["moe_intermediate_size"] for j in range(e)}
            mlps[f"{p}.mlp.shared_experts"] = c["moe_intermediate_size"] * c["n_shared_experts"]
        for m, inter in mlps.items():
            shapes.update(
                {
                    f"{m}.gate_proj.weight": (inter, h),
                    f"{m}.up_proj.weight": (inter, h),
                    f"{m}.down_proj.weight": (h, inter),
                }
            )
    return shapes


def _v4_shapes(c: Dict) -> Dict[str, tuple]:
    """name -> shape of every tensor of a V4 checkpoint with config ``c`` (transformers' saved layout)."""
    h, n, d, q = c["hidden_size"], c["hc_mult"], c["head_dim"], c["q_lora_rank"]
    e, inter, mix = c["n_routed_experts"], c["moe_intermediate_size"], (2 + c["hc_mult"]) * c["hc_mult"]
    shapes = {
        "model.embed_tokens.weight": (c["vocab_size"], h),
        "model.norm.weight": (h,),
        "head.weight": (c["vocab_size"], h),
        "model.hc_head.hc_fn": (n, n * h),
        "model.hc_head.hc_base": (n,),
        "model.hc_head.hc_scale": (1,),
    }
    for i, kind in enumerate(c["layer_types"]):
        p = f"model.layers.{i}"
        a = f"{p}.attn"
        heads, groups, o_rank = c["num_attention_heads"], c["o_groups"], c["o_lora_rank"]
        shapes.update(
            {
                f"{p}.attn_norm.weight": (h,),
                f"{p}.ffn_norm.weight": (h,),
                f"{a}.wq_a.weight": (q, h),
                f"{a}.q_norm.weight": (q,),
                f"{a}.wq_b.weight": (heads * d, q),
                f"{a}.wkv.weight": (d, h),
                f"{a}.norm.weight": (d,),
                f"{a}.attn_sink": (heads,),
                f"{a}.wo_a.weight": (groups * o_rank, heads * d // groups),
                f"{a}.wo_b.weight": (h, groups * o_rank),
            }
        )
        for hc in ("hc_attn", "hc_ffn"):
            shapes.update({f"{p}.{hc}_fn": (mix, n * h), f"{p}.{hc}_base": (mix,), f"{p}.{hc}_scale": (3,)})
        compressors = {}
        if kind != "sliding_attention":
            csa = kind == "compressed_sparse_attention"
            compressors[f"{a}.compressor"] = (c["compress_rates"][kind], d, 2 if csa else 1)
            if csa:
                di, hi = c["index_head_dim"], c["index_n_heads"]
                compressors[f"{a}.indexer.compressor"] = (c["compress_rates"][kind], di, 2)
                shapes.update({f"{a}.indexer.wq_b.weight": (hi * di, q), f"{a}.indexer.weights_proj.weight": (hi, h)})
        for m, (rate, width, overlap) in compressors.items():
            shapes.update(
                {
                    f"{m}.wkv.weight": (overlap * width, h),
                    f"{m}.wgate.weight": (overlap * width, h),
                    f"{m}.ape": (rate, overlap * width),
                    f"{m}.norm.weight": (width,),
                }
            )
        f = f"{p}.ffn"
        shapes[f"{f}.gate.weight"] = (e, h)
        if c["mlp_layer_types"][i] == "hash_moe":
            shapes[f"{f}.gate.tid2eid"] = (c["vocab_size"], c["num_experts_per_tok"])
        else:
            shapes[f"{f}.gate.bias"] = (e,)
        for m in [f"{f}.experts.{j}" for j in range(e)] + [f"{f}.shared_experts"]:
            shapes.update({f"{m}.w1.weight": (inter, h), f"{m}.w3.weight": (inter, h), f"{m}.w2.weight": (h, inter)})
    return shapes


def _v4_tensor(name: str, shape: tuple, config: Dict, gen: torch.Generator) -> torch.Tensor:
    """A random V4 tensor: norms near 1, float32 vectors (sinks, biases, mHC bases and scales, pooling
    biases), a random hash table, matrices scaled by ``K**-0.5`` (mHC ones float32, as transformers keeps them)."""
    if name.endswith("tid2eid"):
        experts, k = config["n_routed_experts"], shape[1]
        return torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(shape[0])])
    if name.endswith("norm.weight"):
        return (1 + 0.1 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
    if len(shape) == 1 or name.endswith(".ape"):
        return 0.5 * torch.randn(shape, generator=gen)
    t = torch.randn(shape, generator=gen) * shape[-1] ** -0.5
    return t if "hc_" in name else t.to(torch.bfloat16)


def make_tiny(
    arch: str,
    out: Union[str, Path],
    fp8: bool = False,
    seed: int = 0,
    scale_fmt: Optional[str] = None,
    fp4: bool = False,
) -> Path:
    """Write a tiny random ``arch`` checkpoint to ``out`` (created); FP8 block-quantised when ``fp8``
    (``scale_fmt='ue8m0'``: power-of-two scales, as V3.1); V4's routed experts packed FP4 when ``fp4``
    (:func:`hal.ops.quantize_fp4`: int8 ``[N, K / 2]``, the lower index in the low nibble, with UE8M0
    ``weight_scale_inv`` ``[N, K / 32]``; ``expert_dtype: fp4`` in the quantization config, or at the top
    level without ``fp8``). Returns the directory."""
    if arch not in ARCHES:
        raise hal.InvalidArgumentError("make_tiny", "arch", f"one of {list(ARCHES)}", repr(arch))
    v4 = arch == "deepseek_v4"
    if fp4 and not v4:
        raise hal.InvalidArgumentError("make_tiny", "fp4", "False for deepseek_v3 (only V4 has FP4 experts)", "True")
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # e.g. an existing file of that name
        raise hal.InvalidArgumentError(
            "make_tiny", "out", "a directory to write into (created if absent)", f"'{out}' ({exc.strerror or exc})"
        ) from None
    config = dict(TINY_V4 if v4 else TINY_V3)
    if fp8:
        config["quantization_config"] = dict(FP8_CONFIG, **({"scale_fmt": scale_fmt} if scale_fmt else {}))
    if fp4:
        config.get("quantization_config", config)["expert_dtype"] = "fp4"
    gen = torch.Generator().manual_seed(seed)
    tensors: Dict[str, torch.Tensor] = {}
    for name, shape in (_v4_shapes if v4 else _v3_shapes)(config).items():
        if v4:
            t = _v4_tensor(name, shape, config, gen)
            linear = name.endswith(".weight") and name.split(".")[-2] in V4_FP8_LINEARS and "compressor" not in name
            if fp4 and linear and ".experts." in name:
                q, scale = hal.ops.quantize_fp4(t.float())
                tensors[name], tensors[name + SCALE_SUFFIX] = q.view(torch.int8), scale.to(FP4_SCALE_DTYPE)
            elif fp8 and linear:
                tensors[name], tensors[name + SCALE_SUFFIX] = hal.ops.quantize_fp8_weight(t.float(), 128, scale_fmt)
            else:
                tensors[name] = t
            continue
        if name.endswith("norm.weight"):
            t = 1 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith("e_score_correction_bias"):
            tensors[name] = 0.1 * torch.randn(shape, generator=gen)  # float32, as released
            continue
        else:
            t = torch.randn(shape, generator=gen) * shape[-1] ** -0.5
        if fp8 and name.endswith("_proj.weight"):
            tensors[name], tensors[name + SCALE_SUFFIX] = hal.ops.quantize_fp8_weight(t, 128, scale_fmt)
        else:
            tensors[name] = t.to(torch.bfloat16)
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    for file, part in shards.items():
        save_file({n: tensors[n].contiguous() for n in part}, str(out / file), metadata={"format": "pt"})
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
        "weight_map": {n: f for f, part in shards.items() for n in part},
    }
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
