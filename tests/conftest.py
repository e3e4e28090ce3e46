import gc
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.world import WorldPool  # noqa: E402

_pools: dict[int, WorldPool] = {}


def _pool(n: int) -> WorldPool:
    if n not in _pools:
        _pools[n] = WorldPool(n)
    return _pools[n]


@pytest.fixture(scope="session")
def world2():
    """Two gloo ranks shared by every multi-process test of the session."""
    return _pool(2)


@pytest.fixture(scope="session")
def world4():
    """Four gloo ranks shared by every multi-process test of the session."""
    return _pool(4)


def pytest_sessionfinish(session, exitstatus):
    for pool in _pools.values():
        pool.close()
    # What is left is teardown: its collections need not walk torch's and transformers' objects.
    gc.freeze()
