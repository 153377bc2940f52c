"""xpu-hal: DeepSeek-class operators with one contract and many backends.

>>> import hal
>>> y = hal.ops.grouped_gemm(x_sorted, w_experts, group_sizes)      # doctest: +SKIP
>>> with hal.use_backend("cpu"):                                     # doctest: +SKIP
...     ...
"""

from hal import ops
from hal.backend import Availability, Backend, Support, implements
from hal.config import checked_mode, use_backend
from hal.errors import (
    BackendNotFoundError,
    BackendUnavailableError,
    ConfigError,
    DeviceMismatchError,
    HalError,
    InvalidArgumentError,
    InvalidDtypeError,
    MissingExtraError,
    PluginError,
    UnsupportedError,
)
from hal.hookspecs import hookimpl
from hal.registry import BackendSpec, register_plugin, unregister_plugin

__version__ = "0.1.0"

__all__ = [
    "ops",
    "use_backend",
    "checked_mode",
    "hookimpl",
    "BackendSpec",
    "Backend",
    "Availability",
    "Support",
    "implements",
    "register_plugin",
    "unregister_plugin",
    "HalError",
    "InvalidArgumentError",
    "InvalidDtypeError",
    "DeviceMismatchError",
    "UnsupportedError",
    "BackendNotFoundError",
    "BackendUnavailableError",
    "PluginError",
    "ConfigError",
    "MissingExtraError",
    "__version__",
]
