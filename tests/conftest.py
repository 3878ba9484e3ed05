import pytest

from cacheaug.testing import perturb_trainable, tiny_model


@pytest.fixture
def gemma3():
    return tiny_model("gemma3")


@pytest.fixture
def model():
    """A tiny Llama with a perturbed 3-latent coprocessor: what the serving tests decode with."""
    from cacheaug import CacheAugmentedLM, CoprocessorConfig

    m = CacheAugmentedLM(tiny_model("llama"), CoprocessorConfig(n_latents=3, n_ahead=4))
    perturb_trainable(m, scale=1.0)
    return m
