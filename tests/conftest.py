import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # building presets must never need the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (gpu marker); no GPU on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="module")
def private_cache(tmp_path_factory):
    """Local tokenizers are cached in a private folder, not in the user's home."""
    old = os.environ.get("DISTZO2_CACHE")
    os.environ["DISTZO2_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        del os.environ["DISTZO2_CACHE"]
    else:
        os.environ["DISTZO2_CACHE"] = old
