import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one thread is many times faster than several fighting over busy cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
