import pytest

from training.data import load_dataset


@pytest.fixture(scope="session")
def ml100k(tmp_path_factory):
    """MovieLens-100K read from the RecBole wheel (cached in ./data across runs)."""
    return load_dataset("ml-100k", __import__("pathlib").Path("data"))
