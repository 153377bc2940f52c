"""DeepSeek models written against the HAL (``hal.model``).

>>> model = hal.model.load("/path/to/DeepSeek-V3", backend="cpu", dtype=torch.bfloat16)  # doctest: +SKIP
>>> tokens = hal.model.generate(model, [[1, 2, 3]], max_new_tokens=8)                    # doctest: +SKIP

``model_type`` ``deepseek_v3`` (V3, R1, V3.1 configs) and ``deepseek_v4`` (bf16, FP8 or packed FP4 experts).
See docs/model.md.
"""

from hal.model.checkpoint import LoadReport
from hal.model.config import CheckpointError, ModelArgs, ModelNotSupportedError
from hal.model.generate import generate
from hal.model.loader import load

__all__ = ["load", "generate", "ModelArgs", "CheckpointError", "ModelNotSupportedError", "LoadReport"]
