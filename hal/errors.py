"""The HAL's exception family.

Every error the HAL raises on purpose derives from :class:`HalError`. Bad input raises
:class:`InvalidArgumentError` (a ``ValueError``) or one of its subclasses, whose message names the
operator, the argument, what was expected and what came.
"""

from __future__ import annotations


class HalError(Exception):
    """Base class of every error the HAL raises on purpose."""


class InvalidArgumentError(HalError, ValueError):
    """An operator was called with an argument that breaks its contract."""

    def __init__(self, op: str, argument: str, expected: str, got: str):
        self.op, self.argument, self.expected, self.got = op, argument, expected, got
        super().__init__(f"{op}: argument '{argument}' expected {expected}, got {got}")


class InvalidDtypeError(InvalidArgumentError, TypeError):
    """An argument has a dtype the contract does not accept."""


class DeviceMismatchError(InvalidArgumentError):
    """Tensor arguments of one call live on different devices, or on a device the backend lacks."""


class UnsupportedError(HalError, NotImplementedError):
    """The selected backend declares it cannot serve this request (and fallback is 'error')."""

    def __init__(self, op: str, backend: str, reason: str):
        self.op, self.backend, self.reason = op, backend, reason
        super().__init__(f"{op}: backend '{backend}' does not support this request: {reason}")


class BackendNotFoundError(HalError, LookupError):
    """No backend of that name is registered."""


class BackendUnavailableError(HalError, RuntimeError):
    """The backend is registered but cannot run on this machine; the message says why."""

    def __init__(self, backend: str, reason: str):
        self.backend, self.reason = backend, reason
        super().__init__(f"backend '{backend}' is unavailable: {reason}")


class PluginError(HalError):
    """A backend plugin is broken: it failed to load, declared bad data, or clashes with another."""


class ConfigError(HalError, ValueError):
    """A setting (argument, environment variable or config file) has a value the HAL cannot use."""


class MissingExtraError(HalError, ImportError):
    """A part of the HAL that needs an optional extra was used without it; the message names the install."""

    def __init__(self, part: str, extra: str, missing: str):
        self.part, self.extra, self.missing = part, extra, missing
        super().__init__(
            f"{part} needs the '{extra}' extra ({missing} is not installed): pip install 'xpu-hal[{extra}]'"
        )
