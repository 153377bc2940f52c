"""The CPU backend's native kernels (``hal.backends.cpu.native``): every variant this CPU runs (the others
skipped, saying why), what the backend says where none runs, the build cache, and the aarch64 variant
cross-compiled (and run under qemu where it is installed). Their numerics, on every variant through the
``native_variant`` fixture (tests/conftest.py): tests/test_ops_mla.py
(``test_native_decode_within_tolerance_of_oracle``, and the ``cpu_paths`` tests with and without the best
variant) and tests/test_ops_quant.py (``test_each_native_fp8_variant_is_the_reference_bit_for_bit``)."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from importlib import resources

import pytest
import torch

import hal
from hal.backends.cpu import native

STATUS = "from hal.backends.cpu import native; print(native.status())"


def status_with(tmp_path, **env) -> str:
    """native.status() in a fresh process with ``env`` and an empty kernel cache (and the default choice of
    variant, whatever HAL_CPU_NATIVE the tests run under, unless ``env`` sets it)."""
    inherited = {k: v for k, v in os.environ.items() if k != "HAL_CPU_NATIVE"}
    environment = {**inherited, "XDG_CACHE_HOME": str(tmp_path), **env}
    done = subprocess.run(
        [sys.executable, "-c", STATUS], env=environment, capture_output=True, text=True, timeout=120, check=True
    )
    return done.stdout.strip()


def test_the_best_variant_this_cpu_runs_serves_by_default(monkeypatch):
    monkeypatch.delenv("HAL_CPU_NATIVE", raising=False)
    if not native.variants():
        pytest.skip(f"no native variant runs here: {native.status()}")
    assert native.status() == f"native {native.VARIANTS[native.variants()[0]].label}"


def test_each_variant_says_it_serves(tmp_path, native_variant):
    assert status_with(tmp_path, HAL_CPU_NATIVE=native_variant) == f"native {native.VARIANTS[native_variant].label}"


@pytest.mark.parametrize(
    "env, why",
    [
        ({"HAL_CPU_NATIVE": "0"}, "HAL_CPU_NATIVE=0"),
        ({"HAL_CPU_NATIVE": "sse2"}, "HAL_CPU_NATIVE=sse2 is none of 0, 1, amx, avx512bf16, avx512, avx2, neon"),
        ({"CC": "no-such-compiler"}, "no C compiler (no-such-compiler)"),
        ({"CC": "false"}, "did not build"),
    ],
)
def test_without_the_native_kernels_the_backend_says_why(tmp_path, env, why):
    if not native.variants() and "HAL_CPU_NATIVE" not in env:
        pytest.skip(f"the native kernels do not run here anyway: {native.status()}")
    got = status_with(tmp_path, **env)
    assert got.startswith("PyTorch (") and why in got, got


def test_a_variant_the_cpu_lacks_is_refused_saying_why(tmp_path):
    lacking = [name for name in native.VARIANTS if name not in native.variants()]
    if not lacking:
        pytest.skip("this CPU runs every variant")
    got = status_with(tmp_path, HAL_CPU_NATIVE=lacking[0])
    assert got.startswith(f"PyTorch (HAL_CPU_NATIVE={lacking[0]}, but ") and ("lacks" in got or "are for" in got), got


def test_the_kernels_are_built_once_into_the_cache_directory(tmp_path):
    if not native.variants():
        pytest.skip(f"the native kernels do not run here: {native.status()}")
    best = native.variants()[0]
    running = f"native {native.VARIANTS[best].label}"
    assert status_with(tmp_path) == running
    built = list((tmp_path / "xpu-hal").glob(f"native-{best}-*.so"))
    assert len(built) == 1 and not [p for p in (tmp_path / "xpu-hal").iterdir() if p not in built]
    assert status_with(tmp_path, CC="no-such-compiler") == running  # loaded from the cache, not rebuilt


# ------------------------------------------------------------------------------------ aarch64 (NEON)

CROSS = "aarch64-linux-gnu-gcc"
QEMU = "qemu-aarch64"
AARCH64 = 183  # ELF e_machine

# Runs the kernels on raw arrays: "quant" rows k group ue8m0 | x -> q s; "decode" batch heads dim dim_v
# block_size blocks columns scale | q cache table lengths -> out lse
HARNESS = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
void hal_quantize_fp8_bf16(const uint16_t *, long, long, int, int, uint8_t *, float *, int);
long hal_mla_decode_workspace(int, int, int, int);
void hal_mla_decode(const uint16_t *, int, int, int, int, const uint16_t *, int, const int32_t *, long,
                    const int32_t *, float, uint16_t *, float *, float *, int);
static void *in(size_t bytes) {
    void *p = malloc(bytes + 64);
    if (fread(p, 1, bytes, stdin) != bytes) exit(2);
    return p;
}
static void out(const void *p, size_t bytes) { fwrite(p, 1, bytes, stdout); }
int main(int argc, char **argv) {
    int32_t h[7];
    if (argc < 2) return 1;
    if (!strcmp(argv[1], "quant")) {
        if (fread(h, 4, 4, stdin) != 4) return 2;
        long n = (long)h[0] * h[1];
        uint16_t *x = in(2 * n);
        uint8_t *q = malloc(n + 1);
        float *s = malloc(4 * (n / h[2]) + 4);
        hal_quantize_fp8_bf16(x, h[0], h[1], h[2], h[3], q, s, 1);
        out(q, n), out(s, 4 * (n / h[2]));
    } else {
        float scale;
        if (fread(h, 4, 7, stdin) != 7 || fread(&scale, 4, 1, stdin) != 1) return 2;
        int batch = h[0], heads = h[1], dim = h[2], dim_v = h[3], bs = h[4], blocks = h[5], columns = h[6];
        uint16_t *q = in(2L * batch * heads * dim), *cache = in(2L * blocks * bs * dim);
        int32_t *table = in(4L * batch * columns), *lengths = in(4L * batch);
        uint16_t *o = malloc(2L * batch * heads * dim_v);
        float *lse = malloc(4L * batch * heads), *ws;
        if (posix_memalign((void **)&ws, 64, 4 * hal_mla_decode_workspace(batch, dim, dim_v, 1))) return 3;
        hal_mla_decode(q, batch, heads, dim, dim_v, cache, bs, table, columns, lengths, scale, o, lse, ws, 1);
        out(o, 2L * batch * heads * dim_v), out(lse, 4L * batch * heads);
    }
    return 0;
}
"""


def cross_build(tmp_path, harness: bool = False):
    """The neon variant built with the cross compiler (a shared library, or the harness, static)."""
    if shutil.which(CROSS) is None:
        pytest.skip(f"no {CROSS} (Debian: apt-get install gcc-aarch64-linux-gnu) to build the NEON variant")
    source = tmp_path / "native.c"
    source.write_bytes(resources.files("hal.backends.cpu").joinpath("native.c").read_bytes())
    output = tmp_path / ("harness" if harness else "native.so")
    command = native.compile_command("neon", source, output, [CROSS])
    if harness:
        (tmp_path / "harness.c").write_text(HARNESS)
        command = [c for c in command if c not in ("-shared", "-fPIC")] + [str(tmp_path / "harness.c"), "-static"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return output


def test_the_neon_variant_cross_compiles_for_aarch64(tmp_path):
    built = cross_build(tmp_path).read_bytes()
    assert built[:4] == b"\x7fELF" and struct.unpack_from("<H", built, 18)[0] == AARCH64


def run_harness(harness, mode: str, header: bytes, *arrays: torch.Tensor) -> bytes:
    data = header + b"".join(a.contiguous().view(torch.uint8).numpy().tobytes() for a in arrays)
    done = subprocess.run([QEMU, str(harness), mode], input=data, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_the_neon_variant_under_qemu_is_the_reference_bit_for_bit_and_within_tolerance(tmp_path):
    # the NEON variant, run by qemu-user: FP8 quantisation of every finite bf16 value below three group maxima
    # (both scale formats) bit for bit, and a decode step against the float64 oracle within the contract's
    # tolerance (pages of 7 slots, so blocks of 32 keys cross pages; an empty sequence; two halves from 512)
    from test_ops_mla import TOL, decode_as_prefill, decode_inputs, page
    from test_ops_quant import bits, every_bf16_value_below

    if shutil.which(QEMU) is None:
        pytest.skip(f"no {QEMU} (Debian: apt-get install qemu-user) to run the NEON variant")
    harness = cross_build(tmp_path, harness=True)
    for amax in (3.7, 1e-5, 7e4):
        x = every_bf16_value_below(amax)
        for scale_fmt in (None, "ue8m0"):
            got = run_harness(harness, "quant", struct.pack("<4i", *x.shape, 128, scale_fmt == "ue8m0"), x)
            q_ref, s_ref = hal.ops.quantize_fp8.reference_impl(x, 128, scale_fmt)
            assert got[: x.numel()] == bits(q_ref).numpy().tobytes(), (amax, scale_fmt)
            assert got[x.numel() :] == s_ref.numpy().tobytes(), (amax, scale_fmt)
    q, keys, _, _ = decode_inputs(torch.bfloat16, lens=(700, 0, 45), sq=1, hq=16, d=96, seed=2)
    cache, table, lens = page(keys, 7, dtype=torch.bfloat16)
    batch, _, heads, dim = q.shape
    header = struct.pack("<7if", batch, heads, dim, 64, cache.shape[1], cache.shape[0], table.shape[1], 0.1)
    got = run_harness(harness, "decode", header, q, cache, table.to(torch.int32), lens.to(torch.int32))
    out = torch.frombuffer(bytearray(got[: batch * heads * 64 * 2]), dtype=torch.bfloat16).view(batch, 1, heads, 64)
    lse = torch.frombuffer(bytearray(got[batch * heads * 64 * 2 :]), dtype=torch.float32).view(batch, 1, heads)
    exact_out, exact_lse = hal.ops.mla_decode.reference_impl(
        q, cache, table, lens, softmax_scale=0.1, head_dim_v=64, compute_dtype=torch.float64
    )
    n = hal.ops.mla.attention_error_n(q, torch.cat(keys), softmax_scale=0.1, num_keys=700)
    args, _ = decode_as_prefill(q, keys, 64)
    magnitude = hal.ops.mla_prefill.reference_impl(
        args[0], args[1], args[2].abs(), *args[3:], softmax_scale=0.1, compute_dtype=torch.float64
    )[0].reshape(exact_out.shape)
    hal.numerics.assert_within(out, exact_out, TOL["bfloat16"], n=n, magnitude=magnitude, what="out")
    hal.numerics.assert_within(lse, exact_lse, TOL["lse"], n=n, magnitude=torch.ones_like(exact_lse), what="lse")
