# cython: language_level=3, embedsignature=True
"""Typed boundary over the C engine (internal)."""

from ztun._core cimport cztun


def core_version() -> str:
    """Version string compiled into the C core."""
    return cztun.ztun_version().decode()
