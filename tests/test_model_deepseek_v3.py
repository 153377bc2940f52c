"""hal.model's DeepSeek V3 against transformers' own implementation: tiny random
``DeepseekV3ForCausalLM``s saved with ``save_pretrained``, loaded with ``hal.model.load``, logits compared
for the prefill and several decode steps through transformers' cache path (teacher-forced: both sides are
fed the reference's greedy tokens). Tolerance: :func:`hal.model.bisect.logits_rtol` (see docs/model.md)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import hal.model
from hal.model.bisect import logits_rtol
from hal.model.tiny import make_tiny

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, DynamicCache  # noqa: E402

YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 64,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
# The config the implementation was brought up with: YaRN, q LoRA, interleaved rope, group-limited routing.
TUNED = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    moe_intermediate_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    n_shared_experts=1,
    n_routed_experts=8,
    kv_lora_rank=16,
    q_lora_rank=24,
    qk_rope_head_dim=8,
    v_head_dim=12,
    qk_nope_head_dim=16,
    n_group=2,
    topk_group=1,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    max_position_embeddings=256,
    rope_parameters=YARN,
)
# A config no code was tuned on: no q LoRA (q_proj), rotate-half rope without YaRN, every layer MoE,
# no group limit, two shared experts, three layers, more heads, odd widths.
OTHER = dict(
    vocab_size=50,
    hidden_size=40,
    intermediate_size=24,
    moe_intermediate_size=12,
    num_hidden_layers=3,
    num_attention_heads=3,
    num_key_value_heads=3,
    n_shared_experts=2,
    n_routed_experts=6,
    kv_lora_rank=20,
    q_lora_rank=None,
    qk_rope_head_dim=6,
    v_head_dim=10,
    qk_nope_head_dim=14,
    n_group=1,
    topk_group=1,
    num_experts_per_tok=3,
    first_k_dense_replace=0,
    max_position_embeddings=128,
    rope_interleave=False,
    routed_scaling_factor=1.5,
    rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
)


def hf_model(settings: dict, dtype: torch.dtype, seed: int = 0) -> DeepseekV3ForCausalLM:
    """A transformers model with weights large enough that attention and routing are not trivial."""
    torch.manual_seed(seed)
    # eager experts: torch's grouped_mm kernel refuses the odd bf16 widths of these tiny models
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**settings, experts_implementation="eager")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5 * 1.5)
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.1)
    return model.to(dtype)


def reference_logits(model, prompt: torch.Tensor, steps: int):
    """transformers' logits for the prefill and ``steps`` greedy decode steps through its cache."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        logits = [model(prompt, cache=cache, use_cache=True).logits]
        fed = []
        for _ in range(steps):
            fed.append(logits[-1][:, -1:].argmax(-1))
            logits.append(model(fed[-1], cache=cache, use_cache=True).logits)
    return torch.cat(logits, dim=1).float(), torch.cat(fed, dim=1)


def our_logits(model, prompt: torch.Tensor, fed: torch.Tensor):
    cache = model.new_cache(prompt.shape[0], prompt.shape[1] + fed.shape[1])
    logits = [model(prompt, cache)] + [model(fed[:, i : i + 1], cache) for i in range(fed.shape[1])]
    return torch.cat(logits, dim=1).float()


def assert_close(got: torch.Tensor, ref: torch.Tensor, rtol: float, flips_allowed: bool = False) -> None:
    """Every position's logits within ``rtol`` of max |reference logit|. With ``flips_allowed`` (bf16), up
    to a fifth of the positions may exceed it: a bf16 rounding of a hidden state can flip a top-k expert
    choice at a near tie (the routing contract allows either choice; transformers' own bf16 model flips
    against its fp32 one the same way), which moves that token's logits by O(1) and, through the cache,
    the later tokens of its sequence a little. A real bug moves every position."""
    scale = float(ref.abs().max())
    per_position = (got - ref).abs().amax(dim=-1).flatten() / scale
    bad = int((per_position > rtol).sum())
    allowed = per_position.numel() // 5 if flips_allowed else 0
    assert bad <= allowed, (
        f"logits differ by up to {float(per_position.max()):.3g} of max |logit| at {bad} of "
        f"{per_position.numel()} positions (tolerance {rtol:.3g}, {allowed} allowed)"
    )


@pytest.mark.parametrize(
    "settings,dtype",
    [(TUNED, torch.float32), (TUNED, torch.bfloat16), (OTHER, torch.float32), (OTHER, torch.bfloat16)],
    ids=["tuned-fp32", "tuned-bf16", "other-fp32", "other-bf16"],
)
def test_prefill_and_decode_match_transformers(tmp_path, settings, dtype):
    ref_model = hf_model(settings, dtype)
    ref_model.save_pretrained(tmp_path)
    prompt = torch.randint(0, settings["vocab_size"], (2, 6), generator=torch.Generator().manual_seed(1))
    ref, fed = reference_logits(ref_model, prompt, steps=4)
    ours = hal.model.load(tmp_path, backend="cpu", dtype=dtype)
    assert_close(
        our_logits(ours, prompt, fed), ref, logits_rtol(ours.args, dtype), flips_allowed=dtype != torch.float32
    )


@pytest.mark.parametrize("settings", [TUNED, OTHER], ids=["yarn-interleaved", "default-rotate-half"])
def test_rope_rounds_like_transformers_bit_for_bit(tmp_path, settings):
    """Queries' and keys' RoPE in bf16 equal transformers' to the bit (its cos / sin rounded to bf16, the
    rotation computed in bf16, evens then odds), for a prefill's positions and for a decode step's, sliced
    from the table the prefill grew."""
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

    from hal.model.config import read_config
    from hal.model.deepseek_v3 import Rope

    config = DeepseekV3Config(**settings)
    config.save_pretrained(tmp_path)
    rope = Rope(read_config(tmp_path))
    x = torch.randn(1, 2049, 2, config.qk_rope_head_dim, generator=torch.Generator().manual_seed(0)).bfloat16()
    cos, sin = hf.DeepseekV3RotaryEmbedding(config)(x, torch.arange(2049)[None])
    apply = hf.apply_rotary_pos_emb_interleave if config.rope_interleave else hf.apply_rotary_pos_emb
    expected, _ = apply(x, x, cos, sin, unsqueeze_dim=2)
    prefill = rope.rotate(x[:, :2048], *rope.table(0, 2048, torch.bfloat16))
    decode = rope.rotate(x[:, 2048:], *rope.table(2048, 2049, torch.bfloat16))
    assert torch.equal(torch.cat((prefill, decode), dim=1), expected)


def test_the_tolerance_catches_a_wrong_softmax_scale(tmp_path):
    """The fp32 tolerance is tight enough to see a model bug (here: the YaRN mscale**2 left out)."""
    ref_model = hf_model(TUNED, torch.float32)
    ref_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_parameters"]["mscale_all_dim"] = 0.0  # our side then skips the mscale**2 of the scale
    (tmp_path / "config.json").write_text(json.dumps(config))
    prompt = torch.arange(6).view(1, 6)
    ref, fed = reference_logits(ref_model, prompt, steps=2)
    ours = hal.model.load(tmp_path, backend="cpu", dtype=torch.float32)
    with pytest.raises(AssertionError, match="logits differ"):
        assert_close(our_logits(ours, prompt, fed), ref, logits_rtol(ours.args, torch.float32))


def dequantized_copy(src, dst) -> None:
    """The FP8 checkpoint ``src`` with every weight dequantised to fp32 (plain torch, not the HAL)."""
    tensors = {}
    for file in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    out = {}
    for name, t in tensors.items():
        if name.endswith("_scale_inv"):
            continue
        scale = tensors.get(name + "_scale_inv")
        if scale is not None:
            n, k = t.shape
            s = scale.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
            t = t.float() * s
        out[name] = t.float()
    dst.mkdir()
    save_file(out, str(dst / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    del config["quantization_config"]
    (dst / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def fp8_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    make_tiny("deepseek_v3", root / "fp8", fp8=True, seed=3)
    dequantized_copy(root / "fp8", root / "dequantized")
    return root / "fp8", root / "dequantized"


def test_fp8_checkpoint_dequantized_on_load_matches_transformers(fp8_checkpoints):
    fp8, dequantized = fp8_checkpoints
    ref_model = DeepseekV3ForCausalLM.from_pretrained(dequantized, dtype=torch.float32).eval()
    prompt = torch.tensor([[5, 17, 42, 99, 3]])
    ref, fed = reference_logits(ref_model, prompt, steps=3)
    ours = hal.model.load(fp8, backend="cpu", dtype=torch.float32, fp8="dequantize")
    assert ours.layers[0].attn.wq_a.scale is None
    assert_close(our_logits(ours, prompt, fed), ref, logits_rtol(ours.args, torch.float32))


def test_fp8_checkpoint_kept_quantized_runs_fp8_gemms_close_to_the_dequantized_model(fp8_checkpoints):
    """Kept FP8, every linear and expert GEMM also quantises its activations (1x128 groups, e4m3: relative
    error up to 2**-4 an element), so the comparison is DeepGEMM's metric per position: the relative squared
    error sum (a-b)^2 / sum(a^2 + b^2) of a token's logits below 1e-2 (each FP8 GEMM stays below DeepGEMM's
    1e-3; a dozen of them are in series here). The activation noise also flips near-tie expert choices, which
    moves a token's logits by O(1): up to a third of the positions may exceed it (a bug moves all)."""
    fp8, _ = fp8_checkpoints
    kept = hal.model.load(fp8, backend="cpu", dtype=torch.float32, fp8="keep")
    plain = hal.model.load(fp8, backend="cpu", dtype=torch.float32, fp8="dequantize")
    assert kept.layers[0].attn.wq_a.weight.dtype == torch.float8_e4m3fn
    assert kept.layers[1].ffn.experts.w13.dtype == torch.float8_e4m3fn
    prompt = torch.tensor([[5, 17, 42, 99, 3, 64, 7, 200, 11]])
    ref, fed = reference_logits_ours(plain, prompt, steps=3)
    got = our_logits(kept, prompt, fed)
    per_position = (((got - ref) ** 2).sum(-1) / (got**2 + ref**2).sum(-1)).flatten()
    assert float(per_position.min()) > 0  # the FP8 path really ran
    assert int((per_position > 1e-2).sum()) <= per_position.numel() // 3, per_position


def reference_logits_ours(model, prompt, steps):
    from hal.model.bisect import teacher_forced_logits

    logits = teacher_forced_logits(model, prompt, steps)
    return logits, logits[:, prompt.shape[1] - 1 : -1].argmax(-1)


def test_expert_weights_are_laid_out_once_for_the_grouped_gemm(fp8_checkpoints):
    _, dequantized = fp8_checkpoints
    model = hal.model.load(dequantized, backend="cpu", dtype=torch.float32)
    experts = model.layers[1].ffn.experts
    tensors = load_file(str(dequantized / "model.safetensors"))
    p = "model.layers.1.mlp.experts.5"
    assert torch.equal(experts.w13[5], torch.cat((tensors[f"{p}.gate_proj.weight"], tensors[f"{p}.up_proj.weight"])))
    assert torch.equal(experts.w2[5], tensors[f"{p}.down_proj.weight"])
    assert math.prod(experts.w13.shape) == 8 * 256 * 128


def test_fp8_checkpoint_as_w8a8_int8_runs_int8_gemms_close_to_the_dequantized_model(fp8_checkpoints):
    """fp8="int8": weights dequantised then requantised per output channel, activations per token. An int8
    step is amax / 127 of its row, so one operand's relative squared error is about (3 / 127)**2 / 12 ~ 5e-5
    for normal-like rows (amax ~ 3 sigma): a GEMM stays near 1e-4 and a dozen in series near 1e-3, so the
    bound is 5e-3 per position (FP8's is 1e-2, DeepGEMM's metric). Near-tie expert flips move a token's
    logits by O(1), so up to a third of the positions may exceed it (a bug moves all)."""
    fp8, _ = fp8_checkpoints
    w8a8 = hal.model.load(fp8, backend="cpu", dtype=torch.float32, fp8="int8")
    plain = hal.model.load(fp8, backend="cpu", dtype=torch.float32, fp8="dequantize")
    assert (w8a8.fp8, w8a8.fp8_reason) == ("int8", "requested") and plain.fp8 == "dequantize"
    assert w8a8.layers[0].attn.wq_a.weight.dtype == torch.int8 and w8a8.layers[0].attn.wq_a.scale.dim() == 1
    experts = w8a8.layers[1].ffn.experts
    assert experts.w13.dtype == torch.int8 and experts.s13.shape == experts.w13.shape[:2]
    prompt = torch.tensor([[5, 17, 42, 99, 3, 64, 7, 200, 11]])
    ref, fed = reference_logits_ours(plain, prompt, steps=3)
    got = our_logits(w8a8, prompt, fed)
    per_position = (((got - ref) ** 2).sum(-1) / (got**2 + ref**2).sum(-1)).flatten()
    assert float(per_position.min()) > 0  # the int8 path really ran
    assert int((per_position > 5e-3).sum()) <= per_position.numel() // 3, per_position


def test_auto_picks_int8_on_an_atlas_a2_and_generate_reports_it(fp8_checkpoints, capsys):
    from hal.cli import main

    fp8, _ = fp8_checkpoints
    model = hal.model.load(fp8, backend="ascend-emulated", dtype=torch.bfloat16)
    assert model.fp8 == "int8" and "not FP8" in model.fp8_reason
    assert hal.model.load(fp8, backend="ascend-950-emulated", dtype=torch.bfloat16).fp8 == "keep"
    assert (
        main(
            [
                "generate",
                "--model",
                str(fp8),
                "--backend",
                "ascend-emulated",
                "--prompt-ids",
                "1",
                "2",
                "--max-new-tokens",
                "2",
            ]
        )
        == 0
    )
    assert "FP8 checkpoint weights: int8 (auto:" in capsys.readouterr().err


def test_a_missing_routing_bias_is_refused_or_filled_with_zeros_as_transformers_does(tmp_path):
    """Without ``e_score_correction_bias`` the routing would score groups by their maximum, not the top-2 sum:
    a strict load refuses the checkpoint naming the tensor; ``strict=False`` fills it with zeros, as transformers
    does (and reports it, as transformers does), and the two agree."""
    path = make_tiny("deepseek_v3", tmp_path / "tiny")
    name = "model.layers.1.mlp.gate.e_score_correction_bias"
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = path / index["weight_map"].pop(name)
    tensors = load_file(str(shard))
    del tensors[name]
    save_file(tensors, str(shard))
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(hal.model.CheckpointError, match=f"^missing tensor '{name}'"):
        hal.model.load(path, backend="cpu")
    with pytest.warns(UserWarning, match=f"missing tensor '{name}' defaulted"):
        ours = hal.model.load(path, backend="cpu", dtype=torch.float32, strict=False)
    assert ours.load_report == hal.model.LoadReport(defaulted=(name,))
    ref_model, info = DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert info["missing_keys"] == {name}, info
    prompt = torch.tensor([[5, 17, 42, 99, 3, 64, 7, 200, 11]])
    ref, fed = reference_logits(ref_model.eval(), prompt, steps=3)
    assert_close(our_logits(ours, prompt, fed), ref, logits_rtol(ours.args, torch.float32))
