"""hkpod: a Podman VM driven directly by HyperKit on macOS, or by QEMU."""

from __future__ import annotations

__version__ = "0.1.0"
