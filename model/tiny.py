"""``hal model make-tiny``: a tiny random checkpoint in the official Hugging Face layout (config.json,
two safetensors shards and their index; optionally FP8 block-quantised like the released weights)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Union

import torch
from safetensors.torch import save_file

import hal
from hal.model.config import ModelNotSupportedError
from hal.model.checkpoint import INDEX_FILE, SCALE_SUFFIX

ARCHES = ("deepseek_v3", "deepseek_v4")

# Every GEMM's K is a multiple of 128, so an FP8 checkpoint keeps all its linears quantised.
TINY_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "vocab_size": 256, "hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 128,
    "num_hidden_layers": 2, "first_k_dense_replace": 1, "num_nextn_predict_layers": 0,
    "num_attention_heads": 2, "num_key_value_heads": 2, "q_lora_rank": 128, "kv_lora_rank": 128,
    "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 64,
    "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2,
    "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": True,
    "hidden_act": "silu", "rms_norm_eps": 1e-6, "max_position_embeddings": 4096, "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 64, "type": "yarn"},
    "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "bfloat16",
}
FP8_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}


def _v3_shapes(c: Dict) -> Dict[str, tuple]:
    """name -> shape of every tensor of a V3 checkpoint with config ``c`` (linear weights end in '_proj.weight')."""
    h, heads = c["hidden_size"], c["num_attention_heads"]
    qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], h), "model.norm.weight": (h,),
              "lm_head.weight": (c["vocab_size"], h)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes.update({
            f"{p}.input_layernorm.weight": (h,), f"{p}.post_attention_layernorm.weight": (h,),
            f"{p}.self_attn.q_a_proj.weight": (c["q_lora_rank"], h),
            f"{p}.self_attn.q_a_layernorm.weight": (c["q_lora_rank"],),
            f"{p}.self_attn.q_b_proj.weight": (heads * qk, c["q_lora_rank"]),
            f"{p}.self_attn.kv_a_proj_with_mqa.weight": (c["kv_lora_rank"] + c["qk_rope_head_dim"], h),
            f"{p}.self_attn.kv_a_layernorm.weight": (c["kv_lora_rank"],),
            f"{p}.self_attn.kv_b_proj.weight": (heads * (c["qk_nope_head_dim"] + c["v_head_dim"]), c["kv_lora_rank"]),
            f"{p}.self_attn.o_proj.weight": (h, heads * c["v_head_dim"]),
        })
        mlps = {f"{p}.mlp": c["intermediate_size"]}
        if i >= c["first_k_dense_replace"]:
            e = c["n_routed_experts"]
            shapes.update({f"{p}.mlp.gate.weight": (e, h), f"{p}.mlp.gate.e_score_correction_bias": (e,)})
            mlps = {f"{p}.mlp.experts.{j}": c["moe_intermediate_size"] for j in range(e)}
            mlps[f"{p}.mlp.shared_experts"] = c["moe_intermediate_size"] * c["n_shared_experts"]
        for m, inter in mlps.items():
            shapes.update({f"{m}.gate_proj.weight": (inter, h), f"{m}.up_proj.weight": (inter, h),
                           f"{m}.down_proj.weight": (h, inter)})
    return shapes


def make_tiny(arch: str, out: Union[str, Path], fp8: bool = False, seed: int = 0,
              scale_fmt: Optional[str] = None) -> Path:
    """Write a tiny random ``arch`` checkpoint to ``out`` (created); FP8 block-quantised when ``fp8``
    (``scale_fmt='ue8m0'``: power-of-two scales, as V3.1). Returns the directory."""
    if arch not in ARCHES:
        raise hal.InvalidArgumentError("make_tiny", "arch", f"one of {list(ARCHES)}", repr(arch))
    if arch == "deepseek_v4":
        raise ModelNotSupportedError("make-tiny: deepseek_v4 checkpoints are not implemented yet")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = dict(TINY_V3)
    if fp8:
        config["quantization_config"] = dict(FP8_CONFIG, **({"scale_fmt": scale_fmt} if scale_fmt else {}))
    gen = torch.Generator().manual_seed(seed)
    tensors: Dict[str, torch.Tensor] = {}
    for name, shape in _v3_shapes(config).items():
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
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, part in shards.items():
        save_file({n: tensors[n].contiguous() for n in part}, str(out / file), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": {n: f for f, part in shards.items() for n in part}}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
