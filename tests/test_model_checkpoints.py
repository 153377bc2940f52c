"""Bad checkpoints fail at load with a message naming the tensor or field; the CLI's make-tiny and
generate; bisect names a deliberately wrong operator (and layer) of a backend registered as a plugin."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import register_backend
from safetensors.torch import load_file, save_file

import hal.model
from hal.backends.cpu.backend import CpuBackend
from hal.cli import main
from hal.model.bisect import bisect, render
from hal.model.tiny import make_tiny
from hal.ops.grouped_gemm import grouped_gemm
from hal.ops.mla import mla_decode
from hal.registry import registry

SHARD = "model-00002-of-00002.safetensors"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny("deepseek_v3", tmp_path_factory.mktemp("tiny") / "v3")


@pytest.fixture
def broken(tiny, tmp_path):
    """A fresh copy of the tiny checkpoint to break."""
    return shutil.copytree(tiny, tmp_path / "broken")


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def edit_shard(path, fn):
    tensors = load_file(str(path / SHARD))
    fn(tensors)
    save_file(tensors, str(path / SHARD))


def test_missing_tensor_is_named(broken):
    name = "model.layers.1.self_attn.o_proj.weight"
    edit_shard(broken, lambda t: t.pop(name))
    (broken / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "weight_map": {
                    n: f
                    for n, f in json.loads((broken / "model.safetensors.index.json").read_text())["weight_map"].items()
                    if n != name
                }
            }
        )
    )
    with pytest.raises(hal.model.CheckpointError, match=f"missing tensor '{name}'"):
        hal.model.load(broken)


def test_wrong_shape_is_named(broken):
    name = "model.norm.weight"
    edit_shard(broken, lambda t: t.update({name: torch.ones(7, dtype=torch.bfloat16)}))
    with pytest.raises(hal.model.CheckpointError, match=rf"tensor '{name}': expected shape \[128\], got \[7\]"):
        hal.model.load(broken)


def test_unknown_model_type_is_named(broken):
    edit_config(broken, model_type="llama")
    with pytest.raises(hal.model.CheckpointError, match="field 'model_type'.*'llama'"):
        hal.model.load(broken)


def test_missing_config_field_is_named(broken):
    config = json.loads((broken / "config.json").read_text())
    del config["kv_lora_rank"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(hal.model.CheckpointError, match="missing field 'kv_lora_rank'"):
        hal.model.load(broken)


def test_truncated_file_is_named(broken):
    data = (broken / SHARD).read_bytes()
    (broken / SHARD).write_bytes(data[: len(data) // 2])
    with pytest.raises(hal.model.CheckpointError, match=SHARD):
        hal.model.load(broken)


def test_unexpected_tensor_is_named(broken):
    edit_shard(broken, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.ones(2)}))
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.mlp.extra.weight"] = SHARD
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(hal.model.CheckpointError, match="unexpected tensor.*model.layers.0.mlp.extra.weight"):
        hal.model.load(broken)


def test_fp8_weight_without_its_scale_is_named(tmp_path):
    ckpt = make_tiny("deepseek_v3", tmp_path / "fp8", fp8=True)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    name = "model.layers.0.self_attn.q_a_proj.weight_scale_inv"
    del index["weight_map"][name]
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(hal.model.CheckpointError, match="q_a_proj.weight' is FP8 but .*weight_scale_inv' is missing"):
        hal.model.load(ckpt)


def test_a_v3_config_labelled_deepseek_v4_names_the_missing_v4_field(broken):
    edit_config(broken, model_type="deepseek_v4")
    with pytest.raises(hal.model.CheckpointError, match="missing field 'head_dim'"):
        hal.model.load(broken)


def test_cli_make_tiny_and_generate(tmp_path, capsys):
    for fp8 in (False, True):
        out = tmp_path / f"tiny{fp8}"
        assert main(["model", "make-tiny", "--arch", "deepseek_v3", str(out)] + (["--fp8"] if fp8 else [])) == 0
        assert main(["generate", "--model", str(out), "--prompt-ids", "1", "2", "3", "--max-new-tokens", "4"]) == 0
        captured = capsys.readouterr()
        tokens = captured.out.split("\n")[-2].split()
        assert len(tokens) == 4 and all(0 <= int(t) < 256 for t in tokens)
        assert "4/4" in captured.err and "tokens/s" in captured.err
    assert main(["generate", "--model", str(tmp_path / "none"), "--max-new-tokens", "2"]) == 2
    assert "no config.json" in capsys.readouterr().err


class WrongDecodeScale(CpuBackend):
    """TEST DOUBLE: mla_decode with FlashMLA's default softmax scale (576**-0.5-style head-dim scale)
    instead of the one passed."""

    def __init__(self):
        super().__init__()
        self.add_implementation("mla_decode", self.wrong)

    @staticmethod
    def wrong(
        q,
        kv_cache,
        block_table,
        seq_lens,
        *,
        softmax_scale,
        head_dim_v=512,
        causal=True,
        sinks=None,
        window=None,
        topk_indices=None,
    ):
        return mla_decode.reference_impl(
            q,
            kv_cache,
            block_table,
            seq_lens,
            softmax_scale=q.shape[-1] ** -0.5,
            head_dim_v=head_dim_v,
            causal=causal,
            sinks=sinks,
            window=window,
            topk_indices=topk_indices,
        )


class ExpertGemmDropsLastGroup(CpuBackend):
    """TEST DOUBLE: grouped_gemm that returns zeros for the last expert's rows."""

    def __init__(self):
        super().__init__()
        self.add_implementation("grouped_gemm", self.wrong)

    @staticmethod
    def wrong(x, w, group_sizes, *, layout="contiguous", x_scale=None, w_scale=None, out_dtype=None):
        y = grouped_gemm.reference_impl(
            x, w, group_sizes, layout=layout, x_scale=x_scale, w_scale=w_scale, out_dtype=out_dtype
        )
        last = int(group_sizes[-1])
        if last:
            y[-last:] = 0
        return y


@pytest.mark.parametrize(
    "cls,op,layer", [(WrongDecodeScale, "mla_decode", 0), (ExpertGemmDropsLastGroup, "grouped_gemm", 1)]
)
def test_bisect_names_the_wrong_operator_and_layer(tiny, cls, op, layer):
    name = register_backend(f"bisect-{op}", cls)
    model = hal.model.load(tiny, backend="cpu", dtype=torch.float32)
    findings = {f.op: f for f in bisect(model, name, prompt=[[3, 1, 4, 1, 5, 9, 2, 6]], steps=2)}
    assert findings[op].status == "diverges" and findings[op].layer == layer, findings[op]
    assert all(f.status == "ok" for other, f in findings.items() if other != op), findings


def test_bisect_cli_passes_for_the_reference(tiny, capsys):
    assert main(["bisect", "--model", str(tiny), "--backend", "cpu", "--steps", "1"]) == 0
    assert "no operator diverges" in capsys.readouterr().out


@pytest.mark.parametrize("twin, vendor_op", [("ascend-emulated", "npu_grouped_matmul"), ("mlu-emulated", "group_gemm")])
def test_bisect_on_an_emulated_vendor_twin_names_its_broken_kernel(tiny, twin, vendor_op, monkeypatch):
    """The twin as shipped agrees with the reference; with its (emulated) expert GEMM kernel 1% off,
    bisect names grouped_gemm and nothing else."""
    model = hal.model.load(tiny, backend="cpu", dtype=torch.float32)
    prompt = [[3, 1, 4, 1, 5, 9, 2, 6]]
    assert all(f.status in ("ok", "unsupported") for f in bisect(model, twin, prompt=prompt, steps=1))
    lib = registry().backend(twin).lib
    kernel = getattr(lib, vendor_op)

    def one_percent_off(*args, **kwargs):
        out = kernel(*args, **kwargs)
        (out[0] if isinstance(out, (list, tuple)) else out).mul_(1.01)
        return out

    monkeypatch.setattr(lib, vendor_op, one_percent_off)
    found = bisect(model, twin, prompt=prompt, steps=1)
    assert "[EMULATED" in render(found, twin, 1e-3).splitlines()[0]
    findings = {f.op: f for f in found}
    assert findings["grouped_gemm"].status == "diverges", findings["grouped_gemm"]
    assert all(f.status in ("ok", "unsupported") for op, f in findings.items() if op != "grouped_gemm"), findings


def add_tensors(path, tensors):
    """Add ``tensors`` (name -> tensor) to the checkpoint ``path``, in the second shard."""
    edit_shard(path, lambda t: t.update(tensors))
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"].update({name: SHARD for name in tensors})
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def test_layers_beyond_the_config_are_refused_unless_they_are_its_mtp_layers(broken):
    """A config saying fewer layers than the files hold is no shallower model: the extra layer's tensors are
    unexpected (a few named, and the count), unless ``num_nextn_predict_layers`` says they are MTP layers."""
    edit_config(broken, num_hidden_layers=1, num_nextn_predict_layers=0)
    with pytest.raises(
        hal.model.CheckpointError,
        match=r"^\d+ unexpected tensors: 'model\.layers\.1\.input_layernorm\.weight', .* and \d+ more",
    ):
        hal.model.load(broken)
    edit_config(broken, num_nextn_predict_layers=1)
    model = hal.model.load(broken)
    assert len(model.layers) == 1 and model.load_report == hal.model.LoadReport()


def test_a_config_with_more_layers_than_the_files_names_the_missing_tensors(broken):
    edit_config(broken, num_hidden_layers=3)
    with pytest.raises(
        hal.model.CheckpointError,
        match=r"^\d+ missing tensors: 'model\.layers\.2\.input_layernorm\.weight', .* and \d+ more$",
    ):
        hal.model.load(broken, strict=False)  # no weights are made up, strict or not


def test_not_strict_skips_unexpected_tensors_and_reports_them(broken):
    extra = {"model.layers.0.mlp.extra.weight": torch.ones(2), "lm_head.bias": torch.ones(256)}
    add_tensors(broken, extra)
    with pytest.raises(hal.model.CheckpointError, match="2 unexpected tensors: 'lm_head.bias', 'model.layers.0"):
        hal.model.load(broken)
    with pytest.warns(UserWarning, match="2 unexpected tensors: 'lm_head.bias', .* skipped"):
        model = hal.model.load(broken, strict=False)
    assert model.load_report.skipped == tuple(sorted(extra)) and not model.load_report.defaulted


def test_cli_generate_no_strict(broken, capsys):
    add_tensors(broken, {"model.layers.0.mlp.extra.weight": torch.ones(2)})
    command = ["generate", "--model", str(broken), "--prompt-ids", "1", "2", "--max-new-tokens", "1"]
    assert main(command) == 2
    assert "unexpected tensor 'model.layers.0.mlp.extra.weight'" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="unexpected tensor 'model.layers.0.mlp.extra.weight' skipped"):
        assert main(command + ["--no-strict"]) == 0
