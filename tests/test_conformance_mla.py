"""The MLA suites have teeth: deliberately wrong backends, registered through the public plugin API, fail
them; the CPU reference passes."""

from __future__ import annotations

import math

import torch

import hal
from hal.backends.cpu.backend import CpuBackend
from hal.conformance.core import PROFILES, run_cell
from hal.ops.mla import mla_decode as DECODE
from hal.ops.mla import mla_prefill as PREFILL

F32 = torch.float32


def cell(dtype="float32", causal="false", sinks="false", window="false", sparse="false"):
    return {"dtype": dtype, "causal": causal, "sinks": sinks, "window": window, "sparse": sparse}


class WrongPrefill(CpuBackend):
    """The reference prefill with one deliberate mistake, made by :meth:`wrong` (arguments -> arguments)."""

    def __init__(self):
        super().__init__()
        self.add_implementation("mla_prefill", self.mla_prefill)

    def mla_prefill(
        self,
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k=None,
        *,
        softmax_scale,
        causal=True,
        sinks=None,
        window=None,
        topk_indices=None,
    ):
        kw = dict(softmax_scale=softmax_scale, causal=causal, sinks=sinks, window=window, topk_indices=topk_indices)
        out, lse = PREFILL.reference_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, **self.wrong(q, kw), compute_dtype=F32)
        return out, self.wrong_lse(lse)

    def wrong(self, q, kw):
        return kw

    def wrong_lse(self, lse):
        return lse


class WrongDecode(CpuBackend):
    """The reference decode with one deliberate mistake, made by :meth:`wrong` (arguments -> arguments)."""

    def __init__(self):
        super().__init__()
        self.add_implementation("mla_decode", self.mla_decode)

    def mla_decode(
        self,
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
        kw = dict(
            softmax_scale=softmax_scale,
            head_dim_v=head_dim_v,
            causal=causal,
            sinks=sinks,
            window=window,
            topk_indices=topk_indices,
        )
        return DECODE.reference_impl(q, kv_cache, block_table, seq_lens, **self.wrong(q, kw), compute_dtype=F32)

    def wrong(self, q, kw):
        return kw


class NoCausalMask(WrongPrefill):
    """Prefill that ignores ``causal`` (every query sees the whole sequence)."""

    def wrong(self, q, kw):
        return dict(kw, causal=False)


class HeadDimScale(WrongDecode):
    """Decode that derives the scale from the head dim (FlashMLA's default), ignoring ``softmax_scale``."""

    def wrong(self, q, kw):
        return dict(kw, softmax_scale=q.shape[-1] ** -0.5)


class Base2Lse(WrongPrefill):
    """Prefill returning lse in base 2 (``log2 sum 2**(s * log2 e)`` = lse / ln 2)."""

    def wrong_lse(self, lse):
        return lse / math.log(2)


class WindowOffByOne(WrongDecode):
    """Decode attending ``window + 1`` keys."""

    def wrong(self, q, kw):
        return dict(kw, window=None if kw["window"] is None else kw["window"] + 1)


class SinksIgnored(WrongDecode):
    """Decode that drops the sink logits."""

    def wrong(self, q, kw):
        return dict(kw, sinks=None)


class PaddingIsKeyZero(WrongPrefill):
    """Sparse prefill gathering index -1 as key 0 instead of masking it."""

    def wrong(self, q, kw):
        topk = kw["topk_indices"]
        return dict(kw, topk_indices=None if topk is None else topk.clamp_min(0))


class NegativeSlotWrites(CpuBackend):
    """Cache write that scatters every row, so slot -1 lands in the last slot (Python indexing)."""

    def __init__(self):
        super().__init__()

        self.add_implementation("paged_cache_write", self.paged_cache_write)

    def paged_cache_write(self, kv_cache, kv, slot_mapping):
        kv_cache.view(-1, kv_cache.shape[2])[slot_mapping.long()] = kv


def _register(name, cls):
    class Plugin:
        @hal.hookimpl
        def hal_backends(self):
            return [hal.BackendSpec(name=name, factory=f"{__name__}:{cls.__name__}")]

    hal.register_plugin(Plugin(), name)


def _fails(cls, op, features):
    name = cls.__name__.lower()
    _register(name, cls)
    result = run_cell(name, op, features, profile="ci", seed=1)
    assert result.status == "fail", result
    return result


def test_reference_backend_passes_representative_cells():
    for op, features in [
        ("mla_prefill", cell("bfloat16", causal="true", sinks="true", window="true", sparse="true")),
        ("mla_prefill", cell("float16")),
        ("mla_decode", cell("bfloat16", causal="true", sinks="true", window="true", sparse="true")),
        ("mla_decode", cell("float32", causal="true")),
        ("paged_cache_write", {"dtype": "bfloat16"}),
    ]:
        result = run_cell("cpu", op, features, profile="ci", seed=1)
        assert result.status == "pass", (result.id, result.message)
        assert result.examples == PROFILES["ci"]


def test_missing_causal_mask_fails_with_a_minimal_example():
    result = _fails(NoCausalMask, "mla_prefill", cell(causal="true"))
    assert result.message.startswith("out") and "mismatched elements" in result.message
    assert "query lengths" in result.minimal_example  # the labelled draws of the shrunk example
    assert result.reproduce.startswith("hal conformance --backend nocausalmask --ops 'mla_prefill[")
    assert " --seed 1 " in result.reproduce


def test_head_dim_softmax_scale_fails():
    _fails(HeadDimScale, "mla_decode", cell(causal="true"))


def test_base2_lse_fails():
    assert _fails(Base2Lse, "mla_prefill", cell()).message.startswith("lse")


def test_window_off_by_one_fails():
    _fails(WindowOffByOne, "mla_decode", cell("bfloat16", causal="true", window="true"))


def test_ignored_sinks_fail():
    _fails(SinksIgnored, "mla_decode", cell("float16", sinks="true"))


def test_padding_as_key_zero_fails():
    _fails(PaddingIsKeyZero, "mla_prefill", cell(sparse="true"))


def test_negative_slot_written_to_the_last_slot_fails():
    result = _fails(NegativeSlotWrites, "paged_cache_write", {"dtype": "float32"})
    assert "kv_cache bits" in result.message


class HeadsBeyond64Dropped(WrongDecode):
    """Decode whose kernel handles at most 64 query heads: heads 64.. are left at zero."""

    def mla_decode(
        self,
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
        out, lse = super().mla_decode(
            q[:, :, :64],
            kv_cache,
            block_table,
            seq_lens,
            softmax_scale=softmax_scale,
            head_dim_v=head_dim_v,
            causal=causal,
            sinks=None if sinks is None else sinks[:64],
            window=window,
            topk_indices=topk_indices,
        )
        pad = q.shape[2] - out.shape[2]
        return (
            torch.nn.functional.pad(out, (0, 0, 0, pad)),
            torch.nn.functional.pad(lse, (0, pad), value=float("-inf")),
        )


def test_heads_beyond_64_dropped_fails():
    _fails(HeadsBeyond64Dropped, "mla_decode", cell("bfloat16"))
