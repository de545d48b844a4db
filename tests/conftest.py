import logging

import pytest
import torch

# transformers warns about tiny configs' token ids; keep test output readable.
logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
