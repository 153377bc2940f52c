"""The whole plugin API: the hooks a backend plugin implements.

A plugin is any importable object (usually a module) with functions marked ``@hal.hookimpl``, named
in the ``hal.backends`` entry-point group of its distribution::

    [project.entry-points."hal.backends"]
    acme = "acme_hal.plugin"

Hooks are called with keyword arguments only, so later versions can add arguments without breaking
existing plugins (an implementation may accept fewer arguments than the spec).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, List

import pluggy

if TYPE_CHECKING:
    from hal.registry import BackendSpec

PROJECT = "hal"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def hal_backends() -> List[BackendSpec]:
    """Return the backends this plugin provides, as :class:`hal.registry.BackendSpec` descriptors.

    Keep it cheap: import no vendor library here. Each spec names its backend class as a
    ``"module:Class"`` string, imported only when the backend is listed or used.
    """
    raise NotImplementedError  # a specification: plugins implement it
