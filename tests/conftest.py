import pytest

from cacheaug.testing import perturb_trainable, tiny_corpus, tiny_model, tiny_tokenizer


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


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    """A tiny text folder and its tokenizer, with CACHEAUG_HOME (token files) under tmp_path: what the training and
    adaptation tests read."""
    monkeypatch.setenv("CACHEAUG_HOME", str(tmp_path / "home"))
    texts = tiny_corpus(tmp_path / "corpus", n_docs=80)
    return str(tmp_path / "corpus"), tiny_tokenizer(texts)
