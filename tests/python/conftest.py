"""pytest setup for normkit's Python tests: torch (the float64 oracle) is imported once here, and
every output the module allocates is NaN-filled before its kernel runs, so an element a kernel
does not write fails the comparison. Run with /usr/bin/python3 -m pytest and the built module on
PYTHONPATH (build/python)."""

import os
import zlib

import numpy as np
import pytest
import torch

import normkit

torch.set_default_dtype(torch.float64)
torch.set_num_threads(1)  # the oracle's inputs are small; threads only add overhead
normkit._set_output_poison(True)


@pytest.fixture
def rng(request):
    """A generator seeded by the test's id: reproducible, and different for every case.
    NORMKIT_TEST_SEED=k draws another set of cases (the default is 0)."""
    salt = int(os.environ.get("NORMKIT_TEST_SEED", "0"))
    return np.random.default_rng([zlib.crc32(request.node.nodeid.encode()), salt])
