import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(20181231)


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
