"""Fixtures of the integration tests that start services as their own processes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from swarmfly.natsserver import NatsServer
from tests.integration.test_swarm import Cluster


@pytest.fixture
def cluster(nats: NatsServer, prefix: str, tmp_path: Path) -> Iterator[Cluster]:
    """Scheduler, storage and peers as separate processes, stopped after the test."""
    with ExitStack() as stack:
        yield Cluster(nats, prefix, tmp_path, stack)
