"""Backends shipped with the HAL (installed as ``hal.backends``). Each is a plugin registered through
the ``hal.backends`` entry-point group, exactly as a vendor's own package would register one."""
