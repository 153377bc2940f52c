"""Backend selection settings and where they come from.

Settings come in layers, highest precedence first:

1. ``with hal.use_backend(...)`` (innermost first);
2. environment: ``HAL_BACKEND``, ``HAL_OPS``, ``HAL_FALLBACK``, ``HAL_CHECKED``;
3. a config file: ``$HAL_CONFIG``, else ``hal.toml`` in the working directory, else ``[tool.hal]``
   of ``pyproject.toml`` there;
4. auto-detection: the first available accelerator backend, else ``cpu``.

For one operator, the backend is the first layer's per-operator choice (``ops``) or, failing that,
that layer's ``backend``; a layer that names neither defers to the next. The fallback policy
(``"error"``: raise :class:`~hal.errors.UnsupportedError`; ``"warn"``: run the request on
``fallback_backend``, default ``cpu``, with a warning) resolves the same way, per operator too.

Config file (``hal.toml``; the same keys go under ``[tool.hal]`` in ``pyproject.toml``)::

    backend = "ascend"
    fallback = "error"
    checked = false
    [ops]                 # per-operator backend, e.g. to bisect a wrong model output
    mla_decode = "cpu"
    [op_fallback]         # per-operator fallback policy
    topk_routing = "warn"
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple

from hal.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["Layer", "use_backend", "checked_mode", "layers", "reload", "FALLBACK_POLICIES"]

FALLBACK_POLICIES = ("error", "warn")


@dataclass(frozen=True, eq=False)  # identity hash: layers key the dispatch cache, cheaply
class Layer:
    """One source of settings. ``None`` / empty means "not set here"."""

    source: str
    backend: Optional[str] = None
    ops: Tuple[Tuple[str, str], ...] = ()
    fallback: Optional[str] = None
    op_fallback: Tuple[Tuple[str, str], ...] = ()
    fallback_backend: Optional[str] = None
    checked: Optional[bool] = None

    def __post_init__(self) -> None:
        for policy in [self.fallback, *dict(self.op_fallback).values()]:
            if policy is not None and policy not in FALLBACK_POLICIES:
                raise ConfigError(
                    f"{self.source}: fallback policy must be one of {', '.join(FALLBACK_POLICIES)}, got {policy!r}"
                )
        from hal.contract import all_ops

        known = all_ops()
        for op in [*dict(self.ops), *dict(self.op_fallback)]:
            if op not in known:
                raise ConfigError(f"{self.source}: no operator named {op!r} (operators: {', '.join(sorted(known))})")

    def backend_for(self, op: str) -> Optional[str]:
        return dict(self.ops).get(op, self.backend)

    def fallback_for(self, op: str) -> Optional[str]:
        return dict(self.op_fallback).get(op, self.fallback)


def _layer(source: str, data: Mapping[str, Any]) -> Layer:
    allowed = {"backend", "ops", "fallback", "op_fallback", "fallback_backend", "checked"}
    unknown = set(data) - allowed
    if unknown:
        raise ConfigError(f"{source}: unknown setting(s) {sorted(unknown)} (known: {sorted(allowed)})")
    for key in ("ops", "op_fallback"):
        if not isinstance(data.get(key, {}), Mapping):
            raise ConfigError(f"{source}: '{key}' must be a table of operator = value")
    checked = data.get("checked")
    if checked is not None and not isinstance(checked, bool):
        raise ConfigError(f"{source}: 'checked' must be true or false, got {checked!r}")
    return Layer(
        source,
        backend=data.get("backend"),
        ops=tuple(sorted(data.get("ops", {}).items())),
        fallback=data.get("fallback"),
        op_fallback=tuple(sorted(data.get("op_fallback", {}).items())),
        fallback_backend=data.get("fallback_backend"),
        checked=checked,
    )


def _pairs(var: str, text: str) -> Tuple[Optional[str], Dict[str, str]]:
    """``"warn,mla_decode=error"`` -> ("warn", {"mla_decode": "error"})."""
    default, per_op = None, {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        if "=" in item:
            op, _, value = item.partition("=")
            per_op[op.strip()] = value.strip()
        elif default is None:
            default = item
        else:
            raise ConfigError(f"{var}: more than one default value in {text!r}")
    return default, per_op


def _env_layer() -> Optional[Layer]:
    env = os.environ
    data: Dict[str, Any] = {}
    if env.get("HAL_BACKEND"):
        data["backend"] = env["HAL_BACKEND"].strip()
    if env.get("HAL_OPS"):
        default, ops = _pairs("HAL_OPS", env["HAL_OPS"])
        if default is not None:
            raise ConfigError(f"HAL_OPS: expected op=backend pairs, got {default!r}")
        data["ops"] = ops
    if env.get("HAL_FALLBACK"):
        data["fallback"], data["op_fallback"] = _pairs("HAL_FALLBACK", env["HAL_FALLBACK"])
    if env.get("HAL_CHECKED"):
        value = env["HAL_CHECKED"].strip().lower()
        if value not in ("0", "1", "true", "false", "yes", "no"):
            raise ConfigError(f"HAL_CHECKED: expected 1 or 0, got {env['HAL_CHECKED']!r}")
        data["checked"] = value in ("1", "true", "yes")
    return _layer("environment", data) if data else None


def _file_layer() -> Optional[Layer]:
    explicit = os.environ.get("HAL_CONFIG")
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(f"HAL_CONFIG: no file at {path}")
        return _layer(str(path), _read_toml(path))
    local = Path.cwd() / "hal.toml"
    if local.is_file():
        return _layer(str(local), _read_toml(local))
    pyproject = Path.cwd() / "pyproject.toml"
    if pyproject.is_file():
        table = _read_toml(pyproject).get("tool", {}).get("hal")
        if table:
            return _layer(f"{pyproject} [tool.hal]", table)
    return None


def _read_toml(path: Path) -> Dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


_static: Optional[Tuple[Layer, ...]] = None
_context: contextvars.ContextVar[Tuple[Layer, ...]] = contextvars.ContextVar("hal_layers", default=())


def reload() -> None:
    """Re-read the environment and config file (they are read once, on first use)."""
    global _static
    _static = None
    from hal import dispatch

    dispatch.clear_cache()


def _static_layers() -> Tuple[Layer, ...]:
    global _static
    if _static is None:
        _static = tuple(layer for layer in (_env_layer(), _file_layer()) if layer is not None)
    return _static


def layers() -> Tuple[Layer, ...]:
    """The settings in force here, highest precedence first. Hashable: a cache key for dispatch."""
    return _context.get() + (_static if _static is not None else _static_layers())  # called on every op call


@contextlib.contextmanager
def use_backend(
    backend: Optional[str] = None,
    *,
    ops: Optional[Mapping[str, str]] = None,
    fallback: Optional[str] = None,
    op_fallback: Optional[Mapping[str, str]] = None,
    fallback_backend: Optional[str] = None,
    checked: Optional[bool] = None,
) -> Iterator[Layer]:
    """Run the block with these settings above every other source.

    ``backend`` applies to every operator; ``ops`` picks a backend per operator (e.g.
    ``ops={"mla_decode": "cpu"}`` to keep attention on the reference while bisecting).
    """
    layer = _interned(
        _layer(
            "use_backend()",
            {
                k: v
                for k, v in dict(
                    backend=backend,
                    ops=dict(ops or {}),
                    fallback=fallback,
                    op_fallback=dict(op_fallback or {}),
                    fallback_backend=fallback_backend,
                    checked=checked,
                ).items()
                if v not in (None, {})
            },
        )
    )
    token = _context.set((layer,) + _context.get())
    try:
        yield layer
    finally:
        _context.reset(token)


_INTERNED: Dict[Tuple[Any, ...], Layer] = {}


def _interned(layer: Layer) -> Layer:
    """The one Layer object with these settings: a block entered with the same settings again (e.g. once per
    model forward) finds the routes and validated signatures of the last time (layers key them by identity)."""
    key = tuple(vars(layer).values())
    if len(_INTERNED) >= 1024 and key not in _INTERNED:  # settings made in a loop: a bound on memory
        _INTERNED.clear()
    return _INTERNED.setdefault(key, layer)


def checked_mode() -> bool:
    """Whether every call is validated in full, tensor values included (``HAL_CHECKED=1`` etc.)."""
    for layer in layers():
        if layer.checked is not None:
            return layer.checked
    return False


def describe() -> Dict[str, Any]:
    """The settings layers, for ``hal info``."""
    return {"layers": [{k: v for k, v in vars(layer).items() if v not in (None, ())} for layer in layers()]}
