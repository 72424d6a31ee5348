import matplotlib
import pytest
import torch

matplotlib.use("Agg")
# The test problems are small: one thread is as fast, and it does not collapse when the machine is shared
# (two OpenMP threads competing for two busy cores were measured 30x slower than one).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
