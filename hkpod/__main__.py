from __future__ import annotations

from hkpod.cli import main

main()
