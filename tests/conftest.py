import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(20181231)


@pytest.fixture(autouse=True)
def _forget_known_calls():
    """Every test's first call of a kind takes the general path: a call another test made under
    its own monkeypatched schedule (a forced plan, a lowered threshold) must not be replayed in
    this one (``api._known_call``)."""
    from nbgn import api

    api._KNOWN_CALLS.clear()


def pytest_collection_modifyitems(config, items):
    import os

    # Slow tests first (a stable sort): pytest-xdist hands tests out as workers free up, so the
    # long ones (minutes of compiling in a child process) then run beside the short ones instead
    # of alone at the end, with the other worker idle.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    if os.environ.get("NBGN_BIGMEM") == "1":
        return
    skip = pytest.mark.skip(reason="needs >8 GiB of memory: opt in with NBGN_BIGMEM=1")
    for item in items:
        if "bigmem" in item.keywords:
            item.add_marker(skip)
