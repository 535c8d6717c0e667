"""One gloo pool of two ranks for all the integration tests (starting processes costs seconds)."""

from __future__ import annotations

import pytest

from tests.gloo_pool import GlooPool


@pytest.fixture(scope="session")
def gloo2():
    pool = GlooPool(2)
    yield pool
    pool.close()
