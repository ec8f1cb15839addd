"""Fixtures for the end-to-end tests; load with ``pytest_plugins = ["tests.e2e_fixtures"]``.

Every process a fixture starts is stopped, by its PID, in the fixture's finaliser.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from tests.e2e_support import NAMES, BackendServer, Relay, TestCA


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"), NAMES)


@pytest.fixture(scope="session")
def backend(test_ca: TestCA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackendServer]:
    server = BackendServer(test_ca, tmp_path_factory.mktemp("backend-home"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def start_relay(tmp_path: Path) -> Iterator[Callable[..., Relay]]:
    """A factory: ``start_relay(routes, **relay_settings)`` -> a running :class:`Relay`."""
    started: list[Relay] = []

    def start(routes: Mapping[str, str], **relay: str) -> Relay:
        relay_process = Relay(tmp_path / f"relay{len(started)}", routes, **relay)
        started.append(relay_process)
        return relay_process

    try:
        yield start
    finally:
        for relay_process in started:
            relay_process.stop()


@pytest.fixture
def relay(backend: BackendServer, start_relay: Callable[..., Relay]) -> Relay:
    """A relay with a route to each backend name, default settings."""
    return start_relay({name: backend.backend(name) for name in NAMES})


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """HOME for client commands (curl, openssl): empty, per test."""
    path = tmp_path / "home"
    path.mkdir()
    return path
