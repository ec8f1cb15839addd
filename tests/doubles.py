"""The in-memory harness now ships as :mod:`acrrelay.testing`; these names stay for the tests."""

from __future__ import annotations

from twisted.internet.interfaces import IHalfCloseableProtocol

from acrrelay.testing import EXAMPLE_CONFIG as RELAY_TOML
from acrrelay.testing import Events, PipeEnd, run_now
from acrrelay.testing import RelayHarness as Harness

__all__ = ["RELAY_TOML", "Events", "Harness", "PipeEnd", "is_half_closeable", "run_now"]


def is_half_closeable(protocol: object) -> bool:
    return IHalfCloseableProtocol.providedBy(protocol)
