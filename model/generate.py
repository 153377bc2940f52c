"""Greedy generation with the paged latent cache: one prefill, then one decode step per new token."""

from __future__ import annotations

import sys
import time
from typing import Callable, List, Optional, Sequence

import torch

import hal
from hal.model.deepseek_v3 import check_token_ids

Progress = Callable[[int, int], None]


def stderr_progress(done: int, total: int) -> None:
    """A one-line progress bar on stderr."""
    width = 30
    filled = width * done // max(total, 1)
    sys.stderr.write(f"\rgenerating [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def generate(
    model, prompts: Sequence[Sequence[int]], max_new_tokens: int, progress: Optional[Progress] = None
) -> List[List[int]]:
    """Greedy (argmax) continuation of each prompt (all the same length) by ``max_new_tokens`` tokens.

    Returns the new tokens of each prompt. ``progress(done, total)`` is called after every token."""
    lengths = {len(p) for p in prompts}
    if len(prompts) == 0 or len(lengths) != 1 or 0 in lengths:  # prompts may be a [B, S] tensor
        raise hal.InvalidArgumentError(
            "generate", "prompts", "one or more non-empty prompts of one length", f"lengths {sorted(lengths)}"
        )
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise hal.InvalidArgumentError("generate", "max_new_tokens", "an int >= 1", repr(max_new_tokens))
    tokens = torch.tensor([list(p) for p in prompts])  # no dtype: float ids are refused, not truncated
    check_token_ids(tokens, "generate", "prompts")
    tokens = tokens.long()
    cache = model.new_cache(tokens.shape[0], tokens.shape[1] + max_new_tokens)
    out: List[torch.Tensor] = []
    for step in range(max_new_tokens):
        logits = model(tokens, cache)
        tokens = logits[:, -1].argmax(dim=-1, keepdim=True)
        out.append(tokens)
        if progress:
            progress(step + 1, max_new_tokens)
    return torch.cat(out, dim=1).tolist()


def timed_generate(
    model, prompts: Sequence[Sequence[int]], max_new_tokens: int, progress: Optional[Progress] = stderr_progress
):
    """:func:`generate` and the tokens per second it achieved (new tokens of all prompts / wall time)."""
    start = time.perf_counter()
    new = generate(model, prompts, max_new_tokens, progress)
    return new, len(prompts) * max_new_tokens / (time.perf_counter() - start)
