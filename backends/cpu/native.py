"""The CPU backend's native kernels (``native.c``): absorbed MLA decode, and FP8 quantisation of bf16 activations.

PyTorch's CPU flash attention pays a fixed cost for every block of keys of a decode step (two small oneDNN
calls) and gives a sequence one core; the decode kernel multiplies with the CPU's best bf16 or fp32
instructions directly, reads the paged cache in place, scattered pages included, and shares a step's work out
among PyTorch's own OpenMP threads (found through libgomp's entry points; one thread where the process has
none). PyTorch converts fp32 to e4m3 one value at a time; the quantiser does the whole group in vector
registers, bit for bit the reference. docs/performance.md gives the figures per CPU.

One source is compiled into a variant per instruction set, the best this CPU runs chosen at run time
(:data:`VARIANTS`, best first): ``amx`` (the tile unit; x86-64 with AMX-BF16), ``avx512bf16`` (``vdpbf16ps``),
``avx512`` (AVX-512 F/BW/VL: keys converted to fp32, FMAs), ``avx2`` (with FMA), and ``neon`` (aarch64).
``HAL_CPU_NATIVE`` (read at each call) picks: unset or ``1`` the best, ``0`` none, a variant's name that
variant (tests run every variant the CPU has this way).

They are C, compiled on first use with the system's compiler (``$CC``, else ``cc``) into a cache directory
(``$XDG_CACHE_HOME/xpu-hal``, else ``~/.cache/xpu-hal``), keyed by the variant, its source and flags, and
loaded with ctypes: nothing is built at install time. Where they cannot run (not Linux on x86-64 or aarch64,
a CPU without AVX2 and FMA, no compiler, the OS refuses the tile registers, ``HAL_CPU_NATIVE=0``), the backend
keeps its PyTorch paths, and :func:`status` (``hal info``) says why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

from hal.probe import cache_dir

__all__ = [
    "VARIANTS",
    "mla_decode",
    "quantize_fp8_bf16",
    "serves_mla_decode",
    "serves_quantize_fp8",
    "status",
    "variants",
]


class Variant(NamedTuple):
    label: str  # as status() says it
    machine: str  # platform.machine()
    flags: Tuple[str, ...]  # the compiler's: they alone choose native.c's code
    cpu_flags: Tuple[str, ...]  # what /proc/cpuinfo must list


_X86 = ("x86_64", "AMD64")
_AVX512 = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma")
_AVX512_CPU = ("avx512f", "avx512bw", "avx512vl", "fma")
VARIANTS = {  # best first
    "amx": Variant(
        "AMX",
        "x86_64",
        ("-mamx-tile", "-mamx-bf16", *_AVX512, "-mavx512bf16"),
        ("amx_tile", "amx_bf16", *_AVX512_CPU, "avx512_bf16"),
    ),
    "avx512bf16": Variant("AVX-512 BF16", "x86_64", (*_AVX512, "-mavx512bf16"), (*_AVX512_CPU, "avx512_bf16")),
    "avx512": Variant("AVX-512", "x86_64", _AVX512, _AVX512_CPU),
    "avx2": Variant("AVX2", "x86_64", ("-mavx2", "-mfma"), ("avx2", "fma")),
    "neon": Variant("NEON", "aarch64", ("-march=armv8-a",), ("asimd",)),
}
_SOURCE = "native.c"
_FLAGS = ("-O2", "-fPIC", "-shared")
MAX_HEADS = 16  # query rows a sequence: the 16 lanes of a vector, the 16 rows of a tile


def status() -> str:
    """ "native" and the variant that serves (e.g. "native AVX-512 BF16"), else why none does."""
    library, variant_or_why = _library()
    return f"native {VARIANTS[variant_or_why].label}" if library is not None else f"PyTorch ({variant_or_why})"


def variants() -> List[str]:
    """The variants this machine's CPU can run, best first (whether they build is another matter)."""
    return [name for name, variant in VARIANTS.items() if _lacks(variant) is None]


def serves_mla_decode(heads: int, dim: int, dim_v: int, kv_cache: torch.Tensor) -> bool:
    """Whether :func:`mla_decode` takes a decode step of these widths over ``kv_cache``."""
    return (
        heads <= MAX_HEADS
        and dim % 32 == 0
        and dim_v % 32 == 0
        and 0 < dim_v <= dim
        and kv_cache.dtype == torch.bfloat16
        and kv_cache.is_cpu
        and kv_cache.is_contiguous()
        and _library()[0] is not None
    )


def mla_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    softmax_scale: float,
    dim_v: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """A decode step: each sequence's rows ``q`` ``[B, rows, D]`` bf16 over the first ``seq_lens[b]`` keys in its
    blocks ``block_table[b]`` -> out ``[B, rows, dim_v]`` bf16, lse ``[B, rows]`` fp32 (an empty sequence: 0 and
    -inf). The caller checks :func:`serves_mla_decode` and the block ids of the pages used."""
    batch, rows, dim = q.shape
    q = q.contiguous()
    table = (
        block_table
        if block_table.dtype == torch.int32 and block_table.stride(-1) == 1
        else block_table.to(torch.int32).contiguous()
    )
    lengths = seq_lens.to(torch.int32).contiguous()
    out = q.new_empty((batch, rows, dim_v))
    lse = torch.empty((batch, rows), dtype=torch.float32)
    library = _library()[0]
    threads = torch.get_num_threads()
    workspace = torch.empty(library.hal_mla_decode_workspace(batch, dim, dim_v, threads), dtype=torch.float32)
    library.hal_mla_decode(
        q.data_ptr(),
        batch,
        rows,
        dim,
        dim_v,
        kv_cache.data_ptr(),
        kv_cache.shape[1],
        table.data_ptr(),
        table.stride(0),
        lengths.data_ptr(),
        softmax_scale,
        out.data_ptr(),
        lse.data_ptr(),
        workspace.data_ptr(),
        threads,
    )
    return out, lse


def serves_quantize_fp8(x: torch.Tensor, group_size: int) -> bool:
    """Whether :func:`quantize_fp8_bf16` quantises ``x`` in groups of ``group_size``."""
    return (
        x.dtype == torch.bfloat16
        and x.is_cpu
        and x.dim() >= 1
        and group_size % 16 == 0
        and x.shape[-1] % group_size == 0
        and _library()[0] is not None
    )


def quantize_fp8_bf16(x: torch.Tensor, group_size: int, ue8m0: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The contract's ``quantize_fp8`` of bf16 ``x`` ``[..., K]`` (bit for bit the reference) on PyTorch's OpenMP
    threads: ``q`` e4m3fn of ``x``'s shape and ``s`` ``[..., K // group_size]``."""
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    x = x.contiguous()
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn)
    s = torch.empty((*x.shape[:-1], k // group_size), dtype=torch.float32)
    if x.numel():
        _library()[0].hal_quantize_fp8_bf16(
            x.data_ptr(), rows, k, group_size, int(ue8m0), q.data_ptr(), s.data_ptr(), torch.get_num_threads()
        )
    return q, s


def _library() -> Tuple[Optional[ctypes.CDLL], str]:
    """The loaded kernels and their variant's name, or None and why not."""
    return _load(os.environ.get("HAL_CPU_NATIVE", "1"))


@functools.lru_cache(maxsize=None)
def _load(choice: str) -> Tuple[Optional[ctypes.CDLL], str]:
    if choice == "0":
        return None, "HAL_CPU_NATIVE=0"
    if platform.system() != "Linux" or platform.machine() not in (*_X86, "aarch64"):
        return None, (
            f"the native kernels are for x86-64 and aarch64 Linux, not {platform.system()} {platform.machine()}"
        )
    if choice not in ("", "1", *VARIANTS):
        return None, f"HAL_CPU_NATIVE={choice} is none of 0, 1, {', '.join(VARIANTS)}"
    runnable = variants()
    if choice in VARIANTS and choice not in runnable:
        return None, f"HAL_CPU_NATIVE={choice}, but {_lacks(VARIANTS[choice])}"
    if not runnable:
        return None, _lacks(VARIANTS["avx2" if platform.machine() in _X86 else "neon"])
    name = choice if choice in VARIANTS else runnable[0]
    try:
        library = ctypes.CDLL(str(_built(name)))
    except _NotBuilt as exc:
        return None, str(exc)
    except OSError as exc:
        return None, f"the native kernels ({name}) did not load: {exc}"
    if name == "amx" and not library.hal_amx_request():
        return None, "the OS refused this process the AMX tile registers"
    p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    library.hal_mla_decode.argtypes = [p, i, i, i, i, p, i, p, ctypes.c_long, p, f, p, p, p, i]
    library.hal_mla_decode.restype = None
    library.hal_mla_decode_workspace.argtypes = [i, i, i, i]
    library.hal_mla_decode_workspace.restype = ctypes.c_long
    library.hal_quantize_fp8_bf16.argtypes = [p, ctypes.c_long, ctypes.c_long, i, i, p, p, i]
    library.hal_quantize_fp8_bf16.restype = None
    return library, name


def _lacks(variant: Variant) -> Optional[str]:
    """Why this machine cannot run ``variant``, or None."""
    machine = "x86_64" if platform.machine() in _X86 else platform.machine()
    if machine != variant.machine:
        return f"the {variant.label} kernels are for {variant.machine}, not {platform.machine()}"
    missing = [f for f in variant.cpu_flags if f not in _cpu_flags()]
    return f"the CPU lacks {', '.join(missing)}" if missing else None


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> frozenset:
    """The CPU's features as /proc/cpuinfo lists them ("flags" on x86, "Features" on ARM)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((x for x in text.splitlines() if x.startswith(("flags", "Features"))), "")
    return frozenset(line.partition(":")[2].split())


class _NotBuilt(Exception):
    """Why the kernels could not be compiled."""


def compile_command(variant: str, source: Path, output: Path, compiler: Sequence[str]) -> List[str]:
    """The command that builds ``variant`` of the kernels from ``source`` into ``output`` with ``compiler``."""
    return [*compiler, *_FLAGS, *VARIANTS[variant].flags, str(source), "-o", str(output), "-lm"]


def _built(variant: str) -> Path:
    """The compiled kernels of ``variant`` in the cache directory (keyed by the variant, the source and the
    flags), compiled now if they are not there yet: written under a temporary name and renamed, so that
    processes building at once never load a partial file."""
    source = resources.files(__package__).joinpath(_SOURCE).read_bytes()
    key = hashlib.sha256(source + " ".join(compile_command(variant, Path(), Path(), [])).encode()).hexdigest()[:16]
    cache = cache_dir()
    target = cache / f"native-{variant}-{key}.so"
    if target.exists():
        return target
    command = shlex.split(os.environ.get("CC", "cc")) or ["cc"]  # "ccache gcc" too
    compiler = shutil.which(command[0])
    if compiler is None:
        raise _NotBuilt(f"no C compiler ({command[0]}) to build the native kernels")
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            src, built = Path(tmp) / _SOURCE, Path(tmp) / target.name
            src.write_bytes(source)
            subprocess.run(
                compile_command(variant, src, built, [compiler, *command[1:]]),
                check=True,
                capture_output=True,
                timeout=120,
            )
            os.replace(built, target)
    except subprocess.CalledProcessError as exc:
        raise _NotBuilt(
            f"the native kernels did not build ({command[0]} exited with {exc.returncode}): "
            + exc.stderr.decode(errors="replace").strip()[-300:]
        ) from None
    except subprocess.SubprocessError as exc:
        raise _NotBuilt(f"the native kernels did not build: {exc}") from None
    except OSError as exc:
        raise _NotBuilt(f"the native kernels could not be built in {cache}: {exc}") from None
    return target
