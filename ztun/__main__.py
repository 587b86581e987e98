"""``python -m ztun``: the ztund node daemon (see :mod:`ztun.daemon`)."""

from __future__ import annotations

from ztun.daemon import main

if __name__ == "__main__":
    main()
