"""Layer 1: the gateway's pure modules stay free of the reactor."""

from __future__ import annotations

import subprocess
import sys

PURE = [
    "acrrelay.gateway",
    "acrrelay.gateway.registryapi",
    "acrrelay.gateway.proof",
    "acrrelay.gateway.store",
    "acrrelay.gateway.spool",
    "acrrelay.gateway.ca",
    "acrrelay.gateway.config",
    "acrrelay.gateway.commands",
]


def test_pure_modules_import_no_reactor() -> None:
    """Importing every pure gateway module leaves twisted.internet.reactor uninstalled."""
    code = (
        "import sys\n"
        + "".join(f"import {name}\n" for name in PURE)
        + "print('twisted.internet.reactor' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "False"
