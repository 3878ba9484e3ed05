import pytest

from cacheaug.testing import tiny_model


@pytest.fixture
def gemma3():
    return tiny_model("gemma3")
