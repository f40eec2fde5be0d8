"""Fixtures of the SOLO tests (plain helpers live in helpers.py)."""

import numpy as np
import os
import pytest
import torch

# Keep the suite predictable on 2 cores.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def rng():
    return np.random.default_rng(0)
