"""The compiled boundary to the C core. Internal: use :mod:`ztun` instead."""
