"""One pool of two gloo ranks for every Hugging Face test module (starting one costs seconds)."""

from __future__ import annotations

import pytest

from tests.gloo_pool import GlooPool


@pytest.fixture(scope="session")
def hf_pool():
    pool = GlooPool(2)
    yield pool
    pool.close()
