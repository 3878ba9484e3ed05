"""cacheaug: differentiable cache augmentation (arXiv 2412.17747) for Hugging Face causal LMs.

A frozen pretrained decoder gets a trainable coprocessor that reads its kv-cache and writes back a few
latent embeddings; the decoder itself is never changed.
"""

__version__ = "0.1.0"

from .base import load_base_model
from .checkpoint import fingerprint
from .config import CoprocessorConfig
from .controls import LoraDecoderLM, build_model
from .families import SUPPORTED_MODEL_TYPES
from .model import AugmentOutput, CacheAugmentedLM, CacheAugmentedOutput

__all__ = [
    "AugmentOutput",
    "CacheAugmentedLM",
    "CacheAugmentedOutput",
    "CoprocessorConfig",
    "LoraDecoderLM",
    "SUPPORTED_MODEL_TYPES",
    "build_model",
    "fingerprint",
    "load_base_model",
]
