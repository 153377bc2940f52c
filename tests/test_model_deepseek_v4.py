"""hal.model's DeepSeek V4 against transformers' own implementation: tiny random ``DeepseekV4ForCausalLM``s
saved with ``save_pretrained``, loaded with ``hal.model.load``, logits compared for the prefill and several
decode steps through transformers' cache path (teacher-forced: both sides are fed the reference's greedy
tokens). Every V4 feature is active: hash-routed and top-k routed MoE, sliding-window, CSA (with the
indexer keeping fewer entries than are closed) and HCA layers, sinks, mHC, the grouped output projection.
Tolerance: :func:`v4_logits_rtol`."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import model_tensors
from safetensors.torch import load_file, save_file

# the V3 harness: transformers' cache path, ours, and the per-position comparison (bf16: a fifth of the
# positions may flip a near-tie routing or, here, indexer choice)
from test_model_deepseek_v3 import assert_close, dequantized_copy, our_logits, reference_logits

import hal.model
from hal.cli import main
from hal.model.bisect import logits_rtol
from hal.model.tiny import FP4_SCALE_DTYPE, make_tiny

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM  # noqa: E402

# The config the implementation was brought up with: three layers, one of each attention type, a hash layer.
TUNED = dict(
    vocab_size=64,
    hidden_size=32,
    moe_intermediate_size=16,
    num_hidden_layers=3,
    num_attention_heads=4,
    head_dim=16,
    q_lora_rank=24,
    qk_rope_head_dim=8,
    num_experts_per_tok=2,
    n_routed_experts=8,
    layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
    mlp_layer_types=["hash_moe", "moe", "moe"],
    hc_mult=3,
    sliding_window=6,
    o_groups=2,
    o_lora_rank=12,
    index_n_heads=2,
    index_head_dim=16,
    index_topk=3,
    max_position_embeddings=256,
)
# A config no code was tuned on: four layers (two hash layers, CSA twice), YaRN on the compressed layers'
# rope, CSA pooling 2 tokens with a wider indexer top-k, HCA pooling 5 (not a power of two), sigmoid
# scoring, 4 mHC streams, a short window, more groups, odd widths.
OTHER = dict(
    vocab_size=50,
    hidden_size=40,
    moe_intermediate_size=12,
    num_hidden_layers=4,
    num_attention_heads=6,
    head_dim=20,
    q_lora_rank=18,
    qk_rope_head_dim=6,
    num_experts_per_tok=3,
    n_routed_experts=6,
    layer_types=[
        "compressed_sparse_attention",
        "heavily_compressed_attention",
        "sliding_attention",
        "compressed_sparse_attention",
    ],
    compress_rates={"compressed_sparse_attention": 2, "heavily_compressed_attention": 5},
    mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"],
    hc_mult=4,
    hc_sinkhorn_iters=7,
    sliding_window=4,
    o_groups=3,
    o_lora_rank=10,
    index_n_heads=3,
    index_head_dim=10,
    index_topk=4,
    scoring_func="sigmoid",
    routed_scaling_factor=2.0,
    swiglu_limit=1.5,
    max_position_embeddings=512,
    rope_theta=5000.0,
    compress_rope_theta=40000.0,
    rope_parameters={
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 64,
        "beta_fast": 32,
        "beta_slow": 1,
    },
)
PROMPT_LEN, STEPS = 13, 6  # several windows closed at prefill, more during decode


def hf_model(settings: dict, seed: int = 0) -> DeepseekV4ForCausalLM:
    """A float32 transformers model with weights large enough that attention, pooling, routing and the mHC
    mixing are not trivial (transformers initialises sinks, biases and tid2eid to zeros)."""
    torch.manual_seed(seed)
    # eager experts: torch's grouped_mm kernel refuses the odd widths of these tiny models
    model = DeepseekV4ForCausalLM(DeepseekV4Config(**settings, experts_implementation="eager")).eval()
    config = model.config
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
            elif p.dim() == 1 or "position_bias" in name:  # sinks, mHC bases and scales, pooling biases
                p.normal_(0.0, 0.5)
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5 * 1.5)
        for layer in model.model.layers:
            gate = layer.mlp.gate
            if hasattr(gate, "tid2eid"):
                table = [
                    torch.randperm(config.n_routed_experts)[: config.num_experts_per_tok]
                    for _ in range(config.vocab_size)
                ]
                gate.tid2eid.copy_(torch.stack(table))
            else:
                gate.e_score_correction_bias.normal_(0.0, 0.1)
    return model


def prompt_for(settings: dict) -> torch.Tensor:
    return torch.randint(0, settings["vocab_size"], (2, PROMPT_LEN), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", params=["tuned", "other"])
def saved(request, tmp_path_factory):
    settings = TUNED if request.param == "tuned" else OTHER
    path = tmp_path_factory.mktemp(request.param)
    hf_model(settings).save_pretrained(path)
    return settings, path


def test_every_v4_feature_is_exercised(saved):
    settings, path = saved
    args = hal.model.load(path, backend="cpu", dtype=torch.float32).args
    assert set(args.layer_types) == {"sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"}
    assert any(args.hash_layers) and not all(args.hash_layers)
    csa = min(r for t, r in zip(args.layer_types, args.compress_rates) if t == "compressed_sparse_attention")
    assert (PROMPT_LEN + STEPS) // csa > args.index_topk  # the indexer really drops entries
    assert PROMPT_LEN > args.sliding_window  # the window really drops keys


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_prefill_and_decode_match_transformers(saved, dtype):
    settings, path = saved
    # transformers' bf16 model as loaded from the checkpoint: norms, mHC, sinks and pooling biases stay fp32
    ref_model = DeepseekV4ForCausalLM.from_pretrained(path, dtype=dtype, experts_implementation="eager").eval()
    ref, fed = reference_logits(ref_model, prompt_for(settings), STEPS)
    ours = hal.model.load(path, backend="cpu", dtype=dtype)
    assert_close(
        our_logits(ours, prompt_for(settings), fed),
        ref,
        logits_rtol(ours.args, dtype),
        flips_allowed=dtype != torch.float32,
    )


@pytest.mark.parametrize(
    "change", [{"sliding_window": 7}, {"hc_sinkhorn_iters": 2}, {"index_topk": 2}], ids=["window", "sinkhorn", "topk"]
)
def test_the_tolerance_catches_a_model_bug(saved, tmp_path, change):
    """The fp32 tolerance sees a one-off in the window or the indexer's top-k, or a Sinkhorn stopped early
    (our side reads the edited config, the reference keeps the saved one)."""
    settings, path = saved
    ref, fed = reference_logits(
        DeepseekV4ForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), prompt_for(settings), STEPS
    )
    for file in path.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    config = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, **change)))
    ours = hal.model.load(tmp_path, backend="cpu", dtype=torch.float32)
    with pytest.raises(AssertionError, match="logits differ"):
        assert_close(our_logits(ours, prompt_for(settings), fed), ref, logits_rtol(ours.args, torch.float32))


@pytest.fixture(scope="module")
def fp8_checkpoints(tmp_path_factory):
    """``make-tiny --fp8`` and its plainly dequantised float32 copy (the hash table kept as ints)."""
    root = tmp_path_factory.mktemp("fp8")
    make_tiny("deepseek_v4", root / "fp8", fp8=True, seed=3)
    dequantized_copy(root / "fp8", root / "dequantized")
    file = root / "dequantized" / "model.safetensors"
    tensors = load_file(str(file))
    save_file({n: t.long() if n.endswith("tid2eid") else t for n, t in tensors.items()}, str(file))
    return root / "fp8", root / "dequantized"


def test_make_tiny_fp8_dequantized_on_load_matches_transformers(fp8_checkpoints):
    """make-tiny writes what transformers reads, and our FP8 dequantisation is the plain one."""
    fp8, dequantized = fp8_checkpoints
    ref_model = DeepseekV4ForCausalLM.from_pretrained(dequantized, dtype=torch.float32).eval()
    prompt = torch.tensor([[5, 17, 42, 99, 3, 64, 7, 200, 11, 12]])
    ref, fed = reference_logits(ref_model, prompt, steps=4)
    ours = hal.model.load(fp8, backend="cpu", dtype=torch.float32, fp8="dequantize")
    assert_close(our_logits(ours, prompt, fed), ref, logits_rtol(ours.args, torch.float32))


def test_make_tiny_fp8_kept_quantized_runs_fp8_gemms_close_to_the_dequantized_model(fp8_checkpoints):
    """Kept FP8, activations are quantised too (e4m3, up to 2**-4 relative an element): DeepGEMM's metric
    per position, sum (a-b)^2 / sum(a^2 + b^2) below 1e-2, with up to a third of the positions allowed to
    exceed it through a routing or indexer flip (as for V3, docs/model.md)."""
    fp8, _ = fp8_checkpoints
    kept = hal.model.load(fp8, backend="cpu", dtype=torch.float32, fp8="keep")
    plain = hal.model.load(fp8, backend="cpu", dtype=torch.float32, fp8="dequantize")
    assert kept.layers[0].attn.wq_a.weight.dtype == torch.float8_e4m3fn
    assert kept.layers[1].ffn.experts.w13.dtype == torch.float8_e4m3fn
    prompt = torch.tensor([[5, 17, 42, 99, 3, 64, 7, 200, 11, 12]])
    ref = our_logits(plain, prompt, torch.tensor([[1, 2, 3]]))
    got = our_logits(kept, prompt, torch.tensor([[1, 2, 3]]))
    per_position = (((got - ref) ** 2).sum(-1) / (got**2 + ref**2).sum(-1)).flatten()
    assert float(per_position.min()) > 0  # the FP8 path really ran
    assert int((per_position > 1e-2).sum()) <= per_position.numel() // 3, per_position


def test_cli_make_tiny_and_generate(tmp_path, capsys):
    out = tmp_path / "tiny"
    assert main(["model", "make-tiny", "--arch", "deepseek_v4", str(out)]) == 0
    assert (
        main(
            [
                "generate",
                "--model",
                str(out),
                "--prompt-ids",
                "1",
                "2",
                "3",
                "--max-new-tokens",
                "4",
                "--backend",
                "cpu",
            ]
        )
        == 0
    )
    tokens = capsys.readouterr().out.split("\n")[-2].split()
    assert len(tokens) == 4 and all(0 <= int(t) < 256 for t in tokens)


@pytest.fixture(scope="module")
def fp4_checkpoint(tmp_path_factory):
    """``make-tiny --fp4``: routed experts packed FP4, everything else bf16."""
    return make_tiny("deepseek_v4", tmp_path_factory.mktemp("fp4") / "tiny", fp4=True, seed=5)


def test_fp4_experts_kept_packed_match_them_dequantized_on_load(fp4_checkpoint):
    """Kept packed, the experts' grouped GEMMs take the FP4 weights and their UE8M0 scales; dequantised on
    load, the same values as float32 weights (e2m1 times a power of two is exact in float32). The activations
    are the same float32 ones: only where the GEMM applies the scales and its summation order differ, so
    the fp32 model tolerance holds at every position. The dequantised weights are transformers' own
    reading of the checkpoint's FP4 tensors (its FP8/FP4 dequantiser): make-tiny writes the official
    packing (lower index in the low nibble, a scale per 32 along K)."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    kept = hal.model.load(fp4_checkpoint, backend="cpu", dtype=torch.float32)
    plain = hal.model.load(fp4_checkpoint, backend="cpu", dtype=torch.float32, fp4="dequantize")
    assert (kept.fp4, plain.fp4, plain.fp4_reason) == ("keep", "dequantize", "requested")
    assert "FP4 weights" in kept.fp4_reason and kept.fp8 is None
    experts = kept.layers[1].ffn.experts
    assert (experts.w13.dtype, experts.w13.shape, experts.s13.shape) == (torch.uint8, (8, 256, 64), (8, 256, 4))
    tensors = {}
    for file in fp4_checkpoint.glob("*.safetensors"):
        tensors.update(load_file(str(file)))
    name = "model.layers.1.ffn.experts.5.w2.weight"
    assert tensors[name].dtype == torch.int8 and tensors[name + "_scale_inv"].dtype == FP4_SCALE_DTYPE  # UE8M0
    theirs = Fp8Dequantize(None)._dequantize_one(tensors[name], tensors[name + "_scale_inv"], torch.float32)
    assert torch.equal(plain.layers[1].ffn.experts.w2[5], theirs)
    prompt = torch.tensor([[5, 17, 42, 99, 3, 64, 7, 200, 11, 12]])
    fed = torch.tensor([[1, 2, 3]])
    assert_close(our_logits(kept, prompt, fed), our_logits(plain, prompt, fed), logits_rtol(kept.args, torch.float32))


def test_fp4_experts_are_dequantized_on_an_atlas_a2_and_kept_on_a_950(fp4_checkpoint):
    """The emulated Atlas A2 offers no FP4 operand: auto dequantises the experts on load (on the host) and
    says why; the emulated Ascend 950 serves FP4-weight grouped GEMMs, so they stay packed."""
    a2 = hal.model.load(fp4_checkpoint, backend="ascend-emulated", dtype=torch.bfloat16)
    assert a2.fp4 == "dequantize" and "no grouped GEMM of bfloat16 activations and FP4 weights" in a2.fp4_reason
    assert a2.layers[1].ffn.experts.w13.dtype == torch.bfloat16
    assert len(hal.model.generate(a2, [[1, 2, 3]], max_new_tokens=2)[0]) == 2
    assert hal.model.load(fp4_checkpoint, backend="ascend-950-emulated", dtype=torch.bfloat16).fp4 == "keep"


@pytest.fixture(scope="module")
def fp8_fp4_checkpoint(tmp_path_factory):
    """``make-tiny --fp8 --fp4``: FP8 linears, routed experts packed FP4."""
    return make_tiny("deepseek_v4", tmp_path_factory.mktemp("fp8-fp4") / "tiny", fp8=True, fp4=True, seed=5)


def test_fp4_experts_with_fp8_linears_take_fp8_activations(fp8_fp4_checkpoint):
    """``--fp4 --fp8``: the rest FP8 kept, so the FP4 expert GEMMs take FP8 activations (DeepGEMM's
    fp8 x fp4 GEMMs); the CPU reference serves them."""
    path = fp8_fp4_checkpoint
    assert json.loads((path / "config.json").read_text())["quantization_config"]["expert_dtype"] == "fp4"
    model = hal.model.load(path, backend="cpu", dtype=torch.bfloat16)
    assert (model.fp8, model.fp4) == ("keep", "keep") and "float8_e4m3fn activations" in model.fp4_reason
    assert model.layers[1].ffn.experts.fp4_x_dtype == torch.float8_e4m3fn
    assert len(hal.model.generate(model, [[1, 2, 3]], max_new_tokens=2)[0]) == 2


def _rewrite(path, name: str, tensor) -> None:
    """Replace (``tensor``) or drop (None) the tensor ``name`` of the sharded checkpoint ``path``."""
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = path / index["weight_map"][name]
    tensors = load_file(str(shard))
    if tensor is None:
        del tensors[name], index["weight_map"][name]
    else:
        tensors[name] = tensor
    save_file(tensors, str(shard))
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize(
    "broken, message",
    [
        ("w1.weight", r"tensor 'model\.layers\.2\.ffn\.experts\.3\.w1\.weight': expected packed FP4 shape"),
        (
            "w1.weight_scale_inv",
            r"'model\.layers\.2\.ffn\.experts\.3\.w1\.weight' is packed FP4 but "
            r"'model\.layers\.2\.ffn\.experts\.3\.w1\.weight_scale_inv' is missing",
        ),
    ],
    ids=["unpacked-shape", "missing-scale"],
)
def test_a_bad_fp4_tensor_is_named_at_load(fp4_checkpoint, tmp_path, broken, message):
    for file in fp4_checkpoint.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    name = f"model.layers.2.ffn.experts.3.{broken}"
    _rewrite(tmp_path, name, torch.zeros(128, 128, dtype=torch.int8) if broken == "w1.weight" else None)
    with pytest.raises(hal.model.CheckpointError, match=message):
        hal.model.load(tmp_path, backend="cpu")


def test_a_bf16_checkpoint_declaring_fp4_experts_is_refused_naming_the_tensor(tmp_path):
    out = make_tiny("deepseek_v4", tmp_path / "tiny")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(dict(config, expert_dtype="fp4")))
    with pytest.raises(hal.model.CheckpointError, match=r"experts\.0\.w1\.weight': expected packed FP4 shape"):
        hal.model.load(out)


# The released DeepSeek-V4 naming (DeepSeek's own, what the Hugging Face repositories ship), written here
# independently of hal.model's table as a rewrite of save_pretrained's names: no ``model.`` prefix, DeepSeek's
# top-level names, FP8 and FP4 block scales under ``<module>.scale``; per-expert w1 / w3 / w2 in both.
RELEASED_TOP_LEVEL = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "norm.weight",
    "model.hc_head.hc_fn": "hc_head_fn",
    "model.hc_head.hc_base": "hc_head_base",
    "model.hc_head.hc_scale": "hc_head_scale",
}


def released_name(saved: str) -> str:
    if saved in RELEASED_TOP_LEVEL:
        return RELEASED_TOP_LEVEL[saved]
    if saved.endswith(".weight_scale_inv"):
        saved = saved[: -len("weight_scale_inv")] + "scale"
    return saved[len("model.") :] if saved.startswith("model.") else saved


def released_copy(src, dst):
    """The sharded checkpoint ``src`` with every tensor renamed to the released naming, in ``dst``."""
    dst.mkdir(parents=True)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    for shard in set(index["weight_map"].values()):
        tensors = load_file(str(src / shard))
        save_file({released_name(n): t for n, t in tensors.items()}, str(dst / shard), metadata={"format": "pt"})
    index["weight_map"] = {released_name(n): shard for n, shard in index["weight_map"].items()}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    (dst / "config.json").write_bytes((src / "config.json").read_bytes())
    return dst


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    return make_tiny("deepseek_v4", tmp_path_factory.mktemp("bf16") / "tiny", seed=7)


@pytest.mark.parametrize("checkpoint", ["bf16_checkpoint", "fp8_fp4_checkpoint"], ids=["bf16", "fp8-fp4"])
def test_the_released_naming_loads_the_same_model(request, tmp_path, checkpoint):
    """The same model from a checkpoint in save_pretrained's naming and from its copy in the released one (FP8
    scales, FP4 experts and their scales included): every tensor equal to the bit, with the same dtype and
    strides, in memory of its own (64-byte aligned, wherever the file put it: a kernel may sum in another order
    on unaligned data), so the two run the same kernels on the same inputs on any CPU. The logits are then
    compared within the fp32 model tolerance, which does not depend on which kernels a CPU picks."""
    saved = request.getfixturevalue(checkpoint)
    released = released_copy(saved, tmp_path / "released")
    prompt, fed = torch.tensor([[5, 17, 42, 99, 3, 64, 7, 200, 11, 12]]), torch.tensor([[1]])
    ours = hal.model.load(released, backend="cpu", dtype=torch.float32)
    theirs = hal.model.load(saved, backend="cpu", dtype=torch.float32)
    ours_tensors, their_tensors = model_tensors(ours), model_tensors(theirs)
    assert ours_tensors.keys() == their_tensors.keys()
    for name, t in ours_tensors.items():
        u = their_tensors[name]
        assert (t.dtype, t.shape, t.stride()) == (u.dtype, u.shape, u.stride()) and torch.equal(t, u), name
        assert t.data_ptr() % 64 == 0 and u.data_ptr() % 64 == 0, name
    assert_close(our_logits(ours, prompt, fed), our_logits(theirs, prompt, fed), logits_rtol(ours.args, torch.float32))


def test_transformers_reads_the_released_naming_as_we_do(bf16_checkpoint, tmp_path):
    """transformers converts the released names on load (its conversion mapping): it finds every tensor of our
    released copy and agrees with us on it, so the copy is in the released layout. (bf16 only: transformers
    needs accelerate for FP8 checkpoints.)"""
    released = released_copy(bf16_checkpoint, tmp_path / "released")
    ref_model, info = DeepseekV4ForCausalLM.from_pretrained(released, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    prompt = torch.tensor([[5, 17, 42, 99, 3, 64, 7, 200, 11, 12]])
    ref, fed = reference_logits(ref_model.eval(), prompt, steps=2)
    ours = hal.model.load(released, backend="cpu", dtype=torch.float32)
    assert_close(our_logits(ours, prompt, fed), ref, logits_rtol(ours.args, torch.float32))


@pytest.mark.parametrize(
    "broken, tensor, message",
    [
        (
            "layers.2.ffn.experts.3.w1.scale",
            None,
            r"'layers\.2\.ffn\.experts\.3\.w1\.weight' is packed FP4 but "
            r"'layers\.2\.ffn\.experts\.3\.w1\.scale' is missing",
        ),
        ("hc_head_fn", None, r"missing tensor 'hc_head_fn'"),
        (
            "layers.0.attn.wq_a.scale",
            torch.ones(2, 1),
            r"tensor 'layers\.0\.attn\.wq_a\.scale': expected shape \[1, 1\]",
        ),
    ],
    ids=["fp4-scale-missing", "top-level-missing", "fp8-scale-misshapen"],
)
def test_a_bad_released_tensor_is_named_as_the_file_names_it(fp8_fp4_checkpoint, tmp_path, broken, tensor, message):
    released = released_copy(fp8_fp4_checkpoint, tmp_path / "released")
    _rewrite(released, broken, tensor)
    with pytest.raises(hal.model.CheckpointError, match=message):
        hal.model.load(released, backend="cpu")


def _with_config(src, dst, **changes):
    """A copy of the checkpoint ``src`` in ``dst`` with ``changes`` to its config."""
    dst.mkdir(parents=True)
    for file in src.iterdir():
        (dst / file.name).write_bytes(file.read_bytes())
    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(dict(config, **changes)))
    return dst


def test_layers_beyond_the_config_are_refused(bf16_checkpoint, tmp_path):
    """Two layers in the config, three in the files: no shallower model, the third layer's tensors are named."""
    path = _with_config(bf16_checkpoint, tmp_path / "shallow", num_hidden_layers=2, num_nextn_predict_layers=0)
    with pytest.raises(hal.model.CheckpointError, match=r"^\d+ unexpected tensors: 'model\.layers\.2\..* and \d+ more"):
        hal.model.load(path, backend="cpu")
    with pytest.raises(hal.model.CheckpointError, match=r"unexpected tensors: 'layers\.2\."):
        hal.model.load(released_copy(path, tmp_path / "released"), backend="cpu")


def test_the_released_mtp_layers_are_recognised_as_such(bf16_checkpoint, tmp_path):
    """The released naming's multi-token-prediction module (``mtp.0.*``, here layer 2's tensors renamed) is skipped
    when the config declares it (``num_nextn_predict_layers``), and unexpected when it does not."""
    path = _with_config(bf16_checkpoint, tmp_path / "two", num_hidden_layers=2, num_nextn_predict_layers=1)
    released = released_copy(path, tmp_path / "released")

    def mtp(name: str) -> str:
        return "mtp.0." + name[len("layers.2.") :] if name.startswith("layers.2.") else name

    index = json.loads((released / "model.safetensors.index.json").read_text())
    for shard in set(index["weight_map"].values()):
        save_file({mtp(n): t for n, t in load_file(str(released / shard)).items()}, str(released / shard))
    index["weight_map"] = {mtp(n): shard for n, shard in index["weight_map"].items()}
    (released / "model.safetensors.index.json").write_text(json.dumps(index))
    model = hal.model.load(released, backend="cpu")
    assert len(model.layers) == 2 and model.load_report == hal.model.LoadReport()
    (released / "config.json").write_text(
        json.dumps(dict(json.loads((released / "config.json").read_text()), num_nextn_predict_layers=0))
    )
    with pytest.raises(hal.model.CheckpointError, match=r"unexpected tensors: 'mtp\.0\."):
        hal.model.load(released, backend="cpu")
