"""A 3-primary Redis Cluster of the test's own, on loopback ports (the tests here run on one Redis too)."""
from __future__ import annotations

import pytest

from app.embedded import EmbeddedCluster


@pytest.fixture
def cluster(tmp_path):
    c = EmbeddedCluster(tmp_path / "cluster").start()
    yield c
    c.stop()
