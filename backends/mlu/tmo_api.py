"""Which torch_mlu_ops API is installed: its signatures moved between releases (vLLM-MLU targets
``>= 1.6.0``, the newest documented release is 1.12.1), so the backend reads them with
:func:`inspect.signature` instead of trusting a version number, adapts where a difference is known, and
refuses, naming the version, where an operator it needs is missing or has an unknown shape.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, Tuple

__all__ = ["TmoApi", "TmoVersionError", "detect", "OLDEST_TMO"]

OLDEST_TMO = (1, 6)

# operator -> the parameters the backend passes by name (the others are passed by position, checked by count)
_REQUIRED: Dict[str, Tuple[Tuple[str, ...], int]] = {
    "moe_gen_idx": ((), 2),
    "moe_expand_input": ((), 5),
    "group_gemm": ((), 8),
    "moe_combine_result": ((), 8),
    "moe_sigmoid_topk": (("normalize", "num_expert_group", "topk_group", "score_bias"), 2),
    "moe_softmax_topk": (("normalize", "num_expert_group", "topk_group"), 2),
    "flash_attention": (("compute_dtype", "return_lse", "out_dtype"), 12),
    "single_query_cached_kv_attn": (("return_lse", "out_dtype", "compute_dtype", "head_size_v"), 13),
    "reshape_paged_cache": ((), 5),
    "matmul": (("trans_b", "dtype"), 2),
}


class TmoVersionError(RuntimeError):
    """The installed torch_mlu_ops lacks an operator or parameter the backend needs."""


@dataclass(frozen=True)
class TmoApi:
    """What the installed torch_mlu_ops offers, as far as the backend's choices depend on it."""

    version: str
    #: group_gemm(output_dtype=): 1.12.1 rounds the fp32 accumulator straight to a wider/narrower dtype
    group_gemm_output_dtype: bool
    #: scaled_matmul and the float8 "a_groupwise-b_per_block" smooth_quant_group_gemm (1.12.1; not in 1.6)
    fp8_block_gemm: bool
    #: scaled_quantize + scaled_matmul: W8A8 int8 per-token / per-channel (1.12.1; 1.6 has the older
    #: per_token_smooth_quantize / smooth_quant_matmul, which the backend does not call)
    int8_scaled: bool


def _version_tuple(version: str) -> Tuple[int, ...]:
    digits = []
    for part in version.split("+")[0].split(".")[:2]:
        if not part.isdigit():
            break
        digits.append(int(part))
    return tuple(digits)


def detect(lib: Any) -> TmoApi:
    """Read the installed API; raise :class:`TmoVersionError` naming the version when it cannot be used."""
    version = str(getattr(lib, "__version__", "unknown"))
    supported = f"this backend adapts to torch_mlu_ops {'.'.join(map(str, OLDEST_TMO))} (vLLM-MLU) to 1.12.1"
    numbers = _version_tuple(version)
    if numbers and numbers < OLDEST_TMO:
        raise TmoVersionError(f"torch_mlu_ops {version} is too old: {supported}")
    group_gemm_params: FrozenSet[str] = frozenset()
    for name, (named, positional) in _REQUIRED.items():
        fn = getattr(lib, name, None)
        if fn is None:
            raise TmoVersionError(f"torch_mlu_ops {version} has no {name}(): {supported}")
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            raise TmoVersionError(
                f"torch_mlu_ops {version}: the signature of {name}() cannot be read: {supported}"
            ) from None
        missing = [p for p in named if p not in params]
        if missing or len(params) < positional:
            raise TmoVersionError(
                f"torch_mlu_ops {version}: {name}{inspect.signature(fn)} lacks "
                f"{', '.join(repr(p) for p in missing) or f'{positional} positional parameters'}: "
                f"{supported}"
            )
        if name == "group_gemm":
            group_gemm_params = frozenset(params)
    return TmoApi(
        version=version,
        group_gemm_output_dtype="output_dtype" in group_gemm_params,
        fp8_block_gemm=hasattr(lib, "scaled_matmul") and hasattr(lib, "smooth_quant_group_gemm"),
        int8_scaled=hasattr(lib, "scaled_quantize") and hasattr(lib, "scaled_matmul"),
    )
