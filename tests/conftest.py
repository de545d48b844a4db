import logging

import pytest
import torch

# transformers warns about tiny configs' token ids; keep test output readable.
logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def shared_data(name: str):
    """A file of the project's shared test data: `../shared/data/` beside the repository (as CI has it)."""
    from pathlib import Path

    return Path(__file__).resolve().parents[2] / "shared" / "data" / name
