import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: on a 2-core machine, intra-op threads cost more than they save (measured on the
    kernel test files: 64 s with 2 threads, 17 s with 1). Use with ``pytest.mark.usefixtures``."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
